"""The golden fixtures in the repository (tests/data/golden): what a plain clone's fidelity tests
read, equal to the golden originals, small; and the end-of-run list of fidelity tests that could
not run (tests/conftest.py ``pytest_terminal_summary``)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from golden_data import REPO_GOLDEN, SHARED_GOLDEN, golden_path

IN_REPO = {"ref_mfcc.npz": None, "carphone_crop_ref.npz": ("landmarks_raw", "landmarks_interp", "roi_gray")}


def test_the_small_fixtures_are_in_the_repository_and_read_from_there():
    for name in IN_REPO:
        assert golden_path(name) == REPO_GOLDEN / name
    tracked = subprocess.run(["git", "ls-files", str(REPO_GOLDEN)], capture_output=True, text=True,
                             cwd=REPO_GOLDEN).stdout.split()
    if tracked:  # a git checkout (an unpacked archive has no index to ask)
        assert sorted(Path(p).name for p in tracked) == sorted([*IN_REPO, "README.md"])
    total = sum((REPO_GOLDEN / n).stat().st_size for n in IN_REPO)
    assert total < 1.5e6, f"{total / 1e6:.1f} MB of fixtures: keep the repository's copies small"


@pytest.mark.parametrize("name", sorted(IN_REPO))
def test_the_copies_equal_the_golden_originals(name):
    original = SHARED_GOLDEN / name
    if not original.is_file():
        pytest.skip(f"golden reference data absent: {original} (to compare the repository's copy with)")
    copy, ref = np.load(REPO_GOLDEN / name), np.load(original)
    keys = IN_REPO[name] or ref.files
    assert sorted(copy.files) == sorted(keys)
    for key in keys:
        assert copy[key].dtype == ref[key].dtype and np.array_equal(copy[key], ref[key]), key


def test_skipped_fidelity_tests_are_listed_once_at_the_end(tmp_path):
    (tmp_path / "conftest.py").write_text((Path(__file__).parent / "conftest.py").read_text())
    (tmp_path / "test_demo.py").write_text(
        "import pytest\n"
        "def test_parity():\n"
        "    pytest.skip('golden reference data absent: ref_tiny_pretrain.pt not here')\n"
        "@pytest.mark.skipif(True, reason='golden reference data absent: ref_tiny_pretrain.pt not here')\n"
        "def test_layers():\n"
        "    pass\n"
        "def test_other():\n"
        "    pytest.skip('no Slurm cluster answers here')\n"
        "def test_ok():\n"
        "    pass\n")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert out.count("fidelity test(s) not run") == 1, out
    section = out[out.index("fidelity test(s) not run"):]
    assert "2 skipped: golden reference data absent: ref_tiny_pretrain.pt not here" in section
    assert "test_demo.py::test_parity" in section and "test_demo.py::test_layers" in section
    assert "test_other" not in section.split("short test summary")[0]

    (tmp_path / "test_demo.py").write_text("def test_ok():\n    pass\n")
    quiet = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                           capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert quiet.returncode == 0 and "fidelity" not in quiet.stdout
