"""The kmeans stage reads only the frames it trains on: its peak resident memory (VmHWM of a
subprocess running the stage) is the same for a 4x larger fabricated feature set, and far below
what holding that set would take."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]

RUN_STAGE = """
import json, sys
sys.path[:0] = [{repo!r}, {tests!r}, {tests_root!r}]
from feat_helpers import make_cfg
from pipeline.stage import StageContext
from stages.kmeans import STAGE
cfg = make_cfg([{{"features": "mfcc", "layer": None, "n_clusters": 20}}],
               features={{"nshard": {nshard}, "store": "all", "splits": ["train"]}}, kmeans={{"percent": 0.5, "refine_points_per_centroid": 512}})
stats = STAGE.run(StageContext(cfg=cfg, workdir={work!r}, iteration=1), STAGE.shards(None)[0])
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(json.dumps({{"stats": stats, "peak_rss_mb": int(hwm) / 1024}}))
"""


def fabricate(work: Path, nshard: int, utts_per_shard: int, frames_per_utt: int = 150, dim: int = 768) -> int:
    """float16 feature dump shards of clustered random frames (as the features stage writes them)."""
    from speechfeat.shards import ShardWriter

    rng = np.random.default_rng(0)
    centres = rng.normal(scale=3, size=(64, dim)).astype(np.float32)
    d = work / "iter1" / "features"
    total = 0
    for r in range(nshard):
        with ShardWriter(d / f"train_{r}_{nshard}.npy", d / f"train_{r}_{nshard}.len", dim, "float16") as w:
            for _ in range(utts_per_shard):
                x = centres[rng.integers(0, 64)] + rng.normal(size=(frames_per_utt, dim)).astype(np.float32)
                w.append(x)
                total += frames_per_utt
    return total


def run_stage(work: Path, nshard: int) -> dict:
    code = RUN_STAGE.format(repo=str(REPO), tests=str(REPO / "tests" / "features"),
                           tests_root=str(REPO / "tests"), work=str(work), nshard=nshard)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         env={"OMP_NUM_THREADS": "2", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_kmeans_peak_memory_does_not_grow_with_the_feature_set(tmp_path):
    small_frames = fabricate(tmp_path / "small", nshard=2, utts_per_shard=200)  # 60k frames
    big_frames = fabricate(tmp_path / "big", nshard=8, utts_per_shard=200)  # 240k frames
    small, big = run_stage(tmp_path / "small", 2), run_stage(tmp_path / "big", 8)
    # half of each shard's utterances is the sample; the pool it trains on is bounded by K
    assert big["stats"]["sample_frames"] == big_frames // 2 and small["stats"]["sample_frames"] == small_frames // 2
    assert big["stats"]["frames"] == small["stats"]["frames"] < small_frames // 2
    sample_mb = big_frames // 2 * 768 * 4 / 2**20  # the big sample in memory as float32: ~350 MB
    print(f"kmeans peak RSS: {small['peak_rss_mb']:.0f} MB ({small_frames} frames), "
          f"{big['peak_rss_mb']:.0f} MB ({big_frames} frames); the big sample alone is {sample_mb:.0f} MB")
    assert abs(big["peak_rss_mb"] - small["peak_rss_mb"]) < 40
    assert big["peak_rss_mb"] < small["peak_rss_mb"] + 0.25 * sample_mb


def test_sample_set_draws_whole_utterances_thinned_to_the_pool(tmp_path):
    from speechfeat.kmeans import sample_set

    fabricate(tmp_path, nshard=2, utts_per_shard=30, frames_per_utt=20, dim=8)
    d = tmp_path / "iter1" / "features"
    paths = [(d / f"train_{r}_2.npy", d / f"train_{r}_2.len") for r in range(2)]
    ss = sample_set(paths, 0.5, seed=0)
    assert ss.n_utterances == 30 and ss.n_frames == 600 and ss.dim == 8
    everything = ss.read_all()
    a = ss.draw(250, np.random.default_rng(1))
    b = ss.draw(250, np.random.default_rng(1))
    assert a.shape == (250, 8) and a.dtype == np.float32 and np.array_equal(a, b)
    utterance_of = {r.tobytes(): i // 20 for i, r in enumerate(everything)}
    # whole utterances in a random order until 250 frames: 13 of the 20-frame ones, then thinned
    assert len({utterance_of[r.tobytes()] for r in a}) == 13
    assert np.array_equal(ss.draw(10_000, np.random.default_rng(2)), everything)
    assert sum(len(c) for c in ss.iter_chunks(128)) == 600
    ss.close()
