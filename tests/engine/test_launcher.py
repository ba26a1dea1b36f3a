"""The launcher as a user meets it, on this machine (local executor; real processes and signals,
nothing mocked): launches killed and run again at once adopt the jobs they left (never one shard
run twice), SIGHUP, the detached driver, cancel, the shard lease, one-line errors (a full disk,
a malformed lock), what `status` says (a failed finalize, stale steps)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine_toy_stages import CounterStage, ItemLoopStage, SumStage, ToyStage, overlaps
from launcher_helpers import (
    driver_record,
    job_records,
    keys,
    launch_cmd,
    mount_tmpfs,
    run,
    running_now,
    runs,
    start,
    status,
    toy_cmd,
    toy_env,
    umount,
    wait_for,
    wait_for_text,
)
from pipeline import procs
from pipeline.config import load_config
from pipeline.errors import StageFailed
from pipeline.executors import make_executor, make_task
from pipeline.runner import Pipeline
from pipeline.state import StateStore
from pipeline.status import report
from test_engine import make, run_all


def _each_once(workdir, n):
    done = sorted(r.split()[-1] for r in runs(workdir) if r.startswith("toy"))
    return done == [f"part{i:03d}" for i in range(n)]


def test_killed_launcher_relaunched_at_once_adopts_its_jobs_and_no_shard_runs_twice(tmp_path):
    work = tmp_path / "w"
    env = toy_env({"toy": 8, "sleep_s": 2.5})
    delays = []
    killed_at = None
    for i in range(3):
        log = tmp_path / f"launch{i}.log"
        n_jobs = len(job_records(work)) if work.exists() else 0
        p = start(toy_cmd(work, "local"), env, log)
        if killed_at is not None:  # a relaunch right after a kill: it must adopt, not resubmit
            delays.append(wait_for_text(log, "adopting", 60) - killed_at)
        # killed once it submitted jobs of its own and one of them runs
        wait_for(lambda: len(job_records(work)) > n_jobs and running_now(work), 60, "a job of this launch")
        p.kill()  # the launcher only (SIGKILL); its jobs run in sessions of their own
        p.wait()
        killed_at = time.time()
    final = run(toy_cmd(work, "local"), env, timeout=180)
    assert final.returncode == 0, final.stdout + final.stderr
    assert "adopting" in final.stdout, final.stdout
    assert overlaps(work) == []
    assert _each_once(work, 8), runs(work)
    print(f"\nlocal executor: kill -> relaunch adopting its jobs: {', '.join(f'{d:.2f}' for d in delays)} s; "
          f"overlapping runs of one shard: 0 in 3 kills")


def test_sighup_ends_a_foreground_launch_with_one_line_and_its_jobs_keep_running(tmp_path):
    work = tmp_path / "w"
    env = toy_env({"toy": 4, "sleep_s": 4})
    log = tmp_path / "launch.log"
    p = start(toy_cmd(work, "local"), env, log)
    wait_for(lambda: running_now(work), 60, "a running shard")
    jobs = [r for r in job_records(work) if procs.alive(r)]
    assert jobs
    # each local job's controller leads a session of its own (pipeline.executors.SessionLocalExecutor)
    assert all(os.getsid(int(r["pid"])) == int(r["pid"]) != os.getsid(p.pid) for r in jobs), jobs
    os.killpg(p.pid, signal.SIGHUP)  # a terminal's hangup: the whole foreground process group
    assert p.wait(timeout=30) == 128 + signal.SIGHUP
    out = log.read_text()
    assert out.count("interrupted by SIGHUP") == 1 and "keep running" in out and "launch.py cancel" in out, out
    assert "Traceback" not in out
    assert not (work / ".pipeline" / "lock").exists()
    assert all(procs.alive(r) for r in jobs), "the jobs died with the launcher"
    again = run(toy_cmd(work, "local"), env, timeout=120)
    assert again.returncode == 0 and "adopting" in again.stdout, again.stdout + again.stderr
    assert overlaps(work) == [] and _each_once(work, 4)


def test_detached_local_driver_then_cancel_then_a_detached_resume(tmp_path):
    work = tmp_path / "w"
    t0 = time.time()
    r = run(toy_cmd(work, "local", "--detach"), toy_env({"toy": 6, "sleep_s": 30}), timeout=60)
    took = time.time() - t0
    assert r.returncode == 0, r.stdout + r.stderr
    assert took < 15, took
    rec = driver_record(work)
    assert f"process {rec['pid']}" in r.stdout and rec["log"] in r.stdout
    assert f"launch.py status --workdir {work}" in r.stdout and f"launch.py cancel --workdir {work}" in r.stdout
    assert procs.alive(rec), "the driver died with its launcher"
    wait_for(lambda: running_now(work), 60, "a running shard")
    st = status(work)
    assert f"driver: pid {rec['pid']} on {procs.hostname()}, running" in st.stdout, st.stdout

    c = run(launch_cmd("cancel", "--workdir", str(work)), timeout=120)
    assert c.returncode == 0 and "cancelled the driver" in c.stdout, c.stdout + c.stderr
    assert not procs.alive(rec)
    assert not any(procs.alive(j) for j in job_records(work)), "a job of the work dir still runs"
    st = status(work)
    assert "cancelled" in st.stdout and "stopped part000" in st.stdout, st.stdout
    assert keys(work, "done") == set()

    r = run(toy_cmd(work, "local", "--detach"), toy_env({"toy": 6, "sleep_s": 0.2}), timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    wait_for(lambda: "-          sum" in status(work).stdout and driver_record(work).get("state") == "done", 120,
             "the detached run to finish", every=1)
    st = status(work)
    assert st.returncode == 0 and "toy                 6/6" in st.stdout and "complete" in st.stdout, st.stdout
    assert _each_once(work, 6)
    log = Path(driver_record(work)["log"]).read_text()
    assert "done: 2 step(s)" in log, log


def test_a_job_finding_its_shard_held_by_a_live_job_leaves_it_alone_on_every_rank(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        store = StateStore(tmp_path)
        lease = store.lease("counter", None, "count")
        assert lease.file.create({"token": "other", "job_id": "other-job", "executor": "local",
                                  **procs.identity(holder.pid), "time": time.time()})
        cfg = load_config({}, preset=None, cluster="local",
                          overrides=[f"workdir={tmp_path}", "cluster.stages.counter.tasks_per_node=2"])
        pipe = Pipeline(cfg, {"counter": CounterStage(3, 0.05)}, ["counter"], tmp_path, echo=lambda m: None)
        step = pipe.plan(pipe.targets("all"))[0]
        ex = make_executor(cfg.cluster, tmp_path / "submitit", step)
        job = ex.submit(make_task(step, step.shards[0], False, cfg.cluster))
        job.results()
        logs = tmp_path / ".pipeline" / "logs" / "once" / "counter"
        assert "held by job other-job" in (logs / "count.log").read_text()
        assert "did not take the shard: this rank exits" in (logs / "count.rank1.log").read_text()
        assert not (tmp_path / "counter").exists(), "a rank touched the shard's outputs"
        assert keys(tmp_path, "running", "counter") == set() and keys(tmp_path, "done", "counter") == set()
        assert lease.holder()["token"] == "other"
    finally:
        holder.kill()
        holder.wait()
    run_all(pipe)  # the holder is gone: its lease is taken over
    assert json.loads((tmp_path / "counter" / "final.json").read_text()) == {"count": 3}
    assert not lease.path.exists()


@pytest.mark.slow  # the default suite fills a real disk (tests/e2e/test_disk_full.py)
def test_a_disk_error_fails_the_shard_with_one_line_naming_the_path(tmp_path):
    (tmp_path / "control").mkdir()
    (tmp_path / "control" / "enospc_part001").touch()
    with pytest.raises(StageFailed) as err:
        run_all(make(tmp_path, "local"))
    line = f"disk full on {tmp_path / 'toy' / 'out_1.txt'} (No space left on device)"
    assert f"part001: {line}" in str(err.value)
    marker = json.loads((tmp_path / ".pipeline/state/once/toy/part001.failed.json").read_text())
    assert marker["error"] == line and marker["infrastructure"] is True
    text, rc = report(tmp_path)
    assert f"failed part001: {line}" in text and rc == 1
    (tmp_path / "control" / "enospc_part001").unlink()
    run_all(make(tmp_path, "local"))
    assert (tmp_path / "toy" / "out_1.txt").exists()


def test_status_shows_a_failed_finalize_as_failed_with_its_reason(tmp_path):
    (tmp_path / "control").mkdir()
    (tmp_path / "control" / "fail_finalize").touch()
    with pytest.raises(StageFailed, match="finalize failed"):
        run_all(make(tmp_path, "debug"))
    text, rc = report(tmp_path)
    assert rc == 1
    assert "6/6" in text and "FAILED" in text, text
    assert "step failed: toy: finalize failed: RuntimeError: asked to fail finalize" in text, text
    (tmp_path / "control" / "fail_finalize").unlink()
    run_all(make(tmp_path, "debug"))
    text, rc = report(tmp_path)
    assert rc == 0 and "FAILED" not in text and "step failed" not in text


def test_status_prints_a_failed_steps_reasons_whole_one_per_line(tmp_path):
    (tmp_path / "control").mkdir()
    (tmp_path / "control" / "fail_finalize_items").touch()
    with pytest.raises(StageFailed, match="first reasons"):
        run_all(make(tmp_path, "debug"))
    text, rc = report(tmp_path)
    assert rc == 1
    assert ("    step failed: toy: 3 of 6 items failed; first reasons:\n"
            "      a: truncated video\n"
            "      b: no face found in 70% of frames\n"
            "      c: no audio stream\n"
            f"      all failures are in {tmp_path / 'toy'}\n") in text + "\n", text


def test_status_ends_with_the_applications_own_lines(tmp_path, capsys):
    import dataclasses

    import toy_launch
    from pipeline import cli

    app = dataclasses.replace(toy_launch.APP, status_lines=lambda w: [f"corpus: 2 files left out of {w.name}"])
    run_all(make(tmp_path, "debug"))
    capsys.readouterr()
    assert cli.main(app, ["status", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "toy" in out and out.rstrip().endswith(f"corpus: 2 files left out of {tmp_path.name}"), out


def test_a_bug_in_a_stages_shards_is_an_internal_error_not_a_missing_input(tmp_path):
    work = tmp_path / "w"
    env = toy_env({"toy": 2})
    assert run(toy_cmd(work, "debug"), env).returncode == 0
    (work / "control").mkdir()
    (work / "control" / "bug_in_shards").touch()
    r = run(toy_cmd(work, "debug", "--stage", "sum"), env)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 3 and len(lines) == 1, r.stdout + r.stderr
    assert lines[0].startswith("error: internal error: KeyError: 'total' (traceback in "), lines
    traceback_file = Path(lines[0].split("(traceback in ")[1].rstrip(")"))
    assert traceback_file.parent == work / ".pipeline" and ", in shards\n" in traceback_file.read_text()


def test_the_launcher_runs_as_an_imported_module_from_anywhere(tmp_path):
    # an installed console script (`avhubert-pipeline` = launch:main) imports launch from its
    # package and runs main(): from any directory, and its detached driver finds the module again
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    plan = subprocess.run([sys.executable, "-c", "import sys, launch; sys.exit(launch.main())", "--dry-run",
                           "--workdir", str(tmp_path / "real")], capture_output=True, text=True, cwd=elsewhere,
                          env=toy_env({}), timeout=300)
    assert plan.returncode == 0 and "(dry run: nothing submitted)" in plan.stdout, plan.stdout + plan.stderr
    assert not (tmp_path / "real").exists()
    work = tmp_path / "w"
    r = subprocess.run([sys.executable, "-c", "import sys, toy_launch; sys.exit(toy_launch.main())", "--detach",
                        "--workdir", str(work), "--cluster", "local"], capture_output=True, text=True,
                       cwd=elsewhere, env=toy_env({"toy": 2}), timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    wait_for(lambda: driver_record(work).get("state") in ("done", "failed"), 120, "the detached driver", every=0.5)
    assert driver_record(work)["state"] == "done", Path(driver_record(work)["log"]).read_text()
    assert driver_record(work)["cmd"][1] == str(Path(__file__).parent / "toy_launch.py")


def test_a_redone_step_makes_its_readers_stale_and_a_repair_does_not(tmp_path):
    def pipe(force=False):
        stages = {"toy": ToyStage(2, per_iteration=True), "sum": SumStage(per_iteration=True, depends_on_previous=["sum"])}
        return make(tmp_path, "debug", stages, force=force, overrides=["iterations=2"])

    run_all(pipe())
    assert len(runs(tmp_path)) == 6
    run_all(pipe(force=True), ["toy"], [1])  # toy of iteration 1 made anew
    text, _ = report(tmp_path)
    assert "stale: its input toy (iteration 1) was redone since it ran" in text, text
    p = pipe()
    plan = p.describe_plan(p.plan(p.targets("all")))
    assert "stale: its input toy (iteration 1) was redone since it ran" in plan, plan
    assert "reruns after sum (iteration 1)" in plan, plan
    before = len(runs(tmp_path))
    run_all(pipe())
    # sum of iteration 1 (stale), then sum of iteration 2 (its input sum (iteration 1) was redone);
    # a stale step runs as forced (training would start over instead of keeping the old model)
    assert [r.split()[:2] for r in runs(tmp_path)[before:]] == [["sum", "1"], ["sum", "2"]]
    assert all(r.endswith(" forced") for r in runs(tmp_path)[before:]), runs(tmp_path)
    text, _ = report(tmp_path)
    assert "stale" not in text
    # a lost output of iteration 2's toy is made again: the same content, so sum is not stale
    (tmp_path / "iter2" / "toy" / "out_1.txt").unlink()
    before = len(runs(tmp_path))
    run_all(pipe())
    assert runs(tmp_path)[before:] == ["toy 2 part001"]


def test_a_malformed_lock_is_one_clear_line(tmp_path):
    work = tmp_path / "w"
    (work / ".pipeline").mkdir(parents=True)
    (work / ".pipeline" / "lock").write_text("garbage{")
    r = run(toy_cmd(work, "local"), toy_env({"toy": 2}), timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"error: the lock file is malformed: {work / '.pipeline' / 'lock'} does not hold JSON ('garbage{{'). "
        f"If no launch or driver runs in this work dir, remove {work / '.pipeline' / 'lock'}"
    ], r.stderr
    st = status(work)
    assert "lock: the lock file is malformed" in st.stdout and "Traceback" not in st.stdout + st.stderr


def test_a_full_disk_at_launch_is_one_error_line(tmp_path):
    work = tmp_path / "w"
    mount_tmpfs(work, "256k")
    try:
        subprocess.run(["dd", "if=/dev/zero", f"of={work / 'filler'}", "bs=4k"], capture_output=True)
        r = run(toy_cmd(work, "local"), toy_env({"toy": 2}), timeout=120)
        assert r.returncode == 2, r.stdout + r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: disk full") and str(work) in lines[0], r.stderr
        assert "No space left on device" in lines[0] and "Traceback" not in r.stdout + r.stderr
        (work / "filler").unlink()
        r = run(toy_cmd(work, "local"), toy_env({"toy": 2}), timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        umount(work)



@pytest.mark.slow  # defence in depth behind the job records (test above)
def test_a_job_nobody_recorded_is_found_by_its_lease_and_adopted(tmp_path):
    # a launcher killed between starting a job and recording it: the job holds its shard's lease
    work = tmp_path / "w"
    env = toy_env({"toy": 4, "sleep_s": 4})
    p = start(toy_cmd(work, "local"), env, tmp_path / "launch1.log")
    wait_for(lambda: len(running_now(work)) == 2, 60, "two running shards")
    p.kill()
    p.wait()
    shutil.rmtree(work / ".pipeline" / "state" / "once" / "toy" / "_jobs")
    again = run(toy_cmd(work, "local"), env, timeout=120)
    assert again.returncode == 0 and "adopting 2 running job(s)" in again.stdout, again.stdout + again.stderr
    assert overlaps(work) == [] and _each_once(work, 4)


def test_a_time_limit_in_an_item_loop_fails_the_shard_and_never_an_item(tmp_path):
    # the crop stage's loop records an item whose processing raises an Exception; the time-limit
    # signal must not be one (submitit raises UncompletedJobError there: a bad-video record)
    stages = {"items": ItemLoopStage(n_items=200, item_s=0.25)}
    pipe = make(tmp_path, "local", stages, overrides=["cluster.stages.items.timeout_min=1", "cluster.signal_delay_s=50"])
    with pytest.raises(StageFailed) as err:
        run_all(pipe)
    assert "all: timed out after 1 min: raise cluster.stages.items.timeout_min" in str(err.value), str(err.value)
    assert not (tmp_path / "item_failures.log").exists(), (tmp_path / "item_failures.log").read_text()
    assert not (tmp_path / "items" / "results.jsonl").exists()
    marker = json.loads((tmp_path / ".pipeline/state/once/items/all.failed.json").read_text())
    assert marker["infrastructure"] is True


def test_a_time_limit_without_progress_is_not_requeued(tmp_path):
    # checkpointable, but nothing saved before the limit: requeueing would start from nothing again
    stages = {"counter": CounterStage(target=10000, step_s=0.2, save_every=100000)}
    pipe = make(tmp_path, "local", stages, overrides=["cluster.stages.counter.timeout_min=1", "cluster.signal_delay_s=50"])
    with pytest.raises(StageFailed) as err:
        run_all(pipe)
    assert ("count: timed out after 1 min without progress since it started (nothing saved yet): raise "
            "cluster.stages.counter.timeout_min") in str(err.value), str(err.value)
    starts = (tmp_path / "counter" / "starts.log").read_text().splitlines()
    assert len(starts) == 1, starts  # one run, no requeue
