"""Fixtures of the noise tests: synthetic noise folders, and work dirs made from the session's
smoke run (``smoke_run``, read-only: the parts a test needs are copied) with the noise stage run
as a user runs it (``launch.py --stage noise``)."""
from __future__ import annotations

from pathlib import Path

import pytest

from noise_helpers import copy_steps, launch_here, noise_args, noise_folders


@pytest.fixture(scope="session")
def noise_inputs(tmp_path_factory) -> dict:
    return noise_folders(tmp_path_factory.mktemp("noise_inputs"))


@pytest.fixture(scope="session")
def noise_work(smoke_run, sample_corpus, noise_inputs, tmp_path_factory) -> Path:
    """A work dir with the smoke run's manifest and a finished noise stage (read-only)."""
    work = copy_steps(smoke_run, tmp_path_factory.mktemp("noise_work") / "work", "manifest")
    proc = launch_here(work, sample_corpus, "--stage", "noise", *noise_args(noise_inputs))
    if proc.returncode != 0:
        pytest.fail(f"the noise stage failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return work


