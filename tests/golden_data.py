"""Where the fidelity tests read the golden reference data (outputs of the original AV-HuBERT code).

The small fixtures (MFCC, crop) are in the repository, ``tests/data/golden/`` (its README says
what each is), so a plain clone checks them. The rest, above all the 45 MB reference checkpoint
``ref_tiny_pretrain.pt``, stays outside it in ``../shared/golden`` beside the checkout (present in
CI); a test that needs it skips with a reason that starts with ``SKIP_REASON`` and the end of the
run lists those tests once (``pytest_terminal_summary`` in tests/conftest.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import pytest

REPO_GOLDEN = Path(__file__).resolve().parent / "data" / "golden"
SHARED_GOLDEN = Path(__file__).resolve().parents[2] / "shared" / "golden"
SKIP_REASON = "golden reference data absent"


def golden_path(name: str) -> Optional[Path]:
    """The file ``name`` of the golden data: the repository's copy, else ../shared/golden's, else None."""
    for root in (REPO_GOLDEN, SHARED_GOLDEN):
        if (root / name).is_file():
            return root / name
    return None


def missing_reason(*names: str) -> Optional[str]:
    """Why a test of these golden files cannot run here (None: all present)."""
    absent = [n for n in names if golden_path(n) is None]
    if not absent:
        return None
    return (f"{SKIP_REASON}: {', '.join(absent)} not in tests/data/golden nor {SHARED_GOLDEN} "
            "(kept outside the repository; CI checks it out beside the repo)")


def golden_file(name: str) -> Path:
    """The path of a golden file, or skip the calling test saying which file is absent."""
    path = golden_path(name)
    if path is None:
        pytest.skip(missing_reason(name))
    return path


def needs_golden(*names: str):
    """A skipif marker for tests (or a module's ``pytestmark``) that read these golden files."""
    reason = missing_reason(*names)
    return pytest.mark.skipif(reason is not None, reason=reason or "")
