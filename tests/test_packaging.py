"""pyproject.toml: the installed command equals ``python launch.py``, the package holds every data
file the code reads, and its requirements are requirements.txt's (which scripts/setup.sh installs)."""
from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pip's own copy of the same parser
    from pip._vendor import tomli as tomllib


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _requirement(line: str):
    """(normalised name, specifier) of a requirement line."""
    name, spec = re.match(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(.*?)\s*$", line).groups()
    return re.sub(r"[-_.]+", "-", name).lower(), spec.replace(" ", "")


def test_pyproject_requires_what_requirements_txt_pins():
    """requirements.txt (setup.sh, CI) = the package's dependencies + its faiss and test extras."""
    project = _pyproject()["project"]
    packaged = dict(map(_requirement, project["dependencies"]))
    for extra in ("faiss", "test"):
        packaged.update(map(_requirement, project["optional-dependencies"][extra]))
    pinned = dict(_requirement(line) for line in (REPO / "requirements.txt").read_text().splitlines()
                  if line.strip() and not line.lstrip().startswith("#"))
    assert packaged == pinned
    assert "faiss-cpu" not in dict(map(_requirement, project["dependencies"]))  # an optional extra
    assert project["scripts"] == {"avhubert-pipeline": "launch:main"}


def _tracked_files() -> list:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("not a git checkout: the tracked files are unknown")
    return [Path(p) for p in out.stdout.splitlines() if (REPO / p).is_file()]


def test_every_data_file_of_the_packages_is_package_data():
    """A non-Python file inside an installed package (presets, cluster configs, the fairseq yaml
    configs, the mean face, the report's templates) must be in [tool.setuptools.package-data],
    or `pip install .` leaves it behind and the installed command fails where it reads it."""
    setuptools = _pyproject()["tool"]["setuptools"]
    include = setuptools["packages"]["find"]["include"]
    patterns = setuptools["package-data"]
    missing = []
    for path in _tracked_files():
        top = path.parts[0]
        if len(path.parts) < 2 or path.suffix in (".py", ".pyc"):
            continue
        if not any(fnmatch.fnmatch(top, pattern) for pattern in include):
            continue
        # setuptools expands the patterns as globs from the package's directory (`*` stays in one directory)
        packaged = {p for glob in patterns.get(top, []) for p in (REPO / top).glob(glob)}
        if REPO / path not in packaged:
            missing.append(str(path))
    assert missing == [], f"not in [tool.setuptools.package-data]: {missing}"


def _fresh_venv(root: Path) -> Path:
    """A venv whose only packages are the project venv's (a .pth to its site-packages): pip,
    setuptools and every dependency are found there, so nothing is downloaded."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    python = root / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "_project_venv.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return python


def _source_copy(dest: Path) -> Path:
    """The checkout's files as a fresh clone has them (not its work dirs, venv or tests)."""
    shutil.copytree(REPO, dest, ignore=shutil.ignore_patterns(
        ".git", ".venv", "work", "tests", "bench", "__pycache__", ".pytest_cache", "*.egg-info", "build", "outputs",
        "multirun"))
    return dest


def _tiny_corpus(root: Path) -> Path:
    import imageio_ffmpeg

    root.mkdir()
    for name in ("a", "b"):
        subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-f", "lavfi", "-i",
                        "color=c=gray:s=16x16:r=25:d=1", "-f", "lavfi", "-i", "anullsrc=r=16000:cl=mono:d=1",
                        "-shortest", "-c:v", "libx264", "-c:a", "aac", str(root / f"{name}.mp4")], check=True)
    return root


def _plan(cmd: list, cwd: Path) -> str:
    """The dry run's output, less what changes from run to run: the free space (other processes
    write to the same disk) and the listing's seconds."""
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "(dry run: nothing submitted)" in out.stdout, out.stdout
    return "\n".join(re.sub(r" in [\d.]+ s\b", " in ... s", line) for line in out.stdout.splitlines()
                     if "free on the work dir's filesystem" not in line)


@pytest.mark.slow  # a venv, two installs and three dry runs: about a minute and a half on the dev machine
def test_installed_command_equals_launch_py(tmp_path):
    """`pip install -e .`, then `pip install .` (the source copy deleted: the installed files
    alone), each in a fresh venv's `avhubert-pipeline --dry-run` from another directory: the same
    plan as `python launch.py --dry-run` of the checkout."""
    python = _fresh_venv(tmp_path / "venv")
    src = _source_copy(tmp_path / "src")
    corpus = _tiny_corpus(tmp_path / "corpus")
    args = ["--dry-run", "--corpus", str(corpus), "--workdir", str(tmp_path / "work"),
            # the smoke preset's split lists are the sample corpus's
            "manifest.valid_ids=null", "manifest.test_ids=null", "manifest.valid_fraction=0",
            "manifest.test_fraction=0"]
    expected = _plan([sys.executable, str(REPO / "launch.py"), *args], REPO)
    assert "crop " in expected and "finetune " in expected and "2 items" in expected
    command = str(python.parent / "avhubert-pipeline")
    pip = [str(python), "-m", "pip", "install", "-q", "--no-index", "--no-build-isolation"]
    subprocess.run([*pip, "-e", str(src)], check=True, cwd=tmp_path, timeout=300)
    assert _plan([command, *args], tmp_path) == expected
    subprocess.run([*pip, str(src)], check=True, cwd=tmp_path, timeout=300)
    shutil.rmtree(src)
    # the installed copy runs, its presets and cluster configs beside it: the source is gone
    where = subprocess.run([str(python), "-c", "import launch, pipeline; print(launch.__file__, pipeline.__file__)"],
                           capture_output=True, text=True, check=True, cwd=tmp_path).stdout.split()
    assert len(where) == 2 and all(Path(p).is_relative_to(tmp_path / "venv") for p in where), where
    assert _plan([command, *args], tmp_path) == expected
    assert not (tmp_path / "work").exists()
