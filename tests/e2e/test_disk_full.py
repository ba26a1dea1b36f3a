"""A full disk is not the videos' fault. The real crop and manifest stages of the sample corpus run
into a small tmpfs mounted as the work dir (needs root: CI runs as root); the disk fills up during
the crop. The shards that hit it fail with one line naming the file and the disk, no item is
recorded as a bad video, and after the tmpfs is remounted bigger the same command produces every
item, and train.tsv lists every train clip."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from e2e_helpers import REPO_ROOT, launch_cmd, run_launch

sys.path.insert(0, str(REPO_ROOT / "tests" / "engine"))
from launcher_helpers import mount_tmpfs, umount  # noqa: E402


def _split_ids(corpus: Path, name: str) -> set:
    lines = (corpus / "splits" / f"{name}.lst").read_text().splitlines()
    return {ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")}


def test_disk_full_during_crop_fails_shards_and_a_rerun_produces_every_item(sample_corpus, tmp_path):
    work = tmp_path / "work"
    mount_tmpfs(work, "1200k")
    try:
        # all four shards start at once: the disk fills while they crop (not while the launcher
        # writes a later shard's job files, which is one `error:` line of the launcher)
        # (the up-front free-space estimate would refuse the launch: this test is about the disk
        # that fills while the jobs write, which an estimate can never rule out)
        cmd = launch_cmd(work, sample_corpus, "local", "--stage", "crop", "cluster.array_parallelism=4",
                         "cluster.check_free_space=false")
        full = run_launch(cmd, tmp_path / "launch1.log", timeout=900)
        assert full.returncode == 2, full
        lines = [ln for ln in full.output.splitlines() if "disk full" in ln]
        assert lines and all(str(work) in ln for ln in lines), full
        assert "Traceback" not in full.output, full
        state = work / ".pipeline" / "state" / "once" / "crop"
        # shard markers only: the step's own _stage.failed.json is there too when the disk had room for it
        markers = [json.loads(p.read_text()) for p in state.glob("*.failed.json") if not p.name.startswith("_")]
        # a shard whose marker could not be written on the full disk is reported by the launcher
        assert all(m["infrastructure"] and "disk full" in m["error"] for m in markers), markers
        for results in (work / "crop" / "results").glob("*.jsonl"):
            for rec in map(json.loads, results.read_text().splitlines()):
                assert rec["status"] == "ok", rec  # never a clip recorded as bad because of the disk
        st = subprocess.run([sys.executable, str(REPO_ROOT / "launch.py"), "status", "--workdir", str(work)],
                            capture_output=True, text=True, timeout=120)
        assert st.returncode == 1 and "disk full" in st.stdout, st.stdout + st.stderr

        subprocess.run(["mount", "-o", "remount,size=64m", str(work)], check=True)
        again = run_launch(cmd, tmp_path / "launch2.log", timeout=900)
        assert again.returncode == 0, again
        manifest = run_launch(launch_cmd(work, sample_corpus, "local", "--stage", "manifest"), tmp_path / "launch3.log",
                              timeout=600)
        assert manifest.returncode == 0, manifest
        summary = json.loads((work / "crop" / "summary.json").read_text())
        corpus_ids = {str(p.relative_to(sample_corpus).with_suffix("")) for p in sample_corpus.rglob("*.mp4")}
        assert summary["items"] == summary["ok"] == len(corpus_ids), summary
        rows = (work / "manifest" / "train.tsv").read_text().splitlines()[1:]
        train_ids = {r.split("\t")[0] for r in rows}
        expected = corpus_ids - _split_ids(sample_corpus, "valid") - _split_ids(sample_corpus, "test")
        assert train_ids == expected, sorted(train_ids ^ expected)
    finally:
        umount(work)
