import os
import shutil
import subprocess
import sys
from pathlib import Path

import cloudpickle
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine_toy_stages  # noqa: E402

# workers (local processes, Slurm jobs) cannot import tests/engine: ship the toy stages by value
cloudpickle.register_pickle_by_value(engine_toy_stages)


def slurm_available() -> bool:
    if not shutil.which("sinfo"):
        return False
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and any(s.strip() in ("idle", "mix", "alloc") for s in out.stdout.split())


@pytest.fixture(scope="session")
def slurm():
    """A Slurm cluster answering on this machine (scripts/slurm_local.sh start). In CI its absence
    is a failure, not a skip: the Slurm path must be proven there."""
    if not slurm_available():
        msg = "no Slurm cluster answers `sinfo` here (start one with: sudo scripts/slurm_local.sh start)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return True
