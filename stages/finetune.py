"""finetune: sequence-to-sequence fine-tuning of the pretrained AV-HuBERT, then beam-search
decoding of the valid and test splits and their word error rates.

Runs once, after the last pretraining iteration. Input: the last iteration's
``iter{N}/train/checkpoints/checkpoint_final.pt`` (N = ``iterations``), or
``finetune.pretrained_checkpoint`` (any av_hubert pretraining checkpoint, ours or one written by the
reference code, e.g. a published one; published AV-HuBERT weights are under a non-commercial
research licence, which a model fine-tuned from them inherits). Targets: the manifest stage's
``{split}.wrd`` transcripts, as pieces of its sentencepiece model (``dict.wrd.txt``).

Model and training: ``avhubert/hubert_asr.py`` (``av_hubert_seq2seq``: the pretrained encoder and a
transformer decoder), fairseq's label-smoothed cross-entropy, the encoder frozen for the first
``model.freeze_finetune_updates`` updates, input streams from ``finetune.modalities``
(``video`` = lip reading, ``audio``, ``av``; a missing stream is fed as zeros, as in pretraining's
modality dropout). Base configs: ``avhubert/conf/finetune/{tiny,base,large}.yaml``.

Like the train stage, one shard = one submitit job of ``nodes x tasks_per_node`` tasks, ``run`` is
called in every task (one fairseq rank each) and a requeued or relaunched job resumes from
``checkpoints/checkpoint_last.pt``. Rank 0 then copies it to ``checkpoint_final.pt`` (atomic), next
to a copy of the sentencepiece model (so the checkpoint directory is self-contained for
``launch.py infer``), decodes valid and test with beam search and writes ``results.json``:

    {"checkpoint": ..., "pretrained": ..., "modalities": [...], "num_updates": ...,
     "generation": {"beam": ..., ...},
     "splits": {"valid": {"wer": 12.5, "errors": 2, "ref_words": 16, "utterances": 2,
                          "hypotheses": [{"id": ..., "ref": ..., "hyp": ...}, ...]},
                "test": {...}}}

(``wer`` in percent; null for a split without reference words.)

Under noise (``finetune.noise.eval_snrs``, e.g. ``[-5, 0, 5]``): rank 0 then decodes each split of
``eval_splits`` once per modality of ``eval_modalities`` (audio, av, video: the fine-tuned model
with the other stream zeroed) clean and for every noise category x SNR, the noise clip and its
offset drawn per utterance from ``eval_seed`` (the same noisy input for every modality), and adds::

    "noise": {"dir": ..., "seed": 0, "snrs": [-5, 0, 5], "categories": [...], "modalities": [...],
              "wer": {"test": {"av": {"clean": 8.1, "babble": {"-5": 30.2, "0": 15.0, "5": 10.3}, ...},
                               "audio": {...}}},
              "conditions": [{"split", "modalities", "category", "snr", "wer", "errors", "ref_words",
                              "utterances"}, ...], "notes": [...]}

Each condition's hypotheses are in ``finetune/noise_eval/<split>/<modality>/<category>_<snr>.json``
(a requeued job reuses the conditions already decoded with the same checkpoint and settings), and
the table in ``noise_eval/done-<digest of the evaluation settings>.json``, a declared output: asking
a finished run for another evaluation reruns the shard, which only decodes.
Noise does not reach the video stream: a video-only model is decoded clean only.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from omegaconf import OmegaConf

from pipeline import atomic
from pipeline.config import resources_for
from pipeline.errors import ConfigError
from pipeline.fingerprint import classify, file_identity
from pipeline.stage import Shard, Stage, StageContext
from stages import estimates
from stages.fairseq_run import (CHECKPOINT_DIR, FINAL_CHECKPOINT, LAST_CHECKPOINT, RUN_OWNED_KEYS, DistributedEnv,
                                checkpoint_updates, close_fairseq_tensorboard_writers, discard_previous_training,
                                distributed_env, hydra_value,
                                override_key, resume_point, run_overrides, train_device, update_freq_for)
from stages.manifest import spm_model_path
from stages.noise_use import (NOISE_TASK_KEYS, FinetuneNoise, inert_noise_settings, noise_categories_made,
                              task_overrides as noise_overrides, use_dir, uses_noise_stage, validate_use)

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
FINETUNE_CONFIG_DIR = REPO_ROOT / "avhubert" / "conf" / "finetune"

RESULTS = "results.json"
NOISE_EVAL_DIR = "noise_eval"
DECODE_SPLITS = ("valid", "test")
AVERAGED_CHECKPOINT = "checkpoint_averaged.pt"
DECODING = "decoding.json"  # beside the checkpoints: the setting chosen on valid (launch.py infer reads it)

STAGE_OWNED_KEYS = (
    "task.data",
    "task.label_dir",
    "task.labels",
    "task.tokenizer_bpe_model",
    "task.modalities",
    "model.w2v_path",
    "model.w2v_args",
    *NOISE_TASK_KEYS,  # from finetune.noise
    *RUN_OWNED_KEYS,
)


# the settings tried on valid decide the one test is decoded with
@classify(output=("beam", "lenpen"))
@dataclass
class DecodeGrid:
    # valid is decoded with every beam x lenpen of these lists and with finetune.beam / lenpen;
    # the lowest valid WER picks the setting test (and launch.py infer) decode with. An empty list
    # means finetune.beam (or lenpen) alone; both empty: no tuning, one setting. The default holds
    # the reference's setting (beam 50, lenpen 1) and the maintainers' advice (beam 20).
    beam: List[int] = field(default_factory=lambda: [20, 50])
    lenpen: List[float] = field(default_factory=lambda: [0.0, 1.0])


@classify(output=("model_config", "pretrained_checkpoint", "modalities", "max_update", "freeze_finetune_updates",
                  "overrides", "beam", "max_len_a", "max_len_b", "lenpen", "noise", "update_freq",
                  "decode_grid", "average_last"),
          ignored={"enabled": "whether the stage takes part in --stage all",
                   "decode_max_tokens": "how many frames one decoding batch takes", "master_port": "where the ranks meet"})
@dataclass
class Config:
    # Run fine-tuning as part of the pipeline. It needs transcripts (the manifest's .wrd files):
    # None = on, except for the vox2 layout (VoxCeleb2 has no transcripts).
    enabled: Optional[bool] = None
    # Base fairseq config: a name in avhubert/conf/finetune/ ("base", "large", "tiny") or a path.
    model_config: str = "base"
    # Pretrained checkpoint; None = the last pretraining iteration's checkpoint_final.pt.
    pretrained_checkpoint: Optional[str] = None
    # Input streams: "video" (lip reading, the paper's main setting), "audio" or "av".
    modalities: str = "video"
    # Updates; None = the base config's optimization.max_update.
    max_update: Optional[int] = None
    # Encoder frozen for this many updates; None = the base config's model.freeze_finetune_updates.
    freeze_finetune_updates: Optional[int] = None
    # Extra fairseq key=value overrides (hydra syntax), e.g. "model.decoder_layers=9".
    overrides: List[str] = field(default_factory=list)
    # Decoding of valid/test (the reference's settings: beam 50, max length = number of frames).
    beam: int = 50
    max_len_a: float = 1.0
    max_len_b: int = 0
    lenpen: float = 1.0
    decode_max_tokens: int = 2000  # frames per decoding batch
    decode_grid: DecodeGrid = field(default_factory=DecodeGrid)
    # 0 = off; N >= 2: also average the last N saved checkpoints (avhubert/averaging.py, fairseq's
    # average_checkpoints semantics), decode valid with both, keep the better for test and infer
    average_last: int = 0
    # Batches each rank accumulates per update; None = the recipe's batch on this job's ranks
    # (as train.update_freq, from the base config's distributed_world_size and update_freq).
    update_freq: Optional[int] = None
    # Rendezvous port of rank 0; None = derived from the job id (stable across requeues).
    master_port: Optional[int] = None
    # Noise in fine-tuning (prob, snr, categories, dir) and decoding under noise (eval_*): stages/noise.py.
    noise: FinetuneNoise = field(default_factory=FinetuneNoise)


def base_config_path(cfg) -> Path:
    name = str(cfg.finetune.model_config)
    if name.endswith((".yaml", ".yml")) or os.sep in name:
        return Path(name).expanduser().resolve()
    return FINETUNE_CONFIG_DIR / f"{name}.yaml"


def _base_value(cfg, key: str):
    path = base_config_path(cfg)
    if not path.is_file():
        return None
    return OmegaConf.select(OmegaConf.load(path), key, default=None, throw_on_missing=False)


def max_update(cfg) -> int:
    value = cfg.finetune.max_update
    if value is None:
        value = _base_value(cfg, "optimization.max_update")
    try:
        value = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"finetune.max_update: {value!r} is not an integer (and "
                          f"{base_config_path(cfg)} sets no optimization.max_update)") from None
    if value <= 0:
        raise ConfigError(f"finetune.max_update must be positive, got {value}")
    return value


def pretrained_checkpoint(ctx: StageContext) -> Path:
    """The checkpoint fine-tuning starts from."""
    configured = ctx.cfg.finetune.get("pretrained_checkpoint")
    if configured:
        return Path(str(configured)).expanduser().resolve()
    n = int(ctx.cfg.get("iterations", 0) or 0)
    if n < 1:
        raise ConfigError("finetune needs finetune.pretrained_checkpoint or iterations >= 1 "
                          "(it reads the last pretraining iteration's checkpoint)")
    return ctx.stage_dir("train", iteration=n) / CHECKPOINT_DIR / FINAL_CHECKPOINT


def manifest_dir(ctx: StageContext) -> Path:
    return ctx.with_iteration(None).stage_dir("manifest")


def spm_model(ctx: StageContext) -> Path:

    summary = manifest_dir(ctx) / "summary.json"
    if not summary.is_file():
        raise FileNotFoundError(f"{summary}: the manifest stage has not run")
    path = spm_model_path(ctx.with_iteration(None))
    if path is None or not Path(path).is_file():
        raise RuntimeError(f"{manifest_dir(ctx)}: no sentencepiece model: the corpus has no transcripts, "
                           "so there is nothing to fine-tune on (set finetune.enabled=false)")
    return Path(path)


def fairseq_overrides(ctx: StageContext, dist=None, device: str = "cpu",
                      n_visible_gpus: Optional[int] = None) -> List[str]:
    """Hydra overrides turning the base fine-tuning config into this run's config."""
    from avhubert.s2s_decode import modality_list

    cfg = ctx.cfg
    dist = dist or DistributedEnv()
    stage_dir = ctx.with_iteration(None).stage_dir("finetune")
    manifest = manifest_dir(ctx)
    streams = modality_list(str(cfg.finetune.modalities))
    overrides = [
        f"task.data={hydra_value(manifest)}",
        f"task.label_dir={hydra_value(manifest)}",
        "task.labels=[wrd]",
        f"task.tokenizer_bpe_model={hydra_value(spm_model(ctx))}",
        f"task.modalities=[{','.join(streams)}]",
        f"model.w2v_path={hydra_value(pretrained_checkpoint(ctx))}",
    ]
    overrides += noise_overrides(ctx, cfg.finetune.noise, hydra_value)
    overrides += run_overrides(stage_dir, max_update(cfg), dist, device, n_visible_gpus,
                               finetune_update_freq(ctx, dist.world_size).update_freq)
    if cfg.finetune.get("freeze_finetune_updates") is not None:
        overrides.append(f"model.freeze_finetune_updates={int(cfg.finetune.freeze_finetune_updates)}")
    n_average = int(cfg.finetune.get("average_last", 0) or 0)
    keep = _base_value(cfg, "checkpoint.keep_interval_updates")
    if n_average >= 2 and keep is not None and 0 < int(keep) < n_average:
        # the base configs keep one update checkpoint (as the reference's): averaging needs N
        overrides.append(f"checkpoint.keep_interval_updates={n_average}")
    return overrides + [str(o) for o in (cfg.finetune.overrides or [])]


