"""Fixtures of the noise tests: synthetic noise folders, and work dirs made from the session's
smoke run (``smoke_run``, read-only: the parts a test needs are copied) with the noise stage run
as a user runs it (``launch.py --stage noise``)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from noise_helpers import noise_folders

REPO_ROOT = Path(__file__).resolve().parents[2]

# small corpus noise: 4-talker babble and single-talker speech, 4 s clips
CORPUS_NOISE = ["noise.corpus_categories={babble: 4, speech: 1}", "noise.corpus_clips={train: 4, valid: 2, test: 2}",
                "noise.clip_seconds=4", "noise.clips_per_shard=3", "noise.files_per_shard=4"]


def launch(work: Path, corpus: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", "1")  # tiny models: threads only contend on a shared machine
    cmd = [sys.executable, str(REPO_ROOT / "launch.py"), "--preset", "smoke", "--cluster", "debug",
           "--workdir", str(work), "--corpus", str(corpus), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=timeout)


def copy_steps(smoke_run: Path, work: Path, *steps: str) -> Path:
    """Copy finished steps (``manifest``, ``iter1/labels``, ...) of the smoke run: their outputs
    and their engine state, so the engine sees them complete in ``work``."""
    for step in steps:
        scope, _, stage = step.rpartition("/")
        shutil.copytree(smoke_run / step, work / step)
        state = Path(".pipeline") / "state" / (scope or "once") / stage
        shutil.copytree(smoke_run / state, work / state)
    return work


def noise_args(folders: dict) -> list:
    return ["noise.enabled=true", f"noise.dirs=[{','.join(folders['dirs'])}]", *CORPUS_NOISE]


@pytest.fixture(scope="session")
def noise_inputs(tmp_path_factory) -> dict:
    return noise_folders(tmp_path_factory.mktemp("noise_inputs"))


@pytest.fixture(scope="session")
def noise_work(smoke_run, sample_corpus, noise_inputs, tmp_path_factory) -> Path:
    """A work dir with the smoke run's manifest and a finished noise stage (read-only)."""
    work = copy_steps(smoke_run, tmp_path_factory.mktemp("noise_work") / "work", "manifest")
    proc = launch(work, sample_corpus, "--stage", "noise", *noise_args(noise_inputs))
    if proc.returncode != 0:
        pytest.fail(f"the noise stage failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return work


