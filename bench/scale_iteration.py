"""The iteration stages at corpus scale: peak memory and wall time of the kmeans stage on
fabricated feature shards of a corpus of N hours, and of a labels shard.

    python bench/scale_iteration.py --hours 50 200                 # kmeans at 50 h and 200 h
    python bench/scale_iteration.py --hours 200 --labels-hours 2 --labels-model base

kmeans: for each ``--hours`` H, the files the features stage writes by default
(``features.store=sample``): ``kmeans.percent`` (10 %) of the utterances of H hours of 25 Hz
layer features (``--dim`` 768, ``--dtype`` float16 by default to spare the disk: 200 h is then
2.8 GB; float32 doubles it), in shards of ``--shard-hours``, plus the manifest the draw is checked
against (5 s utterances). The real kmeans stage (``stages.kmeans.STAGE.run``, default backend, K
``--k``) runs in a subprocess; its peak RSS (VmHWM) and wall time are printed. With the default
backend the peak must not grow with H (it trains on a pool bounded by K, read straight from the
shards); ``--backend sklearn`` (the reference) holds the whole sample.

labels (``--labels-hours``, per shard; a labels job's cost is O(its shard)):
- ``dump``: ``features.store=all``'s path: one float32 feature shard of that many hours, labelled
  by ``stages.labels.label_dump`` (reading + nearest centroid of K);
- ``--labels-model tiny|base|large``: the default path, ``stages.labels.label_rows``: ROI videos
  and wavs decoded, layer features of a randomly initialised model of that size computed on the
  CPU, assigned in the same pass (``--labels-clips`` fabricated clips, each listed
  ``--labels-repeat`` times in the tsv).
Prints frames/s and peak RSS for each. Figures of the dev machine are in the report of issue 13
(docs/DESIGN.md, Features section).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FRAMES_PER_UTT = 125  # 5 s at 25 Hz

WORKER = """
import json, sys, time
sys.path.insert(0, {repo!r})
t0 = time.time()
from omegaconf import OmegaConf
from pipeline.stage import Shard, StageContext
from stages import config_sections
cfg = OmegaConf.create({{k: OmegaConf.structured(v) for k, v in config_sections().items()}})
cfg = OmegaConf.merge(cfg, OmegaConf.create({overrides}))
ctx = StageContext(cfg=cfg, workdir={work!r}, iteration=2)
job = {job!r}
if job == "kmeans":
    from stages.kmeans import STAGE
    stats = STAGE.run(ctx, STAGE.shards(ctx)[0])