def finetune_update_freq(ctx: StageContext, ranks: int):
    """The update_freq fine-tuning runs with on ``ranks`` ranks (``fairseq_run.update_freq_for``)."""
    return update_freq_for(base_config_path(ctx.cfg), ranks, ctx.cfg.finetune.get("update_freq"))


def decode_and_score(checkpoint: Path, modalities, beam: int, max_len_a: float, max_len_b: int,
                     lenpen: float, splits=DECODE_SPLITS, data_dir: Optional[Path] = None,
                     max_tokens: int = 2000, device: str = "cpu") -> dict:
    """Beam-search decode ``splits`` of the manifest with a fine-tuned checkpoint; WER per split."""
    from avhubert.s2s_decode import Decoder

    decoder = Decoder(checkpoint, modalities, beam=beam, max_len_a=max_len_a, max_len_b=max_len_b,
                      lenpen=lenpen, data_dir=data_dir, max_tokens=max_tokens, device=device)
    return score_splits(decoder, splits)


def score_splits(decoder, splits=DECODE_SPLITS) -> dict:
    out = {}
    for split in splits:
        out[split] = decoder.score(split)
        log.info("%s: WER %s over %d utterances", split, out[split]["wer"], out[split]["utterances"])
    return out


def decode_settings(f) -> list[tuple[int, float]]:
    """The (beam, lenpen) cells valid is decoded with: finetune.beam/lenpen first, then the grid."""
    beams = [int(b) for b in f.decode_grid.beam] or [int(f.beam)]
    lenpens = [float(x) for x in f.decode_grid.lenpen] or [float(f.lenpen)]
    cells = [(int(f.beam), float(f.lenpen))]
    for b in beams:
        for lp in lenpens:
            if (b, lp) not in cells:
                cells.append((b, lp))
    return cells


