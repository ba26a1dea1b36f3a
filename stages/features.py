"""Features stage: the frames that iteration N's k-means clusters, sharded over utterances.

Shards: every split of ``features.splits`` (train, valid) cut into ``features.nshard`` contiguous
ranges of tsv rows (``manifest/{split}.tsv``). Shard ``{split}_{rank}_{nshard}`` writes
``iter{N}/features/{split}_{rank}_{nshard}.npy`` (float32 (frames, D), utterances one after the
other in tsv order) and ``.len`` (frames per utterance), streamed under a temporary name and
renamed (``speechfeat.shards.ShardWriter``); ``np.load(mmap_mode="r")`` reads them.

What is computed comes from the schedule (``stages.schedule.iteration_spec``):
- ``mfcc`` (iteration 1): 39-d Kaldi MFCC + deltas + delta-deltas at 100 Hz of the wav
  (``speechfeat.mfcc``, parity with the reference ``dump_mfcc_feature.py``). An utterance has
  exactly ``1 + (n_audio_samples - 400) // 160`` frames; the wav must have the tsv's sample count.
- ``layer`` (iteration N > 1): transformer layer L of iteration N-1's final checkpoint
  (``iter{N-1}/train/checkpoints/checkpoint_final.pt``, or ``features.checkpoint`` to featurize with
  any checkpoint, ours or reference-format), audio-visual input by default (``features.modality``),
  25 Hz, exactly ``n_video_frames`` frames. Clips longer than ``features.max_frames`` are cut into
  independent chunks of at most that many frames (as the reference HuBERT dump's ``max_chunk``);
  pieces are batched with padding up to ``features.batch_frames`` padded frames per forward
  (``0`` = auto: batched on GPU, one piece per forward on CPU where padding only costs time).

An utterance whose files cannot be read or whose counts disagree with the tsv (a stale manifest)
gets 0 frames and a failure record in the shard's stats, so one broken file does not stop the
stage; more than ``features.max_failure_fraction`` of a shard's utterances failing does. The
labels stage then writes an empty label line for it, which the training dataset skips.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np

from pipeline.errors import ConfigError, raise_if_infrastructure
from pipeline.stage import Shard, Stage, StageContext

log = logging.getLogger(__name__)

VIDEO_RATE = 25  # fps of the crop stage's ROI videos (and of layer features)
MFCC_RATE = 100


@dataclass
class Config:
    splits: List[str] = field(default_factory=lambda: ["train", "valid"])
    nshard: int = 1  # shards per split
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
    from speechfeat.mfcc import n_mfcc_frames

    return n_mfcc_frames(n_audio_samples) if kind == "mfcc" else int(n_video_frames)


class FeaturesStage(Stage):
    name = "features"
    depends_on = ("manifest",)
    per_iteration = True
    depends_on_previous = ("train",)

    def validate(self, ctx: StageContext) -> None:
        from stages.schedule import iteration_spec

        c = ctx.cfg.features
        if int(c.nshard) < 1:
            raise ConfigError(f"features.nshard={c.nshard}: must be at least 1")
        if not list(c.splits):
            raise ConfigError("features.splits is empty: k-means needs at least the train split")
        for s in c.splits:
            if s not in ("train", "valid", "test"):
                raise ConfigError(f"features.splits: {s!r} is not train, valid or test")
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
        n = int(ctx.cfg.features.nshard)
        out = []
        for split in ctx.cfg.features.splits:
            for rank in range(n):
                out.append(Shard(len(out), 0, f"{split}_{rank}_{n}", {"split": split, "rank": rank, "nshard": n}))
        return [Shard(s.index, len(out), s.key, s.params) for s in out]

    def outputs(self, ctx: StageContext, shard: Shard) -> list[Path]:
        d = ctx.stage_dir(self.name)
        return [d / f"{shard.key}.npy", d / f"{shard.key}.len"]

    def run(self, ctx: StageContext, shard: Shard) -> dict:
        from stages.schedule import iteration_spec

        spec = iteration_spec(ctx.cfg, ctx.iteration)
        c = ctx.cfg.features
        split, rank, nshard = shard.params["split"], int(shard.params["rank"]), int(shard.params["nshard"])
        npy, len_path = self.outputs(ctx, shard)
        tsv = ctx.with_iteration(None).stage_dir("manifest") / f"{split}.tsv"
        if spec.features == "mfcc":
            return featurize_mfcc(tsv, rank, nshard, npy, len_path, float(c.max_failure_fraction))
        return featurize_layer(tsv, rank, nshard, npy, len_path, checkpoint_path(ctx), int(spec.layer),
                               modality=str(c.modality), device=str(c.device), max_frames=int(c.max_frames),
                               batch_frames=int(c.batch_frames),
                               max_failure_fraction=float(c.max_failure_fraction),
                               torch_threads=int(c.torch_threads))


STAGE = FeaturesStage()


# ---------------------------------------------------------------------------------------------
def media_readers():
    """(read_gray_video, read_wav): the crop stage's readers when present, else equivalent ones."""
    try:
        from avprep.media import read_gray_video, read_wav
        return read_gray_video, read_wav
    except ImportError:
        from avhubert.features import read_video_gray, read_wav_int16
        return read_video_gray, read_wav_int16


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


