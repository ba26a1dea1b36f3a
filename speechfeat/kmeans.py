"""k-means for the pseudo-labels: sampling frames from feature shards, four training backends,
and the nearest-centroid assignment the labels stage applies.

Backends (``fit``):
- ``numpy`` (default): greedy k-means++ seeding, then Lloyd iterations on a sample and refine
  iterations on a larger one (``FAST_DEFAULTS``), every distance a BLAS product (numpy's
  OpenBLAS); at least 20x faster than the reference settings at a lower inertia (bench/kmeans.py).
- ``torch``: the same seeding and samples, Lloyd iterations in torch, for a GPU (``device``).
- ``faiss``: the same seeding and samples, faiss's Lloyd iterations (faiss-cpu, an optional
  extra: ``pip install 'avhubert-pipeline[faiss]'``; ``backend_problem`` says so). It was to be
  the default, but faiss-cpu's wheel spends about 5x numpy's time per Lloyd iteration on 39-d
  MFCCs and 1.15x on 768-d features (its search at 1M x 768, K=500 is BLAS-bound like numpy's;
  at 39-d its own scan dominates), measured on the dev machine.
- ``sklearn``: MiniBatchKMeans with the reference ``learn_kmeans.py`` settings (k-means++ init,
  n_init 20, max_iter 100, batch 10000, tol 0, max_no_improvement 100, reassignment_ratio 0,
  init_size = 3 x batch as sklearn's default), on everything it is given.

``SampleSet`` / ``fit_sample`` train from feature shards reading only what a backend uses.

The saved model (``save_model``/``load_model``, joblib) is a plain dict whatever the backend:
``{"format": "speechfeat-kmeans-1", "centroids": float32 (K, D), "backend", "inertia",
"n_frames", "params", "sklearn_model" (sklearn backend only, for tools expecting it)}``.
``load_centroids`` also accepts a bare sklearn model (e.g. one made by the reference scripts).
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence, Tuple

import numpy as np

from pipeline import atomic
from speechfeat.shards import FeatureShard

log = logging.getLogger(__name__)

FORMAT = "speechfeat-kmeans-1"
BACKENDS = ("numpy", "faiss", "torch", "sklearn")
FAISS_MISSING = ("kmeans.backend=faiss needs faiss, which is not installed: pip install "
                 "'avhubert-pipeline[faiss]' (or faiss-cpu), or use the default kmeans.backend=numpy")

SKLEARN_DEFAULTS = dict(init="k-means++", n_init=20, max_iter=100, batch_size=10000, tol=0.0,
                        max_no_improvement=100, reassignment_ratio=0.0, init_size=None)
# numpy, faiss and torch backends. Measured with bench/kmeans.py's data (1M x 768, K=500 and
# 1M x 39, K=100), inertia on held-out frames relative to the reference settings':
# - the seeding decides most of the final inertia: greedy k-means++ with 32 candidates per step
#   on 128 x K frames (at most 65,536) ended 0.2-0.5 % lower than 2 + ln K candidates at the same
#   cost (more frames, fewer candidates), and 0.5-1 % lower than seeding 16-32 x K frames;
# - at 768-d the seeding measures distances in the principal subspace holding 95 % of the
#   sample's variance (64 dimensions on the bench data): 6.2 s of one core instead of 24.7 s for
#   the same seeding in 768 dimensions, final inertia within 0.1 %; a 39-d MFCC sample is not
#   projected (95 % needs more than half its dimensions);
# - Lloyd iterations on 128 x K frames, then refine iterations on 4,096 x K frames (at most
#   262,144: more frames per centroid is what brings the MFCC case below the reference), each
#   phase stopped once an iteration gains less than 0.1 % (8-9, then 3-5 iterations on the
#   bench data; 1e-4 cost 40 % more for 0.2 % on MFCC).
# The pool these samples come from (``pool_frames``) is what the kmeans stage reads.
FAST_DEFAULTS = dict(init="k-means++", n_init=1, init_points_per_centroid=128, init_max_points=65536,
                     init_trials=32, init_pca_variance=0.95, niter=10, max_points_per_centroid=128, refine_niter=10,
                     refine_points_per_centroid=4096, refine_max_points=262144, tol=1e-3, threads=0)


# ------------------------------------------------------------------------------------ sampling
def choose_utterances(n_utts: int, percent: float, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of the utterances kept: ceil(percent x n) of them drawn without
    replacement (as the reference), all of them for percent -1 (or >= 1)."""
    if percent == -1 or percent >= 1:
        return np.arange(n_utts)
    if not 0 < percent < 1:
        raise ValueError(f"percent={percent}: must be in (0, 1) or -1 (all frames)")
    n = min(n_utts, int(np.ceil(n_utts * percent)))
    return np.sort(rng.choice(n_utts, n, replace=False))


