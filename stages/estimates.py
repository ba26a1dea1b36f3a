"""Resource estimates of the AV-HuBERT stages for ``--dry-run`` and the free-space check
(``Stage.estimate`` -> ``pipeline.estimate.Estimate``): the measured cost figures and the
arithmetic on them. A leaf: each stage's ``estimate`` passes what it knows (the corpus size,
``stages.corpus_size``; its resources, K, the model config) and this module imports no stage.

Per-frame costs: CPU figures measured on the 2-core dev machine (AMD EPYC, 2 vCPUs, one core
per figure, bench/ scripts named next to each); GPU figures are the model's forward FLOPs per
frame counted with ``torch.utils.flop_counter.FlopCounterMode`` on the real model, divided by an
assumed sustained GPU throughput (no GPU was available to measure: replace ``GPU_TFLOPS`` with
what bench/gpu_check.sh measures on yours). Every figure is an estimate; disk figures are the
tightest (bytes per frame of real outputs).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional

from omegaconf import OmegaConf

from pipeline.estimate import Estimate
from pipeline.stage import Resources, StageContext
from speechfeat.kmeans import fast_params, pool_frames, sample_sizes

GB = 1e9
MB = 1e6
VIDEO_RATE = 25
SAMPLES_PER_FRAME = 640  # 16 kHz audio per 25 fps video frame
MFCC_PER_FRAME = 4  # 100 Hz MFCC frames per video frame

# --- measured on the 2-core dev machine (one thread, process CPU time) -----------------------
# crop outputs per video frame: the smoke run's crop dir on the sample corpus (96x96 gray h264 at
# crf 18, 16-bit 16 kHz wav, compressed landmarks npz)
CROP_BYTES_PER_FRAME = {"video": 318, "audio": 1296, "landmarks": 379}
# fast crop per frame, one core: bench/crop.py on 640x480 video with 60-240 px faces, decoding,
# key-frame face search, landmarks, warp and ROI encoding 3.4-3.7 ms (bench/README.md), plus the
# audio extraction and the per-item start-up
CROP_CPU_SECONDS_PER_FRAME = 0.0045
CROP_BASE_RAM = 400 * MB  # dlib models + decoder, on top of crop.frame_cache_mb
# speechfeat.mfcc.mfcc39: seconds of audio per CPU second (bench/README.md, bench/mfcc.py: 3,482-3,854)
MFCC_REALTIME_PER_CORE = 3700.0
# reading one utterance's model inputs, per video frame: ROI mp4 decode, wav, filterbanks, transforms
INPUT_CPU_SECONDS_PER_FRAME = 0.0007
# layer features (avhubert.extract.extract_batched, all layers, 125-frame clips, randomly
# initialised models of each size), one torch thread
LAYER_CPU_SECONDS_PER_FRAME = {"tiny": 0.0060, "base": 0.0118, "large": 0.0176}
# float32 products (numpy OpenBLAS sgemm: 90.8 GFLOP/s on one thread; with the argmin and the
# centroid sums of a k-means iteration or a labels assignment about 60)
CPU_GFLOPS_PER_CORE = 60.0
# the reference MiniBatchKMeans (n_init 20) on bench/kmeans.py's 1M x 768, K=500 case, CPU seconds
SKLEARN_CPU_SECONDS = 1100.0

# --- counted on the models (FlopCounterMode, layer-L extraction of a 125-frame clip) ------------
MODEL_FORWARD_GFLOP_PER_FRAME = {"tiny": 0.32, "base": 0.815, "large": 1.259}
MODEL_PARAMS = {"tiny": 5.04e6, "base": 102.8e6, "large": 324.9e6}
MODEL_DIM = {"tiny": 64, "base": 768, "large": 1024}
# --- assumed (no GPU measured here) --------------------------------------------------------------
GPU_TFLOPS = {"inference": 5.0, "training": 25.0}  # sustained: fp32 inference, fp16 training
CHECKPOINT_BYTES_PER_PARAM = 12  # weights + Adam moments (smoke run: 4 files of ~12 B/param)
CHECKPOINTS_KEPT = 4  # checkpoint_last, _best, one interval checkpoint, checkpoint_final

BASIS_CPU = ("CPU figures measured on the 2-core dev machine (stages/estimates.py); GPU hours = FLOPs counted on "
             f"the model / assumed {GPU_TFLOPS['inference']:g} TFLOP/s (fp32 inference), "
             f"{GPU_TFLOPS['training']:g} TFLOP/s (fp16 training)")


@dataclass
class CorpusSize:
    """What the estimates scale with (``stages.corpus_size`` finds it)."""

    frames: Dict[str, int] = field(default_factory=dict)  # 25 fps video frames per split
    items: Dict[str, int] = field(default_factory=dict)
    source: str = ""  # where the figures come from, for the plan's basis line

    def total(self, splits=None) -> int:
        return sum(v for k, v in self.frames.items() if splits is None or k in splits)

    def hours(self, splits=None) -> float:
        return self.total(splits) / VIDEO_RATE / 3600


def _model_name(config_path: Path) -> str:
    """tiny / base / large by the base config's encoder size (any config of that size)."""
    m = OmegaConf.load(config_path).get("model", {})
    by_dim = {64: "tiny", 768: "base", 1024: "large"}
    return by_dim.get(int(m.get("encoder_embed_dim", 768)), "base")