else:
    import numpy as np
    from stages import labels
    from speechfeat.kmeans import load_centroids
    c = load_centroids({centroids!r})
    if job == "dump":
        f = {work!r} + "/iter2/features/train_0_1"
        stats = labels.label_dump(c, f + ".npy", f + ".len", {work!r} + "/out.km", device="cpu")
    else:
        sys.path.insert(0, {repo!r} + "/bench")
        from model import build
        from stages.features import LayerFeaturizer
        model, _, _ = build({model!r}, 100)
        model.eval()
        feat = LayerFeaturizer({model!r} + " (random init)", len(model.encoder.layers), device="cpu",
                               loaded=(model, {{"stack_order_audio": 4}}))
        stats = labels.label_rows(feat, {work!r} + "/manifest/train.tsv", 0, 1, c, {work!r} + "/out.km", device="cpu")
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(json.dumps({{"stats": stats, "peak_rss_mb": int(hwm) / 1024, "wall": time.time() - t0}}))
"""


def run_worker(job: str, work: Path, overrides: dict, centroids: str = "", model: str = "") -> dict:
    code = WORKER.format(repo=str(REPO), work=str(work), job=job, overrides=repr(overrides),
                         centroids=centroids, model=model)
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{job} failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process_wall"] = time.time() - t0
    return out


def clustered(rng, n: int, dim: int, centres: np.ndarray) -> np.ndarray:
    return (centres[rng.integers(0, len(centres), n)] + rng.normal(size=(n, dim)).astype(np.float32))


def fabricate_sample(work: Path, hours: float, dim: int, dtype: str, percent: float, shard_hours: float,
                     seed: int = 0) -> dict:
    """The features stage's sample files for ``hours`` of train utterances and the manifest."""
    from speechfeat.shards import ShardWriter
    from stages.features import sample_draw

    n_rows = int(hours * 3600 * 25 / FRAMES_PER_UTT)
    nshard = max(1, round(hours / shard_hours))
    (work / "manifest").mkdir(parents=True, exist_ok=True)
    with open(work / "manifest" / "train.tsv", "w") as f:
        f.write(f"{work}/crop\n")
        for i in range(n_rows):
            f.write(f"u{i}\tvideo/u{i}.mp4\taudio/u{i}.wav\t{FRAMES_PER_UTT}\t{FRAMES_PER_UTT * 640}\n")
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=2.0, size=(2000, dim)).astype(np.float32)
    feat = work / "iter2" / "features"
    frames = 0
    for rank in range(nshard):
        rows = sample_draw(n_rows, rank, nshard, percent, seed)
        key = feat / f"train_{rank}_{nshard}"
        with ShardWriter(f"{key}.sample.npy", f"{key}.sample.len", dim, dtype) as w:
            for a in range(0, len(rows), 256):  # 256 utterances per write
                block = clustered(rng, min(256, len(rows) - a) * FRAMES_PER_UTT, dim, centres)
                for j in range(0, len(block), FRAMES_PER_UTT):
                    w.append(block[j:j + FRAMES_PER_UTT])
        Path(f"{key}.sample.rows").write_text("".join(f"{i}\n" for i in rows))
        frames += len(rows) * FRAMES_PER_UTT
    return {"rows": n_rows, "nshard": nshard, "frames": frames,
            "bytes": sum(p.stat().st_size for p in feat.glob("*.npy"))}


def fabricate_dump(work: Path, hours: float, dim: int, seed: int = 1) -> int:
    from speechfeat.shards import ShardWriter

    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=2.0, size=(2000, dim)).astype(np.float32)
    n_utts = int(hours * 3600 * 25 / FRAMES_PER_UTT)
    key = work / "iter2" / "features" / "train_0_1"
    with ShardWriter(f"{key}.npy", f"{key}.len", dim, "float32") as w:
        for a in range(0, n_utts, 256):
            block = clustered(rng, min(256, n_utts - a) * FRAMES_PER_UTT, dim, centres)
            for j in range(0, len(block), FRAMES_PER_UTT):
                w.append(block[j:j + FRAMES_PER_UTT])
    return n_utts * FRAMES_PER_UTT


def fabricate_media(work: Path, clips: int, repeat: int, seed: int = 2) -> int:
    """``clips`` random ROI videos + wavs, each listed ``repeat`` times in manifest/train.tsv."""
    import soundfile as sf

    from avprep.media import write_gray_video

    rng = np.random.default_rng(seed)
    crop = work / "crop"
    rows = []
    for i in range(clips):
        n = FRAMES_PER_UTT
        write_gray_video(crop / "video" / f"c{i}.mp4", rng.integers(0, 256, (n, 96, 96), dtype=np.uint8))
        (crop / "audio").mkdir(parents=True, exist_ok=True)
        sf.write(str(crop / "audio" / f"c{i}.wav"), (rng.normal(size=n * 640) * 3000).astype(np.int16), 16000,
                 subtype="PCM_16")
        rows.append((f"video/c{i}.mp4", f"audio/c{i}.wav", n, n * 640))
    (work / "manifest").mkdir(parents=True, exist_ok=True)
    with open(work / "manifest" / "train.tsv", "w") as f:
        f.write(f"{crop}\n")
        for r in range(repeat):
            for i, (v, a, n, s) in enumerate(rows):
                f.write(f"u{r}_{i}\t{v}\t{a}\t{n}\t{s}\n")
    return clips * repeat * FRAMES_PER_UTT


