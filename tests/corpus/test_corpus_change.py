"""A corpus that changes under a run, launched as a user does (local executor): the crop is killed
half way, new videos whose names sort first are added, the same command is run again. Every item
gets exactly one crop and one tsv row, each ROI comes from its own source; a removed source
stays in the manifest until manifest.drop_removed=true."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psutil

from corpus_helpers import launch_here
from avprep.crop import crop_one_video
from stages import crop as crop_stage

REPO_ROOT = Path(__file__).resolve().parents[2]
# every item in train (the smoke preset's split lists belong to the sample corpus)
SETTINGS = ["crop.items_per_shard=2", "cluster.array_parallelism=1", "manifest.valid_ids=null",
            "manifest.test_ids=null", "manifest.valid_fraction=0", "manifest.test_fraction=0"]


def launch(work: Path, corpus: Path, *args: str) -> list[str]:
    return ["--preset", "smoke", "--cluster", "local", "--workdir", str(work), "--corpus", str(corpus), *args,
            *SETTINGS]


def add(corpus: Path, name: str, clip: Path) -> None:
    shutil.copy(clip, corpus / f"{name}.mp4")
    shutil.copy(clip.with_suffix(".txt"), corpus / f"{name}.txt")


def kill_tree(proc: subprocess.Popen) -> None:
    try:
        root = psutil.Process(proc.pid)
    except psutil.NoSuchProcess:
        return
    for p in root.children(recursive=True) + [root]:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait()


def test_videos_added_during_a_killed_crop(tmp_path, clips, capsys, no_run_report):
    corpus, work = tmp_path / "corpus", tmp_path / "work"
    corpus.mkdir()
    for name, key in (("m1", "a"), ("m2", "b"), ("m3", "c"), ("m4", "d")):
        add(corpus, name, clips[key])
    state = work / ".pipeline" / "state" / "once" / "crop"
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "launch.py"), *launch(work, corpus, "--stage", "crop")],
                                stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, start_new_session=True)
        try:
            deadline = time.time() + 300
            while not list(state.glob("*.done.json")) and time.time() < deadline and proc.poll() is None:
                time.sleep(0.2)
        finally:
            kill_tree(proc)
    done_before = sorted(p.name for p in state.glob("*.done.json"))
    assert len(done_before) == 1, (done_before, (tmp_path / "killed.log").read_text())

    add(corpus, "a_new1", clips["g"])  # sort before every frozen item
    add(corpus, "a_new2", clips["h"])
    rc, out = launch_here(launch(work, corpus, "--stage", "crop"), capsys)
    assert rc == 0 and "froze 2 new items: 2 items in 1 shards (shard 00002)" in out, out
    rc, out = launch_here(launch(work, corpus, "--stage", "manifest"), capsys)
    assert rc == 0, out

    ids = sorted(p.stem for p in corpus.glob("*.mp4"))
    crop = work / "crop"
    records = [json.loads(line) for f in sorted((crop / "results").glob("*.jsonl")) for line in f.read_text().splitlines()]
    assert Counter(r["id"] for r in records) == Counter(ids)  # exactly one crop each
    assert all(r["status"] == "ok" for r in records)
    rows = (work / "manifest" / "train.tsv").read_text().splitlines()[1:]
    assert sorted(r.split("\t")[0] for r in rows) == ids  # exactly one tsv row each
    summary = json.loads((crop / "summary.json").read_text())
    assert (summary["items"], summary["ok"], summary["last_listing"]["new"]) == (6, 6, 2)

    # each ROI is its own source's: the landmarks say what they were detected on, and the crop
    # code run on that source with them gives the very same ROI video
    for item_id in ids:
        source = json.loads(str(__import__("numpy").load(crop / "landmarks" / f"{item_id}.npz")["source"]))
        assert source["video"] == str((corpus / f"{item_id}.mp4").resolve()), item_id
        check = tmp_path / "check" / item_id
        check.mkdir(parents=True)
        shutil.copy(crop / "landmarks" / f"{item_id}.npz", check / "x.landmarks.npz")
        roi = crop_one_video(corpus / f"{item_id}.mp4", check, name="x")
        assert roi.video.read_bytes() == (crop / "video" / f"{item_id}.mp4").read_bytes(), item_id

    # a source removed: reported, kept in the manifest until asked
    (corpus / "m3.mp4").unlink()
    rc, out = launch_here(launch(work, corpus, "--stage", "crop"), capsys)
    assert rc == 0 and "1 frozen items are gone from the corpus (e.g. m3)" in out, out
    assert "[crop] complete (3 shards), nothing to do" in out
    rc, out = launch_here(launch(work, corpus, "--stage", "manifest"), capsys)
    assert rc == 0 and "nothing to do" in out and len((work / "manifest" / "train.tsv").read_text().splitlines()) == 7
    rc, out = launch_here(launch(work, corpus, "--stage", "manifest", "manifest.drop_removed=true"), capsys)
    assert rc == 0, out
    rows = (work / "manifest" / "train.tsv").read_text().splitlines()[1:]
    assert sorted(r.split("\t")[0] for r in rows) == [i for i in ids if i != "m3"]
    assert json.loads((work / "manifest" / "summary.json").read_text())["dropped_removed"] == 1
