"""units: discrete speech units of the corpus for downstream use (unit-to-speech vocoders,
ReVISE-style audio-visual resynthesis, speech-to-unit models); ``launch.py units`` does the same for
a handful of raw videos (``stages/units_command.py``).

What is computed: transformer layer L of a checkpoint (``units.checkpoint``, any ours/reference
pretraining or fine-tuning checkpoint; default: the final checkpoint of iteration
``units.iteration``, default the last) from ``units.modality`` input (av, audio, video), every
frame assigned to its nearest centroid of a k-means model, which is exactly one of:

- ``units.kmeans=PATH``: a given model (a pipeline ``kmeans.joblib`` or a reference sklearn one);
- ``units.kmeans_iteration=M``: iteration M's own (``iterM/kmeans/kmeans.joblib``); the
  checkpoint, layer and modality then default to what iteration M clustered (iteration M-1's final
  checkpoint, the schedule's layer, ``features.modality``), so the units of the train and valid
  rows are iteration M's labels;
- ``units.n_clusters=K``: trained here by the ``units_kmeans`` stage (``stages/units_kmeans.py``, one job) on that layer's
  features of a seeded sample of the train split (``units.kmeans_percent`` of its utterances, at
  most ``units.kmeans_max_frames`` frames) with the ``kmeans.*`` backend settings.

The corpus is read through the manifest's tsv rows (the frozen item list, cropped by the crop
stage). Shards: ``units.splits`` x ``units.nshard`` contiguous row ranges (as the labels stage),
each one job (GPU when it has one, batched; CPU otherwise) writing under ``units.out_dir``
(default ``WORKDIR/units``) ``shards/{split}_{rank}_{n}.{units,rle,jsonl}``; a rerun skips
complete shards. ``finalize`` concatenates them per split (formats: ``speechfeat/units.py``):

- ``{split}.units``: one line per tsv row, space-separated unit ids at 25 Hz (empty for a row
  whose files could not be read: the shard's stats and ``summary.json`` list it);
- ``{split}.rle``: the same, run-length deduplicated: ``ids<TAB>durations`` (frames);
- ``{split}.jsonl``: ``{"id", "audio", "hubert", "duration"}`` per readable row, the manifest
  form of speech-resynthesis's unit HiFi-GAN (``units.jsonl_key`` renames ``"hubert"``);
- ``dict.units.txt`` (``i 1`` for 0..K-1, a fairseq dictionary), ``summary.json`` (settings,
  layer, K, per split: utterances, failures, frames, clusters used, entropy).

The stage is off in ``--stage all`` unless ``units.enabled=true`` or one of the three k-means
settings is given (``units.enabled`` null = on exactly then); ``--stage units`` runs it on demand.
The settings are recorded in ``settings.json`` beside the outputs: a later launch with other
settings is refused (``--stage units --force`` replaces the units, ``units.out_dir`` keeps both).
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import numpy as np

from pipeline import atomic
from pipeline.errors import ConfigError, raise_if_infrastructure
from pipeline.fingerprint import classify, file_content
from pipeline.fingerprint import resolve as resolve_settings
from pipeline.stage import Shard, Stage, StageContext
from speechfeat.kmeans import assign, load_centroids, load_model
from speechfeat.shards import read_tsv, shard_range
from speechfeat.units import rle_line, units_line, vocoder_record
from stages.fairseq_run import CHECKPOINT_DIR, FINAL_CHECKPOINT
from stages.features import checkpoint_path as features_checkpoint, layer_features_of_rows
from stages.kmeans import FAST_KEYS, SKLEARN_KEYS
from stages.labels import usage_stats
from stages.schedule import iteration_spec

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
FORMATS = ("units", "rle", "jsonl")
SETTINGS = "settings.json"
KMEANS_MODEL = "kmeans.joblib"


def is_checkpoint(path) -> bool:
    """A checkpoint file, or a directory written by ``launch.py export``."""
    from avhubert import export  # deferred: the avhubert package imports fairseq

    return export.is_checkpoint(path)


# checkpoint, kmeans and the iterations they come from: resolved (stages.units.fingerprint_settings)
@classify(output=("checkpoint", "iteration", "layer", "modality", "kmeans", "kmeans_iteration", "n_clusters",
                  "kmeans_percent", "kmeans_max_frames", "kmeans_seed", "kmeans_split", "jsonl_key", "max_frames"),
          ignored={"enabled": "whether the stages take part in --stage all",
                   "splits": "which splits get units: each split's files depend only on the other settings "
                             "(a split added runs its own shards)",
                   "nshard": "how rows are grouped into jobs: the per-split files are the same",
                   "out_dir": "where the files go: a new place holds none, so they are made there "
                              "(the recorded settings are those of one place: Stage.output_place)",
                   "device": "where the model runs", "batch_frames": "how many frames go through the model at once",
                   "max_failure_fraction": "a check: the shard fails above it, what is written is the same",
                   "torch_threads": "how many threads compute"})
@dataclass
class Config:
    # None: on in --stage all exactly when a k-means source below is set; true/false forces it
    enabled: Optional[bool] = None
    checkpoint: Optional[str] = None  # any ours/reference pretraining or fine-tuned checkpoint
    iteration: Optional[int] = None  # without checkpoint: this iteration's final one (None = the last)
    layer: Optional[int] = None  # None = iteration M's layer with kmeans_iteration, else the model's last
    modality: Optional[str] = None  # av | audio | video; None = features.modality with kmeans_iteration, else av
    # the k-means model: exactly one of these three
    kmeans: Optional[str] = None  # a model file (pipeline kmeans.joblib or a reference sklearn model)
    kmeans_iteration: Optional[int] = None  # iteration M's own model (and its checkpoint/layer by default)
    n_clusters: Optional[int] = None  # K: trained here (units_kmeans stage) on this layer's features
    kmeans_percent: float = 0.1  # share of the split's utterances drawn for training (-1 = all)
    kmeans_max_frames: int = 500_000  # at most this many frames of them (memory: frames x dim x 4 B)
    kmeans_seed: int = 0
    kmeans_split: str = "train"
    splits: List[str] = field(default_factory=lambda: ["train", "valid", "test"])
    nshard: Optional[int] = None  # shards per split; None = features.nshard
    out_dir: Optional[str] = None  # None = WORKDIR/units
    jsonl_key: str = "hubert"  # key of the unit string in {split}.jsonl (speech-resynthesis reads "hubert")
    device: str = "auto"  # auto (cuda when available) | cpu | cuda | cuda:N
    max_frames: int = 2500  # longest piece of a clip in one forward (as features.max_frames)
    batch_frames: int = 0  # padded frames per forward; 0 = auto (batched on GPU only)
    max_failure_fraction: float = 0.01  # of a shard's utterances; above it the shard fails
    torch_threads: int = 0


# ------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Resolved:
    """What a units run computes, from ``cfg.units`` (and the schedule / features sections)."""

    checkpoint: Path
    checkpoint_iteration: Optional[int]  # the pretraining iteration it comes from; None: given
    layer: Optional[int]  # None = the model's last layer (known once it is loaded)
    modality: str
    kmeans_source: str  # "file" | "iteration" | "trained"
    kmeans_path: Path
    kmeans_iteration: Optional[int]
    n_clusters: Optional[int]
    out_dir: Path


def units_dir(ctx: StageContext) -> Path:
    configured = ctx.cfg.units.get("out_dir")
    return Path(str(configured)).expanduser().resolve() if configured else ctx.with_iteration(None).stage_dir("units")


def resolve(ctx: StageContext) -> Resolved:
    c, cfg = ctx.cfg.units, ctx.cfg
    sources = [k for k in ("kmeans", "kmeans_iteration", "n_clusters") if c.get(k) is not None]
    if len(sources) != 1:
        raise ConfigError("units: choose the k-means model with exactly one of units.kmeans=PATH, "
                          "units.kmeans_iteration=M (iteration M's own) or units.n_clusters=K (trained here)"
                          + (f"; got {', '.join('units.' + s for s in sources)}" if sources else ""))
    n_iter = int(cfg.get("iterations", 1) or 1)
    layer = c.get("layer")
    modality = c.get("modality")
    ckpt_iteration = None
    out = units_dir(ctx)
    if c.get("kmeans_iteration") is not None:
        m = int(c.kmeans_iteration)
        if not 1 <= m <= len(cfg.schedule.iterations):
            raise ConfigError(f"units.kmeans_iteration={m}: the schedule has iterations 1..{len(cfg.schedule.iterations)}")
        spec = iteration_spec(cfg, m)
        if spec.features != "layer":
            raise ConfigError(f"units.kmeans_iteration={m}: iteration {m} clusters {spec.features}, not layer features")
        if layer is not None and int(layer) != int(spec.layer):
            raise ConfigError(f"units.layer={layer} but iteration {m}'s k-means was trained on layer {spec.layer}")
        if c.get("iteration") is not None and int(c.iteration) != m - 1:
            raise ConfigError(f"units.iteration={c.iteration} but iteration {m}'s k-means was trained on iteration "
                              f"{m - 1}'s checkpoint (leave units.iteration unset, or set units.checkpoint)")
        layer = int(spec.layer)
        modality = modality or str(cfg.features.modality)
        kmeans_path = ctx.stage_dir("kmeans", iteration=m) / "kmeans.joblib"
        if c.get("checkpoint"):
            checkpoint = Path(str(c.checkpoint)).expanduser().resolve()
        else:
            checkpoint = features_checkpoint(ctx.with_iteration(m))
            ckpt_iteration = None if cfg.features.get("checkpoint") else m - 1
            if ckpt_iteration == 0:
                raise ConfigError(f"units.kmeans_iteration={m}: iteration {m} has no previous iteration's checkpoint")
        source, k = "iteration", None
    else:
        if c.get("checkpoint"):
            checkpoint = Path(str(c.checkpoint)).expanduser().resolve()
        else:
            ckpt_iteration = int(c.iteration) if c.get("iteration") is not None else n_iter
            if not 1 <= ckpt_iteration <= n_iter:
                raise ConfigError(f"units.iteration={ckpt_iteration}: this run has iterations 1..{n_iter}")
            checkpoint = _final_checkpoint(ctx, ckpt_iteration)
        if c.get("kmeans") is not None:
            source, kmeans_path, k = "file", Path(str(c.kmeans)).expanduser().resolve(), None
        else:
            source, kmeans_path, k = "trained", out / KMEANS_MODEL, int(c.n_clusters)
        modality = modality or "av"
    return Resolved(checkpoint, ckpt_iteration, None if layer is None else int(layer), str(modality), source,
                    kmeans_path, int(c.kmeans_iteration) if source == "iteration" else None, k, out)


def _final_checkpoint(ctx: StageContext, iteration: int) -> Path:
    return ctx.stage_dir("train", iteration=iteration) / CHECKPOINT_DIR / FINAL_CHECKPOINT


def shown_place(path: Path, workdir: Path) -> str:
    """A path as recorded in outputs: relative to the work dir when inside it (so the same run
    in another work dir records the same bytes), absolute otherwise."""
    try:
        return Path(path).resolve().relative_to(Path(workdir).resolve()).as_posix()
    except ValueError:
        return str(path)


def kmeans_settings(ctx: StageContext, r: Resolved) -> dict:
    """What a k-means model trained here depends on (recorded in it and checked before use)."""
    c = ctx.cfg.units
    return {"checkpoint": shown_place(r.checkpoint, ctx.workdir), "layer": r.layer, "modality": r.modality,
            "n_clusters": r.n_clusters, "percent": float(c.kmeans_percent), "max_frames": int(c.kmeans_max_frames),
            "seed": int(c.kmeans_seed), "split": str(c.kmeans_split), "backend": str(ctx.cfg.kmeans.backend)}


def settings(ctx: StageContext, r: Resolved) -> dict:
    out = {"checkpoint": shown_place(r.checkpoint, ctx.workdir), "layer": r.layer, "modality": r.modality,
           "kmeans": r.kmeans_source, "jsonl_key": str(ctx.cfg.units.jsonl_key)}
    if r.kmeans_source == "trained":
        out["kmeans_training"] = kmeans_settings(ctx, r)
    else:
        out["kmeans_model"] = shown_place(r.kmeans_path, ctx.workdir)
    return out


def fingerprint_settings(ctx: StageContext, r: Resolved, kmeans_only: bool = False) -> dict:
    """The units settings of a step's fingerprint (``Stage.settings``), resolved: what the
    checkpoint and k-means model are (a file from elsewhere with its content; one of this run's
    by its place: the step it comes from is among the inputs)."""
    def shown(path: Path) -> str:
        text = shown_place(path, ctx.workdir)
        return text if not Path(text).is_absolute() else f"{text} ({file_content(path)})"

    c = ctx.cfg.units
    out = {"units.checkpoint": shown(r.checkpoint), "units.layer": r.layer, "units.modality": r.modality}
    if kmeans_only:
        out.update({"units.n_clusters": r.n_clusters, "units.kmeans_percent": float(c.kmeans_percent),
                    "units.kmeans_max_frames": int(c.kmeans_max_frames), "units.kmeans_seed": int(c.kmeans_seed),
                    "units.kmeans_split": str(c.kmeans_split)})
        # the kmeans.* backend settings it trains with (K, sample and seed are the units' own)
        backend = resolve_settings(ctx.cfg, ["kmeans"])
        unused = {"n_clusters", "percent", "seed", "split",
                  *(FAST_KEYS if ctx.cfg.kmeans.backend == "sklearn" else SKLEARN_KEYS)}
        out.update({k: v for k, v in backend.items() if k.split(".", 1)[1] not in unused})
        return out
    # a model trained here is the units_kmeans step's output, among the inputs
    out["units.kmeans"] = "units_kmeans" if r.kmeans_source == "trained" else shown(r.kmeans_path)
    out.update({"units.jsonl_key": str(c.jsonl_key), "units.max_frames": int(c.max_frames)})
    return out


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _differences(old: dict, new: dict) -> str:
    old, new = _flat(old or {}), _flat(new)
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return "; ".join(f"{k}: {old.get(k)!r} there, {new.get(k)!r} now" for k in keys)


def check_settings(ctx: StageContext, r: Resolved) -> tuple:
    """Refuse to mix units of different settings in one output directory: lines for the user and
    the settings to record there (None: recorded already)."""
    path = r.out_dir / SETTINGS
    wanted = settings(ctx, r)
    if path.is_file():
        recorded = json.loads(path.read_text(encoding="utf-8"))
        if recorded == wanted:
            return [], None
        if not ctx.force:
            raise ConfigError(
                f"units: {r.out_dir} holds units made with other settings ({_differences(recorded, wanted)}): "
                "set units.out_dir=DIR to keep both, or replace them with `python launch.py "
                + ("--stage units_kmeans --force` then `--stage units --force`" if r.kmeans_source == "trained"
                   else "--stage units --force`") + " and these settings")
    return [f"units of layer {'last' if r.layer is None else r.layer} of {wanted['checkpoint']} "
            f"({r.modality}), k-means: {r.kmeans_source} -> {r.out_dir}"], wanted


def check_trained_kmeans(ctx: StageContext, r: Resolved) -> None:
    """A k-means model trained here must have been trained with the current settings."""
    recorded = load_model(r.kmeans_path).get("units_settings")
    wanted = kmeans_settings(ctx, r)
    if recorded != wanted:
        raise ConfigError(f"units: {r.kmeans_path} was trained with other settings ({_differences(recorded, wanted)}): "
                          "set units.out_dir=DIR to keep both, or retrain it with "
                          "`python launch.py --stage units_kmeans --force` and these settings")


def validate_units(ctx: StageContext) -> Resolved:
    c = ctx.cfg.units
    # relative paths are the launch directory's: made absolute here, before the config reaches
    # jobs that may start elsewhere
    for key in ("checkpoint", "kmeans", "out_dir"):
        if c.get(key):
            c[key] = str(Path(str(c[key])).expanduser().resolve())
    r = resolve(ctx)
    if r.modality not in ("av", "audio", "video"):
        raise ConfigError(f"units.modality={r.modality!r}: av, audio or video")
    if r.layer is not None and r.layer < 0:
        raise ConfigError(f"units.layer={r.layer}: a transformer layer number (0 = front-end)")
    if c.get("checkpoint") and not is_checkpoint(r.checkpoint):
        raise ConfigError(f"units.checkpoint={c.checkpoint}: file not found")
    if r.kmeans_source == "file" and not r.kmeans_path.is_file():
        raise ConfigError(f"units.kmeans={c.kmeans}: file not found")
    if r.n_clusters is not None and r.n_clusters < 2:
        raise ConfigError(f"units.n_clusters={r.n_clusters}: need at least 2 clusters")
    p = float(c.kmeans_percent)
    if not (p == -1 or 0 < p <= 1):
        raise ConfigError(f"units.kmeans_percent={c.kmeans_percent}: in (0, 1] or -1 (all utterances)")
    if int(c.kmeans_max_frames) < 1:
        raise ConfigError("units.kmeans_max_frames must be >= 1")
    for s in list(c.splits) + [c.kmeans_split]:
        if s not in ("train", "valid", "test"):
            raise ConfigError(f"units: split {s!r} is not train, valid or test")
    if not list(c.splits):
        raise ConfigError("units.splits is empty")
    if _nshard(ctx) < 1:
        raise ConfigError(f"units.nshard={_nshard(ctx)}: must be at least 1")
    if int(c.max_frames) < 1 or int(c.batch_frames) < 0:
        raise ConfigError("units.max_frames must be >= 1 and units.batch_frames >= 0")
    if not 0 <= float(c.max_failure_fraction) <= 1:
        raise ConfigError(f"units.max_failure_fraction={c.max_failure_fraction}: must be in [0, 1]")
    if not str(c.jsonl_key) or str(c.jsonl_key) in ("id", "audio", "duration"):
        raise ConfigError(f"units.jsonl_key={c.jsonl_key!r}: a name other than id, audio, duration")
    return r


def _nshard(ctx: StageContext) -> int:
    n = ctx.cfg.units.get("nshard")
    return int(n if n is not None else ctx.cfg.features.nshard)


def is_enabled(ctx: StageContext) -> bool:
    c = ctx.cfg.units
    if c.get("enabled") is not None:
        return bool(c.enabled)
    return any(c.get(k) is not None for k in ("kmeans", "kmeans_iteration", "n_clusters"))


def pretraining_dependencies(ctx: StageContext, r: Resolved) -> list:
    """The stages of this run the checkpoint and k-means come from. The engine resolves a
    per-iteration dependency of this once-only stage to the last iteration; an earlier
    iteration's file that already exists needs nothing more (a missing one: the last iteration,
    which comes after it, is incomplete too)."""
    n_iter = int(ctx.cfg.get("iterations", 1) or 1)
    deps = []
    if r.checkpoint_iteration is not None and (r.checkpoint_iteration == n_iter or not r.checkpoint.is_file()):
        deps.append("train")
    if r.kmeans_source == "iteration" and (r.kmeans_iteration == n_iter or not r.kmeans_path.is_file()):
        deps.append("kmeans")
    return deps


class UnitsStage(Stage):
    name = "units"
    depends_on = ("manifest", "train")
    after_iterations = True
    libraries = ("numpy", "torch", "fairseq|fairseq-fixed", "av")
    _to_record: Optional[tuple] = None  # (settings file, settings) that commit_plan writes

    def settings(self, ctx: StageContext) -> dict:
        return fingerprint_settings(ctx, resolve(ctx))

    def provenance_dirs(self, ctx: StageContext) -> list:
        return [units_dir(ctx)]

    def output_place(self, ctx: StageContext) -> str:
        return shown_place(units_dir(ctx), ctx.workdir)

    def dependencies(self, ctx: StageContext):
        r = resolve(ctx)
        return ["manifest"] + pretraining_dependencies(ctx, r) + (["units_kmeans"] if r.kmeans_source == "trained" else [])

    def enabled(self, ctx: StageContext) -> bool:
        return is_enabled(ctx)

    def validate(self, ctx: StageContext) -> None:
        validate_units(ctx)

    def prepare(self, ctx: StageContext, commit: bool) -> list:
        r = resolve(ctx)
        # the inputs exist now (prepare runs once the prerequisites are complete)
        if not is_checkpoint(r.checkpoint):
            raise ConfigError(f"units: checkpoint {r.checkpoint} not found")
        if not r.kmeans_path.is_file():
            hint = ("run `python launch.py --stage units_kmeans` first (or --stage all with units.n_clusters set)"
                    if r.kmeans_source == "trained" else "")
            raise ConfigError(f"units: k-means model {r.kmeans_path} not found" + (f": {hint}" if hint else ""))
        if r.kmeans_source == "trained":
            check_trained_kmeans(ctx, r)
        lines, wanted = check_settings(ctx, r)  # recorded (commit_plan) once everything else is right
        self._to_record = (r.out_dir / SETTINGS, wanted) if commit and wanted is not None else None
        return lines

    def commit_plan(self, ctx: StageContext) -> None:
        if self._to_record is not None:
            path, wanted = self._to_record
            atomic.write_json(path, wanted)
        self._to_record = None

    def shards(self, ctx: StageContext) -> list:
        n = _nshard(ctx)
        keys = [(split, rank) for split in ctx.cfg.units.splits for rank in range(n)]
        return [Shard(i, len(keys), f"{s}_{rank}_{n}", {"split": s, "rank": rank, "nshard": n})
                for i, (s, rank) in enumerate(keys)]

    def outputs(self, ctx: StageContext, shard: Shard) -> list:
        d = units_dir(ctx) / "shards"
        return [d / f"{shard.key}.{ext}" for ext in FORMATS]

    def run(self, ctx: StageContext, shard: Shard) -> dict:
        c = ctx.cfg.units
        r = resolve(ctx)
        tsv = ctx.with_iteration(None).stage_dir("manifest") / f"{shard.params['split']}.tsv"
        return units_of_shard(tsv, int(shard.params["rank"]), int(shard.params["nshard"]), self.outputs(ctx, shard),
                              r.checkpoint, r.layer, r.modality, r.kmeans_path, jsonl_key=str(c.jsonl_key),
                              device=str(c.device), max_frames=int(c.max_frames), batch_frames=int(c.batch_frames),
                              max_failure_fraction=float(c.max_failure_fraction), torch_threads=int(c.torch_threads))

    def final_outputs(self, ctx: StageContext) -> list:
        d = units_dir(ctx)
        return [d / f"{s}.{ext}" for s in ctx.cfg.units.splits for ext in FORMATS] + [d / "dict.units.txt",
                                                                                       d / "summary.json"]

    def finalize(self, ctx: StageContext, shard_stats: dict) -> dict:
        r = resolve(ctx)
        out = units_dir(ctx)
        k = len(load_centroids(r.kmeans_path))
        n = _nshard(ctx)
        layers = {s.get("layer") for s in shard_stats.values() if s.get("layer") is not None}
        summary = {"settings": settings(ctx, r), "layer": layers.pop() if len(layers) == 1 else sorted(layers),
                   "n_clusters": k, "frame_rate": 25, "splits": {}}
        for split in ctx.cfg.units.splits:
            _, rows = read_tsv(ctx.with_iteration(None).stage_dir("manifest") / f"{split}.tsv")
            keys = [f"{split}_{rank}_{n}" for rank in range(n)]
            for ext in FORMATS:
                parts = [out / "shards" / f"{key}.{ext}" for key in keys]
                lines = concatenate(parts, out / f"{split}.{ext}")
                if ext != "jsonl" and lines != len(rows):
                    raise ValueError(f"{out / f'{split}.{ext}'}: {lines} lines for the {len(rows)} rows of {split}.tsv")
            counts = np.zeros(k, dtype=np.int64)
            failures = []
            for key in keys:
                stats = shard_stats.get(key, {})
                if stats.get("counts"):
                    counts += np.asarray(stats["counts"], dtype=np.int64)
                failures += stats.get("failures", [])
            split_stats = usage_stats(counts)
            split_stats.update({"utterances": len(rows), "failed_utterances": len(failures),
                                "failures": failures[:20]})
            summary["splits"][split] = split_stats
        atomic.write_text(out / "dict.units.txt", "".join(f"{i} 1\n" for i in range(k)))
        atomic.write_json(out / "summary.json", summary)
        return summary


def concatenate(parts, target: Path) -> int:
    """Byte-copy ``parts`` in order into ``target`` (atomic); returns the number of lines."""
    n = 0
    with atomic.atomic_open(target, "wb") as dst:
        for part in parts:
            with open(part, "rb") as src:
                while True:
                    block = src.read(1 << 20)
                    if not block:
                        break
                    n += block.count(b"\n")
                    dst.write(block)
    return n


STAGE = UnitsStage()


# ------------------------------------------------------------------------------------- shard work
def audio_path(root: Path, rel: str) -> str:
    """Absolute path of a tsv row's wav (symlinks kept: the path a user's tree shows)."""
    return os.path.abspath(Path(root) / rel)


def units_of_shard(tsv, rank: int, nshard: int, outputs, checkpoint, layer: Optional[int], modality: str, kmeans_path,
                   jsonl_key: str = "hubert", device: str = "auto", max_frames: int = 2500, batch_frames: int = 0,
                   max_failure_fraction: float = 0.01, torch_threads: int = 0) -> dict:
    """Units of shard ``rank`` of ``nshard`` of a manifest tsv into ``outputs`` (.units, .rle,
    .jsonl paths, each written atomically)."""
    import torch

    from avhubert.extract import auto_batch_frames, load_layer_model, model_dim

    t0 = time.time()
    if torch_threads > 0:
        torch.set_num_threads(torch_threads)
    model, task_cfg, device, layer = load_layer_model(checkpoint, layer, device)
    centroids = load_centroids(kmeans_path)
    if centroids.shape[1] != model_dim(model):
        raise ValueError(f"{kmeans_path}: {centroids.shape[1]}-d centroids but layer {layer} of {checkpoint} "
                         f"gives {model_dim(model)}-d features")
    root, rows = read_tsv(tsv)
    a, b = shard_range(len(rows), rank, nshard)
    failures: list = []

    def failed(utt_id: str, reason: str) -> None:
        log.warning("%s: %s: %s", tsv, utt_id, reason)
        failures.append({"id": utt_id, "reason": reason})
        if len(failures) > max_failure_fraction * (b - a):
            raise RuntimeError(f"{tsv}: {len(failures)} of {b - a} utterances of this shard failed "
                               f"(units.max_failure_fraction={max_failure_fraction}); first: "
                               f"{failures[0]['id']}: {failures[0]['reason']}")

    counts = np.zeros(len(centroids), dtype=np.int64)
    frames = 0
    paths = dict(zip(FORMATS, outputs))
    with atomic.atomic_open(paths["units"], "w", encoding="utf-8") as f_units, \
            atomic.atomic_open(paths["rle"], "w", encoding="utf-8") as f_rle, \
            atomic.atomic_open(paths["jsonl"], "w", encoding="utf-8") as f_jsonl:
        for row, feats in layer_features_of_rows(model, task_cfg, root, rows[a:b], layer, modality, max_frames,
                                                 batch_frames or auto_batch_frames(device), failed,
                                                 [Path(paths["units"]).parent]):
            if feats is None:
                f_units.write("\n")
                f_rle.write("\n")
                continue
            units = assign(feats, centroids)
            counts += np.bincount(units, minlength=len(centroids))
            frames += len(units)
            f_units.write(units_line(units) + "\n")
            f_rle.write(rle_line(units) + "\n")
            f_jsonl.write(vocoder_record(row.id, audio_path(root, row.audio), units,
                                         row.n_audio_samples / SAMPLE_RATE, jsonl_key) + "\n")
    return {"layer": layer, "modality": modality, "device": device, "utterances": b - a, "frames": frames,
            "n_clusters": int(len(centroids)), "clusters_used": int((counts > 0).sum()), "counts": counts.tolist(),
            "failures": failures, "seconds": round(time.time() - t0, 2)}