def tune_decoding(decoder, cells: list) -> tuple:
    """Decode valid with every (beam, lenpen) cell; returns (chosen cell, the grid rows, valid's
    scores with the chosen cell). Lowest WER wins; ties go to the earlier cell (finetune.beam /
    lenpen first, then the grid in order), so the choice never depends on timing."""
    rows, best = [], None
    for beam, lenpen in cells:
        decoder.set_generation(beam=beam, lenpen=lenpen)
        scores = decoder.score("valid")
        rows.append({"beam": beam, "lenpen": lenpen,
                     **{k: scores[k] for k in ("wer", "errors", "ref_words", "utterances")}})
        key = float("inf") if scores["wer"] is None else scores["wer"]
        if best is None or key < best[0]:
            best = (key, (beam, lenpen), scores)
        log.info("valid with beam %d, lenpen %g: WER %s", beam, lenpen, scores["wer"])
    decoder.set_generation(beam=best[1][0], lenpen=best[1][1])
    return best[1], rows, best[2]


def average_last(ctx: StageContext, ckpt_dir: Path, final: Path, end_updates: int) -> dict:
    """Write ``checkpoint_averaged.pt`` (the last ``finetune.average_last`` checkpoints averaged);
    returns what was averaged, with a note when fewer were saved than asked."""
    import torch

    from avhubert.averaging import average_checkpoints, last_checkpoints
    from avhubert.checkpoint import load_checkpoint_to_cpu

    n = int(ctx.cfg.finetune.average_last)
    paths = last_checkpoints(ckpt_dir, final, int(end_updates), n, checkpoint_updates)
    record = {"asked": n, "checkpoints": [p.name for p in paths]}
    if len(paths) < n:
        record["note"] = (f"only {len(paths)} of the last {n} checkpoints asked were saved: save more often "
                          "(finetune.overrides checkpoint.save_interval_updates=...; epochs shorter than that save "
                          "only epoch checkpoints: checkpoint.no_epoch_checkpoints=false checkpoint.save_interval=1)")
        log.warning("finetune.average_last=%d: %s", n, record["note"])
    if len(paths) < 2:
        return record  # nothing to average: the final model alone
    state = average_checkpoints(paths, load_checkpoint_to_cpu)
    with atomic.atomic_path(ckpt_dir / AVERAGED_CHECKPOINT) as tmp:
        torch.save(state, tmp)
    return record


