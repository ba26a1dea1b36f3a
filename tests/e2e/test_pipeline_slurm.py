"""End to end on the local Slurm cluster (scripts/slurm_local.sh start; CI runs one): two
pretraining iterations on the sample corpus with the smoke preset, every stage as Slurm jobs and
training as one 2-task job (two gloo ranks, cluster_configs/slurm_local.yaml).

One run shared by the module:
1. ``launch.py --stage all --iterations 2 --cluster slurm_local``. While iteration 1 trains, its
   job gets ``scancel --signal=USR2`` (preemption): submitit requeues it and it resumes by itself,
   the same launch goes on. While iteration 2 trains, its job is cancelled (``scancel``): the
   launch fails;
2. the same command: iteration 2's training resumes from its checkpoint and completes;
3. the same command again: nothing is submitted.
"""
from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from e2e_helpers import (
    STAGES_PER_ITERATION,
    Launch,
    events_first_steps,
    kill_tree,
    launch_cmd,
    read_done_stats,
    run_launch,
    running_job_id,
    stage_wall_times,
    start_launch,
    submitted_steps,
    tree,
    wait_for_updates,
)
from stages.train import checkpoint_updates

pytestmark = pytest.mark.slurm
# two CPU ranks on a shared 2-core machine take ~5 s per update: 4 updates per iteration (smoke: 6)
# keep the run short and still leave updates 3-4 to train after the resume from update 2
MAX_UPDATE = 4


@dataclass
class SlurmRun:
    workdir: Path
    first: Launch
    preempted_at: int
    cancelled_at: int
    resumed: Launch
    again: Launch
    wall_times: dict = field(default_factory=dict)


def _signal_job(workdir: Path, iteration: int, *scancel_args: str, timeout: float = 60) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job_id = running_job_id(workdir, "train", iteration, "train")
        if job_id and not job_id.startswith("inprocess"):
            subprocess.run(["scancel", *scancel_args, job_id], check=True, timeout=30)
            return job_id
        time.sleep(0.5)
    raise AssertionError(f"no running Slurm job recorded for train (iteration {iteration})")


@pytest.fixture(scope="module")
def slurm_run(slurm, sample_corpus, tmp_path_factory) -> SlurmRun:
    base = tmp_path_factory.mktemp("e2e_slurm")
    work = base / "work"
    cmd = launch_cmd(work, sample_corpus, "slurm_local", "--stage", "all", "--iterations", "2",
                     f"train.max_update={MAX_UPDATE}")
    ckpt = {it: work / f"iter{it}" / "train" / "checkpoints" / "checkpoint_last.pt" for it in (1, 2)}

    proc = start_launch(cmd, base / "launch1.log")
    try:
        wait_for_updates(ckpt[1], 2, proc, timeout=1200)
        preempted_at = checkpoint_updates(ckpt[1])
        _signal_job(work, 1, "--signal=USR2")
        wait_for_updates(ckpt[2], 2, proc, timeout=900)
        cancelled_at = checkpoint_updates(ckpt[2])
        _signal_job(work, 2)
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
    first = Launch(cmd, rc, (base / "launch1.log").read_text(errors="replace"))
    cancelled_at = checkpoint_updates(ckpt[2])  # what the relaunch finds

    resumed = run_launch(cmd, base / "launch2.log", timeout=900)
    again = run_launch(cmd, base / "launch3.log", timeout=300)
    run = SlurmRun(work, first, preempted_at, cancelled_at, resumed, again,
                   stage_wall_times(first, resumed))
    (base / "wall_times.json").write_text(json.dumps(run.wall_times, indent=1))
    print("\nwall time per stage (local Slurm cluster, s):", json.dumps(run.wall_times, indent=1))
    return run


def test_two_iterations_complete_on_slurm_with_two_rank_training(slurm_run):
    assert slurm_run.resumed.returncode == 0, slurm_run.resumed
    work = slurm_run.workdir
    for it in (1, 2):
        assert tree(work, it) == set(STAGES_PER_ITERATION), tree(work, it)
        stats = read_done_stats(work, "train", it, "train")
        assert stats["world_size"] == 2 and stats["backend"] == "gloo", stats
        assert stats["num_updates"] == MAX_UPDATE
        final = work / f"iter{it}" / "train" / "checkpoints" / "checkpoint_final.pt"
        assert checkpoint_updates(final) == MAX_UPDATE
        assert (work / f"iter{it}" / "train" / "loss.png").is_file()
    # rank 1 ran, in its own task, with its own log
    assert (work / ".pipeline" / "logs" / "iter1" / "train" / "train.rank1.log").is_file()


def test_preemption_signal_requeues_and_resumes_without_user_action(slurm_run):
    work = slurm_run.workdir
    # the first launch went on to iteration 2 after the preemption of iteration 1's job
    assert "train (iteration 2)" in submitted_steps(slurm_run.first), slurm_run.first
    stats = read_done_stats(work, "train", 1, "train")
    assert slurm_run.preempted_at <= stats["resumed_from_updates"] < MAX_UPDATE, stats
    log = (work / ".pipeline" / "logs" / "iter1" / "train" / "train.log").read_text(errors="replace")
    assert "requeueing" in log and log.count("== train train (iteration 1) rank 0/2") == 2, log[-3000:]
    firsts = events_first_steps(work / "iter1" / "train" / "tensorboard" / "train_inner")
    assert firsts[0] == 1 and firsts[-1] == stats["resumed_from_updates"] + 1, firsts


def test_cancelled_training_resumes_on_relaunch(slurm_run):
    assert slurm_run.first.returncode not in (0, None), slurm_run.first
    assert submitted_steps(slurm_run.resumed) == ["train (iteration 2)"], slurm_run.resumed
    stats = read_done_stats(slurm_run.workdir, "train", 2, "train")
    assert stats["resumed_from_updates"] == slurm_run.cancelled_at
    assert 2 <= slurm_run.cancelled_at < MAX_UPDATE
    firsts = events_first_steps(slurm_run.workdir / "iter2" / "train" / "tensorboard" / "train_inner")
    assert firsts[-1] == slurm_run.cancelled_at + 1, firsts


def test_second_launch_on_slurm_submits_nothing(slurm_run):
    assert slurm_run.again.returncode == 0, slurm_run.again
    assert submitted_steps(slurm_run.again) == [], slurm_run.again