class _Failures:
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


def featurize_mfcc(tsv, rank: int, nshard: int, npy_path, len_path, max_failure_fraction: float = 0.01) -> dict:
    """MFCC shard ``rank`` of ``nshard`` of a manifest tsv into ``npy_path`` / ``len_path``."""
    from speechfeat.mfcc import DIM, mfcc39, n_mfcc_frames
    from speechfeat.shards import ShardWriter, read_tsv, shard_range

    t0 = time.time()
    root, rows = read_tsv(tsv)
    a, b = shard_range(len(rows), rank, nshard)
    _, read_wav = media_readers()
    failures = _Failures(Path(tsv), b - a, max_failure_fraction)
    with ShardWriter(npy_path, len_path, DIM) as w:
        for row in rows[a:b]:
            try:
                wav = _read_wav_checked(read_wav, root / row.audio, row.n_audio_samples)
                feats = mfcc39(wav)
                if len(feats) != n_mfcc_frames(row.n_audio_samples):
                    raise ValueError(f"{len(feats)} MFCC frames, expected {n_mfcc_frames(row.n_audio_samples)}")
            except Exception as e:  # one broken file must not stop the shard
                raise_if_infrastructure(e, [Path(npy_path).parent])  # a full disk or a signal does
                failures.add(row.id, f"{type(e).__name__}: {e}")
                feats = np.zeros((0, DIM), dtype=np.float32)
            w.append(feats)
    return {"kind": "mfcc", "utterances": b - a, "frames": w.n_rows, "dim": DIM, "failures": failures.records,
            "seconds": round(time.time() - t0, 2)}


# ---------------------------------------------------------------------------------------------
def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"features.device={device} but torch sees no GPU")
    return device


def _pieces(n_frames: int, max_frames: int) -> List[Tuple[int, int]]:
    return [(s, min(n_frames, s + max_frames)) for s in range(0, max(n_frames, 1), max_frames)]


def extract_batched(model, inputs: Sequence[Tuple[Optional["torch.Tensor"], Optional["torch.Tensor"]]],
                    layer: int, max_frames: int, batch_frames: int) -> List[np.ndarray]:
    """Layer features of several utterances. ``inputs``: per utterance (video (T, 88, 88) | None,
    audio (T, F) | None), as ``avhubert.extract.video_input`` / ``audio_input`` make them.
    Each utterance is cut into independent pieces of at most ``max_frames``; pieces are grouped
    in order into padded batches of at most ``batch_frames`` padded frames (<= max_frames: one
    piece per forward). Returns float32 (T, D) per utterance."""
    import torch

    from avhubert.extract import extract_layer

    pieces = []  # (utt index, start, end)
    for i, (v, au) in enumerate(inputs):
        t = len(v) if v is not None else len(au)
        if v is not None and au is not None and len(au) != len(v):
            raise ValueError(f"utterance {i}: {len(v)} video frames but {len(au)} audio frames")
        pieces += [(i, s, e) for s, e in _pieces(t, max_frames)]
    outs: List[List[np.ndarray]] = [[] for _ in inputs]
    budget = max(batch_frames, max_frames)
    j = 0
    while j < len(pieces):
        batch = [pieces[j]]
        while j + len(batch) < len(pieces):
            nxt = pieces[j + len(batch)]
            longest = max(e - s for _, s, e in batch + [nxt])
            if longest * (len(batch) + 1) > budget:
                break
            batch.append(nxt)
        j += len(batch)
        t_max = max(e - s for _, s, e in batch)
        has_v, has_a = inputs[batch[0][0]][0] is not None, inputs[batch[0][0]][1] is not None
        video = audio = mask = None
        if has_v:
            v0 = inputs[batch[0][0]][0]
            video = v0.new_zeros((len(batch), 1, t_max) + tuple(v0.shape[1:]))
        if has_a:
            a0 = inputs[batch[0][0]][1]
            audio = a0.new_zeros((len(batch), a0.shape[1], t_max))
        if len(batch) > 1:
            mask = torch.zeros((len(batch), t_max), dtype=torch.bool)
        for b, (i, s, e) in enumerate(batch):
            v, au = inputs[i]
            if has_v:
                video[b, 0, : e - s] = v[s:e]
            if has_a:
                audio[b, :, : e - s] = au[s:e].T
            if mask is not None:
                mask[b, e - s:] = True
        feats = extract_layer(model, video, audio, mask, layer).float().cpu().numpy()
        for b, (i, s, e) in enumerate(batch):
            outs[i].append(feats[b, : e - s])
    result = []
    for i, parts in enumerate(outs):
        result.append(np.ascontiguousarray(np.concatenate(parts, axis=0), dtype=np.float32))
    return result


def auto_batch_frames(device: str) -> int:
    """``batch_frames=0`` (auto): batched on a GPU; on a CPU padding only costs time."""
    return 8000 if device.startswith("cuda") else 0


