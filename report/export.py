"""``launch.py export WORKDIR --out DIR``: a run's model as a self-contained directory to share.

    DIR/encoder.safetensors, encoder.json   the last pretraining iteration's encoder (avhubert/export.py)
    DIR/seq2seq.safetensors, seq2seq.json,  the fine-tuned model, when the run fine-tuned one
        dict.wrd.txt, spm.model
    DIR/iterations/iterN/kmeans.npy         every iteration's k-means centroids (K, D) float32
    DIR/iterations/iterN/dict.km.txt        and its label dictionary (the targets iteration N trained on)
    DIR/MODEL_CARD.md                       what made it, written from the run's records
    DIR/provenance.json                     the same as data: settings, sources with sha256, versions

``avhubert.load(DIR)`` loads the encoder (features, units); ``launch.py units ... --checkpoint DIR``
and ``launch.py infer VIDEO --checkpoint DIR`` take the directory as they take a checkpoint. The
same run gives the same bytes (no times, hosts or absolute paths in any file).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from avhubert import export as exported

LICENCE_NOTE = ("The published AV-HuBERT weights (Meta) are under the AV-HuBERT licence: non-commercial research "
                "use only. A model fine-tuned or pretrained from them is bound by it too.")
# settings that name where things are, not what was computed: left out of the settings digest
LOCATION_KEYS = ("workdir", "corpus")


class ExportFailed(RuntimeError):
    pass


def _json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _config(workdir: Path) -> dict:
    from omegaconf import OmegaConf

    path = workdir / ".pipeline" / "config.yaml"
    if not path.is_file():
        raise ExportFailed(f"{workdir}: no .pipeline/config.yaml: not a work dir of this pipeline")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=False)


def settings_digest(config: dict) -> str:
    kept = {k: v for k, v in config.items() if k not in LOCATION_KEYS}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def project_version() -> str:
    try:
        from importlib.metadata import version

        return version("avhubert-pipeline")
    except Exception:  # not installed as a package: the source tree's commit
        root = Path(__file__).resolve().parents[1]
        try:
            out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                                 text=True, timeout=10)
            return f"git {out.stdout.strip()}" if out.returncode == 0 and out.stdout.strip() else "unknown"
        except (OSError, subprocess.SubprocessError):
            return "unknown"


def versions() -> dict:
    import torch

    out = {"avhubert-pipeline": project_version(), "python": platform.python_version(), "torch": torch.__version__,
           "numpy": np.__version__}
    try:
        import fairseq

        out["fairseq"] = fairseq.__version__
    except ImportError:
        pass
    return out


def _iterations(workdir: Path) -> list[int]:
    found = []
    for p in workdir.glob("iter*"):
        if p.name[4:].isdigit() and p.is_dir():
            found.append(int(p.name[4:]))
    return sorted(found)


def _final_checkpoint(workdir: Path, iteration: int) -> Path:
    return workdir / f"iter{iteration}" / "train" / "checkpoints" / "checkpoint_final.pt"


def _training_figures(state: dict) -> dict:
    """Updates and the last logged train/valid losses a fairseq checkpoint carries."""
    out = {}
    history = state.get("optimizer_history") or []
    if history:
        out["updates"] = int(history[-1].get("num_updates", 0))
    extra = state.get("extra_state") or {}
    for split, meters in (extra.get("metrics") or {}).items():
        if split not in ("train", "valid"):
            continue
        for _, name, _, value in meters:
            if name == "loss" and value.get("count"):
                out[f"{split}_loss"] = round(float(value["sum"]) / float(value["count"]), 3)
    if extra.get("val_loss") is not None:
        out["valid_loss"] = round(float(extra["val_loss"]), 3)
    return out


def _digest(path: Path) -> str:
    return exported.file_digest(path)


def _load_state(path: Path) -> dict:
    from avhubert.checkpoint import load_checkpoint_to_cpu
    from avhubert.extract import ensure_plugin_registered

    ensure_plugin_registered()
    return load_checkpoint_to_cpu(str(path))


def export_run(workdir: Path, out: Path, finetuned: Optional[bool] = None) -> dict:
    """Write the export of ``workdir`` into ``out`` (created; must be empty or absent). Returns
    the provenance record written. ``finetuned``: include the fine-tuned model (None: when the
    run has one)."""
    workdir = Path(workdir).resolve()
    config = _config(workdir)
    iterations = [i for i in _iterations(workdir) if _final_checkpoint(workdir, i).is_file()]
    if not iterations:
        raise ExportFailed(f"{workdir}: no pretraining iteration has finished (no iterN/train/checkpoints/"
                           "checkpoint_final.pt): nothing to export yet")
    ft_dir = workdir / "finetune" / "checkpoints"
    # the model the finetune stage kept (the averaged one when it decoded valid better)
    kept = Path(str((_json(workdir / "finetune" / "results.json") or {}).get("checkpoint") or "checkpoint_final.pt"))
    ft_checkpoint = ft_dir / kept.name
    if finetuned is None:
        finetuned = ft_checkpoint.is_file()
    if finetuned and not ft_checkpoint.is_file():
        raise ExportFailed(f"{ft_checkpoint}: no fine-tuned model in this run (export without --finetuned)")
    if out.exists() and any(out.iterdir()):
        raise ExportFailed(f"{out}: exists and is not empty; export into a new directory")
    out.mkdir(parents=True, exist_ok=True)

    last = iterations[-1]
    pre_checkpoint = _final_checkpoint(workdir, last)
    pre_state = _load_state(pre_checkpoint)
    encoder = exported.export_encoder(pre_state, str(pre_checkpoint), out)
    sources = {exported.ENCODER_WEIGHTS: {"from": pre_checkpoint.relative_to(workdir).as_posix(),
                                          "sha256": _digest(pre_checkpoint)}}
    rows = []
    for it in iterations:
        rows.append(_export_iteration(workdir, it, out, _load_state(_final_checkpoint(workdir, it))
                                      if it != last else pre_state))
    results = None
    if finetuned:
        manifest = workdir / "manifest"
        ms = _json(manifest / "summary.json") or {}
        spm = manifest / ms["spm_model"] if ms.get("spm_model") else None
        exported.export_seq2seq(_load_state(ft_checkpoint), str(ft_checkpoint), out, manifest / "dict.wrd.txt",
                                spm if spm is not None and spm.is_file() else None)
        sources[exported.SEQ2SEQ_WEIGHTS] = {"from": ft_checkpoint.relative_to(workdir).as_posix(),
                                             "sha256": _digest(ft_checkpoint)}
        if (ft_dir / "decoding.json").is_file():  # the decoding setting chosen on valid: infer's default
            shutil.copyfile(ft_dir / "decoding.json", out / "decoding.json")
        results = _json(workdir / "finetune" / "results.json")
    started_from = {k: config.get(k, {}).get("pretrained_checkpoint") for k in ("train", "finetune")
                    if isinstance(config.get(k), dict) and config[k].get("pretrained_checkpoint")}
    files = {p.relative_to(out).as_posix(): _digest(p) for p in sorted(out.rglob("*")) if p.is_file()}
    provenance = {"format": exported.FORMAT, "format_version": exported.FORMAT_VERSION,
                  "run": workdir.name, "settings_digest": settings_digest(config),
                  "settings": {k: v for k, v in config.items() if k not in LOCATION_KEYS},
                  "sources": sources, "files": files, "versions": versions(), "iterations": rows,
                  "encoder": {k: encoder[k] for k in ("layers", "dim")}, "started_from": started_from,
                  "corpus": _corpus(workdir)}
    (out / "provenance.json").write_text(json.dumps(provenance, indent=1, sort_keys=True, default=str) + "\n")
    (out / "MODEL_CARD.md").write_text(model_card(provenance, encoder, results, finetuned))
    return provenance


def _export_iteration(workdir: Path, it: int, out: Path, state: dict) -> dict:
    from avhubert.api import kmeans_centroids

    row = {"iteration": it, **_training_figures(state)}
    src = workdir / f"iter{it}"
    target = out / "iterations" / f"iter{it}"
    target.mkdir(parents=True, exist_ok=True)
    km = src / "kmeans" / "kmeans.joblib"
    if km.is_file():
        centroids = kmeans_centroids(km)
        np.save(target / "kmeans.npy", centroids, allow_pickle=False)
        row["n_clusters"] = int(centroids.shape[0])
    labels = _json(src / "labels" / "report.json") or {}
    row.update({k: labels.get(k) for k in ("features", "layer") if k in labels})
    if (src / "labels" / "dict.km.txt").is_file():
        shutil.copyfile(src / "labels" / "dict.km.txt", target / "dict.km.txt")
    return row


def _corpus(workdir: Path) -> dict:
    ms = _json(workdir / "manifest" / "summary.json") or {}
    crop = _json(workdir / "crop" / "summary.json") or {}
    fps = 25.0
    return {"items": crop.get("items"), "cropped": crop.get("ok"), "failed": crop.get("failed"),
            "splits": {s: {"utterances": n, "hours": round(ms.get("frames", {}).get(s, 0) / fps / 3600, 4)}
                       for s, n in sorted((ms.get("counts") or {}).items())}}


def model_card(prov: dict, encoder: dict, results: Optional[dict], finetuned: bool) -> str:
    corpus, rows = prov["corpus"], prov["iterations"]
    last = rows[-1]["iteration"]
    lines = [f"# AV-HuBERT model of the run `{prov['run']}`", "",
             f"An AV-HuBERT encoder ({encoder['layers']} transformer layers, {encoder['dim']}-d features) pretrained "
             f"for {len(rows)} iteration(s) by avhubert-pipeline ({prov['versions']['avhubert-pipeline']})"
             + (", then fine-tuned for speech recognition (sequence-to-sequence)." if finetuned else "."), "",
             "## Use", "", "```python", "import avhubert", "", 'model = avhubert.load("THIS_DIR")',
             'feats = model.extract(video="clip.mp4", layer=%d)   # (T, %d) float32 at 25 Hz'
             % (rows[-1].get("layer") or encoder["layers"], encoder["dim"]),
             f'units = model.units(video="clip.mp4", layer=L, kmeans="THIS_DIR/iterations/iter{last}/kmeans.npy")',
             "```", "",
             "`python launch.py units VIDEO... --checkpoint THIS_DIR ...`"
             + (" and `python launch.py infer VIDEO --checkpoint THIS_DIR`" if finetuned else "")
             + " take this directory as a checkpoint. The weights are safetensors and the configs JSON: loading runs "
             "no pickled code.", "", "## Data", ""]
    splits = corpus.get("splits") or {}
    lines += [f"- corpus: {corpus.get('items')} items listed, {corpus.get('cropped')} cropped, "
              f"{corpus.get('failed')} failed (mouth ROI 96x96 at 25 fps, 16 kHz audio)"]
    lines += [f"- {s}: {v['utterances']} utterances, {v['hours']:.4g} h" for s, v in splits.items()]
    lines += ["", "## Pretraining iterations", "",
              "| iteration | targets from | layer | K | updates | train loss | valid loss |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append("| {} | {} | {} | {} | {} | {} | {} |".format(
            r["iteration"], r.get("features", "?"), r.get("layer") if r.get("layer") is not None else "-",
            r.get("n_clusters", "?"), r.get("updates", "?"), r.get("train_loss", "-"), r.get("valid_loss", "-")))
    if finetuned:
        lines += ["", "## Fine-tuning", ""]
        if results:
            gen = results.get("generation") or {}
            grid = results.get("decode_grid") or []
            avg = results.get("averaging")
            lines += [f"Decoded with beam {gen.get('beam')}, length penalty {gen.get('lenpen')}"
                      + (f", the lowest valid WER of {len(grid)} settings" if len(grid) > 1 else "")
                      + (f"; the {avg['kept']} model of the last {len(avg['checkpoints'])} checkpoints averaged or "
                         f"not (valid WER {avg['valid_wer']})" if avg else "")
                      + f" ({results.get('num_updates')} updates, modalities {results.get('modalities')}).", "",
                      "| split | WER % | utterances | reference words |", "|---|---|---|---|"]
            for split, r in sorted((results.get("splits") or {}).items()):
                wer = r.get("wer")
                lines.append(f"| {split} | {wer:.2f} | {r.get('utterances')} | {r.get('ref_words')} |"
                             if isinstance(wer, (int, float)) else f"| {split} | - | - | - |")
        else:
            lines.append("No results.json in the run: the fine-tuned model was not evaluated.")
    lines += ["", "## Settings and provenance", "",
              f"- settings digest `{prov['settings_digest']}` (the whole settings are in provenance.json, with the "
              "sha256 of every file here and of the checkpoints they came from)",
              "- versions: " + ", ".join(f"{k} {v}" for k, v in sorted(prov["versions"].items()))]
    if prov.get("started_from"):
        lines += [f"- started from: " + ", ".join(f"{k}: `{Path(str(v)).name}`" for k, v in prov["started_from"].items())]
    lines += ["", "## Licence", ""]
    if prov.get("started_from"):
        lines.append(f"This model was initialised from an existing checkpoint. {LICENCE_NOTE}")
    else:
        lines.append("Pretrained from scratch on the corpus above: the licence is that of the corpus and of "
                     f"whoever shares it. ({LICENCE_NOTE})")
    return "\n".join(lines) + "\n"


def main(argv: list) -> int:
    p = argparse.ArgumentParser(prog="launch.py export",
                                description="Write a run's model as a self-contained directory: safetensors weights, "
                                            "JSON configs, k-means models and dictionaries, MODEL_CARD.md.")
    p.add_argument("workdir")
    p.add_argument("--out", required=True, help="the directory to write (new or empty)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--finetuned", dest="finetuned", action="store_true", default=None,
                   help="include the fine-tuned model (default: when the run has one)")
    g.add_argument("--no-finetuned", dest="finetuned", action="store_false")
    a = p.parse_args(argv)
    workdir = Path(os.path.expanduser(a.workdir))
    if not workdir.is_dir():
        print(f"error: {workdir}: no such work dir", file=sys.stderr)
        return 1
    try:
        prov = export_run(workdir, Path(os.path.expanduser(a.out)).resolve(), a.finetuned)
    except (ExportFailed, exported.ExportError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    out = Path(a.out)
    print(f"exported {workdir} to {out}: encoder of iteration {prov['iterations'][-1]['iteration']} "
          f"({prov['encoder']['layers']} layers)" + (", fine-tuned model" if exported.SEQ2SEQ_WEIGHTS in prov["sources"]
                                                     else "")
          + f", {len(prov['iterations'])} k-means model(s); see {out / 'MODEL_CARD.md'}")
    return 0