def _snr_key(snr: float) -> str:
    return f"{float(snr):g}"


def noise_eval_plan(ctx: StageContext) -> dict:
    """What decoding under noise covers: the noise dir, its categories per split (those with noise
    for the split; the dir's own lists are the category ``all``), modalities, SNRs; and notes on
    what had to be left out."""
    f = ctx.cfg.finetune
    use = f.noise
    directory = use_dir(ctx, use)
    made = noise_categories_made(directory)
    wanted = [str(c) for c in use.eval_categories] or made or ["all"]
    notes, categories = [], {}
    for split in use.eval_splits:
        categories[split] = []
        for category in wanted:
            tsv = directory / f"{split}.tsv" if category == "all" else directory / category / f"{split}.tsv"
            if tsv.is_file() and tsv.read_text().strip():
                categories[split].append(category)
            else:
                notes.append(f"no {split} noise of category {category} in {directory}: not evaluated")
    modalities = [str(m) for m in use.eval_modalities] or [str(f.modalities)]
    if "video" in modalities:
        notes.append("noise does not reach the video stream: video-only input is decoded clean only")
    return {"dir": str(directory), "seed": int(use.eval_seed), "snrs": [float(s) for s in use.eval_snrs],
            "splits": [str(s) for s in use.eval_splits], "modalities": modalities, "categories": categories,
            "notes": notes}


