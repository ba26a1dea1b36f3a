"""Benchmark of the k-means backends against the reference settings, on the same synthetic data.

    python bench/kmeans.py                                # both cases at full size (1M x 768, K=500; MFCC 1M x 39, K=100)
    python bench/kmeans.py --frames 200000 --cases layer --backends sklearn,numpy

Each (case, backend) trains in its own subprocess on the same data file (written once to a temp
dir), one after the other, so the printed peak RSS is that backend's own and every backend has
both cores; inertia is computed on all frames with the same assignment code for every backend.
Synthetic data: a Gaussian mixture of 4 x K centres on a low-rank subspace plus isotropic noise
(clustered like real features, not uniform noise). ``sklearn`` = the reference learn_kmeans.py
settings (MiniBatchKMeans, n_init 20); ``numpy`` is the kmeans stage's default.
Targets (issue 14): the default backend >= 20x faster than sklearn at <= 1.01x its inertia.
Figures on the 2-core dev machine: bench/README.md (k-means section).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CASES = {"layer": (768, 500), "mfcc": (39, 100)}


def make_data(path: Path, frames: int, dims: int, k: int, seed: int = 0, chunk: int = 100_000) -> None:
    rng = np.random.default_rng(seed)
    rank = min(dims, 64)
    basis = rng.normal(size=(rank, dims)).astype(np.float32) / np.sqrt(rank)
    centres = rng.normal(scale=3.0, size=(4 * k, rank)).astype(np.float32)
    weights = rng.dirichlet(np.ones(4 * k))
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(frames, dims))
    for a in range(0, frames, chunk):
        n = min(chunk, frames - a)
        z = centres[rng.choice(4 * k, n, p=weights)] + rng.normal(size=(n, rank)).astype(np.float32)
        out[a:a + n] = z @ basis + 0.3 * rng.normal(size=(n, dims)).astype(np.float32)
    out.flush()
    del out


def worker(data: str, k: int, backend: str, seed: int) -> None:
    sys.path.insert(0, str(REPO))
    from speechfeat.kmeans import fit

    # the libraries are imported before the clock starts (sklearn's import alone takes ~1.5 s here):
    # the figures compare the algorithms
    import scipy.sparse  # noqa: F401
    import sklearn.cluster  # noqa: F401
    import threadpoolctl  # noqa: F401

    if backend == "faiss":
        import faiss  # noqa: F401
    if backend == "torch":
        import torch  # noqa: F401

    x = np.load(data)  # in memory, as the kmeans stage's sample
    t0 = time.time()
    model = fit(x, k, backend, seed)
    seconds = time.time() - t0
    # train_cpu_seconds: CPU time of all the process's threads while training, less sensitive than
    # wall time to other load on a shared machine (it counts BLAS threads spinning, too)
    print(json.dumps({"train_seconds": model["train_seconds"], "fit_seconds_incl_inertia": seconds,
                      "train_cpu_seconds": model["train_cpu_seconds"], "inertia": model["inertia"],
                      "peak_rss_mb": _peak_rss_mb()}))


def _peak_rss_mb() -> float:
    # VmHWM, this process's own peak: getrusage's ru_maxrss survives fork + exec, so it would
    # report the parent's peak (the memory-mapped data it has just written) when that is higher
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=1_000_000, help="frames of the layer case")
    ap.add_argument("--mfcc-frames", type=int, default=None, help="frames of the MFCC case (default: --frames)")
    ap.add_argument("--dims", type=int, default=768, help="dims of the layer case")
    ap.add_argument("--k", type=int, default=500, help="clusters of the layer case")
    ap.add_argument("--cases", default="layer,mfcc")
    ap.add_argument("--backends", default="sklearn,numpy,torch,faiss")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker[0], int(args.worker[1]), args.worker[2], args.seed)
        return
    backends = args.backends.split(",")
    sys.path.insert(0, str(REPO))
    from speechfeat.kmeans import backend_problem

    for backend in [b for b in backends if backend_problem(b)]:  # faiss is an optional extra
        print(f"skipping {backend}: {backend_problem(backend)}", flush=True)
        backends.remove(backend)
    print(f"cpus: {os.cpu_count()}  threads: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}  "
          f"load average: {os.getloadavg()[0]:.1f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-kmeans-") as tmp:
        for case in args.cases.split(","):
            dims, k = (args.dims, args.k) if case == "layer" else CASES[case]
            frames = args.frames if case == "layer" else (args.mfcc_frames or args.frames)
            data = Path(tmp) / f"{case}.npy"
            t0 = time.time()
            make_data(data, frames, dims, k, args.seed)
            print(f"\n[{case}] {frames} frames x {dims} dims, K={k} (data {data.stat().st_size / 2**20:.0f} MB, "
                  f"made in {time.time() - t0:.1f}s)", flush=True)
            results = {}
            for backend in backends:
                t0 = time.time()
                proc = subprocess.run([sys.executable, __file__, "--seed", str(args.seed), "--worker",
                                       str(data), str(k), backend], capture_output=True, text=True)
                if proc.returncode != 0:
                    print(f"  {backend}: FAILED\n{proc.stderr[-2000:]}")
                    continue
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                results[backend] = r
                print(f"  {backend:8s} train {r['train_seconds']:8.1f} s   CPU {r['train_cpu_seconds']:8.1f} s"
                      f"   peak RSS {r['peak_rss_mb']:8.0f} MB   inertia {r['inertia']:.6e}", flush=True)
            if "sklearn" in results:
                base = results["sklearn"]
                for b, r in results.items():
                    if b != "sklearn":
                        print(f"  {b} vs sklearn: {base['train_seconds'] / r['train_seconds']:.1f}x faster "
                              f"(CPU time {base['train_cpu_seconds'] / r['train_cpu_seconds']:.1f}x), "
                              f"inertia ratio {r['inertia'] / base['inertia']:.4f}", flush=True)


if __name__ == "__main__":
    main()
