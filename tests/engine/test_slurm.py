"""The engine on a real Slurm cluster (scripts/slurm_local.sh start): sbatch arrays, failures and
reruns, a two-stage chain, and a checkpointable 2-task job requeued by a preemption signal."""
import json
import os
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest

from engine_toy_stages import CounterStage, SumStage, ToyStage
from pipeline.errors import StageFailed
from test_engine import make, run_all, runs

pytestmark = pytest.mark.slurm


def test_array_with_more_shards_than_parallelism_then_chain(tmp_path, slurm):
    pipe = make(tmp_path, "slurm_local", {"toy": ToyStage(8), "sum": SumStage()},
                overrides=["cluster.array_parallelism=2"])
    results = run_all(pipe)
    assert [r.submitted for r in results] == [8, 1]
    assert (tmp_path / "sum" / "sum.txt").read_text() == "28\n"
    log = runs(tmp_path)
    assert all(l.startswith("toy") for l in log[:8]) and log[8].startswith("sum")
    job_ids = {json.loads(p.read_text())["job_id"] for p in (tmp_path / ".pipeline/state/once/toy").glob("part*.done.json")}
    # one array for the stage, never one sbatch per shard
    assert len({j.split("_")[0] for j in job_ids}) == 1 and all("_" in j for j in job_ids), job_ids
    array_id = next(iter(job_ids)).split("_")[0]
    for _ in range(50):  # accounting is written a moment after the jobs end
        sacct = subprocess.run(["sacct", "-n", "-X", "-j", array_id, "-o", "JobID,State"], capture_output=True, text=True)
        if sacct.stdout.count("COMPLETED") == 8:
            break
        time.sleep(0.2)
    assert sacct.stdout.count("COMPLETED") == 8, sacct.stdout
    assert [r.submitted for r in run_all(make(tmp_path, "slurm_local", {"toy": ToyStage(8), "sum": SumStage()}))] == [0, 0]


def test_failed_shard_reported_and_rerun_completes_only_it(tmp_path, slurm):
    (tmp_path / "control").mkdir()
    (tmp_path / "control" / "fail_part001").touch()
    with pytest.raises(StageFailed, match=r"part001: ValueError: asked to fail shard part001") as err:
        run_all(make(tmp_path, "slurm_local"))
    assert str(tmp_path / ".pipeline/logs/once/toy/part001.log") in str(err.value)
    assert not (tmp_path / "sum").exists()
    (tmp_path / "control" / "fail_part001").unlink()
    before = len(runs(tmp_path))
    assert before == 5
    results = run_all(make(tmp_path, "slurm_local"))
    assert [r.submitted for r in results] == [1, 1]
    assert [l.split()[-1] for l in runs(tmp_path)[before:]] == ["part001", "sum15"]


def test_checkpointable_two_task_job_is_requeued_on_usr2_and_resumes(tmp_path, slurm):
    stages = {"counter": CounterStage(target=24, step_s=0.5)}
    pipe = make(tmp_path, "slurm_local", stages,
                overrides=["cluster.stages.counter.tasks_per_node=2", "cluster.stages.counter.mem_gb=1"])
    steps = pipe.plan(pipe.targets("all"))
    error = []
    runner = threading.Thread(target=lambda: _run(pipe, steps, error))
    runner.start()
    progress = tmp_path / "counter" / "progress.json"
    running = tmp_path / ".pipeline/state/once/counter/count.running.json"
    deadline = time.time() + 90
    while time.time() < deadline and not (progress.exists() and json.loads(progress.read_text())["count"] >= 4):
        time.sleep(0.3)
    assert progress.exists(), "the job never made progress"
    job_id = json.loads(running.read_text())["job_id"]
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    runner.join(timeout=180)
    assert not runner.is_alive() and not error, error
    starts = [l.split() for l in (tmp_path / "counter" / "starts.log").read_text().splitlines()]
    # started twice: from 0, then (after the requeue, SLURM_RESTART_COUNT=1) from where it stopped
    assert len(starts) == 2 and starts[0] == ["0", "0"] and int(starts[1][0]) >= 4 and starts[1][1] == "1", starts
    assert json.loads((tmp_path / "counter" / "final.json").read_text()) == {"count": 24}
    assert json.loads((tmp_path / "counter" / "rank1.json").read_text())["ntasks"] == 2