def random_centroids(path: Path, k: int, dim: int) -> str:
    from speechfeat.kmeans import save_model

    c = np.random.default_rng(3).normal(size=(k, dim)).astype(np.float32)
    save_model(path, {"format": "speechfeat-kmeans-1", "backend": "random", "centroids": c})
    return str(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hours", type=float, nargs="*", default=[50, 200], help="corpus sizes for the kmeans stage")
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    ap.add_argument("--k", type=int, default=500)
    ap.add_argument("--percent", type=float, default=0.1)
    ap.add_argument("--shard-hours", type=float, default=25.0)
    ap.add_argument("--backend", default=None, help="kmeans.backend (default: the stage's default)")
    ap.add_argument("--labels-hours", type=float, default=0, help="hours of one labels shard (0: skip)")
    ap.add_argument("--labels-model", default=None, choices=["tiny", "base", "large"])
    ap.add_argument("--labels-clips", type=int, default=4)
    ap.add_argument("--labels-repeat", type=int, default=4)
    ap.add_argument("--dir", default=None, help="where to fabricate (default: a temp dir, removed after)")
    args = ap.parse_args()
    base = Path(args.dir or tempfile.mkdtemp(prefix="scale-iteration-"))
    print(f"cpus: {os.cpu_count()}, work: {base}, free: {shutil.disk_usage(base).free / 1e9:.1f} GB")
    layer_iteration = {"schedule": {"iterations": [{"features": "mfcc", "layer": None, "n_clusters": 100},
                                                   {"features": "layer", "layer": 12, "n_clusters": args.k}]},
                       "features": {"nshard": 1}, "kmeans": {"percent": args.percent}}
    if args.backend:
        layer_iteration["kmeans"]["backend"] = args.backend
    try:
        for hours in args.hours:
            work = base / f"kmeans_{hours:g}h"
            t0 = time.time()
            info = fabricate_sample(work, hours, args.dim, args.dtype, args.percent, args.shard_hours)
            made = time.time() - t0
            over = json.loads(json.dumps(layer_iteration))
            over["features"]["nshard"] = info["nshard"]
            r = run_worker("kmeans", work, over)
            s = r["stats"]
            print(f"kmeans {hours:g} h: sample {info['frames']:,} frames x {args.dim} {args.dtype} in {info['nshard']} "
                  f"shard(s) ({info['bytes'] / 1e9:.2f} GB, made in {made:.0f} s); {s['backend']} trained on "
                  f"{s['frames']:,} frames: peak RSS {r['peak_rss_mb']:.0f} MB, wall {r['process_wall']:.1f} s "
                  f"(training {s['train_seconds']:.1f} s)", flush=True)
            shutil.rmtree(work)
        if args.labels_hours:
            work = base / "labels_dump"
            frames = fabricate_dump(work, args.labels_hours, args.dim)
            cent = random_centroids(work / "kmeans.joblib", args.k, args.dim)
            r = run_worker("dump", work, layer_iteration, cent)
            s = r["stats"]
            print(f"labels from a dump shard of {args.labels_hours:g} h ({frames:,} frames x {args.dim} float32, "
                  f"K={args.k}): {s['frames_per_second']:,.0f} frames/s, peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
            shutil.rmtree(work)
        if args.labels_model:
            from stages.estimates import MODEL_DIM

            work = base / "labels_model"
            frames = fabricate_media(work, args.labels_clips, args.labels_repeat)
            cent = random_centroids(work / "kmeans.joblib", args.k, MODEL_DIM[args.labels_model])
            r = run_worker("rows", work, layer_iteration, cent, args.labels_model)
            s = r["stats"]
            print(f"labels computing {args.labels_model} layer features on CPU ({frames:,} frames, K={args.k}, "
                  f"torch threads default): {s['frames_per_second']:,.1f} frames/s, peak RSS "
                  f"{r['peak_rss_mb']:.0f} MB", flush=True)
            shutil.rmtree(work)
    finally:
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
