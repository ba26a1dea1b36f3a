"""Features stage: the frames that iteration N's k-means clusters, sharded over utterances.

Shards: split x ``features.nshard`` contiguous ranges of tsv rows (``manifest/{split}.tsv``),
keyed ``{split}_{rank}_{nshard}``. What a shard writes depends on ``features.store``:
- ``sample`` (default): only the utterances k-means samples: ``kmeans.percent`` of the shard's
  utterances of ``kmeans.split``, drawn with ``kmeans.seed`` exactly as the reference
  ``learn_kmeans.py`` draws them from a full dump (``speechfeat.kmeans.choose_utterances``, one
  random stream per shard), into ``{key}.sample.npy`` / ``.sample.len`` / ``.sample.rows`` (the
  tsv rows drawn). The labels stage computes every utterance's features itself and assigns them
  in the same pass, so the full feature matrix is never written (at LRS3 + VoxCeleb2 size ~486 GB
  of float32 layer features per iteration, ~99 GB of MFCC). Other splits have no features shard.
- ``all``: every utterance of every split of ``features.splits`` into ``{key}.npy`` / ``.len``
  (the reference's dump); the labels stage reads it. ``features.dtype=float16`` halves the disk.
Files are streamed under a temporary name and renamed (``speechfeat.shards.ShardWriter``).

What is computed comes from the schedule (``stages.schedule.iteration_spec``):
- ``mfcc`` (iteration 1): 39-d Kaldi MFCC + deltas + delta-deltas at 100 Hz of the wav
  (``speechfeat.mfcc``, parity with the reference ``dump_mfcc_feature.py``). An utterance has
  exactly ``1 + (n_audio_samples - 400) // 160`` frames; the wav must have the tsv's sample count.
  MFCC is cheap (hundreds of times real time per core) next to writing and rereading ~4x as many
  frames as the video has, so ``sample`` is the default for MFCC too.
- ``layer`` (iteration N > 1): transformer layer L of iteration N-1's final checkpoint
  (``iter{N-1}/train/checkpoints/checkpoint_final.pt``, or ``features.checkpoint`` to featurize with
  any checkpoint, ours or reference-format), audio-visual input by default (``features.modality``),
  25 Hz, exactly ``n_video_frames`` frames. Clips longer than ``features.max_frames`` are cut into
  independent chunks of at most that many frames (as the reference HuBERT dump's ``max_chunk``);
  pieces are batched with padding up to ``features.batch_frames`` padded frames per forward
  (``0`` = auto: batched on GPU, one piece per forward on CPU where padding only costs time).

``row_features`` ("features of these tsv rows", a generator) is what both this stage and the
labels stage run; ``avhubert.extract.extract_batched`` is the batched model call under it.

An utterance whose files cannot be read or whose counts disagree with the tsv (a stale manifest)
gets 0 frames and a failure record in the shard's stats, so one broken file does not stop the
stage; more than ``features.max_failure_fraction`` of a shard's utterances failing does. The
labels stage then writes an empty label line for it, which the training dataset skips.

``features.keep=false`` deletes an iteration's feature files once the next iteration's labels
are complete (never by default; see ``remove_bulky``).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np

from avprep.media import read_gray_video, read_wav
from pipeline import atomic
from pipeline.config import resources_for
from pipeline.errors import ConfigError, raise_if_infrastructure
from pipeline.fingerprint import classify, file_identity
from pipeline.stage import Shard, Stage, StageContext
from speechfeat.kmeans import choose_utterances
from speechfeat.mfcc import DIM as MFCC_DIM, mfcc39, n_mfcc_frames
from speechfeat.shards import DTYPES, ShardWriter, read_tsv, shard_range
from stages import crop, estimates, train
from stages.schedule import iteration_spec

log = logging.getLogger(__name__)

VIDEO_RATE = 25  # fps of the crop stage's ROI videos (and of layer features)
MFCC_RATE = 100
STORES = ("sample", "all")


@classify(output=("splits", "nshard", "store", "dtype", "checkpoint", "modality", "max_frames"),
          ignored={"keep": "deletes this iteration's feature files once the next iteration's labels exist; "
                           "what was written is the same",
                   "device": "where the model runs", "batch_frames": "how many frames go through the model at once",
                   "max_failure_fraction": "a check: the shard fails above it, what is written is the same",
                   "torch_threads": "how many threads compute"})
@dataclass
class Config:
    splits: List[str] = field(default_factory=lambda: ["train", "valid"])
    nshard: int = 1  # shards per split
    # "sample": write only the utterances k-means samples; the labels stage computes features
    # itself (no full dump). "all": write every frame of every split (the reference's dump)
    store: str = "sample"
    dtype: str = "float32"  # storage of the written features: float32 or float16 (half the disk)
    keep: bool = True  # False: delete this iteration's feature files once the next iteration's labels exist
    checkpoint: Optional[str] = None  # layer features: this checkpoint instead of iteration N-1's
    modality: str = "av"  # layer features from "av" (both streams), "audio" or "video" input
    device: str = "auto"  # "auto" (cuda when available), "cpu", "cuda", "cuda:1", ...
    max_frames: int = 2500  # longest piece of a clip in one forward (100 s at 25 fps)
    batch_frames: int = 0  # padded frames per forward; 0 = auto (8000 on GPU, no batching on CPU)
    max_failure_fraction: float = 0.01  # of a shard's utterances; above it the shard fails
    torch_threads: int = 0  # 0 = torch's default (the job's CPUs)


def feature_rate(kind: str) -> int:
    return MFCC_RATE if kind == "mfcc" else VIDEO_RATE


def checkpoint_path(ctx: StageContext) -> Path:
    """The checkpoint whose layer features iteration ``ctx.iteration`` clusters."""
    override = ctx.cfg.features.get("checkpoint")
    if override:
        return Path(str(override)).expanduser()
    return ctx.stage_dir("train", ctx.iteration - 1) / "checkpoints" / "checkpoint_final.pt"


def expected_frames(kind: str, n_video_frames: int, n_audio_samples: int) -> int:
    return n_mfcc_frames(n_audio_samples) if kind == "mfcc" else int(n_video_frames)


def split_shards(ctx: StageContext, splits: Sequence[str]) -> list[Shard]:
    """``features.nshard`` contiguous shards of each split, keyed ``{split}_{rank}_{nshard}`` (the
    labels stage's shards are those of every featurized split)."""
    n = int(ctx.cfg.features.nshard)
    keys = [(split, rank) for split in splits for rank in range(n)]
    return [Shard(i, len(keys), f"{split}_{rank}_{n}", {"split": split, "rank": rank, "nshard": n})
            for i, (split, rank) in enumerate(keys)]


def store_mode(ctx: StageContext) -> str:
    return str(ctx.cfg.features.store)


def sample_draw(n_rows: int, rank: int, nshard: int, percent: float, seed: int) -> np.ndarray:
    """tsv row indices that k-means samples from shard ``rank`` of a split of ``n_rows`` rows: the
    draw ``speechfeat.kmeans.sample_set`` makes from a full dump of the same shards."""
    a, b = shard_range(n_rows, rank, nshard)
    return a + choose_utterances(b - a, float(percent), np.random.default_rng([int(seed), int(rank)]))


def shard_files(ctx: StageContext, key: str, store: Optional[str] = None) -> dict:
    """The files of features shard ``key``: ``npy`` and ``len`` (+ ``rows`` for a sample), and
    ``removed`` (the note ``remove_bulky`` leaves in place of a deleted ``npy``)."""
    d = ctx.stage_dir("features")
    if (store or store_mode(ctx)) == "all":
        return {"npy": d / f"{key}.npy", "len": d / f"{key}.len", "removed": d / f"{key}.removed.json"}
    return {"npy": d / f"{key}.sample.npy", "len": d / f"{key}.sample.len", "rows": d / f"{key}.sample.rows",
            "removed": d / f"{key}.sample.removed.json"}


class FeaturesStage(Stage):
    name = "features"
    depends_on = ("manifest",)
    per_iteration = True
    depends_on_previous = ("train",)
    # the utterances k-means samples are drawn here (store=sample); what is computed: the schedule
    reads = ("kmeans.percent", "kmeans.seed", "kmeans.split", "schedule.iterations.features",
             "schedule.iterations.layer")
    libraries = ("numpy", "torch", "fairseq|fairseq-fixed", "python-speech-features", "av")

    def settings(self, ctx: StageContext) -> dict:
        s = super().settings(ctx)
        it = ctx.iteration
        if store_mode(ctx) == "all":  # every utterance of every split: nothing is drawn here
            for key in ("kmeans.percent", "kmeans.seed", "kmeans.split"):
                s.pop(key, None)
        else:  # only the k-means split's draw is written; the labels stage reads features.splits
            s.pop("features.splits", None)
        if iteration_spec(ctx.cfg, it).features == "mfcc":  # no model: its settings do nothing
            for key in ("features.checkpoint", "features.modality", "features.max_frames", f"schedule.iterations[{it}].layer"):
                s.pop(key, None)
        elif s.get("features.checkpoint"):  # a checkpoint from elsewhere: what it holds counts
            s["features.checkpoint"] = file_identity(checkpoint_path(ctx))
        return s

    def validate(self, ctx: StageContext) -> None:
        c = ctx.cfg.features
        if int(c.nshard) < 1:
            raise ConfigError(f"features.nshard={c.nshard}: must be at least 1")
        if not list(c.splits):
            raise ConfigError("features.splits is empty: k-means needs at least the train split")
        for s in c.splits:
            if s not in ("train", "valid", "test"):
                raise ConfigError(f"features.splits: {s!r} is not train, valid or test")
        if c.store not in STORES:
            raise ConfigError(f"features.store={c.store!r}: must be sample (only what k-means needs) or all")
        if c.dtype not in DTYPES:
            raise ConfigError(f"features.dtype={c.dtype!r}: must be one of {', '.join(DTYPES)}")
        if c.modality not in ("av", "audio", "video"):
            raise ConfigError(f"features.modality={c.modality!r}: must be av, audio or video")
        if int(c.max_frames) < 1 or int(c.batch_frames) < 0:
            raise ConfigError("features.max_frames must be >= 1 and features.batch_frames >= 0")
        if not 0 <= float(c.max_failure_fraction) <= 1:
            raise ConfigError(f"features.max_failure_fraction={c.max_failure_fraction}: must be in [0, 1]")
        spec = iteration_spec(ctx.cfg, ctx.iteration)
        if spec.features not in ("mfcc", "layer"):
            raise ConfigError(f"schedule.iterations[{ctx.iteration - 1}].features={spec.features!r}: mfcc or layer")
        if spec.features == "layer":
            if spec.layer is None or int(spec.layer) < 0:
                raise ConfigError(f"schedule.iterations[{ctx.iteration - 1}].layer: a layer number is needed")
            if c.get("checkpoint"):
                if not checkpoint_path(ctx).is_file():
                    raise ConfigError(f"features.checkpoint={c.checkpoint}: file not found")
            elif ctx.iteration == 1:
                raise ConfigError("iteration 1 has layer features but no previous iteration: "
                                  "set features.checkpoint or use mfcc")

    def shards(self, ctx: StageContext) -> list[Shard]:
        if store_mode(ctx) == "all":
            return split_shards(ctx, list(ctx.cfg.features.splits))
        return split_shards(ctx, [str(ctx.cfg.kmeans.split)])

    def estimate(self, ctx: StageContext):
        return estimate(ctx)

    def outputs(self, ctx: StageContext, shard: Shard) -> list[Path]:
        f = shard_files(ctx, shard.key)
        if f["removed"].exists():  # deleted on purpose (features.keep=false): still complete
            return [f["len"], f["removed"]]
        return [f[k] for k in ("npy", "len", "rows") if k in f]

    def run(self, ctx: StageContext, shard: Shard) -> dict:
        t0 = time.time()
        c = ctx.cfg.features
        split, rank, nshard = shard.params["split"], int(shard.params["rank"]), int(shard.params["nshard"])
        files = shard_files(ctx, shard.key)
        files["removed"].unlink(missing_ok=True)  # featurized again: a real file from now on
        tsv = ctx.with_iteration(None).stage_dir("manifest") / f"{split}.tsv"
        root, rows = read_tsv(tsv)
        if "rows" in files:
            picked = sample_draw(len(rows), rank, nshard, float(ctx.cfg.kmeans.percent), int(ctx.cfg.kmeans.seed))
        else:
            picked = np.arange(*shard_range(len(rows), rank, nshard))
        stats = write_features(make_featurizer(ctx), tsv, root, [rows[i] for i in picked], files["npy"], files["len"],
                               float(c.max_failure_fraction), str(c.dtype))
        if "rows" in files:
            atomic.write_text(files["rows"], "".join(f"{i}\n" for i in picked))
        return {**stats, "store": store_mode(ctx), "seconds": round(time.time() - t0, 2)}


STAGE = FeaturesStage()


def feature_cost(ctx: StageContext, stage_name: str) -> estimates.FeatureCost:
    """What computing iteration ``ctx.iteration``'s features costs per frame in a job of
    ``stage_name`` (features, or labels, which computes them again)."""
    if iteration_spec(ctx.cfg, ctx.iteration).features == "mfcc":
        return estimates.mfcc_cost()
    model_config = None  # a given features.checkpoint: sized as a base model
    if ctx.iteration > 1 and not ctx.cfg.features.get("checkpoint"):
        model_config = train.base_config_path(ctx.cfg, ctx.iteration - 1)
    return estimates.layer_cost(model_config, resources_for(ctx.cfg, stage_name))


def estimate(ctx: StageContext):
    """The features step of iteration ``ctx.iteration``."""
    return estimates.features(ctx, crop.STAGE.corpus_sizes.of(ctx), feature_cost(ctx, "features"))


def remove_bulky(ctx: StageContext, reason: str) -> list[Path]:
    """Delete iteration ``ctx.iteration``'s feature matrices (``features.keep=false``), leaving per
    shard a ``.removed.json`` note (what, when asked by what) next to the small ``.len``/``.rows``
    files, so the step stays complete and is not featurized again. Returns the deleted paths."""
    removed = []
    for store in STORES:
        for shard in split_shards(ctx, list(ctx.cfg.features.splits)):
            f = shard_files(ctx, shard.key, store)
            if f["npy"].exists():
                size = f["npy"].stat().st_size
                atomic.write_json(f["removed"], {"file": f["npy"].name, "bytes": size, "reason": reason})
                f["npy"].unlink()
                removed.append(f["npy"])
    return removed


# ---------------------------------------------------------------------------------------------
def _read_wav_checked(read_wav, path: Path, expected_samples: int) -> np.ndarray:
    wav, sr = read_wav(str(path))
    wav = np.asarray(wav)
    if sr != 16000:
        raise ValueError(f"{path}: {sr} Hz audio, expected 16000 Hz")
    if wav.ndim != 1:
        raise ValueError(f"{path}: expected mono audio, got shape {wav.shape}")
    if len(wav) != expected_samples:
        raise ValueError(f"{path}: {len(wav)} samples but the manifest says {expected_samples} (stale manifest?)")
    return wav


class Failures:
    """Per-item failure records of one shard; raises once more than ``max_fraction`` of its
    ``n_utts`` utterances failed."""

    def __init__(self, tsv: Path, n_utts: int, max_fraction: float):
        self.tsv, self.n_utts, self.max_fraction = tsv, n_utts, max_fraction
        self.records: list = []

    def add(self, utt_id: str, reason: str) -> None:
        log.warning("%s: %s: %s", self.tsv, utt_id, reason)
        self.records.append({"id": utt_id, "reason": reason})
        if len(self.records) > self.max_fraction * self.n_utts:
            raise RuntimeError(f"{self.tsv}: {len(self.records)} of {self.n_utts} utterances of this shard failed "
                               f"(features.max_failure_fraction={self.max_fraction}); first: "
                               f"{self.records[0]['id']}: {self.records[0]['reason']}")


class MfccFeaturizer:
    """39-d MFCC of a row's wav (``speechfeat.mfcc.mfcc39``), one utterance at a time."""

    kind = "mfcc"

    def __init__(self):
        self.dim = MFCC_DIM
        self.read_wav = read_wav

    def describe(self) -> dict:
        return {"kind": "mfcc"}

    def expected(self, row) -> int:
        return expected_frames("mfcc", row.n_video_frames, row.n_audio_samples)

    def load(self, root: Path, row):
        return _read_wav_checked(self.read_wav, root / row.audio, row.n_audio_samples)

    def compute(self, loaded: list) -> List[np.ndarray]:
        return [mfcc39(wav) for wav in loaded]

    def group_frames(self) -> int:
        return 1  # nothing to batch


class LayerFeaturizer:
    """Layer ``layer`` features of a checkpoint for a row's ROI video and/or wav
    (``avhubert.extract``), several utterances per ``extract_batched`` call on a GPU."""

    kind = "layer"

    def __init__(self, checkpoint, layer: Optional[int], modality: str = "av", device: str = "auto",
                 max_frames: int = 2500, batch_frames: int = 0, torch_threads: int = 0, loaded=None):
        """``loaded``: an already loaded ``(model, task_cfg)`` (on ``device``) instead of reading
        ``checkpoint`` (which then only names it). ``layer`` None = the last one."""
        import torch

        from avhubert import extract

        if torch_threads > 0:
            torch.set_num_threads(torch_threads)
        self.checkpoint = Path(checkpoint)
        if loaded is None:
            self.model, self.task_cfg, self.device, self.layer = extract.load_layer_model(checkpoint, layer, device)
        else:
            self.model, self.task_cfg = loaded
            self.device = extract.resolve_device(device)
            self.layer = len(self.model.encoder.layers) if layer is None else int(layer)
        self.batch_frames = batch_frames or extract.auto_batch_frames(self.device)
        self.modality, self.max_frames = modality, int(max_frames)
        self.dim = extract.model_dim(self.model)
        self.read_video, self.read_wav = read_gray_video, read_wav

    def describe(self) -> dict:
        return {"kind": "layer", "layer": self.layer, "checkpoint": str(self.checkpoint), "modality": self.modality,
                "device": self.device}

    def expected(self, row) -> int:
        return int(row.n_video_frames)

    def load(self, root: Path, row):
        from avhubert.extract import audio_input, video_input

        video = audio = None
        if self.modality in ("av", "video"):
            roi = np.asarray(self.read_video(str(root / row.video)))
            if len(roi) != row.n_video_frames:
                raise ValueError(f"{root / row.video}: {len(roi)} frames but the manifest says "
                                 f"{row.n_video_frames} (stale manifest?)")
            video = video_input(roi, self.task_cfg)
        if self.modality in ("av", "audio"):
            wav = _read_wav_checked(self.read_wav, root / row.audio, row.n_audio_samples)
            audio = audio_input(wav, row.n_video_frames, self.task_cfg)
        return video, audio

    def compute(self, loaded: list) -> List[np.ndarray]:
        from avhubert.extract import extract_batched

        return extract_batched(self.model, loaded, self.layer, self.max_frames, self.batch_frames)

    def group_frames(self) -> int:
        return max(self.batch_frames, self.max_frames)


def make_featurizer(ctx: StageContext):
    """The featurizer of iteration ``ctx.iteration`` (the schedule and the ``features`` settings)."""
    spec = iteration_spec(ctx.cfg, ctx.iteration)
    c = ctx.cfg.features
    if spec.features == "mfcc":
        return MfccFeaturizer()
    return LayerFeaturizer(checkpoint_path(ctx), int(spec.layer), modality=str(c.modality), device=str(c.device),
                           max_frames=int(c.max_frames), batch_frames=int(c.batch_frames),
                           torch_threads=int(c.torch_threads))


def row_features(featurizer, root: Path, rows: Sequence, on_failure=None,
                 output_roots: Sequence[Path] = ()) -> Iterator[Tuple[object, Optional[np.ndarray]]]:
    """(row, float32 (T, D) features or None) for each tsv row, in order: "features of these rows".

    Rows are read one by one and computed in groups of about ``featurizer.group_frames()`` frames
    (batched forwards on a GPU), so memory stays bounded. A row that cannot be read, or whose
    features do not have the tsv's frame count, yields None after ``on_failure(row.id, reason)``
    (e.g. ``Failures.add``; default: a warning); an infrastructure error (disk full under
    ``output_roots``, I/O error, signal: ``pipeline.errors``) propagates and fails the shard."""
    if on_failure is None:
        def on_failure(utt_id, reason):
            log.warning("%s: %s", utt_id, reason)
    group_frames = featurizer.group_frames()
    pending: list = []  # (row, loaded input | None), in order
    queued = 0

    def flush():
        ok = [(r, x) for r, x in pending if x is not None]
        feats = featurizer.compute([x for _, x in ok]) if ok else []
        by_row = {id(r): f for (r, _), f in zip(ok, feats)}
        done = list(pending)
        pending.clear()
        for r, _ in done:
            f = by_row.get(id(r))
            if f is not None and len(f) != featurizer.expected(r):  # a decoder or model that drops frames
                on_failure(r.id, f"{len(f)} feature frames, expected {featurizer.expected(r)}")
                f = None
            yield r, f

    for row in rows:
        try:
            x = featurizer.load(root, row)
        except Exception as e:  # one broken file must not stop the shard
            raise_if_infrastructure(e, list(output_roots))  # a full disk or a signal does
            on_failure(row.id, f"{type(e).__name__}: {e}")
            x = None
        pending.append((row, x))
        queued += featurizer.expected(row) if x is not None else 0
        if queued >= group_frames:
            yield from flush()
            queued = 0
    yield from flush()


# ---------------------------------------------------------------------------------------------
def layer_features_of_rows(model, task_cfg, root, rows, layer: int, modality: str = "av", max_frames: int = 2500,
                           batch_frames: int = 0, on_failure=None, output_roots=()) -> Iterator[tuple]:
    """``(row, features)`` for every tsv row in order: float32 (n_video_frames, D) of ``layer`` of
    an already loaded model, or None for a row that failed (``row_features`` with a
    ``LayerFeaturizer`` of that model)."""
    featurizer = LayerFeaturizer("(loaded model)", layer, modality, str(next(model.parameters()).device),
                                 max_frames, batch_frames, loaded=(model, task_cfg))
    return row_features(featurizer, Path(root), rows, on_failure, output_roots)


def featurize_layer(tsv, rank: int, nshard: int, npy_path, len_path, checkpoint, layer: int,
                    modality: str = "av", device: str = "auto", max_frames: int = 2500, batch_frames: int = 0,
                    max_failure_fraction: float = 0.01, torch_threads: int = 0, dtype: str = "float32") -> dict:
    """Layer-``layer`` features of ``checkpoint`` for shard ``rank`` of ``nshard`` of a tsv into a
    feature dump shard (``npy_path`` / ``len_path``)."""
    featurizer = LayerFeaturizer(checkpoint, layer, modality, device, max_frames, batch_frames, torch_threads)
    root, rows = read_tsv(tsv)
    a, b = shard_range(len(rows), rank, nshard)
    return write_features(featurizer, Path(tsv), root, rows[a:b], npy_path, len_path, max_failure_fraction, dtype)


def write_features(featurizer, tsv: Path, root: Path, rows: Sequence, npy_path, len_path,
                   max_failure_fraction: float = 0.01, dtype: str = "float32") -> dict:
    """The features of ``rows`` (0 frames for a failed row) streamed into a feature shard."""
    t0 = time.time()
    failures = Failures(tsv, len(rows), max_failure_fraction)
    empty = np.zeros((0, featurizer.dim), dtype=np.float32)
    with ShardWriter(npy_path, len_path, featurizer.dim, dtype) as w:
        for _, feats in row_features(featurizer, root, rows, failures.add, [Path(npy_path).parent]):
            w.append(empty if feats is None else feats)
    return {**featurizer.describe(), "dtype": dtype, "utterances": len(rows), "frames": w.n_rows,
            "dim": featurizer.dim, "failures": failures.records, "seconds": round(time.time() - t0, 2)}
