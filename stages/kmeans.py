"""k-means stage: one shard that trains iteration N's clustering on a sample of its features.

The sample is the reference ``learn_kmeans.py``'s: ``kmeans.percent`` of the utterances of each
features shard of ``kmeans.split`` (train), a seeded draw per shard (ceil; -1 = every utterance).
With ``features.store=sample`` (default) the features stage wrote exactly those utterances; with
``features.store=all`` they are drawn here from the full dump; the same utterances either way.

What is read depends on ``kmeans.backend``:
- ``numpy`` (default), ``torch`` (GPU) and ``faiss``: only the frames they train on, a pool of at
  most ``speechfeat.kmeans.pool_frames(K)`` frames (262,144 with the defaults: the seeding, Lloyd
  and refine samples are drawn from it) drawn from the sample by seeded utterance sampling and
  read straight from the shard files (``SampleSet.draw``): peak memory is that pool, whatever the
  corpus size;
- ``sklearn``: MiniBatchKMeans with the reference settings (n_init 20, batch 10000, ...) on every
  sampled frame in memory, as the reference does (at LRS3 + VoxCeleb2 size, 10 % of 158M layer
  frames = ~49 GB). It is the reference, one key away (``kmeans.backend=sklearn``), not the
  default: numpy is 20x+ faster at a lower inertia (bench/kmeans.py).
The inertia in the stats is computed in chunks over the frames trained on. Writes
``iter{N}/kmeans/kmeans.joblib``: a dict with the centroids whatever the backend
(``speechfeat.kmeans.load_model``), which is all the labels stage needs.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from pipeline.errors import ConfigError
from pipeline.fingerprint import classify
from pipeline.stage import Shard, Stage, StageContext
from speechfeat import kmeans as km
from speechfeat.kmeans import SampleSet, backend_problem, sample_set as dump_sample
from speechfeat.shards import FeatureShard, count_tsv_rows, read_rows_file
from stages import crop, estimates, features
from stages.features import sample_draw, shard_files, store_mode
from stages.schedule import iteration_spec

log = logging.getLogger(__name__)


SKLEARN_KEYS = ("n_init", "max_iter", "batch_size", "tol", "max_no_improvement", "reassignment_ratio")
FAST_KEYS = ("seedings", "init_points_per_centroid", "init_max_points", "init_trials", "init_pca_variance", "niter",
             "max_points_per_centroid", "refine_niter", "refine_points_per_centroid", "refine_max_points", "lloyd_tol")


# (the features stage reads percent, seed and split too: it draws the sample)
@classify(output=("backend", "n_clusters", "percent", "seed", "split", "init", *SKLEARN_KEYS, *FAST_KEYS),
          ignored={"device": "where it runs", "threads": "how many threads compute"})
@dataclass
class Config:
    # "numpy" (default: k-means++ seeding and Lloyd iterations on bounded samples, BLAS products),
    # "torch" (the same on a GPU), "faiss" (the same seeding, faiss's Lloyd iterations) or
    # "sklearn" (the reference learn_kmeans.py: MiniBatchKMeans, whole sample in memory)
    backend: str = "numpy"
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
    # numpy, faiss and torch (speechfeat.kmeans.FAST_DEFAULTS, where the choices are measured)
    seedings: int = 1  # k-means++ seedings, the best on the seeding sample kept
    init_points_per_centroid: int = 128  # seeding sample = this x K frames, at most init_max_points
    init_max_points: int = 65536
    init_trials: int = 32  # candidates per k-means++ step
    init_pca_variance: float = 0.95  # seed in the principal subspace holding this share of variance (0: off)
    niter: int = 10  # Lloyd iterations (at most) on max_points_per_centroid x K frames
    max_points_per_centroid: int = 128
    refine_niter: int = 10  # then at most this many on refine_points_per_centroid x K frames (<= refine_max_points)
    refine_points_per_centroid: int = 4096
    refine_max_points: int = 262144
    lloyd_tol: float = 1e-3  # a phase stops once an iteration lowers the inertia by less than this (relative)
    threads: int = 0  # 0 = all the job's CPUs


def n_clusters(ctx: StageContext) -> int:
    k = ctx.cfg.kmeans.get("n_clusters")
    return int(k) if k else int(iteration_spec(ctx.cfg, ctx.iteration).n_clusters)


def model_path(ctx: StageContext) -> Path:
    return ctx.stage_dir("kmeans") / "kmeans.joblib"


def backend_params(c) -> dict:
    if c.backend == "sklearn":
        return {"init": str(c.init), "n_init": int(c.n_init), "max_iter": int(c.max_iter),
                "batch_size": int(c.batch_size), "tol": float(c.tol), "max_no_improvement": int(c.max_no_improvement),
                "reassignment_ratio": float(c.reassignment_ratio)}
    return {"init": str(c.init), "n_init": int(c.seedings), "init_points_per_centroid": int(c.init_points_per_centroid),
            "init_max_points": int(c.init_max_points), "init_trials": int(c.init_trials),
            "init_pca_variance": float(c.init_pca_variance), "tol": float(c.lloyd_tol), "niter": int(c.niter),
            "max_points_per_centroid": int(c.max_points_per_centroid), "refine_niter": int(c.refine_niter),
            "refine_points_per_centroid": int(c.refine_points_per_centroid),
            "refine_max_points": int(c.refine_max_points), "threads": int(c.threads),
            **({"device": str(c.device)} if c.backend == "torch" else {})}


class KmeansStage(Stage):
    name = "kmeans"
    depends_on = ("features",)
    per_iteration = True
    libraries = ("numpy", "torch", "scikit-learn", "faiss-cpu|faiss-gpu|faiss")

    def settings(self, ctx: StageContext) -> dict:
        s = super().settings(ctx)
        s["kmeans.n_clusters"] = n_clusters(ctx)  # null = the schedule's K: the K trained is what counts
        unused = FAST_KEYS if ctx.cfg.kmeans.backend == "sklearn" else SKLEARN_KEYS
        return {k: v for k, v in s.items() if k.split(".", 1)[1] not in unused}

    def validate(self, ctx: StageContext) -> None:
        c = ctx.cfg.kmeans
        problem = backend_problem(str(c.backend))
        if problem:  # an unknown backend, or faiss (an optional extra) not installed
            raise ConfigError(problem)
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

    def estimate(self, ctx: StageContext):
        return estimates.kmeans(ctx, crop.STAGE.corpus_sizes.of(ctx), features.feature_cost(ctx, "features"),
                                n_clusters(ctx), backend_params(ctx.cfg.kmeans))

    def outputs(self, ctx: StageContext, shard: Shard) -> list[Path]:
        return [model_path(ctx)]

    def run(self, ctx: StageContext, shard: Shard) -> dict:
        c = ctx.cfg.kmeans
        t0 = time.time()
        samples = sample_set(ctx)
        k = n_clusters(ctx)
        log.info("kmeans: %d utterances, %d frames x %d dims sampled; training K=%d with %s",
                 samples.n_utterances, samples.n_frames, samples.dim, k, c.backend)
        try:
            model = km.fit_sample(samples, k, str(c.backend), int(c.seed), backend_params(c))
        finally:
            samples.close()
        model["percent"] = float(c.percent)
        model["iteration"] = ctx.iteration
        # timings go to the shard's stats, never into the model file (same inputs, same bytes)
        train_seconds = model.pop("train_seconds")
        km.save_model(model_path(ctx), model)
        return {"backend": c.backend, "n_clusters": k, "frames": model["n_frames"], "dim": model["dim"],
                "sample_frames": model["sample_frames"], "sample_utterances": model["sample_utterances"],
                "inertia": model["inertia"], "inertia_per_frame": model["inertia"] / max(model["n_frames"], 1),
                "train_seconds": round(train_seconds, 2), "seconds": round(time.time() - t0, 2)}


def sample_set(ctx: StageContext):
    """The utterances k-means samples (``speechfeat.kmeans.SampleSet``), from the features stage's
    sample files or drawn from its full dump. Opens headers and lengths only."""
    c = ctx.cfg.kmeans
    nshard = int(ctx.cfg.features.nshard)
    keys = [f"{c.split}_{r}_{nshard}" for r in range(nshard)]
    files = [shard_files(ctx, key) for key in keys]
    for f in files:
        if not f["npy"].is_file() or not f["len"].is_file():
            if f["removed"].exists():
                raise FileNotFoundError(f"{f['npy']} was deleted (features.keep=false): rerun "
                                        f"`--stage features --iteration {ctx.iteration} --force` first")
            raise FileNotFoundError(f"{f['npy']}: feature shard missing (run the features stage)")
    if store_mode(ctx) == "all":
        return dump_sample([(f["npy"], f["len"]) for f in files], float(c.percent), int(c.seed))
    # the sample files must hold today's draw: a changed percent or seed needs new features
    n_rows = count_tsv_rows(ctx.with_iteration(None).stage_dir("manifest") / f"{c.split}.tsv")
    shards = []
    for rank, f in enumerate(files):
        want = sample_draw(n_rows, rank, nshard, float(c.percent), int(c.seed))
        if not np.array_equal(read_rows_file(f["rows"]), want):
            raise ValueError(f"{f['rows']}: the features stage sampled other utterances than kmeans.percent="
                             f"{c.percent}, kmeans.seed={c.seed} draw now (settings or manifest changed since): "
                             f"rerun `--stage features --iteration {ctx.iteration} --force`")
        shards.append(FeatureShard(f["npy"], f["len"]))
    return SampleSet(shards, [np.arange(len(sh.lengths)) for sh in shards])


STAGE = KmeansStage()
