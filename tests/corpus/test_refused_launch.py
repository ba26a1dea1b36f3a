"""A launch refused by the work dir lock changes nothing (issue 22, item 4): while a crop launch
runs, a video is added and the same command is run again. The second launch is refused with one
line and writes no file (not the item list the crop stage freezes, not a plan, not a log); the
first finishes normally with the items it froze, and the next launch picks the new video up."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from corpus_helpers import launch_here
from test_corpus_change import SETTINGS, add

REPO_ROOT = Path(__file__).resolve().parents[2]


def launch(work: Path, corpus: Path) -> list[str]:
    return ["--stage", "crop", "--preset", "smoke", "--cluster", "local", "--workdir", str(work),
            "--corpus", str(corpus), *SETTINGS, "crop.items_per_shard=1"]  # shards left once the first is done


def snapshot(root: Path) -> dict:
    """Every file and directory under ``root``: its size and modification time."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.lstat(Path(dirpath) / name)
            out[str(Path(dirpath, name).relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


def signal_tree(pid: int, sig: int) -> None:
    """``sig`` to a launch and every process under it (its jobs lead sessions of their own)."""
    root = psutil.Process(pid)
    for p in [root] + root.children(recursive=True):
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def test_a_launch_refused_by_the_lock_writes_nothing_and_the_running_one_finishes(tmp_path, clips, capsys,
                                                                                  no_run_report):
    corpus, work = tmp_path / "corpus", tmp_path / "work"
    corpus.mkdir()
    for name, key in (("m1", "a"), ("m2", "b"), ("m3", "c")):
        add(corpus, name, clips[key])
    state = work / ".pipeline" / "state" / "once" / "crop"
    log = tmp_path / "first.log"
    with open(log, "w") as f:
        first = subprocess.Popen([sys.executable, str(REPO_ROOT / "launch.py"), *launch(work, corpus)],
                                 stdout=f, stderr=subprocess.STDOUT, cwd=REPO_ROOT, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not list(state.glob("*.done.json")) and time.time() < deadline and first.poll() is None:
            time.sleep(0.2)
        assert list(state.glob("*.done.json")) and first.poll() is None, log.read_text()
        # the first launch and its jobs held still, so that any file written is the second's
        signal_tree(first.pid, signal.SIGSTOP)
        try:
            time.sleep(0.5)
            add(corpus, "a_new", clips["g"])
            before = snapshot(work)
            rc, out = launch_here(launch(work, corpus), capsys)
            after = snapshot(work)
        finally:
            signal_tree(first.pid, signal.SIGCONT)
        lines = out.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and "in use by another launch" in lines[0], out
        assert after == before, {k: (before.get(k), after.get(k)) for k in set(before) | set(after)
                                 if before.get(k) != after.get(k)}
        assert first.wait(timeout=600) == 0, log.read_text()
    finally:
        if first.poll() is None:
            signal_tree(first.pid, signal.SIGKILL)
            first.wait()
    summary = json.loads((work / "crop" / "summary.json").read_text())
    assert (summary["items"], summary["ok"]) == (3, 3), summary

    rc, out = launch_here(launch(work, corpus), capsys)  # the new video: frozen by the next launch
    assert rc == 0 and "froze 1 new items" in out, out
    assert json.loads((work / "crop" / "summary.json").read_text())["items"] == 4