def _compute(est: Estimate, gflop: float, cpu_seconds: float, use_gpu: bool, kind: str = "inference") -> None:
    """Add work of ``gflop`` (on a GPU when the job has one) and ``cpu_seconds`` (always CPU)."""
    if use_gpu:
        est.gpu_hours += gflop / (GPU_TFLOPS[kind] * 1000) / 3600
    est.cpu_hours += cpu_seconds / 3600


# ---------------------------------------------------------------------------------- per stage
def crop(ctx: StageContext, size: CorpusSize) -> Estimate:
    c = ctx.cfg.crop
    frames, items = size.total(), sum(size.items.values())
    shards = int(c.n_shards) or math.ceil(items / max(int(c.items_per_shard), 1))
    return Estimate(disk_bytes=frames * sum(CROP_BYTES_PER_FRAME.values()),
                    peak_ram_bytes=CROP_BASE_RAM + int(c.frame_cache_mb) * 2**20, jobs=max(1, min(shards, items)),
                    cpu_hours=frames * CROP_CPU_SECONDS_PER_FRAME / 3600,
                    cpus=2,  # one Python process (decoding on one thread) and its one-thread ffmpeg encoder
                    detail=f"{items:,} items, {size.hours():,.{0 if size.hours() >= 10 else 2}f} h",
                    basis=[size.source, BASIS_CPU])


def manifest(size: CorpusSize) -> Estimate:
    items = sum(size.items.values())
    return Estimate(disk_bytes=items * 160, peak_ram_bytes=300 * MB + items * 600, jobs=1,
                    cpu_hours=items * 0.002 / 3600, basis=[size.source])


@dataclass
class FeatureCost:
    """What computing one iteration's features costs per video frame."""

    kind: str
    dim: int
    model: Optional[str]
    gflop: float  # per video frame, on the GPU when the job has one
    cpu_seconds: float  # per video frame, on the CPU (all of it without a GPU)
    per_video_frame: int  # feature frames per video frame


def mfcc_cost() -> FeatureCost:
    return FeatureCost("mfcc", 39, None, 0.0, 1 / VIDEO_RATE / MFCC_REALTIME_PER_CORE, MFCC_PER_FRAME)


def layer_cost(model_config: Optional[Path], res: Resources) -> FeatureCost:
    """Layer features of a model of ``model_config``'s size (None: the base size) in jobs of
    ``res``."""
    model = "base" if model_config is None else _model_name(model_config)
    if res.gpus_per_task > 0:
        return FeatureCost("layer", MODEL_DIM[model], model, MODEL_FORWARD_GFLOP_PER_FRAME[model],
                         INPUT_CPU_SECONDS_PER_FRAME, 1)
    return FeatureCost("layer", MODEL_DIM[model], model, 0.0,
                     INPUT_CPU_SECONDS_PER_FRAME + LAYER_CPU_SECONDS_PER_FRAME[model], 1)


def _feature_ram(f: FeatureCost) -> float:
    if f.kind == "mfcc":
        return 400 * MB
    return 1.5 * GB + 3 * 4 * MODEL_PARAMS[f.model]