class SampleSet:
    """The utterances k-means may draw its frames from: ``picks[i]`` (sorted utterance indices)
    of ``shards[i]`` (:class:`speechfeat.shards.FeatureShard`), in shard order. Nothing is read
    until asked: ``draw`` reads only the utterances it keeps, ``read_all`` everything (the
    reference's in-memory sample), ``iter_chunks`` streams it."""

    def __init__(self, shards: Sequence, picks: Sequence[np.ndarray]):
        if not shards:
            raise ValueError("no feature shards to sample from")
        self.shards = list(shards)
        self.dim = self.shards[0].dim
        for sh in self.shards:
            if sh.dim != self.dim:
                raise ValueError(f"{sh.npy_path}: {sh.dim}-d features, other shards have {self.dim}")
        self.shard_of = np.concatenate([np.full(len(p), i, np.int64) for i, p in enumerate(picks)])
        self.utt_of = np.concatenate([np.asarray(p, np.int64) for p in picks])
        self.lengths = np.concatenate([sh.lengths[np.asarray(p, np.int64)] for sh, p in zip(self.shards, picks)])

    @property
    def n_frames(self) -> int:
        return int(self.lengths.sum())

    @property
    def n_utterances(self) -> int:
        return len(self.lengths)

    def _read_into(self, which: np.ndarray, out: np.ndarray, keep: Optional[Sequence[np.ndarray]] = None) -> None:
        pos = 0
        for n, u in enumerate(which):
            sh = self.shards[self.shard_of[u]]
            j = self.utt_of[u]
            if keep is None:
                a, b = sh.offsets[j], sh.offsets[j + 1]
                sh.read(a, b, out[pos:pos + b - a])
                pos += b - a
            elif len(keep[n]):
                rows = sh.utterance(j)[keep[n]]
                out[pos:pos + len(rows)] = rows
                pos += len(rows)

    def read_all(self) -> np.ndarray:
        """Every frame of the set as one float32 (N, D) array (preallocated: peak ~ the sample)."""
        out = np.empty((self.n_frames, self.dim), dtype=np.float32)
        self._read_into(np.arange(self.n_utterances), out)
        return out

    def draw(self, n_frames: int, rng: np.random.Generator) -> np.ndarray:
        """``n_frames`` frames (all of them when the set has no more) from utterances drawn in a
        seeded random order until they hold enough, then thinned to exactly ``n_frames`` at
        random rows. Only those utterances are read; the result is the only large allocation."""
        if n_frames >= self.n_frames:
            return self.read_all()
        order = rng.permutation(self.n_utterances)
        cum = np.cumsum(self.lengths[order])
        chosen = np.sort(order[: int(np.searchsorted(cum, n_frames)) + 1])  # shard and file order
        lengths = self.lengths[chosen]
        kept = np.sort(rng.choice(int(lengths.sum()), n_frames, replace=False))
        starts = np.concatenate([[0], np.cumsum(lengths)])
        bounds = np.searchsorted(kept, starts)
        keep = [kept[bounds[i]:bounds[i + 1]] - starts[i] for i in range(len(chosen))]
        out = np.empty((n_frames, self.dim), dtype=np.float32)
        self._read_into(chosen, out, keep)
        return out

    def iter_chunks(self, chunk_frames: int = 262144) -> Iterator[np.ndarray]:
        """Every frame of the set, in float32 chunks of about ``chunk_frames`` rows."""
        group: list = []
        size = 0
        for u in range(self.n_utterances):
            group.append(u)
            size += int(self.lengths[u])
            if size >= chunk_frames:
                out = np.empty((size, self.dim), dtype=np.float32)
                self._read_into(np.array(group), out)
                yield out
                group, size = [], 0
        if size:
            out = np.empty((size, self.dim), dtype=np.float32)
            self._read_into(np.array(group), out)
            yield out

    def close(self) -> None:
        for sh in self.shards:
            sh.close()