def _run(pipe, steps, error):
    try:
        pipe.run(steps)
    except Exception as e:  # reported by the test's assertion
        error.append(repr(e))


# --- runs you can leave alone: adoption, the driver job, cancel, scheduler feedback, time limits ---
from launcher_helpers import (  # noqa: E402
    all_job_ids,
    driver_record,
    launch_cmd,
    require_partitions,
    run as run_cmd,
    running_now,
    runs as toy_runs,
    shard_overlaps_in_sacct,
    squeue_tagged,
    start,
    status,
    toy_cmd,
    toy_env,
    wait_for,
    wait_for_text,
)
from engine_toy_stages import overlaps  # noqa: E402


def _each_once(workdir, n):
    done = sorted(r.split()[-1] for r in toy_runs(workdir) if r.startswith("toy"))
    return done == [f"part{i:03d}" for i in range(n)]


@pytest.mark.slow  # the default suite has the same with the real crop array (tests/e2e/test_pipeline_slurm.py)
def test_launcher_killed_during_an_array_and_relaunched_adopts_the_running_tasks(tmp_path, slurm):
    work = tmp_path / "w"
    env = toy_env({"toy": 6, "sleep_s": 4})
    delays, killed_at = [], None
    for i in range(2):
        n_jobs = len(all_job_ids(work)) if work.exists() else 0
        log = tmp_path / f"launch{i}.log"
        p = start(toy_cmd(work, "slurm_local"), env, log)
        if killed_at is not None:
            delays.append(wait_for_text(log, "adopting", 60) - killed_at)
        # the first launch submits the array; the relaunch adopts all of it (pending tasks too)
        wait_for(lambda: (i > 0 or len(all_job_ids(work)) > n_jobs) and running_now(work), 90, "a running task")
        p.kill()
        p.wait()
        killed_at = time.time()
    final = run_cmd(toy_cmd(work, "slurm_local"), env, timeout=300)
    assert final.returncode == 0 and "adopting" in final.stdout, final.stdout + final.stderr
    assert shard_overlaps_in_sacct(work) == [] and overlaps(work) == []
    assert _each_once(work, 6), toy_runs(work)
    print(f"\nSlurm: kill -> relaunch adopting the array's tasks: {delays[0]:.2f} s; overlapping jobs of one "
          f"shard in sacct: 0")


