"""End to end with the local executor: two pretraining iterations on the real sample corpus with
the smoke preset (tiny model, 6 updates per iteration), launched as a user does.

One run is shared by every test of this module (module fixture):
1. ``launch.py --stage all --iterations 2``; once iteration 1's training has saved a checkpoint,
   its rank processes are SIGKILLed: the launch fails;
2. the same command again: training resumes from that checkpoint, both iterations complete;
3. the same command a third time: nothing is submitted;
4. ``--iteration 2 --stage train --force``: only that stage runs again (from scratch);
5. ``train.max_update`` raised on the complete iteration 1 (dry run, then run): its training
   continues from its last checkpoint, and iteration 2 becomes stale (`status`).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from e2e_helpers import (
    REPO_ROOT,
    STAGES_PER_ITERATION,
    Launch,
    events_first_steps,
    kill_tree,
    launch_cmd,
    rank_processes,
    read_done_stats,
    run_launch,
    sigkill,
    stage_wall_times,
    start_launch,
    submitted_steps,
    tree,
    wait_for_updates,
)
from stages.fairseq_run import checkpoint_updates

MAX_UPDATE = 6  # presets/smoke.yaml


@dataclass
class LocalRun:
    workdir: Path
    killed: Launch
    killed_at_updates: int
    resumed: Launch
    again: Launch
    rerun: Launch
    raise_dry: Launch
    raised: Launch
    status_after_raise: str
    before_raise: dict  # iteration 1's final update count and train stats before max_update was raised
    rerun_untouched: dict = field(default_factory=dict)
    wall_times: dict = field(default_factory=dict)


@pytest.fixture(scope="module")
def local_run(sample_corpus, tmp_path_factory) -> LocalRun:
    base = tmp_path_factory.mktemp("e2e_local")
    work = base / "work"
    cmd = launch_cmd(work, sample_corpus, "local", "--stage", "all", "--iterations", "2")
    last = work / "iter1" / "train" / "checkpoints" / "checkpoint_last.pt"

    proc = start_launch(cmd, base / "launch1.log")
    try:
        wait_for_updates(last, 2, proc, timeout=900)
        ranks = rank_processes(proc.pid)
        assert ranks, "no submitit task process under the launcher while iteration 1 trains"
        sigkill(ranks)
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
    killed = Launch(cmd, rc, (base / "launch1.log").read_text(errors="replace"))
    killed_at = checkpoint_updates(last)

    resumed = run_launch(cmd, base / "launch2.log", timeout=1200)
    again = run_launch(cmd, base / "launch3.log", timeout=300)
    labels = work / "iter2" / "labels" / "train.km"
    untouched = {"labels_mtime": labels.stat().st_mtime_ns if labels.exists() else None}
    rerun_cmd = launch_cmd(work, sample_corpus, "local", "--iteration", "2", "--stage", "train",
                           "--force")
    rerun = run_launch(rerun_cmd, base / "launch4.log", timeout=600)
    untouched["labels_mtime_after"] = labels.stat().st_mtime_ns if labels.exists() else None
    final1 = work / "iter1" / "train" / "checkpoints" / "checkpoint_final.pt"
    before_raise = {"final_updates": checkpoint_updates(final1), "stats": read_done_stats(work, "train", 1, "train"),
                    "firsts": events_first_steps(work / "iter1" / "train" / "tensorboard" / "train_inner")}
    raise_cmd = launch_cmd(work, sample_corpus, "local", "--iteration", "1", "--stage", "train",
                           f"train.max_update={MAX_UPDATE + 2}")
    raise_dry = run_launch(raise_cmd + ["--dry-run"], base / "launch5.log", timeout=300)
    raised = run_launch(raise_cmd, base / "launch6.log", timeout=600)
    import subprocess
    import sys

    status = subprocess.run([sys.executable, str(REPO_ROOT / "launch.py"), "status", "--workdir", str(work)],
                            capture_output=True, text=True, timeout=120).stdout

    run = LocalRun(work, killed, killed_at, resumed, again, rerun, raise_dry, raised, status, before_raise,
                   untouched, stage_wall_times(killed, resumed))
    (base / "wall_times.json").write_text(json.dumps(run.wall_times, indent=1))
    print("\nwall time per stage (local executor, s):", json.dumps(run.wall_times, indent=1))
    return run


def test_two_iterations_complete(local_run):
    assert local_run.resumed.returncode == 0, local_run.resumed
    work = local_run.workdir
    # crop and manifest once, at the top; everything else per iteration
    assert (work / "crop").is_dir() and (work / "manifest" / "train.tsv").is_file()
    assert local_run.before_raise["final_updates"] == MAX_UPDATE
    for it in (1, 2):
        assert tree(work, it) == set(STAGES_PER_ITERATION), tree(work, it)
        final = work / f"iter{it}" / "train" / "checkpoints" / "checkpoint_final.pt"
        assert checkpoint_updates(final) == (MAX_UPDATE + 2 if it == 1 else MAX_UPDATE)
        png = work / f"iter{it}" / "train" / "loss.png"
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_iterations_chain_through_the_final_checkpoint(local_run):
    work = local_run.workdir
    stats = read_done_stats(work, "features", 2, "train_0_1")
    if not stats:  # shard keys are the features stage's: find any of iteration 2
        from pipeline.state import StateStore

        done = StateStore(work).markers("features", 2)["done"]
        stats = read_done_stats(work, "features", 2, sorted(done)[0])
    assert stats.get("kind") == "layer" and stats.get("layer") == 1, stats
    assert Path(stats["checkpoint"]) == work / "iter1" / "train" / "checkpoints" / "checkpoint_final.pt"
    # labels: 100 Hz (MFCC) in iteration 1, 25 Hz (layer features) in iteration 2
    rows = (work / "manifest" / "train.tsv").read_text().splitlines()[1:]
    frames = [int(r.split("\t")[3]) for r in rows]
    per_frame = []
    for it in (1, 2):
        lines = (work / f"iter{it}" / "labels" / "train.km").read_text().splitlines()
        assert len(lines) == len(frames)
        per_frame.append(sum(len(l.split()) for l in lines) / sum(frames))
    assert per_frame[0] == pytest.approx(4.0, rel=0.05) and per_frame[1] == pytest.approx(1.0, rel=0.05)
    k = [len((work / f"iter{it}" / "labels" / "dict.km.txt").read_text().splitlines()) for it in (1, 2)]
    assert k == [20, 20]  # smoke schedule


def test_killed_training_resumes_and_the_update_count_continues(local_run):
    assert local_run.killed.returncode not in (0, None), local_run.killed
    resume_at = local_run.killed_at_updates
    assert resume_at is not None and 2 <= resume_at < MAX_UPDATE, resume_at
    stats = local_run.before_raise["stats"]
    assert stats["resumed_from_updates"] == resume_at and stats["num_updates"] == MAX_UPDATE
    firsts = local_run.before_raise["firsts"]
    assert firsts[0] == 1 and firsts[-1] == resume_at + 1, firsts
    # crop, manifest and iteration 1's label chain were not redone by the relaunch
    redone = submitted_steps(local_run.resumed)
    assert "crop" not in redone and "manifest" not in redone, redone
    assert "train (iteration 1)" in redone


def test_second_launch_submits_nothing(local_run):
    again = local_run.again
    assert again.returncode == 0, again
    assert submitted_steps(again) == [], again
    assert "everything was already complete" in again.output, again


def test_rerun_of_one_stage_of_one_iteration(local_run):
    rerun = local_run.rerun
    assert rerun.returncode == 0, rerun
    assert submitted_steps(rerun) == ["train (iteration 2)"], rerun
    stats = read_done_stats(local_run.workdir, "train", 2, "train")
    assert stats["trained"] is True and stats["resumed_from_updates"] == 0
    assert stats["num_updates"] == MAX_UPDATE
    assert local_run.rerun_untouched["labels_mtime"] == local_run.rerun_untouched["labels_mtime_after"]


def test_wall_time_of_every_stage_is_reported(local_run):
    expected = {"crop", "manifest"} | {f"{s} (iteration {i})" for s in STAGES_PER_ITERATION
                                       for i in (1, 2)}
    assert expected <= set(local_run.wall_times), local_run.wall_times


def test_raising_max_update_continues_a_complete_iteration_and_makes_the_next_stale(local_run):
    assert local_run.raise_dry.returncode == 0, local_run.raise_dry
    assert (f"out of date: train: train.max_update raised from {MAX_UPDATE} to {MAX_UPDATE + 2}: training "
            "continues from its last checkpoint") in local_run.raise_dry.output, local_run.raise_dry
    raised = local_run.raised
    assert raised.returncode == 0 and submitted_steps(raised) == ["train (iteration 1)"], raised
    stats = read_done_stats(local_run.workdir, "train", 1, "train")
    assert stats["resumed_from_updates"] == MAX_UPDATE and stats["num_updates"] == MAX_UPDATE + 2, stats
    final = local_run.workdir / "iter1" / "train" / "checkpoints" / "checkpoint_final.pt"
    assert checkpoint_updates(final) == MAX_UPDATE + 2
    firsts = events_first_steps(local_run.workdir / "iter1" / "train" / "tensorboard" / "train_inner")
    assert firsts[-1] == MAX_UPDATE + 1, firsts  # the update count went on from the old final
    status = local_run.status_after_raise
    for stage in STAGES_PER_ITERATION:  # iteration 2 read iteration 1's old final checkpoint
        line = next(ln for ln in status.splitlines() if ln.startswith("2 ") and f" {stage} " in ln)
        assert line.rstrip().endswith("stale"), status
    assert "stale: its input train (iteration 1) was redone since it ran" in status, status