def sample_set(shards: Sequence[Tuple[Path, Path]], percent: float, seed: int) -> SampleSet:
    """The reference's sample of a feature dump: from each shard (``(npy, len)`` paths) a seeded
    draw of ``percent`` of its utterances (``choose_utterances``, one random stream per shard
    index, so the draw of a shard does not depend on the others)."""
    opened, picks = [], []
    for i, (npy, len_path) in enumerate(shards):
        sh = FeatureShard(npy, len_path)
        opened.append(sh)
        picks.append(choose_utterances(len(sh.lengths), percent, np.random.default_rng([int(seed), i])))
    return SampleSet(opened, picks)


def sample_frames(shards: Sequence[Tuple[Path, Path]], percent: float, seed: int) -> np.ndarray:
    """Frames of a seeded draw of utterances from every shard (``(npy, len)`` paths), as one
    float32 (N, D) array (``sample_set(...).read_all()``)."""
    ss = sample_set(shards, percent, seed)
    try:
        return ss.read_all()
    finally:
        ss.close()


# ------------------------------------------------------------------------------------ training
def fit(x: np.ndarray, n_clusters: int, backend: str = "numpy", seed: int = 0,
        params: Optional[dict] = None) -> dict:
    """Train k-means on (N, D) frames; returns the model dict (see module doc). The inertia is
    over all of ``x`` (chunked); ``train_seconds`` / ``train_cpu_seconds`` (wall, and CPU time of
    all the process's threads) exclude it: timings for stats, not for the saved file."""
    problem = backend_problem(backend)
    if problem:
        raise ValueError(problem)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if len(x) < n_clusters:
        raise ValueError(f"{len(x)} sampled frames are fewer than {n_clusters} clusters: raise kmeans.percent")
    t0, c0 = time.time(), time.process_time()
    if backend == "sklearn":
        used = {**SKLEARN_DEFAULTS, **(params or {})}
        model = _fit_sklearn(x, n_clusters, seed, used)
        centroids = model.cluster_centers_.astype(np.float32)
        extra = {"sklearn_model": model}
    else:
        used = fast_params(backend, params)
        centroids = {"numpy": _fit_numpy, "faiss": _fit_faiss, "torch": _fit_torch}[backend](x, n_clusters, seed, used)
        extra = {}
    seconds, cpu_seconds = time.time() - t0, time.process_time() - c0
    _, inertia = assign(x, centroids, return_inertia=True)
    return {"format": FORMAT, "backend": backend, "centroids": centroids, "inertia": float(inertia),
            "n_frames": int(len(x)), "dim": int(x.shape[1]), "seed": int(seed), "params": used,
            "train_seconds": seconds, "train_cpu_seconds": cpu_seconds, **extra}


def backend_problem(backend: str) -> Optional[str]:
    """Why ``backend`` cannot train here (one line), or None: an unknown name, or faiss (an
    optional extra) not installed. Asked before anything runs (the kmeans stage's validation)."""
    if backend not in BACKENDS:
        return f"kmeans.backend={backend!r}: must be one of {', '.join(BACKENDS)}"
    if backend == "faiss":
        if importlib.util.find_spec("faiss") is None:
            return FAISS_MISSING
    return None


def fast_params(backend: str, params: Optional[dict] = None) -> dict:
    """``FAST_DEFAULTS`` under ``params`` (plus ``device`` for torch)."""
    return {**FAST_DEFAULTS, **({"device": "auto"} if backend == "torch" else {}), **(params or {})}


def sample_sizes(n_clusters: int, params: Optional[dict] = None) -> dict:
    """Frames of the seeding, Lloyd and refine samples of the numpy/faiss/torch backends."""
    p = fast_params("numpy", params)
    k = int(n_clusters)
    return {"seeding": max(k, min(int(p["init_points_per_centroid"]) * k, int(p["init_max_points"]))),
            "lloyd": max(k, int(p["max_points_per_centroid"]) * k) if int(p["niter"]) else 0,
            "refine": (max(k, min(int(p["refine_points_per_centroid"]) * k, int(p["refine_max_points"])))
                       if int(p["refine_niter"]) else 0)}