def _kmeans_frames(ctx: StageContext, size: CorpusSize, f: FeatureCost) -> float:
    percent = float(ctx.cfg.kmeans.percent)
    train = size.total([str(ctx.cfg.kmeans.split)]) * f.per_video_frame
    return train if percent == -1 or percent >= 1 else train * percent


def features(ctx: StageContext, size: CorpusSize, f: FeatureCost) -> Estimate:
    c = ctx.cfg.features
    bytes_per = 2 if str(c.dtype) == "float16" else 4
    if str(c.store) == "all":
        video_frames = size.total(list(c.splits))
        written = video_frames * f.per_video_frame
        jobs = int(c.nshard) * len(list(c.splits))
        hint = "features.store=sample writes only what k-means samples"
    else:
        written = _kmeans_frames(ctx, size, f)
        video_frames = written / f.per_video_frame
        jobs = int(c.nshard)
        hint = "features.dtype=float16 halves it"
    est = Estimate(disk_bytes=written * f.dim * bytes_per, peak_ram_bytes=_feature_ram(f), jobs=jobs,
                   detail=f"{f.kind}{'' if f.kind == 'mfcc' else ' (' + f.model + ')'}, store={c.store}, "
                          f"{written / 1e6:,.1f}M x {f.dim} {c.dtype}",
                   basis=[size.source, BASIS_CPU], hint=hint)
    _compute(est, video_frames * f.gflop, video_frames * f.cpu_seconds, f.gflop > 0)
    return est


def kmeans(ctx: StageContext, size: CorpusSize, f: FeatureCost, k: int, backend_params: dict) -> Estimate:
    """``f``: the features k-means clusters; ``backend_params``: ``stages.kmeans.backend_params``."""
    c = ctx.cfg.kmeans
    sample = _kmeans_frames(ctx, size, f)
    if c.backend == "sklearn":
        frames = sample
        ram = 700 * MB + 1.3 * frames * f.dim * 4
        # MiniBatchKMeans with the reference settings: SKLEARN_CPU_SECONDS at 1M x 768, K=500
        # (bench/kmeans.py); its cost grows with K x D and weakly with N (it stops after 100
        # mini-batches without improvement)
        cpu_seconds = SKLEARN_CPU_SECONDS * (k * f.dim) / (500 * 768) * max(1.0, frames / 1e6) ** 0.5
        detail = f"sklearn on all {frames / 1e6:,.1f}M sampled frames"
    else:
        p = fast_params(str(c.backend), backend_params)
        sizes = {name: min(n, sample) for name, n in sample_sizes(k, p).items()}
        frames = min(sample, pool_frames(k, p))
        ram = 700 * MB + 2.5 * frames * f.dim * 4
        # seeding: candidates x points per step (in at most 64 principal dimensions, plus the
        # elementwise updates); Lloyd phases: ~8 and ~4 iterations (the tolerance stops them)
        seeding = sizes["seeding"] * int(p["init_trials"]) * k * (2 * min(f.dim, 64) + 8)
        lloyd = (8 * sizes["lloyd"] + 4 * sizes["refine"]) * k * f.dim * 2
        cpu_seconds = seeding / (CPU_GFLOPS_PER_CORE * 1e9 / 3) + lloyd / (CPU_GFLOPS_PER_CORE * 1e9)
        detail = f"{c.backend} on {frames / 1e6:,.2f}M of {sample / 1e6:,.1f}M sampled frames, K={k}"
    return Estimate(disk_bytes=k * f.dim * 4 * (2 if c.backend == "sklearn" else 1) + 10_000,
                    peak_ram_bytes=ram, jobs=1, cpu_hours=cpu_seconds / 3600, detail=detail,
                    basis=[size.source, BASIS_CPU])


