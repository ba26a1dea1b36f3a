"""End to end on the local Slurm cluster (scripts/slurm_local.sh start; CI runs one): two
pretraining iterations on the sample corpus with the smoke preset, every stage as Slurm jobs and
training as one 2-task job (two gloo ranks, cluster_configs/slurm_local.yaml), left alone as a user
would leave it: launchers killed, detached, cancelled, relaunched.

One run shared by the module:
1. ``launch.py --stage all --iterations 2 --cluster slurm_local``, SIGKILLed while the crop array
   runs; the same command at once: it adopts the crop tasks (never submits them again);
2. iteration 1's training job gets ``scancel --signal=USR2`` after 2 updates (a preemption): it
   made progress, so submitit requeues it and it resumes by itself, the launch goes on;
3. while iteration 2 trains, that launcher is SIGKILLed too and the same command runs with
   ``--detach``: it returns in seconds, and the driver job adopts the training job;
4. ``launch.py cancel``: no job of the work dir is left in squeue;
5. ``--detach`` again: training resumes from its checkpoint and the run completes, with no
   launcher process alive; `status` shows the driver, then every stage complete;
6. the same command in the foreground submits nothing;
7. multi-node: iteration 2's training again (``--force``) as a 2-node x 1-task job on partition
   ``multi`` (node1, node2: two slurmd daemons on this machine), requeued once by USR2.
sacct shows no two jobs of one shard overlapping in time, and the update count only grows.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from e2e_helpers import (
    STAGES_PER_ITERATION,
    REPO_ROOT,
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
from stages.fairseq_run import checkpoint_updates

sys.path.insert(0, str(REPO_ROOT / "tests" / "engine"))
from launcher_helpers import (  # noqa: E402
    driver_record,
    require_partitions,
    shard_overlaps_in_sacct,
    squeue_tagged,
    wait_for,
    wait_for_text,
)

pytestmark = pytest.mark.slurm
# two CPU ranks on a shared 2-core machine take ~5 s per update: 4 updates in iteration 1 (smoke: 6);
# iteration 2 trains 8, so that a launcher kill, the adoption and a cancel all fall inside it
MAX_UPDATE = [4, 8]
MULTI_UPDATES = 4  # the 2-node run of iteration 2: USR2 after 2 updates, then 2 more after the requeue


@dataclass
class SlurmRun:
    workdir: Path
    first: Launch
    second: Launch
    preempted_at: int
    killed_at: dict
    adopt_seconds: dict
    detach: Launch
    cancel: subprocess.CompletedProcess
    squeue_after_cancel: list
    cancelled_at: int
    resume: Launch
    statuses: list
    launchers_during_resume: list
    again: Launch
    updates_seen: list
    train2_stats: dict
    train2_firsts: list
    multi: Launch
    multi_requeued_at: int
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


def _launchers(workdir: Path) -> list:
    """launch.py processes of this work dir (the driver job runs the launcher in-process)."""
    out = subprocess.run(["pgrep", "-af", f"launch.py .*{workdir}"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "pgrep" not in line]


def _status(workdir: Path) -> str:
    return subprocess.run([sys.executable, str(REPO_ROOT / "launch.py"), "status", "--workdir", str(workdir)],
                          capture_output=True, text=True, timeout=120).stdout


@pytest.fixture(scope="module")
def slurm_run(slurm, sample_corpus, tmp_path_factory) -> SlurmRun:
    require_partitions("service", "multi")
    base = tmp_path_factory.mktemp("e2e_slurm")
    work = base / "work"
    cmd = launch_cmd(work, sample_corpus, "slurm_local", "--stage", "all", "--iterations", "2",
                     f"train.max_update=[{MAX_UPDATE[0]},{MAX_UPDATE[1]}]")
    ckpt = {it: work / f"iter{it}" / "train" / "checkpoints" / "checkpoint_last.pt" for it in (1, 2)}
    crop_state = work / ".pipeline" / "state" / "once" / "crop"
    updates_seen = []
    adopt, killed_at = {}, {}

    def note_updates():
        updates_seen.append(checkpoint_updates(ckpt[2]))

    # 1. killed while the crop array runs, relaunched at once. The sample corpus crops in a few
    # seconds a shard, less than a loaded machine takes to start the relaunch: the crop array is
    # suspended (scontrol suspend: its tasks stay live) before the kill and resumed once adopted.
    p1 = start_launch(cmd, base / "launch1.log")
    crop_jobs = []
    try:
        wait_for(lambda: list(crop_state.glob("_jobs/*.json")) and list(crop_state.glob("*.running.json")), 600,
                 "a running crop task")
        crop_jobs = sorted({j["job_id"].split("_")[0] for f in crop_state.glob("_jobs/*.json")
                            for j in json.loads(f.read_text())["jobs"].values()})
        # (exit 1 for the array's tasks still pending: they stay pending or start, live either way)
        subprocess.run(["scontrol", "suspend", ",".join(crop_jobs)], capture_output=True, timeout=30)
    finally:
        kill_tree(p1.pid)  # the launcher only: it has no local children on Slurm
    p1.wait()
    t_kill = time.time()
    p2 = start_launch(cmd, base / "launch2.log")
    try:
        try:
            adopt["crop"] = wait_for_text(base / "launch2.log", "[crop] adopting", 300) - t_kill
        finally:
            subprocess.run(["scontrol", "resume", ",".join(crop_jobs)], capture_output=True, timeout=30)
        # 2. iteration 1's training is preempted (USR2) after 2 updates: requeued, resumed
        wait_for_updates(ckpt[1], 2, p2, timeout=1200)
        preempted_at = checkpoint_updates(ckpt[1])
        _signal_job(work, 1, "--signal=USR2")
        # 3. killed while iteration 2 trains; a detached relaunch adopts the training job
        wait_for_updates(ckpt[2], 2, p2, timeout=1200)
    finally:
        if p2.poll() is None:
            kill_tree(p2.pid)
    p2.wait()
    t_kill = time.time()
    killed_at["train"] = checkpoint_updates(ckpt[2])
    note_updates()
    detach = run_launch(cmd + ["--detach"], base / "launch3.log", timeout=120)
    driver_log = Path(driver_record(work)["log"])
    adopt["train (driver job)"] = wait_for_text(driver_log, "[train (iteration 2)] adopting", 300) - t_kill
    note_updates()
    # 4. cancel
    cancel = subprocess.run([sys.executable, str(REPO_ROOT / "launch.py"), "cancel", "--workdir", str(work)],
                            capture_output=True, text=True, timeout=300)
    squeue_after = squeue_tagged(work)
    cancelled_at = checkpoint_updates(ckpt[2])
    note_updates()
    # 5. a detached resume runs to the end; no launcher process is alive meanwhile
    resume = run_launch(cmd + ["--detach"], base / "launch4.log", timeout=120)
    statuses, launchers = [], []
    deadline = time.time() + 1500
    while time.time() < deadline and driver_record(work).get("state") not in ("done", "failed", "cancelled"):
        statuses.append(_status(work))
        launchers += _launchers(work)
        note_updates()
        time.sleep(3)
    statuses.append(_status(work))
    note_updates()
    # 6. nothing left to do
    again = run_launch(cmd, base / "launch5.log", timeout=300)
    train2_stats = read_done_stats(work, "train", 2, "train")
    train2_firsts = events_first_steps(work / "iter2" / "train" / "tensorboard" / "train_inner")
    # 7. iteration 2's training again as a 2-node job (one task per node), requeued once
    multi_cmd = launch_cmd(work, sample_corpus, "slurm_local", "--iteration", "2", "--stage", "train", "--force",
                           f"train.max_update=[{MAX_UPDATE[0]},{MULTI_UPDATES}]", "cluster.stages.train.partition=multi",
                           "cluster.stages.train.nodes=2", "cluster.stages.train.tasks_per_node=1")
    started = time.time()
    p6 = start_launch(multi_cmd, base / "launch6.log")
    try:
        # --force starts over: wait for this run's own checkpoint of 2 updates
        wait_for(lambda: ckpt[2].exists() and ckpt[2].stat().st_mtime > started
                 and (checkpoint_updates(ckpt[2]) or 0) >= 2, 900, "2 updates of the 2-node job", every=1.0)
        multi_requeued_at = checkpoint_updates(ckpt[2])
        _signal_job(work, 2, "--signal=USR2")
        rc = p6.wait(timeout=900)
    finally:
        if p6.poll() is None:
            kill_tree(p6.pid)
    multi = Launch(multi_cmd, rc, (base / "launch6.log").read_text(errors="replace"))
    first = Launch(cmd, p1.returncode, (base / "launch1.log").read_text(errors="replace"))
    second = Launch(cmd, p2.returncode, (base / "launch2.log").read_text(errors="replace"))
    resume.output += "\n" + driver_log.read_text(errors="replace")
    run = SlurmRun(work, first, second, preempted_at, killed_at, adopt, detach, cancel, squeue_after, cancelled_at,
                   resume, statuses, launchers, again, updates_seen, train2_stats, train2_firsts, multi,
                   multi_requeued_at,
                   stage_wall_times(second, resume))
    (base / "wall_times.json").write_text(json.dumps(run.wall_times, indent=1))
    print("\nwall time per stage (local Slurm cluster, s):", json.dumps(run.wall_times, indent=1))
    print("launcher kill -> relaunch adopting its jobs (s):", json.dumps({k: round(v, 2) for k, v in adopt.items()}))
    return run


def test_two_iterations_complete_on_slurm_with_two_rank_training(slurm_run):
    work = slurm_run.workdir
    assert driver_record(work)["state"] == "done", slurm_run.statuses[-1]
    assert slurm_run.train2_stats["num_updates"] == MAX_UPDATE[1]
    for it in (1, 2):
        assert tree(work, it) == set(STAGES_PER_ITERATION), tree(work, it)
        final = work / f"iter{it}" / "train" / "checkpoints" / "checkpoint_final.pt"
        # (iteration 2 was trained again at the end, by the 2-node job)
        assert checkpoint_updates(final) == (MAX_UPDATE[0] if it == 1 else MULTI_UPDATES)
        assert (work / f"iter{it}" / "train" / "loss.png").is_file()
    stats = read_done_stats(work, "train", 1, "train")
    assert stats["world_size"] == 2 and stats["backend"] == "gloo", stats
    # rank 1 ran, in its own task, with its own log
    assert (work / ".pipeline" / "logs" / "iter1" / "train" / "train.rank1.log").is_file()


def test_a_killed_launcher_relaunched_at_once_adopts_the_crop_array(slurm_run):
    second = slurm_run.second.output
    assert "[crop] adopting" in second and "[crop] submitting" not in second, second[-3000:]
    assert "[crop] submitting" in slurm_run.first.output


def test_no_shard_ever_ran_in_two_jobs_at_once(slurm_run):
    work = slurm_run.workdir
    for stage, it in [("crop", None), ("manifest", None)] + [(s, i) for i in (1, 2) for s in STAGES_PER_ITERATION]:
        assert shard_overlaps_in_sacct(work, stage, it) == [], (stage, it)


def test_preemption_signal_requeues_and_resumes_without_user_action(slurm_run):
    work = slurm_run.workdir
    stats = read_done_stats(work, "train", 1, "train")
    assert slurm_run.preempted_at <= stats["resumed_from_updates"] < MAX_UPDATE[0], stats
    log = (work / ".pipeline" / "logs" / "iter1" / "train" / "train.log").read_text(errors="replace")
    assert "requeueing" in log and log.count("== train train (iteration 1) rank 0/2") == 2, log[-3000:]
    firsts = events_first_steps(work / "iter1" / "train" / "tensorboard" / "train_inner")
    assert firsts[0] == 1 and firsts[-1] == stats["resumed_from_updates"] + 1, firsts


def test_the_detached_driver_adopts_the_training_job_of_the_killed_launcher(slurm_run):
    assert slurm_run.detach.returncode == 0 and slurm_run.detach.seconds < 30, slurm_run.detach
    assert "detached: Slurm job" in slurm_run.detach.output and "partition service" in slurm_run.detach.output
    assert "train (iteration 2)" in submitted_steps(slurm_run.second)
    # the training job was submitted once by the killed launcher, then only adopted
    driver_log = slurm_run.resume.output
    assert driver_log.count("[train (iteration 2)] adopting") >= 1
    assert driver_log.split("[train (iteration 2)] adopting")[0].count("[train (iteration 2)] submitting") == 0


def test_cancel_leaves_no_job_and_a_later_launch_resumes(slurm_run):
    assert slurm_run.cancel.returncode == 0, slurm_run.cancel.stdout + slurm_run.cancel.stderr
    assert "cancelled the driver job" in slurm_run.cancel.stdout
    assert slurm_run.squeue_after_cancel == []
    stats = slurm_run.train2_stats
    assert stats["resumed_from_updates"] == slurm_run.cancelled_at >= 2, (stats, slurm_run.cancelled_at)
    assert slurm_run.train2_firsts[-1] == slurm_run.cancelled_at + 1, slurm_run.train2_firsts


def test_the_update_count_only_grows(slurm_run):
    seen = [u for u in slurm_run.updates_seen if u is not None]
    assert seen and seen == sorted(seen) and seen[-1] == MAX_UPDATE[1], slurm_run.updates_seen


def test_a_detached_run_needs_no_launcher_and_status_shows_the_driver(slurm_run):
    assert slurm_run.resume.returncode == 0, slurm_run.resume
    assert slurm_run.launchers_during_resume == [], slurm_run.launchers_during_resume
    job = driver_record(slurm_run.workdir)["job_id"]
    assert any(f"driver: Slurm job {job}, running" in s for s in slurm_run.statuses), slurm_run.statuses[:3]
    final = slurm_run.statuses[-1]
    assert f"driver: Slurm job {job}, done" in final and "FAILED" not in final and "incomplete" not in final, final
    assert final.count("complete") >= 2 + 2 * len(STAGES_PER_ITERATION), final


def test_second_launch_on_slurm_submits_nothing(slurm_run):
    assert slurm_run.again.returncode == 0, slurm_run.again
    assert submitted_steps(slurm_run.again) == [], slurm_run.again


def test_two_node_training_runs_and_resumes_after_a_requeue(slurm_run):
    multi = slurm_run.multi
    assert multi.returncode == 0, multi
    work = slurm_run.workdir
    stats = read_done_stats(work, "train", 2, "train")
    assert stats["world_size"] == 2 and stats["num_updates"] == MULTI_UPDATES, stats
    assert slurm_run.multi_requeued_at <= stats["resumed_from_updates"] < MULTI_UPDATES, stats
    job = json.loads((work / ".pipeline/state/iter2/train/train.done.json").read_text())["job_id"]
    nodes = subprocess.run(["sacct", "-X", "-n", "-P", "-j", job, "-o", "NodeList,AllocNodes"],
                           capture_output=True, text=True).stdout.split()
    assert nodes and nodes[-1].split("|")[1] == "2", nodes
    log = (work / ".pipeline" / "logs" / "iter2" / "train" / "train.log").read_text(errors="replace")
    assert "requeueing" in log, log[-2000:]