def pool_frames(n_clusters: int, params: Optional[dict] = None) -> int:
    """Frames the numpy/faiss/torch backends train on at most (the largest of their seeding,
    Lloyd and refine samples, which are drawn from it): what the kmeans stage reads, whatever
    the corpus size."""
    return max(sample_sizes(n_clusters, params).values())


def fit_sample(samples: "SampleSet", n_clusters: int, backend: str = "numpy", seed: int = 0,
               params: Optional[dict] = None) -> dict:
    """Train on a :class:`SampleSet` reading only what the backend uses: ``pool_frames`` frames
    drawn by utterance (``SampleSet.draw``) for numpy/faiss/torch, so memory does not grow with
    the corpus; every sampled frame for sklearn (the reference holds its whole sample in memory).
    The reported inertia is over the frames trained on (computed in chunks)."""
    if backend == "sklearn":
        x = samples.read_all()
    else:
        x = samples.draw(pool_frames(n_clusters, params), np.random.default_rng([int(seed), 1]))
    model = fit(x, n_clusters, backend, seed, params)
    model["sample_frames"] = samples.n_frames
    model["sample_utterances"] = samples.n_utterances
    return model


def _fit_sklearn(x, k, seed, p):
    from sklearn.cluster import MiniBatchKMeans

    model = MiniBatchKMeans(n_clusters=k, init=p["init"], max_iter=p["max_iter"], batch_size=p["batch_size"],
                            verbose=0, compute_labels=False, tol=p["tol"],
                            max_no_improvement=p["max_no_improvement"], init_size=p["init_size"],
                            n_init=p["n_init"], reassignment_ratio=p["reassignment_ratio"], random_state=seed)
    model.fit(x)
    return model


def _subsample(x, n, rng):
    """``n`` rows of ``x`` in their order, drawn without replacement (all of ``x`` when n >= N)."""
    if n >= len(x):
        return x
    # a random-key draw: O(N) and no full permutation (rng.choice without replacement shuffles N)
    keys = rng.random(len(x), dtype=np.float32)
    return x[np.sort(np.argpartition(keys, n - 1)[:n])]


def kmeans_plusplus(x: np.ndarray, k: int, rng: np.random.Generator,
                    n_local_trials: Optional[int] = None) -> np.ndarray:
    """Greedy k-means++ seeding: ``k`` rows of ``x`` (see ``kmeans_plusplus_rows``)."""
    return np.ascontiguousarray(x[kmeans_plusplus_rows(x, k, rng, n_local_trials)], dtype=np.float32)


