"""The same inputs and config give byte-identical outputs: crop -> manifest -> features -> kmeans
-> labels (iteration 1, smoke preset, local executor) run again in another work dir is compared,
file by file and byte by byte with nothing normalised, with the session's smoke run.

Left out of the comparison: WORKDIR/.pipeline/ only: completion markers (host, pid, time, job
ids), per-shard logs, submitit folders and config.yaml (which records the work dir's path). Those
are the engine's state, not outputs. Everything a stage writes is compared, including the
frozen item list, crop records, landmarks, tsv files (their root is relative), the sentencepiece
model, features, kmeans.joblib, labels, report.json and cluster_usage.png."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
STEPS = (("crop", None), ("manifest", None), ("features", 1), ("kmeans", 1), ("labels", 1))
COMPARED = ("crop", "manifest", "iter1/features", "iter1/kmeans", "iter1/labels")


def files_under(work: Path) -> dict:
    return {p.relative_to(work).as_posix(): p for d in COMPARED for p in sorted((work / d).rglob("*")) if p.is_file()}


def test_crop_to_labels_twice_gives_the_same_bytes(smoke_run, sample_corpus, tmp_path):
    work = tmp_path / "second" / "work"
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="2")
    for stage, iteration in STEPS:
        cmd = [sys.executable, str(REPO_ROOT / "launch.py"), "--stage", stage, "--preset", "smoke", "--cluster",
               "local", "--workdir", str(work), "--corpus", str(sample_corpus)]
        if iteration:
            cmd += ["--iteration", str(iteration)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=900)
        assert proc.returncode == 0, f"{stage}: {proc.stdout}\n{proc.stderr}"
    mine, theirs = files_under(work), files_under(smoke_run)
    assert len(mine) > 70 and "manifest/spm/spm_unigram64.model" in mine and "iter1/kmeans/kmeans.joblib" in mine
    assert sorted(mine) == sorted(theirs)
    differ = [name for name in mine if mine[name].read_bytes() != theirs[name].read_bytes()]
    assert differ == []
    # no path of either work dir anywhere in an output
    for path in mine.values():
        assert str(work).encode() not in path.read_bytes(), path