def test_detached_driver_job_requeued_by_usr2_adopts_then_cancel_then_resume(tmp_path, slurm):
    require_partitions("service")
    work = tmp_path / "w"
    t0 = time.time()
    r = run_cmd(toy_cmd(work, "slurm_local", "--detach"), toy_env({"toy": 6, "sleep_s": 15}), timeout=120)
    took = time.time() - t0
    assert r.returncode == 0 and took < 20, (took, r.stdout + r.stderr)
    rec = driver_record(work)
    driver = rec["job_id"]
    assert f"Slurm job {driver}" in r.stdout and "partition service" in r.stdout and rec["log"] in r.stdout
    assert f"launch.py cancel --workdir {work}" in r.stdout
    log = Path(rec["log"])
    wait_for(lambda: running_now(work), 120, "a running task")
    st = status(work)
    assert f"driver: Slurm job {driver}, running" in st.stdout, st.stdout
    # preemption / time limit of the driver: requeued, and the next run adopts the tasks
    usr2_at = time.time()
    subprocess.run(["scancel", "--signal=USR2", driver], check=True)
    wait_for_text(log, f"driver job {driver} run 1", 120)
    adopted_at = wait_for_text(log, "adopting", 60)
    assert log.read_text().count("submitting 6/6") == 1  # never submitted again
    # cancel: no job of the work dir is left
    c = run_cmd(launch_cmd("cancel", "--workdir", str(work)), timeout=180)
    assert c.returncode == 0 and f"the driver job {driver}" in c.stdout, c.stdout + c.stderr
    assert squeue_tagged(work) == []
    st = status(work)
    assert "cancelled" in st.stdout and "stopped part" in st.stdout, st.stdout
    # a later launch resumes (detached again)
    r = run_cmd(toy_cmd(work, "slurm_local", "--detach"), toy_env({"toy": 6, "sleep_s": 0.5}), timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    wait_for(lambda: driver_record(work).get("state") in ("done", "failed"), 300, "the resumed run", every=1)
    st = status(work)
    assert driver_record(work)["state"] == "done" and st.returncode == 0, st.stdout
    assert "toy                 6/6" in st.stdout and "sum                 1/1" in st.stdout, st.stdout
    assert _each_once(work, 6), toy_runs(work)
    print(f"\nSlurm driver: USR2 -> requeued driver adopting the tasks: {adopted_at - usr2_at:.1f} s")


def test_one_liveness_rule_a_requeued_slurm_job_whose_process_ended_here_still_holds(tmp_path, slurm):
    # a Slurm job requeued between two runs: the process of its last run (on this host: the local
    # cluster's nodes) is gone, the job is queued again; lease, lock and driver record alike
    # count it as alive (its next run takes over what it held); once it is gone, as dead
    from pipeline import procs
    from pipeline.driver import record_alive
    from pipeline.lease import holder_alive, holders_alive

    ended = subprocess.Popen(["sleep", "0.2"])
    identity = procs.identity(ended.pid)
    ended.wait()
    assert procs.alive(identity) is False
    sub = subprocess.run(["sbatch", "--hold", "--parsable", "-p", "debug", "-t", "1", "-J", "liveness-test",
                          "-o", str(tmp_path / "out.log"), "--wrap", "true"], capture_output=True, text=True, check=True)
    job = sub.stdout.strip().split(";")[0]
    try:
        holder = {**identity, "executor": "slurm", "job_id": job}
        live = holders_alive({"a": holder, "local": {**identity, "executor": "local", "job_id": "local-1"}})
        assert live["a"].alive is True and live["a"].state.startswith("pending"), live
        assert live["local"].alive is False and live["local"].state == "ended", live
        assert holder_alive(holder) is True and record_alive(holder)[0] is True
    finally:
        subprocess.run(["scancel", job], check=True)
    wait_for(lambda: holder_alive(holder) is False, 60, "the cancelled job to count as dead")
    assert record_alive(holder)[0] is False


def test_cancel_stops_a_driver_job_its_record_does_not_name_before_the_jobs_it_submits(tmp_path, slurm):
    # the work dir's driver is found by its job name (driver-<tag>) when the record names an
    # earlier driver: stopped first and as the driver, so it cannot submit after the sweep
    require_partitions("service")
    work = tmp_path / "w"
    r = run_cmd(toy_cmd(work, "slurm_local", "--detach"), toy_env({"toy": 4, "sleep_s": 30}), timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    driver = driver_record(work)["job_id"]
    wait_for(lambda: running_now(work), 120, "a running task")
    record = work / ".pipeline" / "driver.json"
    assert json.loads(record.read_text())["job_id"] == driver
    record.write_text(json.dumps({**json.loads(record.read_text()), "job_id": "1", "state": "done"}))
    c = run_cmd(launch_cmd("cancel", "--workdir", str(work)), timeout=180)
    assert c.returncode == 0 and f"cancelled the driver job {driver}, " in c.stdout, c.stdout + c.stderr
    stage_jobs = re.search(r"(\d+) job\(s\) \(([^)]*)\)", c.stdout).group(2).split(", ")
    assert driver not in stage_jobs and all("_" in j for j in stage_jobs), c.stdout  # the array's tasks
    assert squeue_tagged(work) == []


@pytest.mark.parametrize("override,expected", [
    ("cluster.stages.counter.nodes=2", "error: cluster.stages.counter.nodes=2: partition debug has 1 node"),
    ("cluster.stages.counter.cpus_per_task=64", "error: cluster.stages.counter.cpus_per_task=64: the nodes of partition debug have at most"),
    ("cluster.partition=nosuchpartition", "error: cluster.partition=nosuchpartition: no such partition"),
    ("cluster.gpus_per_node=1", "error: cluster.gpus_per_node=1: partition debug has no GPUs"),
    ("cluster.slurm_additional_parameters={constraint: nosuchfeature}", "error: the scheduler rejects the counter job (cluster.partition=debug): Invalid feature specification"),
])
def test_an_impossible_request_is_one_line_before_anything_is_submitted(tmp_path, slurm, override, expected):
    work = tmp_path / "w"
    t0 = time.time()
    r = run_cmd(toy_cmd(work, "slurm_local", override), toy_env({"toy": 0, "counter": {"target": 2}}), timeout=120)
    took = time.time() - t0
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), r.stderr
    assert not (work / ".pipeline" / "state").exists() and squeue_tagged(work) == []
    print(f"\n{override}: reported in {took:.1f} s (launch included), before any submission")


def test_sbatch_rejecting_a_submission_is_one_line(tmp_path, slurm):
    work = tmp_path / "w"
    r = run_cmd(toy_cmd(work, "slurm_local", "cluster.check_requests=false", "cluster.partition=nosuchpartition"),
                toy_env({"toy": 2, "sum": False}), timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines == ["error: toy: sbatch rejected the job array: Invalid partition name specified "
                     "(cluster slurm_local, partition nosuchpartition)"], r.stderr


def test_a_job_pending_for_a_reason_that_cannot_clear_fails_its_step(tmp_path, slurm):
    work = tmp_path / "w"
    t0 = time.time()
    r = run_cmd(toy_cmd(work, "slurm_local", "cluster.check_requests=false", "cluster.stages.counter.nodes=2"),
                toy_env({"toy": 0, "counter": {"target": 2}}), timeout=300)
    took = time.time() - t0
    assert r.returncode == 2, r.stdout + r.stderr
    assert "cannot start: pending for reason PartitionNodeLimit" in r.stderr, r.stderr
    assert took < 60, took
    assert squeue_tagged(work) == []
    st = status(work)
    assert st.returncode == 1 and "PartitionNodeLimit" in st.stdout and "FAILED" in st.stdout, st.stdout
    print(f"\nunschedulable job (PartitionNodeLimit, checks off): step failed {took:.1f} s after the launch")


@pytest.mark.slow  # a minute at least; the default suite has the rule on the local executor (test_launcher.py)
def test_a_one_minute_limit_without_progress_fails_with_the_timeout_message(tmp_path, slurm):
    work = tmp_path / "w"
    spec = {"toy": 0, "counter": {"target": 10000, "step_s": 0.5, "save_every": 100000}}
    r = run_cmd(toy_cmd(work, "slurm_local", "cluster.stages.counter.timeout_min=1"), toy_env(spec), timeout=400)
    assert r.returncode == 2, r.stdout + r.stderr
    assert ("count: timed out after 1 min without progress since it started (nothing saved yet): raise "
            "cluster.stages.counter.timeout_min") in r.stderr, r.stderr
    [(key, job)] = all_job_ids(work, "counter")
    sacct = subprocess.run(["sacct", "-X", "-D", "-n", "-P", "-j", job, "-o", "JobID,State"],
                           capture_output=True, text=True).stdout.split()
    assert len(sacct) == 1 and "REQUEUED" not in sacct[0], sacct  # one run, never requeued


def test_a_task_killed_by_a_signal_says_so(tmp_path, slurm):
    work = tmp_path / "w"
    p = start(toy_cmd(work, "slurm_local"), toy_env({"toy": 1, "sleep_s": 60, "sum": False}), tmp_path / "launch.log")
    running = work / ".pipeline/state/once/toy/part000.running.json"
    wait_for(running.exists, 90, "the task to start")
    info = json.loads(running.read_text())
    os.kill(info["pid"], 9)
    assert p.wait(timeout=120) == 2
    out = (tmp_path / "launch.log").read_text()
    line = f"part000: job {info['job_id']}: killed by signal 9 (SIGKILL)"
    assert line in out, out
    st = status(work)
    assert f"failed {line}" in st.stdout and st.returncode == 1, st.stdout