def evaluate_under_noise(ctx: StageContext, decoder, checkpoint: Path, clean: dict) -> dict:
    """Decode every (split, modality, category, SNR) of ``noise_eval_plan`` plus each modality's
    clean input (``clean``: scores already computed for finetune.modalities, by split); each
    condition is kept in its own file, reused by a requeued job when made with the same
    checkpoint and settings."""
    f = ctx.cfg.finetune
    plan = noise_eval_plan(ctx)
    stat = Path(checkpoint).stat()
    generation = {"beam": int(decoder.beam), "max_len_a": float(f.max_len_a), "max_len_b": int(f.max_len_b),
                  "lenpen": float(decoder.lenpen)}
    identity = {"checkpoint": str(checkpoint), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                "generation": generation, "seed": plan["seed"], "noise_dir": plan["dir"],
                "noise_fingerprint": _noise_fingerprint(Path(plan["dir"]))}
    eval_dir = ctx.with_iteration(None).stage_dir("finetune") / NOISE_EVAL_DIR
    table, conditions = {}, []
    for split in plan["splits"]:
        for modality in plan["modalities"]:
            cells = table.setdefault(split, {}).setdefault(modality, {})
            todo = [("clean", None)]
            if modality != "video":  # noise never reaches the video stream
                todo += [(c, snr) for c in plan["categories"][split] for snr in plan["snrs"]]
            for category, snr in todo:
                name = "clean" if snr is None else f"{category}_{_snr_key(snr)}"
                path = eval_dir / split / modality / f"{name}.json"
                key = {**identity, "split": split, "modalities": modality, "category": category, "snr": snr}
                scores = _cached(path, key)
                if scores is None and snr is None and modality == str(f.modalities) and split in clean:
                    scores = clean[split]
                if scores is None:
                    noise = None if snr is None else {"dir": plan["dir"], "snr": snr, "seed": plan["seed"],
                                                      "category": None if category == "all" else category}
                    scores = decoder.score(split, modality, noise)
                    log.info("%s %s %s %s dB: WER %s", split, modality, category, snr, scores["wer"])
                atomic.write_json(path, {"key": key, "scores": scores})
                summary = {k: scores[k] for k in ("wer", "errors", "ref_words", "utterances")}
                conditions.append({"split": split, "modalities": modality, "category": category,
                                   "snr": snr, **summary})
                if snr is None:
                    cells["clean"] = scores["wer"]
                else:
                    cells.setdefault(category, {})[_snr_key(snr)] = scores["wer"]
    return {"dir": plan["dir"], "seed": plan["seed"], "snrs": plan["snrs"], "splits": plan["splits"],
            "modalities": plan["modalities"], "categories": plan["categories"], "wer": table,
            "conditions": conditions, "notes": plan["notes"]}


def noise_eval_record(ctx: StageContext) -> Path:
    """``noise_eval/done-<digest>.json``: the noise table of an evaluation with these settings."""
    f = ctx.cfg.finetune
    settings = {k: f.noise[k] for k in ("eval_snrs", "eval_categories", "eval_modalities", "eval_splits",
                                         "eval_seed", "dir")}
    settings.update({k: f[k] for k in ("beam", "max_len_a", "max_len_b", "lenpen", "modalities", "decode_grid",
                                       "average_last")})
    text = json.dumps(OmegaConf.to_container(OmegaConf.create(settings)), sort_keys=True)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    return ctx.with_iteration(None).stage_dir("finetune") / NOISE_EVAL_DIR / f"done-{digest}.json"


def _noise_fingerprint(directory: Path) -> Optional[str]:
    summary = directory / "summary.json"
    return json.loads(summary.read_text()).get("fingerprint") if summary.is_file() else None


def _cached(path: Path, key: dict) -> Optional[dict]:
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return saved["scores"] if saved.get("key") == json.loads(json.dumps(key)) else None