def load_layer_model(checkpoint, layer: Optional[int], device: str = "auto"):
    """(model, task_cfg, device, layer) for layer features of ``checkpoint`` (any ours/reference
    pretraining or fine-tuning checkpoint); ``layer`` None = its last transformer layer."""
    from avhubert.extract import load_pretrained

    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"{checkpoint}: checkpoint for layer features not found")
    device = resolve_device(device)
    model, task_cfg = load_pretrained(str(checkpoint), device=device)
    n_layers = len(model.encoder.layers)
    layer = n_layers if layer is None else int(layer)
    if not 0 <= layer <= n_layers:
        raise ValueError(f"layer {layer} asked but {checkpoint} has {n_layers} transformer layers")
    return model, task_cfg, device, layer


def _model_dim(model) -> int:
    return int(getattr(model, "encoder_embed_dim", None) or model.encoder.layers[0].fc2.out_features)


def layer_features_of_rows(model, task_cfg, root, rows, layer: int, modality: str = "av", max_frames: int = 2500,
                           batch_frames: int = 0, on_failure=None, output_roots=()) -> Iterator[tuple]:
    """``(row, features)`` for every tsv row in order: float32 (n_video_frames, D) of ``layer``,
    or None for a row whose files cannot be read or whose counts disagree with the tsv (then
    ``on_failure(row.id, reason)`` is called; an infrastructure error is raised instead, see
    ``pipeline.errors``). Rows are decoded and extracted in groups of about
    ``max(batch_frames, max_frames)`` frames (``extract_batched``), so memory stays bounded."""
    from avhubert.extract import audio_input, video_input

    read_video, read_wav = media_readers()
    if on_failure is None:
        def on_failure(utt_id, reason):
            log.warning("%s: %s", utt_id, reason)

    def load(row):
        video = audio = None
        if modality in ("av", "video"):
            roi = np.asarray(read_video(str(root / row.video)))
            if len(roi) != row.n_video_frames:
                raise ValueError(f"{root / row.video}: {len(roi)} frames but the manifest says "
                                 f"{row.n_video_frames} (stale manifest?)")
            video = video_input(roi, task_cfg)
        if modality in ("av", "audio"):
            wav = _read_wav_checked(read_wav, root / row.audio, row.n_audio_samples)
            audio = audio_input(wav, row.n_video_frames, task_cfg)
        return video, audio

    def flush(pending):
        ok = [(r, x) for r, x in pending if x is not None]
        feats = extract_batched(model, [x for _, x in ok], layer, max_frames, batch_frames) if ok else []
        by_id = {id(r): f for (r, _), f in zip(ok, feats)}
        for r, _ in pending:
            f = by_id.get(id(r))
            if f is not None and len(f) != r.n_video_frames:  # cannot happen unless the model drops frames
                on_failure(r.id, f"{len(f)} feature frames, expected {r.n_video_frames}")
                f = None
            yield r, f

    group_frames = max(batch_frames, max_frames)
    pending: list = []  # (row, inputs | None) decoded but not yet extracted, in tsv order
    queued = 0
    for row in rows:
        try:
            x = load(row)
        except Exception as e:  # one broken file must not stop the shard
            raise_if_infrastructure(e, output_roots)  # a full disk or a signal does
            on_failure(row.id, f"{type(e).__name__}: {e}")
            x = None
        pending.append((row, x))
        queued += row.n_video_frames if x is not None else 0
        if queued >= group_frames:
            yield from flush(pending)
            pending, queued = [], 0
    yield from flush(pending)


def featurize_layer(tsv, rank: int, nshard: int, npy_path, len_path, checkpoint, layer: int,
                    modality: str = "av", device: str = "auto", max_frames: int = 2500, batch_frames: int = 0,
                    max_failure_fraction: float = 0.01, torch_threads: int = 0) -> dict:
    """Layer-``layer`` features of ``checkpoint`` for shard ``rank`` of ``nshard`` of a tsv."""
    import torch

    from speechfeat.shards import ShardWriter, read_tsv, shard_range

    t0 = time.time()
    if torch_threads > 0:
        torch.set_num_threads(torch_threads)
    model, task_cfg, device, layer = load_layer_model(checkpoint, layer, device)
    if batch_frames == 0:
        batch_frames = auto_batch_frames(device)
    dim = _model_dim(model)
    root, rows = read_tsv(tsv)
    a, b = shard_range(len(rows), rank, nshard)
    failures = _Failures(Path(tsv), b - a, max_failure_fraction)
    with ShardWriter(npy_path, len_path, dim) as w:
        for _, feats in layer_features_of_rows(model, task_cfg, root, rows[a:b], layer, modality, max_frames,
                                               batch_frames, failures.add, [Path(npy_path).parent]):
            w.append(feats if feats is not None else np.zeros((0, dim), dtype=np.float32))
    return {"kind": "layer", "layer": layer, "checkpoint": str(checkpoint), "modality": modality, "device": device,
            "utterances": b - a, "frames": w.n_rows, "dim": dim, "failures": failures.records,
            "seconds": round(time.time() - t0, 2)}
