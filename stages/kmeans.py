"""k-means stage: one shard that trains iteration N's clustering on a sample of its features.

Reads the features stage's shards of ``kmeans.split`` (train) through mmap, draws a seeded sample
of whole utterances (``kmeans.percent`` of each shard's utterances, ceil, as the reference
``learn_kmeans.py``; -1 = every frame) into one preallocated array (peak memory ~ the sample),
trains ``n_clusters`` = the schedule's K (or ``kmeans.n_clusters``) with ``kmeans.backend``:
``sklearn`` (MiniBatchKMeans with the reference settings) or ``faiss`` (k-means++ seeding + Lloyd
iterations, the fast one; see ``speechfeat.kmeans`` and bench/kmeans.py). Writes
``iter{N}/kmeans/kmeans.joblib``: a dict with the centroids whatever the backend
(``speechfeat.kmeans.load_model``), which is all the labels stage needs.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from pipeline.errors import ConfigError
from pipeline.stage import Shard, Stage, StageContext

log = logging.getLogger(__name__)


@dataclass
class Config:
    backend: str = "sklearn"  # "sklearn" (reference MiniBatchKMeans), "faiss" (faster, CPU) or "torch" (GPU)
    device: str = "auto"  # torch backend: "auto" (cuda when available), "cpu", "cuda"
    n_clusters: Optional[int] = None  # None = the schedule's K for this iteration
    percent: float = 0.1  # share of utterances per shard sampled (reference recipe); -1 = all frames
    seed: int = 0
    split: str = "train"
    # sklearn (reference learn_kmeans.py defaults)
    init: str = "k-means++"
    n_init: int = 20
    max_iter: int = 100
    batch_size: int = 10000
    tol: float = 0.0
    max_no_improvement: int = 100
    reassignment_ratio: float = 0.0
    # faiss and torch (speechfeat.kmeans.FAISS_DEFAULTS; n_init above is sklearn's, faiss_n_init theirs)
    faiss_n_init: int = 1  # k-means++ seedings, the best on the seeding sample kept (more: no gain measured)
    init_points_per_centroid: int = 512  # seeding sample = this x K frames, at most init_max_points
    init_max_points: int = 65536
    niter: int = 20  # Lloyd iterations on max_points_per_centroid x K frames
    max_points_per_centroid: int = 256
    refine_niter: int = 5  # then this many on refine_points_per_centroid x K frames (<= refine_max_points)
    refine_points_per_centroid: int = 4096
    refine_max_points: int = 262144
    threads: int = 0  # 0 = all the job's CPUs


def n_clusters(ctx: StageContext) -> int:
    from stages.schedule import iteration_spec

    k = ctx.cfg.kmeans.get("n_clusters")
    return int(k) if k else int(iteration_spec(ctx.cfg, ctx.iteration).n_clusters)


def model_path(ctx: StageContext) -> Path:
    return ctx.stage_dir("kmeans") / "kmeans.joblib"


def backend_params(c) -> dict:
    if c.backend == "sklearn":
        return {"init": str(c.init), "n_init": int(c.n_init), "max_iter": int(c.max_iter),
                "batch_size": int(c.batch_size), "tol": float(c.tol), "max_no_improvement": int(c.max_no_improvement),
                "reassignment_ratio": float(c.reassignment_ratio)}
    return {"init": str(c.init), "n_init": int(c.faiss_n_init), "init_points_per_centroid": int(c.init_points_per_centroid),
            "init_max_points": int(c.init_max_points), "niter": int(c.niter), "max_points_per_centroid": int(c.max_points_per_centroid),
            "refine_niter": int(c.refine_niter), "refine_points_per_centroid": int(c.refine_points_per_centroid),
            "refine_max_points": int(c.refine_max_points), "threads": int(c.threads),
            **({"device": str(c.device)} if c.backend == "torch" else {})}


class KmeansStage(Stage):
    name = "kmeans"
    depends_on = ("features",)
    per_iteration = True

    def validate(self, ctx: StageContext) -> None:
        from speechfeat.kmeans import BACKENDS

        c = ctx.cfg.kmeans
        if c.backend not in BACKENDS:
            raise ConfigError(f"kmeans.backend={c.backend!r}: must be one of {', '.join(BACKENDS)}")
        p = float(c.percent)
        if not (p == -1 or 0 < p <= 1):
            raise ConfigError(f"kmeans.percent={c.percent}: must be in (0, 1] or -1 (all frames)")
        if n_clusters(ctx) < 2:
            raise ConfigError(f"kmeans.n_clusters={n_clusters(ctx)}: need at least 2 clusters")
        if c.split not in ctx.cfg.features.splits:
            raise ConfigError(f"kmeans.split={c.split!r} is not featurized (features.splits={list(ctx.cfg.features.splits)})")
        if c.init not in ("k-means++", "random"):
            raise ConfigError(f"kmeans.init={c.init!r}: must be k-means++ or random")

    def shards(self, ctx: StageContext) -> list[Shard]:
        return [Shard(0, 1, "all")]

    def outputs(self, ctx: StageContext, shard: Shard) -> list[Path]:
        return [model_path(ctx)]

    def run(self, ctx: StageContext, shard: Shard) -> dict:
        from speechfeat import kmeans as km

        c = ctx.cfg.kmeans
        nshard = int(ctx.cfg.features.nshard)
        feat_dir = ctx.stage_dir("features")
        shards = [(feat_dir / f"{c.split}_{r}_{nshard}.npy", feat_dir / f"{c.split}_{r}_{nshard}.len")
                  for r in range(nshard)]
        for npy, len_path in shards:
            if not npy.is_file() or not len_path.is_file():
                raise FileNotFoundError(f"{npy}: feature shard missing (run the features stage)")
        t0 = time.time()
        x = km.sample_frames(shards, float(c.percent), int(c.seed))
        sample_seconds = time.time() - t0
        k = n_clusters(ctx)
        log.info("kmeans: %d frames x %d dims sampled in %.1fs; training K=%d with %s", len(x), x.shape[1],
                 sample_seconds, k, c.backend)
        model = km.fit(x, k, str(c.backend), int(c.seed), backend_params(c))
        model["percent"] = float(c.percent)
        model["iteration"] = ctx.iteration
        # timings go to the shard's stats, never into the model file (same inputs, same bytes)
        train_seconds = model.pop("train_seconds")
        km.save_model(model_path(ctx), model)
        return {"backend": c.backend, "n_clusters": k, "frames": model["n_frames"], "dim": model["dim"],
                "inertia": model["inertia"], "train_seconds": round(train_seconds, 2),
                "sample_seconds": round(sample_seconds, 2)}


STAGE = KmeansStage()
