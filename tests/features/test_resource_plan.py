"""The resource plan of --dry-run on a fabricated 1,000 h corpus, and the refusal of a work dir
whose filesystem is too small (a 1 MB tmpfs; mounting one needs root, as in CI)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HOURS, CLIP_SECONDS = 1000, 600


@pytest.fixture(scope="module")
def corpus_1000h(tmp_path_factory) -> Path:
    """A plain-layout corpus of 6,000 ten-minute videos (symlinks to one tiny real mp4)."""
    import imageio_ffmpeg

    root = tmp_path_factory.mktemp("corpus_1000h")
    clip = root.parent / f"{root.name}_clip.mp4"
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-f", "lavfi", "-i",
                    f"color=c=gray:s=16x16:r=1:d={CLIP_SECONDS}", "-f", "lavfi", "-i",
                    f"anullsrc=r=16000:cl=mono:d={CLIP_SECONDS}", "-shortest", "-c:v", "libx264", "-c:a", "aac",
                    str(clip)], check=True)
    for i in range(HOURS * 3600 // CLIP_SECONDS):
        os.symlink(clip, root / f"talk{i:05d}.mp4")
    return root


def dry_run(corpus: Path, workdir: Path, *overrides: str) -> subprocess.CompletedProcess:
    # a GPU cluster's plan made on this machine: its requests cannot be checked against a cluster
    # that is not this one (the local Slurm has no gpu partition)
    cmd = [sys.executable, str(REPO / "launch.py"), "--dry-run", "--preset", "base", "--cluster", "example_gpu",
           "--corpus", str(corpus), "--workdir", str(workdir), "cluster.check_requests=false", *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)


def test_dry_run_prints_disk_ram_and_gpu_hours(corpus_1000h, tmp_path):
    # two requests far above what their steps need (the rest of example_gpu.yaml is sized for a corpus this size)
    out = dry_run(corpus_1000h, tmp_path / "work", "cluster.stages.kmeans.mem_gb=200", "cluster.stages.crop.cpus_per_task=16")
    text = out.stdout + out.stderr
    assert "Traceback" not in text, text[-3000:]
    plan = {m.group(1).strip(): m.group(0) for m in re.finditer(r"^  ((?:\w+)(?: \(iteration \d\))?) +disk .*$",
                                                                 text, re.M)}
    assert {"crop", "manifest", "features (iteration 1)", "kmeans (iteration 5)", "labels (iteration 5)",
            "train (iteration 5)", "finetune"} <= set(plan), text
    assert "1,000 h" in plan["crop"] and "6,000 items" in plan["crop"]
    assert "container headers" in text and f"({CLIP_SECONDS:.1f} s)" in text

    def figure(line, name):  # "disk 179.4 GB" -> bytes; "GPU 12.3 h" -> hours
        value, unit = re.search(name + r" +([-\d.,]+) (\w+)", line).groups()
        scale = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "h": 1, "min": 1 / 60}[unit]
        return float(value.replace(",", "")) * scale

    frames = HOURS * 3600 * 25
    # crop writes its ROI video, wav and landmarks (~2 kB a frame); features of iteration 2 only
    # the 10 % sample of 768-d layer features (the dump would be ~10x that: a separate line)
    assert 1.5e3 * frames < figure(plan["crop"], "disk") < 3e3 * frames
    feat2 = figure(plan["features (iteration 2)"], "disk")
    assert 0.05 * frames * 768 * 4 < feat2 < 0.12 * frames * 768 * 4, plan["features (iteration 2)"]
    assert figure(plan["features (iteration 2)"], "GPU") > 0 and figure(plan["labels (iteration 2)"], "GPU") > 0
    assert figure(plan["train (iteration 1)"], "GPU") > 100  # 800k updates x 32 GPUs
    assert figure(plan["kmeans (iteration 5)"], "RAM/job") < 8e9  # a bounded pool, not the 10 % sample
    assert "free on the work dir's filesystem" in text
    # oversized requests are noted once per key, against the largest peak of the steps using it
    notes = {m.group(1): m.group(0) for m in re.finditer(r"^  oversized request: ([\w.]+)=.*$", text, re.M)}
    kmeans_peak = max(figure(plan[f"kmeans (iteration {i})"], "RAM/job") for i in range(1, 6))
    times = re.search(r"=200 is (\d+)x the estimated peak of kmeans \(", notes.pop("cluster.stages.kmeans.mem_gb"))
    assert times and abs(int(times.group(1)) - 200 * 2**30 / kmeans_peak) < 2, times
    assert "8x the estimated peak of crop (2 CPUs per job)" in notes.pop("cluster.stages.crop.cpus_per_task")
    # the manifest's peak grows with the item count: 6,000 long items here, ~1.2M for LRS3 + VoxCeleb2
    notes.pop("cluster.stages.manifest.mem_gb", None)
    assert notes == {}, notes


def test_dry_run_refuses_a_work_dir_without_room(corpus_1000h, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)]).returncode != 0:
        pytest.skip("mount -t tmpfs failed here (no CAP_SYS_ADMIN in this container?)")
    try:
        out = dry_run(corpus_1000h, mnt / "work")
        # a real launch is refused by the same estimate, which needs the crop step's shards: it
        # plans them in memory and writes nothing (not the frozen item list either)
        cmd = [sys.executable, str(REPO / "launch.py"), "--preset", "base", "--cluster", "local", "--stage", "crop",
               "--corpus", str(corpus_1000h), "--workdir", str(mnt / "launched")]
        launched = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
        left = sorted(str(p.relative_to(mnt / "launched")) for p in (mnt / "launched").rglob("*")
                      if p.is_file()) if (mnt / "launched").exists() else []
    finally:
        subprocess.run(["umount", str(mnt)])
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    errors = [l for l in out.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in out.stderr, out.stderr
    assert "not enough disk for crop" in errors[0] and "1.0 MB free" in errors[0], errors[0]
    assert not (mnt / "work").exists() or not any((mnt / "work").iterdir())
    assert launched.returncode == 2, launched.stdout[-2000:] + launched.stderr[-2000:]
    errors = [l for l in launched.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "not enough disk for crop" in errors[0], launched.stderr[-2000:]
    assert "froze" not in launched.stdout, launched.stdout[-2000:]
    assert left == [], left