def kmeans_plusplus_rows(x: np.ndarray, k: int, rng: np.random.Generator,
                         n_local_trials: Optional[int] = None) -> np.ndarray:
    """Row indices of a greedy k-means++ seeding (as sklearn's ``kmeans_plusplus``: each new
    centre is the best of ``n_local_trials`` (default ``2 + ln k``) candidates drawn with
    probability proportional to the squared distance to the nearest centre so far). One BLAS
    product per step over float32 rows, candidates x points so every reduction runs along
    contiguous memory."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = len(x)
    trials = int(n_local_trials or 2 + int(np.log(k)))
    x_sq = np.einsum("ij,ij->i", x, x)
    rows = np.empty(k, dtype=np.int64)
    rows[0] = int(rng.integers(n))
    closest = np.maximum(x_sq - 2.0 * (x @ x[rows[0]]) + x_sq[rows[0]], 0.0)
    for j in range(1, k):
        cumulative = np.cumsum(closest, dtype=np.float64)
        if cumulative[-1] <= 0:  # fewer distinct rows than k: any row is as good
            cand = rng.integers(n, size=trials)
        else:
            cand = np.minimum(np.searchsorted(cumulative, rng.random(trials) * cumulative[-1]), n - 1)
        dist = x[cand] @ x.T  # (trials, n)
        dist *= -2.0
        dist += x_sq[cand][:, None]
        dist += x_sq[None, :]
        np.maximum(dist, 0.0, out=dist)
        np.minimum(dist, closest[None, :], out=dist)
        best = int(dist.sum(axis=1, dtype=np.float64).argmin())
        closest = dist[best]
        rows[j] = cand[best]
    return rows


def principal_projection(x: np.ndarray, variance: float, max_rows: int = 16384) -> Optional[np.ndarray]:
    """(D, d) float32 basis of the fewest principal directions of ``x`` that hold ``variance`` of
    its variance (from at most ``max_rows`` evenly spaced rows), or None when that takes more
    than half the dimensions (then projecting saves too little)."""
    sub = np.asarray(x[:: max(1, len(x) // max_rows)], dtype=np.float64)
    sub = sub - sub.mean(0)
    w, v = np.linalg.eigh(sub.T @ sub)
    w, v = w[::-1], v[:, ::-1]
    total = w.sum()
    if total <= 0:
        return None
    dims = int(np.searchsorted(np.cumsum(w) / total, variance)) + 1
    return None if 2 * dims > x.shape[1] else np.ascontiguousarray(v[:, :dims], dtype=np.float32)


def _seed_centroids(x, k, p, rng):
    """Initial centroids from a sample of ``x``: the best of ``n_init`` greedy k-means++ seedings.
    With ``init_pca_variance`` > 0 the seeding measures distances in the principal subspace that
    holds that share of the sample's variance (when it has at most half the dimensions: 768-d
    layer features, not 39-d MFCCs), then takes the chosen rows in full dimension."""
    if p["init"] == "k-means++":
        sample = np.ascontiguousarray(_subsample(x, sample_sizes(k, p)["seeding"], rng), dtype=np.float32)
        variance = float(p.get("init_pca_variance") or 0.0)
        basis = principal_projection(sample, variance) if 0 < variance < 1 else None
        space = sample if basis is None else np.ascontiguousarray((sample - sample.mean(0)) @ basis)
        best = None
        for _ in range(max(1, int(p["n_init"]))):
            c = sample[kmeans_plusplus_rows(space, k, rng, int(p.get("init_trials") or 0) or None)]
            _, inertia = assign(sample, c, return_inertia=True) if int(p["n_init"]) > 1 else (None, 0.0)
            if best is None or inertia < best[0]:
                best = (inertia, c)
        return np.ascontiguousarray(best[1])
    if p["init"] == "random":
        return np.ascontiguousarray(_subsample(x, k, rng), dtype=np.float32)
    raise ValueError(f"kmeans init {p['init']!r}: must be k-means++ or random")


def _phases(x, k, p, rng):
    """(sample, iterations) of the Lloyd phases: ``niter`` on ``max_points_per_centroid`` x K
    frames, then ``refine_niter`` on the (larger) refine sample."""
    sizes = sample_sizes(k, p)
    for phase, niter in (("lloyd", p["niter"]), ("refine", p["refine_niter"])):
        if int(niter) > 0:
            yield np.ascontiguousarray(_subsample(x, sizes[phase], rng)), int(niter)


def _blas_threads(p):
    from threadpoolctl import threadpool_limits

    return threadpool_limits(int(p["threads"])) if int(p.get("threads") or 0) > 0 else contextlib.nullcontext()


def _fit_numpy(x, k, seed, p):
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(seed)
    with _blas_threads(p):
        # seeding is many small products: on one BLAS thread (more threads spin, not compute)
        with threadpool_limits(1):
            c = _seed_centroids(x, k, p, rng)
        for xs, niter in _phases(x, k, p, rng):
            c = lloyd(xs, c, niter, float(p.get("tol") or 0.0))
    return c


def lloyd(x: np.ndarray, centroids: np.ndarray, niter: int, tol: float = 0.0, chunk: int = 32768) -> np.ndarray:
    """At most ``niter`` Lloyd iterations (assign every row, move each centroid to its rows'
    mean; an empty cluster keeps its centroid), with BLAS distance products in chunks; stops once
    an iteration lowers the inertia by less than ``tol`` (relative)."""
    c = np.array(centroids, dtype=np.float32)
    k, n = len(c), len(x)
    buf = np.empty((min(chunk, n), k), dtype=np.float32)
    x_sq = float(np.einsum("ij,ij->", x, x, dtype=np.float64)) if tol > 0 else 0.0
    previous = None
    for it in range(int(niter)):
        sums = np.zeros(c.shape, dtype=np.float64)
        counts = np.zeros(k, dtype=np.int64)
        neg2c, c_sq = -2.0 * c, np.einsum("ij,ij->i", c, c)
        partial = 0.0  # sum over rows of min_c (||c||^2 - 2 x.c): the inertia less sum ||x||^2
        for a in range(0, n, chunk):
            xb = x[a:a + chunk]
            d = buf[:len(xb)]
            lab = _nearest(xb, neg2c, c_sq, d)
            if tol > 0:
                partial += float(d[np.arange(len(xb)), lab].sum(dtype=np.float64))
            counts += np.bincount(lab, minlength=k)
            sums += _cluster_sums(xb, lab, k)
        keep = counts > 0
        c[keep] = (sums[keep] / counts[keep, None]).astype(np.float32)
        if tol > 0:
            inertia = x_sq + partial  # of the assignment just made (before this move)
            log.debug("lloyd: %d rows, iteration %d, inertia %.6e", n, it + 1, inertia)
            if _converged(previous, inertia, tol):
                break
            previous = inertia
    return c


def _nearest(xb: np.ndarray, neg2c: np.ndarray, c_sq: np.ndarray, out: np.ndarray) -> np.ndarray:
    # ||x||^2 is the same for every centroid: argmin of ||c||^2 - 2 x.c (-2c is exact in float32)
    np.dot(xb, neg2c.T, out=out)
    out += c_sq
    return out.argmin(1)


def _cluster_sums(xb: np.ndarray, lab: np.ndarray, k: int) -> np.ndarray:
    """Per-cluster sums of the rows (a sparse one-hot product: one pass over the rows)."""
    from scipy import sparse

    onehot = sparse.csr_matrix((np.ones(len(lab), dtype=np.float32), (lab, np.arange(len(lab)))), shape=(k, len(lab)))
    return np.asarray(onehot @ xb)


def _converged(previous: Optional[float], inertia: float, tol: float) -> bool:
    return tol > 0 and previous is not None and previous - inertia < tol * inertia


def _fit_faiss(x, k, seed, p):
    import faiss

    if int(p.get("threads") or 0) > 0:
        faiss.omp_set_num_threads(int(p["threads"]))
    rng = np.random.default_rng(seed)
    d, tol = x.shape[1], float(p.get("tol") or 0.0)
    c = _seed_centroids(x, k, p, rng)
    for xs, niter in _phases(x, k, p, rng):
        previous = None
        for _ in range(niter):  # one faiss iteration at a time, for the same stopping rule
            km = faiss.Kmeans(d, k, niter=1, seed=int(rng.integers(2**31 - 1)), max_points_per_centroid=len(xs),
                              verbose=False)
            km.train(xs, init_centroids=c)
            c = np.asarray(km.centroids, dtype=np.float32).reshape(k, d).copy()
            inertia = float(km.obj[-1])
            if _converged(previous, inertia, tol):
                break
            previous = inertia
    return c


def _fit_torch(x, k, seed, p):
    import torch

    device = p.get("device", "auto")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if int(p.get("threads") or 0) > 0 and device == "cpu":
        torch.set_num_threads(int(p["threads"]))
    rng = np.random.default_rng(seed)
    tol = float(p.get("tol") or 0.0)
    c = torch.from_numpy(_seed_centroids(x, k, p, rng)).to(device)
    with torch.no_grad():
        for xs_np, niter in _phases(x, k, p, rng):
            xs = torch.from_numpy(xs_np).to(device)
            x_sq = float((xs.double() ** 2).sum())
            previous = None
            for _ in range(niter):
                sums = torch.zeros_like(c, dtype=torch.float64)
                counts = torch.zeros(k, dtype=torch.float64, device=device)
                c_sq = (c * c).sum(1)
                partial = 0.0
                for a in range(0, len(xs), 65536):
                    xb = xs[a:a + 65536]
                    best, lab = torch.addmm(c_sq[None, :], xb, c.T, alpha=-2.0).min(1)
                    partial += float(best.double().sum())
                    sums.index_add_(0, lab, xb.double())
                    counts += torch.bincount(lab, minlength=k).double()
                keep = counts > 0  # an empty cluster keeps its centroid
                c = torch.where(keep[:, None], (sums / counts.clamp(min=1)[:, None]).float(), c)
                inertia = x_sq + partial
                if _converged(previous, inertia, tol):
                    break
                previous = inertia
    return c.cpu().numpy().astype(np.float32)


# ------------------------------------------------------------------------------------ applying
def assign(x: np.ndarray, centroids: np.ndarray, chunk: int = 32768,
           return_inertia: bool = False, device: str = "cpu"):
    """Nearest centroid of every row (squared Euclidean, chunked BLAS products), int64 (N,);
    with ``return_inertia`` also the sum of squared distances (float64). ``device`` "cuda[:N]"
    computes the products with torch on that GPU (same formula; ties may break differently)."""
    if device != "cpu":
        return _assign_torch(x, centroids, chunk, return_inertia, device)
    c = np.ascontiguousarray(centroids, dtype=np.float32)
    c_sq = (c.astype(np.float64) ** 2).sum(1).astype(np.float32)
    neg2c = -2.0 * c
    labels = np.empty(len(x), dtype=np.int64)
    buf = np.empty((min(chunk, len(x)), len(c)), dtype=np.float32)
    inertia = 0.0
    for a in range(0, len(x), chunk):
        xb = np.ascontiguousarray(x[a:a + chunk], dtype=np.float32)
        # ||x||^2 is the same for every centroid: leave it out of the argmin, add it for the inertia
        d = buf[:len(xb)]
        lab = _nearest(xb, neg2c, c_sq, d)
        labels[a:a + len(xb)] = lab
        if return_inertia:
            x_sq = (xb.astype(np.float64) ** 2).sum(1)
            inertia += float(np.maximum(x_sq + d[np.arange(len(xb)), lab].astype(np.float64), 0).sum())
    return (labels, inertia) if return_inertia else labels


def _assign_torch(x, centroids, chunk, return_inertia, device):
    import torch

    c = torch.from_numpy(np.ascontiguousarray(centroids, dtype=np.float32)).to(device)
    c_sq = (c.double() ** 2).sum(1).float()
    labels = np.empty(len(x), dtype=np.int64)
    inertia = 0.0
    with torch.no_grad():
        for a in range(0, len(x), chunk):
            xb = torch.from_numpy(np.ascontiguousarray(x[a:a + chunk], dtype=np.float32)).to(device)
            d = c_sq[None, :] - 2.0 * (xb @ c.T)
            best, lab = d.min(1)
            labels[a:a + len(xb)] = lab.cpu().numpy()
            if return_inertia:
                inertia += float(((xb.double() ** 2).sum(1) + best.double()).clamp(min=0).sum())
    return (labels, inertia) if return_inertia else labels


# ------------------------------------------------------------------------------------ storage
TIMINGS = ("train_seconds", "train_cpu_seconds")  # in fit's result for stats; never saved


def save_model(path, model: dict) -> None:
    """The model dict (without ``TIMINGS``: same inputs and settings, same bytes), atomically."""
    import joblib

    with atomic.atomic_path(path) as tmp:
        joblib.dump({k: v for k, v in model.items() if k not in TIMINGS}, tmp)


def load_model(path) -> dict:
    import joblib

    obj = joblib.load(path)
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        return obj
    if hasattr(obj, "cluster_centers_"):  # a bare sklearn model (reference learn_kmeans.py)
        c = np.asarray(obj.cluster_centers_, dtype=np.float32)
        return {"format": FORMAT, "backend": "sklearn", "centroids": c, "dim": c.shape[1], "sklearn_model": obj}
    raise ValueError(f"{path}: not a k-means model (neither {FORMAT} nor an sklearn KMeans)")


def load_centroids(path) -> np.ndarray:
    """(K, D) centroids of a k-means model file, or of a ``.npy`` centroid array (an export's)."""
    if str(path).endswith(".npy"):
        c = np.load(path, allow_pickle=False)
        if c.ndim != 2:
            raise ValueError(f"{path}: centroids must be (K, D), got shape {c.shape}")
        return c.astype(np.float32, copy=False)
    return load_model(path)["centroids"]