class FinetuneStage(Stage):
    name = "finetune"
    depends_on = ("manifest", "train")
    per_iteration = False
    # runs once, after the last pretraining iteration (engine hint; see docs/DESIGN.md)
    after_iterations = True
    multi_task = True
    checkpointable = True
    libraries = ("torch", "fairseq|fairseq-fixed", "numpy", "sentencepiece")

    def dependencies(self, ctx: StageContext):
        # a given checkpoint (e.g. a published one) needs no pretraining from this run
        deps = ("manifest",) if ctx.cfg.finetune.get("pretrained_checkpoint") else tuple(self.depends_on)
        # noise in fine-tuning or in decoding reads the noise stage's lists
        return deps + ("noise",) if uses_noise_stage(ctx.cfg.finetune.noise) else deps

    def enabled(self, ctx: StageContext) -> bool:
        setting = ctx.cfg.finetune.get("enabled", None)
        if setting is None:
            return str(ctx.cfg.get("layout", "plain") or "plain") != "vox2"
        return bool(setting)

    def validate(self, ctx: StageContext) -> None:
        from avhubert.s2s_decode import modality_list

        cfg = ctx.cfg
        for override in cfg.finetune.overrides or []:
            if "=" not in str(override) and not str(override).startswith("~"):
                raise ConfigError(f"finetune.overrides: {override!r} is not a key=value override")
            key = override_key(str(override))
            if key in STAGE_OWNED_KEYS:
                raise ConfigError(f"finetune.overrides: {key} is set by the finetune stage "
                                  "(use finetune.* settings instead)")
        path = base_config_path(cfg)
        if not path.is_file():
            raise ConfigError(
                f"finetune.model_config: {path} does not exist (names available: "
                f"{sorted(p.stem for p in FINETUNE_CONFIG_DIR.glob('*.yaml'))})")
        try:
            modality_list(str(cfg.finetune.modalities))
        except ValueError as e:
            raise ConfigError(f"finetune.modalities: {e}") from None
        max_update(cfg)
        finetune_update_freq(ctx, 1)  # a bad finetune.update_freq fails here
        configured = cfg.finetune.get("pretrained_checkpoint")
        if configured and not Path(str(configured)).expanduser().is_file():
            raise ConfigError(f"finetune.pretrained_checkpoint: {configured} does not exist")
        if not configured:
            pretrained_checkpoint(ctx)  # iterations >= 1
        if int(cfg.finetune.beam) < 1 or any(int(b) < 1 for b in cfg.finetune.decode_grid.beam):
            raise ConfigError(f"finetune.beam and finetune.decode_grid.beam must be >= 1, got {cfg.finetune.beam} "
                              f"and {list(cfg.finetune.decode_grid.beam)}")
        for override in cfg.finetune.overrides or []:
            key, _, value = str(override).partition("=")
            if key == "checkpoint.keep_interval_updates" and 0 < int(value) < int(cfg.finetune.average_last):
                raise ConfigError(f"finetune.overrides {override} keeps fewer checkpoints than finetune.average_last="
                                  f"{cfg.finetune.average_last} averages")
        if int(cfg.finetune.average_last) < 0 or int(cfg.finetune.average_last) == 1:
            raise ConfigError(f"finetune.average_last={cfg.finetune.average_last}: 0 (off) or the number of "
                              "checkpoints to average, >= 2 (one checkpoint averaged is itself)")
        validate_use(ctx, "finetune")
        use = cfg.finetune.noise
        for m in use.eval_modalities:
            try:
                modality_list(str(m))
            except ValueError as e:
                raise ConfigError(f"finetune.noise.eval_modalities: {e}") from None
        bad = [s for s in use.eval_splits if s not in ("train", "valid", "test")]
        if bad or (use.eval_snrs and not use.eval_splits):
            raise ConfigError(f"finetune.noise.eval_splits={list(use.eval_splits)}: train, valid and/or test")

    def settings(self, ctx: StageContext) -> dict:
        s = super().settings(ctx)
        name = str(ctx.cfg.finetune.model_config)
        if name.endswith((".yaml", ".yml")) or os.sep in name:  # a config of the user's: its content counts
            s["finetune.model_config"] = file_identity(base_config_path(ctx.cfg))
        if s.get("finetune.pretrained_checkpoint"):
            s["finetune.pretrained_checkpoint"] = file_identity(pretrained_checkpoint(ctx))
        s["finetune.max_update"] = max_update(ctx.cfg)
        return s

    def inert_settings(self, ctx: StageContext) -> dict:
        return inert_noise_settings("finetune", ctx.cfg.finetune.noise)

    def accepts_change(self, ctx: StageContext, key: str, old, new) -> Optional[str]:
        if key.startswith("finetune.noise.eval_"):
            # the evaluation's record is a declared output named by these settings: the shard
            # runs again and only decodes, with the fine-tuned model it has
            return f"{key} changed: the evaluation under noise runs again with the fine-tuned model"
        return None

    def provenance_dirs(self, ctx: StageContext) -> list[Path]:
        stage_dir = ctx.with_iteration(None).stage_dir("finetune")
        return [stage_dir, stage_dir / CHECKPOINT_DIR]

    def shards(self, ctx: StageContext) -> list[Shard]:
        return [Shard(index=0, count=1, key="finetune")]

    def estimate(self, ctx: StageContext):
        res = resources_for(ctx.cfg, self.name, multi_task=self.multi_task)
        return estimates.finetune(ctx, base_config_path(ctx.cfg), max_update(ctx.cfg), res,
                                  finetune_update_freq(ctx, res.nodes * res.tasks_per_node))

    def outputs(self, ctx: StageContext, shard: Shard) -> list[Path]:
        stage_dir = ctx.with_iteration(None).stage_dir("finetune")
        out = [stage_dir / CHECKPOINT_DIR / FINAL_CHECKPOINT, stage_dir / RESULTS]
        if ctx.cfg.finetune.noise.eval_snrs:
            # named by the evaluation settings: asking a finished run for another evaluation
            # under noise makes the shard incomplete, and its rerun only decodes
            out.append(noise_eval_record(ctx))
        return out

    def run(self, ctx: StageContext, shard: Shard) -> dict:
        start = time.time()
        ctx = ctx.with_iteration(None)
        cfg = ctx.cfg
        target = max_update(cfg)
        dist = distributed_env(cfg.finetune.get("master_port", None))
        device, n_gpus = train_device()
        stage_dir = ctx.stage_dir("finetune")
        ckpt_dir = stage_dir / CHECKPOINT_DIR
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        final, last = ckpt_dir / FINAL_CHECKPOINT, ckpt_dir / LAST_CHECKPOINT
        pretrained = pretrained_checkpoint(ctx)
        if not pretrained.is_file():
            raise FileNotFoundError(f"{pretrained}: pretrained checkpoint not found "
                                    "(finetune.pretrained_checkpoint or the last train iteration)")
        spm = spm_model(ctx)

        fresh = False
        if ctx.force and final.exists():
            # forced (--force, a changed setting redone, a stale step after its pretraining was
            # redone): fine-tune anew; a requeue of that run finds no final checkpoint and resumes
            fresh = True
            if dist.rank == 0:
                discard_previous_training(stage_dir)
        final_updates = None if fresh else checkpoint_updates(final)
        done_before = final_updates is not None and final_updates >= target
        start_updates = 0
        if not done_before:
            _, start_updates = resume_point(ckpt_dir, repair=dist.rank == 0)
        log.info("finetune rank %d/%d on %s from %s: %s", dist.rank, dist.world_size, device, pretrained,
                 f"resuming at {start_updates} updates" if start_updates else "from the start")
        batch = finetune_update_freq(ctx, dist.world_size)
        log.log(logging.WARNING if batch.excess else logging.INFO, "finetune: %s", batch.describe())

        trained = False
        if not done_before and start_updates < target:
            from avhubert.s2s_decode import register
            from avhubert.train_entry import run_fairseq_train

            register()  # av_hubert_seq2seq known to fairseq before the config is composed
            base = base_config_path(cfg)
            close_fairseq_tensorboard_writers()
            try:
                run_fairseq_train(str(base.parent), base.stem, fairseq_overrides(ctx, dist, device, n_gpus),
                                  rank=dist.rank, world_size=dist.world_size, init_method=dist.init_method,
                                  device=device)
            finally:
                close_fairseq_tensorboard_writers()
            trained = True

        if dist.rank != 0:
            return {"rank": dist.rank}

        if done_before:
            end_updates = final_updates
        else:
            end_updates = checkpoint_updates(last)
            if end_updates is None or end_updates < target:
                raise RuntimeError(
                    f"fine-tuning stopped at {end_updates or 0} updates, before max_update={target} "
                    f"({last}); see the job log (an epoch or lr limit in the fairseq config ends "
                    "training early)")
        # the sentencepiece model beside the checkpoint: the directory is all `infer` needs
        with atomic.atomic_path(ckpt_dir / spm.name) as tmp:
            shutil.copyfile(spm, tmp)
        if not done_before:
            with atomic.atomic_path(final) as tmp:
                shutil.copyfile(last, tmp)

        f = cfg.finetune
        from avhubert.s2s_decode import Decoder

        def decoder_of(checkpoint: Path):
            return Decoder(checkpoint, str(f.modalities), beam=int(f.beam), max_len_a=float(f.max_len_a),
                           max_len_b=int(f.max_len_b), lenpen=float(f.lenpen), data_dir=manifest_dir(ctx),
                           max_tokens=int(f.decode_max_tokens), device=device)

        decoder = decoder_of(final)
        (beam, lenpen), grid, valid = tune_decoding(decoder, decode_settings(f))
        kept, averaging = final, None
        if int(f.average_last) >= 2:  # both models decoded on valid with the chosen setting
            averaging = average_last(ctx, ckpt_dir, final, int(end_updates))
        if averaging is not None and len(averaging["checkpoints"]) < 2:
            averaging["kept"] = "final"
        elif averaging is not None:
            averaged = decoder_of(ckpt_dir / AVERAGED_CHECKPOINT)
            averaged.set_generation(beam=beam, lenpen=lenpen)
            averaged_valid = averaged.score("valid")
            averaging["valid_wer"] = {"final": valid["wer"], "averaged": averaged_valid["wer"]}
            better = averaged_valid["wer"] is not None and (valid["wer"] is None or averaged_valid["wer"] < valid["wer"])
            averaging["kept"] = "averaged" if better else "final"
            if better:
                kept, decoder, valid = ckpt_dir / AVERAGED_CHECKPOINT, averaged, averaged_valid
        splits = {"valid": valid, "test": decoder.score("test")}
        for split, scores in splits.items():
            log.info("%s: WER %s over %d utterances", split, scores["wer"], scores["utterances"])
        generation = {"beam": beam, "max_len_a": float(f.max_len_a), "max_len_b": int(f.max_len_b), "lenpen": lenpen}
        results = {
            "checkpoint": str(kept),
            "pretrained": str(pretrained),
            "modalities": str(f.modalities),
            "num_updates": int(end_updates),
            "generation": generation,
            # valid WER of every (beam, lenpen) tried; the lowest chose "generation"
            "decode_grid": grid,
            "splits": splits,
        }
        if averaging is not None:
            results["averaging"] = averaging
        atomic.write_json(ckpt_dir / DECODING, {**generation, "checkpoint": kept.name,
                                                 "chosen_by": f"lowest valid WER of {len(grid)} settings"})
        if f.noise.eval_snrs:
            results["noise"] = evaluate_under_noise(ctx, decoder, final, splits)
        atomic.write_json(stage_dir / RESULTS, results)
        if f.noise.eval_snrs:
            atomic.write_json(noise_eval_record(ctx), results["noise"])
        return {
            "num_updates": int(end_updates),
            "resumed_from_updates": int(start_updates),
            "trained": trained,
            "world_size": dist.world_size,
            "update_freq": batch.as_dict(),
            "host": socket.gethostname(),
            "wall_s": round(time.time() - start, 1),
            **{f"wer_{s}": v["wer"] for s, v in splits.items()},
        }

    def save_now(self, ctx: StageContext, shard: Shard) -> bool:
        """A preemption: as the train stage's (``checkpoint_last.pt`` at the next update, then
        stop); False outside training (decoding is redone from the final checkpoint)."""
        from avhubert.train_entry import request_save_and_stop

        return request_save_and_stop()

    def finalize(self, ctx: StageContext, shard_stats: dict[str, dict]) -> dict:
        results = json.loads((ctx.with_iteration(None).stage_dir("finetune") / RESULTS).read_text())
        summary = {"num_updates": results["num_updates"], "modalities": results["modalities"],
                   "decoding": results.get("generation"),
                   **{f"wer_{s}": v["wer"] for s, v in results["splits"].items()}}
        if "noise" in results:
            summary["noise_wer"] = results["noise"]["wer"]
        return summary


STAGE = FinetuneStage()