def labels(ctx: StageContext, size: CorpusSize, f: FeatureCost, k: int, res: Resources,
           previous_features: Optional[Estimate]) -> Estimate:
    """``f``: the features computed in jobs of ``res``; ``previous_features``: the estimate of
    the previous iteration's features step (deleted after these labels with features.keep=false)."""
    c = ctx.cfg.features
    video_frames = size.total(list(c.splits))
    frames = video_frames * f.per_video_frame
    label_bytes = len(str(k - 1)) + 1  # digits and a space per label (upper bound)
    use_gpu = res.gpus_per_task > 0
    assign_gflop = frames * k * f.dim * 2 / 1e9
    est = Estimate(disk_bytes=2 * frames * label_bytes, jobs=int(c.nshard) * len(list(c.splits)),
                   basis=[size.source, BASIS_CPU])
    if str(c.store) == "all":
        est.peak_ram_bytes = 600 * MB + int(ctx.cfg.labels.chunk_frames) * (f.dim + k) * 4 * 3
        _compute(est, assign_gflop, 0 if use_gpu else assign_gflop / CPU_GFLOPS_PER_CORE, use_gpu)
        est.detail = f"assigns {frames / 1e6:,.1f}M frames read from the dump"
    else:
        est.peak_ram_bytes = _feature_ram(f) + int(ctx.cfg.labels.chunk_frames) * (f.dim + k) * 4 * 3
        _compute(est, video_frames * f.gflop + assign_gflop,
                 video_frames * f.cpu_seconds + (0 if use_gpu else assign_gflop / CPU_GFLOPS_PER_CORE),
                 use_gpu and f.kind == "layer")
        est.detail = f"computes and assigns {frames / 1e6:,.1f}M {f.kind} frames (no dump)"
    if previous_features is not None:
        prev = previous_features
        est.disk_bytes -= prev.disk_bytes
        est.detail += f"; then deletes iteration {ctx.iteration - 1}'s features ({prev.disk_bytes / GB:,.1f} GB)"
    return est


def train(ctx: StageContext, path: Path, updates: int, res: Resources, batch) -> Estimate:
    """Pretraining from the base config ``path`` for ``updates`` updates in a job of ``res``,
    ``batch`` (``avhubert.effective_batch.UpdateFreq``) batches per update."""
    base = OmegaConf.load(path)
    model = _model_name(path)
    max_tokens = int(OmegaConf.select(base, "dataset.max_tokens", default=1000) or 1000)
    frames = updates * batch.batches * max_tokens  # full batches: an upper bound
    gflop = 3 * MODEL_FORWARD_GFLOP_PER_FRAME[model] * frames  # forward + backward ~ 3 forwards
    est = Estimate(disk_bytes=CHECKPOINTS_KEPT * CHECKPOINT_BYTES_PER_PARAM * MODEL_PARAMS[model],
                   jobs=1, detail=f"{model}, {updates:,} updates x {batch.batches} batch(es) x {max_tokens} "
                   f"frames; {batch.describe()}", basis=[BASIS_CPU])
    if res.gpus_per_task > 0 or int(ctx.cfg.cluster.gpus_per_node or 0) > 0:
        _compute(est, gflop, 0, True, "training")
    else:
        est.cpu_hours = gflop / CPU_GFLOPS_PER_CORE / 3600
    return est


def finetune(ctx: StageContext, path: Path, updates: int, res: Resources, batch) -> Estimate:
    """Fine-tuning from the base config ``path`` for ``updates`` updates in a job of ``res``,
    ``batch`` batches per update."""
    base = OmegaConf.load(path)
    max_tokens = int(OmegaConf.select(base, "dataset.max_tokens", default=1000) or 1000)
    model = {64: "tiny", 768: "base", 1024: "large"}.get(
        int(OmegaConf.select(base, "model.decoder_embed_dim", default=768) or 768), "base")
    gflop = 3 * MODEL_FORWARD_GFLOP_PER_FRAME[model] * updates * batch.batches * max_tokens
    est = Estimate(disk_bytes=CHECKPOINTS_KEPT * CHECKPOINT_BYTES_PER_PARAM * MODEL_PARAMS[model] * 1.3,
                   jobs=1, detail=f"{model}, {updates:,} updates x {batch.batches} batch(es); {batch.describe()}",
                   basis=[BASIS_CPU])
    if res.gpus_per_task > 0 or int(ctx.cfg.cluster.gpus_per_node or 0) > 0:
        _compute(est, gflop, 0, True, "training")
    else:
        est.cpu_hours = gflop / CPU_GFLOPS_PER_CORE / 3600
    return est
