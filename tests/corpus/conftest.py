from __future__ import annotations

import pytest
from corpus_helpers import ScandirCounter


@pytest.fixture
def scandir_counter(monkeypatch):
    return ScandirCounter(monkeypatch)


@pytest.fixture
def no_run_report(monkeypatch):
    """Tests that launch several times leave out the run report written at the end of each launch
    (seconds each on a busy machine; tested in tests/report)."""
    import report

    monkeypatch.setattr(report, "at_end_of_launch", lambda *args, **kwargs: [])


@pytest.fixture(scope="session")
def clips(sample_corpus) -> dict:
    """Real sample-corpus clips (2.4 s, speech + transcript) by short name."""
    return {"a": sample_corpus / "pexels_langer" / "00.mp4", "b": sample_corpus / "pexels_langer" / "01.mp4",
            "c": sample_corpus / "pyfeat_single_face" / "00.mp4", "d": sample_corpus / "pexels_langer" / "02.mp4",
            "e": sample_corpus / "pexels_langer" / "flip_00.mp4", "f": sample_corpus / "pexels_langer" / "03.mp4",
            "g": sample_corpus / "pexels_langer" / "04.mp4", "h": sample_corpus / "pexels_langer" / "flip_01.mp4"}
