"""The scheduler's bad days on a real Slurm: a controller killed and restarted from older state (it
forgets jobs that sacct still shows pending), a job held after its launch failed on a node, two
detached launches at once, a killed driver, a preemption signal before the first checkpoint.

Controller kills happen on a PRIVATE Slurm instance (``SLURM_LOCAL_INSTANCE``, its own slurmctld,
slurmd daemons and state; munge and slurmdbd shared), never on the machine's cluster that other
tests use. The launcher and its jobs find it through ``SLURM_CONF``.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine_toy_stages import overlaps
from launcher_helpers import (
    ROOT,
    TOY_LAUNCH,
    all_job_ids,
    run as run_cmd,
    runs as toy_runs,
    start,
    toy_cmd,
    toy_env,
    wait_for,
    wait_for_text,
)

pytestmark = pytest.mark.slurm

INSTANCE = "faults"
PORT = "7857"  # the machine's cluster has 6817-6822; other private instances default to 7817


class PrivateSlurm:
    """A private Slurm instance of scripts/slurm_local.sh that a test may break."""

    def __init__(self):
        self.dir = Path(f"/tmp/slurm_local_{INSTANCE}")
        self.conf = self.dir / "etc" / "slurm.conf"
        self.state = self.dir / "state"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    def script(self, action: str) -> subprocess.CompletedProcess:
        env = dict(os.environ, SLURM_LOCAL_INSTANCE=INSTANCE, SLURM_LOCAL_PORT=PORT)
        return subprocess.run([str(ROOT / "scripts" / "slurm_local.sh"), action], env=env, capture_output=True,
                              text=True, timeout=120)

    def cmd(self, *args: str, check: bool = False) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=60, check=check)

    def sacct_state(self, job: str) -> str:
        out = self.cmd("sacct", "-n", "-P", "-X", "-j", job, "-o", "State").stdout.split()
        return out[0] if out else ""

    def ctld_pid(self) -> int:
        return int((self.dir / "run" / "slurmctld.pid").read_text())

    def snapshot_state(self, to: Path) -> None:
        """The controller's saved state as it is now (what a restart after a crash may come back with)."""
        self.cmd("scontrol", "setdebug", "info")  # any RPC: the state is written on changes
        shutil.copytree(self.state, to)

    def crash(self) -> None:
        os.kill(self.ctld_pid(), 9)
        wait_for(lambda: not _alive(self.ctld_pid()), 10, "slurmctld to die")

    def restart(self) -> None:
        subprocess.run(["/usr/sbin/slurmctld"], env=self.env, check=True, timeout=60)
        wait_for(lambda: self.cmd("squeue").returncode == 0, 30, "slurmctld to answer")

    def crash_and_restart_from(self, snapshot: Path) -> None:
        """kill -9 the controller, then start it again from ``snapshot``: the jobs submitted since
        are gone from it, their accounting records stay."""
        os.kill(self.ctld_pid(), 9)
        wait_for(lambda: not _alive(self.ctld_pid()), 10, "slurmctld to die")
        shutil.rmtree(self.state)
        shutil.copytree(snapshot, self.state)
        subprocess.run(["/usr/sbin/slurmctld"], env=self.env, check=True, timeout=60)
        wait_for(lambda: self.cmd("squeue").returncode == 0, 30, "slurmctld to answer")

    def resume_nodes(self) -> bool:
        """Resume drained or down nodes (what an operator does); True once none is left so."""
        bad = self.cmd("sinfo", "-h", "-N", "-o", "%N %t").stdout.split("\n")
        names = [ln.split()[0] for ln in bad if ln.strip() and ln.split()[1].rstrip("*~#$@").startswith(("drain", "drng", "down"))]
        for n in names:
            self.cmd("scontrol", "update", f"nodename={n}", "state=resume")
        return not names

    def wait_nodes_up(self) -> None:
        wait_for(lambda: self.cmd("sinfo", "-h", "-p", "debug", "-o", "%t").stdout.strip() in ("idle", "mix", "alloc"),
                 60, "the restarted controller's node to register", every=0.5)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.fixture(scope="module")
def private_slurm(slurm):
    if os.geteuid() != 0:
        pytest.skip("a private Slurm instance needs root (scripts/slurm_local.sh)")
    inst = PrivateSlurm()
    r = inst.script("start")
    if r.returncode != 0:
        pytest.fail(f"the private Slurm instance did not start:\n{r.stdout}\n{r.stderr}")
    yield inst
    inst.script("stop")


def _env(inst: PrivateSlurm, spec: dict) -> dict:
    return dict(toy_env(spec), SLURM_CONF=str(inst.conf))


def _overlaps_of_finished_runs(workdir: Path) -> list:
    """``overlaps`` less the runs killed without an end line (the orphans of a lost job, killed by
    their node when the restarted controller did not know them), which must all be gone now."""
    out = []
    for key, a, b in overlaps(workdir):
        killed = [r for r in (a, b) if r[1] == float("inf")]
        if any(_alive(int(r[3])) for r in killed) or not killed:
            out.append((key, a, b))
    return out


def _each_once_done(workdir: Path, n: int) -> bool:
    done = sorted(r.split()[-1] for r in toy_runs(workdir) if r.startswith("toy"))
    return done == [f"part{i:03d}" for i in range(n)]


def test_jobs_lost_by_a_restarted_controller_are_submitted_again_and_the_run_completes(tmp_path, private_slurm):
    inst = private_slurm
    work = tmp_path / "w"
    snapshot = tmp_path / "ctld_state"
    inst.snapshot_state(snapshot)  # the controller's state before the array
    log = tmp_path / "launch.log"
    p = start(toy_cmd(work, "slurm_local"), _env(inst, {"toy": 3, "sleep_s": 3}), log)
    try:
        wait_for(lambda: len(all_job_ids(work)) == 3, 90, "the array to be submitted")
        lost = sorted(j for _, j in all_job_ids(work))
        # as in the issue: the accounting has the array (pending or running) when the controller dies
        wait_for(lambda: inst.sacct_state(lost[0].split("_")[0]), 30, "the array's accounting record")
        inst.crash_and_restart_from(snapshot)
        t0 = time.time()
        assert inst.cmd("squeue", "-h", "-j", lost[0].split("_")[0]).returncode != 0  # the controller forgot it
        rc = p.wait(timeout=240)
    finally:
        if p.poll() is None:
            p.kill()
    took = time.time() - t0
    out = log.read_text()
    assert rc == 0, out
    lines = [ln for ln in out.splitlines() if "was lost by the scheduler" in ln]
    assert lines and all("sacct still says" in ln and "submitting it again" in ln for ln in lines), out
    assert {ln.split("job ")[1].split()[0] for ln in lines} <= set(lost)
    assert _each_once_done(work, 3) and _overlaps_of_finished_runs(work) == [], toy_runs(work)
    assert (work / "sum" / "sum.txt").read_text() == "3\n"
    print(f"\ncontroller kill -9 + restart from older state: lost jobs resubmitted, run done {took:.1f} s later")


@pytest.mark.slow  # ~100 s: the restarted controller's node drains on reused job ids and is resumed
def test_a_relaunch_after_the_controller_lost_the_jobs_submits_them_again_and_cancel_does_not_wait(tmp_path,
                                                                                                  private_slurm):
    inst = private_slurm
    work = tmp_path / "w"
    snapshot = tmp_path / "ctld_state"
    inst.snapshot_state(snapshot)
    env = _env(inst, {"toy": 2, "sleep_s": 8})
    p = start(toy_cmd(work, "slurm_local"), env, tmp_path / "launch.log")
    wait_for(lambda: len(all_job_ids(work)) == 2, 90, "the array to be submitted")
    p.kill()  # the launcher is gone; its jobs were recorded
    p.wait()
    lost = sorted(j for _, j in all_job_ids(work))
    wait_for(lambda: inst.sacct_state(lost[0].split("_")[0]), 30, "the array's accounting record")
    inst.crash_and_restart_from(snapshot)
    # the accounting still shows the array pending; the controller does not know it
    t0 = time.time()
    c = run_cmd([sys.executable, str(TOY_LAUNCH), "cancel", "--workdir", str(work)], env, timeout=120)
    took = time.time() - t0
    assert c.returncode == 0 and took < 20, (took, c.stdout + c.stderr)
    inst.wait_nodes_up()
    log = tmp_path / "relaunch.log"
    # (the request check is off: sbatch --test-only refuses while the node is drained meanwhile)
    p = start(toy_cmd(work, "slurm_local", "cluster.check_requests=false"), env, log)
    try:
        # the restarted controller hands out job ids its node still remembers: "Duplicate jobid"
        # drains the node and holds the job; the launch releases it, an operator resumes the node
        wait_for(lambda: inst.resume_nodes() and p.poll() is not None, 180, "the relaunch to end", every=1)
    finally:
        if p.poll() is None:
            p.kill()
    out = log.read_text()
    assert p.returncode == 0, out
    lines = [ln for ln in out.splitlines() if "was lost by the scheduler" in ln]
    assert len(lines) == 2 and "adopting" not in out, out
    assert _each_once_done(work, 2) and _overlaps_of_finished_runs(work) == [], toy_runs(work)
    print(f"\ncancel with jobs the controller lost: {took:.1f} s")


@pytest.fixture
def failing_prolog(private_slurm, tmp_path):
    """A Prolog on the private instance that fails while ``fails`` (a file holding a count) says
    so: each failure drains the node and requeues the job held ("launch failed requeued held")."""
    inst = private_slurm
    counter = tmp_path / "prolog_fails"
    prolog = tmp_path / "prolog.sh"
    prolog.write_text(f"#!/bin/sh\nn=$(cat {counter} 2>/dev/null || echo 0)\n"
                      f"[ \"$n\" -gt 0 ] && {{ echo $((n - 1)) > {counter}; exit 1; }}\nexit 0\n")
    prolog.chmod(0o755)
    original = inst.conf.read_text()
    inst.conf.write_text(original + f"Prolog={prolog}\n")
    inst.cmd("scontrol", "reconfigure", check=True)
    yield counter
    inst.conf.write_text(original)
    inst.cmd("scontrol", "reconfigure")
    inst.resume_nodes()


def test_a_job_held_after_a_failed_launch_is_released_once_then_its_step_fails_with_one_line(
        tmp_path, private_slurm, failing_prolog):
    inst = private_slurm
    failing_prolog.write_text("2")  # the launch fails twice
    work = tmp_path / "w"
    env = _env(inst, {"toy": 1, "sum": False})
    p = start(toy_cmd(work, "slurm_local"), env, tmp_path / "launch.log")
    try:
        wait_for_text(tmp_path / "launch.log", "released it", 60)
        # the node drained by the prolog error: an operator resumes it, the launch fails again
        wait_for(lambda: inst.resume_nodes(), 30, "the drained node to be resumed")
        rc = p.wait(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    out = (tmp_path / "launch.log").read_text()
    [job] = {j for _, j in all_job_ids(work)}
    assert rc == 2, out
    assert (f"shard part000: job {job} was held by the scheduler (launch failed requeued held); released it "
            f"(`scontrol release {job}`)") in out, out
    assert (f"part000: job {job} was held again after its launch failed (launch failed requeued held) and it had "
            f"been released 1 time(s); cancelled: `sinfo -R` says why its node refused it") in out, out


def test_a_job_blocked_on_drained_nodes_is_shown_with_the_way_on_and_fails_after_the_bound(tmp_path, private_slurm):
    inst = private_slurm
    inst.cmd("scontrol", "update", "nodename=faults0", "state=drain", "reason=maintenance", check=True)
    try:
        work = tmp_path / "w"
        t0 = time.time()
        log = tmp_path / "launch.log"
        p = start(toy_cmd(work, "slurm_local", "cluster.blocked_pending_after_s=15", "cluster.check_requests=false"),
                  _env(inst, {"toy": 1, "sum": False}), log)
        wait_for_text(log, "the step waits for it", 60)
        blocked = run_cmd([sys.executable, str(TOY_LAUNCH), "status", "--workdir", str(work)], _env(inst, {}))
        p.wait(timeout=120)
        took = time.time() - t0
        r = subprocess.CompletedProcess(p.args, p.returncode, log.read_text(), log.read_text())
        st = run_cmd([sys.executable, str(TOY_LAUNCH), "status", "--workdir", str(work)], _env(inst, {}))
    finally:
        inst.resume_nodes()
    [job] = {j for _, j in all_job_ids(work)}
    assert r.returncode == 2 and took < 60, (took, r.stdout + r.stderr)
    # Slurm's reason: "ReqNodeNotAvail, UnavailableNodes:faults0" or "Nodes required for job are DOWN, DRAINED ..."
    assert f"shard part000: job {job} is pending (" in r.stdout, r.stdout
    assert "`sinfo -R` (why the nodes are down or drained)" in r.stdout, r.stdout
    assert f"part000: job {job} was pending (" in r.stderr and "(cluster.blocked_pending_after_s); cancelled" in r.stderr, r.stderr
    assert st.returncode == 1 and "FAILED" in st.stdout, st.stdout
    # while it waited: blocked, with the way on, and status exits 4
    assert blocked.returncode == 4 and f"blocked part000 (job {job}): pending (" in blocked.stdout \
        and "`sinfo -R`" in blocked.stdout, blocked.stdout


def test_two_detached_launches_at_the_same_instant_give_one_driver(tmp_path, slurm):
    """On the machine's cluster (nothing is broken here): one driver, one refusal, one record."""
    from launcher_helpers import require_partitions

    require_partitions("service")
    work = tmp_path / "w"
    env = toy_env({"toy": 2, "sleep_s": 0.5})
    procs_ = [subprocess.Popen(toy_cmd(work, "slurm_local", "--detach"), env=env, cwd=ROOT, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs_]
    rcs = sorted(p.returncode for p in procs_)
    assert rcs == [0, 2], outs
    winner = next(o for p, o in zip(procs_, outs) if p.returncode == 0)
    loser = next(o for p, o in zip(procs_, outs) if p.returncode != 0)
    [err] = loser[1].strip().splitlines()
    assert err.startswith(f"error: work dir {work} is in use by ") or "a driver already runs" in err, err
    rec = json.loads((work / ".pipeline" / "driver.json").read_text())
    assert f"Slurm job {rec['job_id']} drives the pipeline" in winner[0], (winner, rec)
    wait_for(lambda: json.loads((work / ".pipeline" / "driver.json").read_text()).get("state") in ("done", "failed"),
             180, "the driver to finish", every=1)
    rec2 = json.loads((work / ".pipeline" / "driver.json").read_text())
    assert rec2["state"] == "done" and rec2["job_id"] == rec["job_id"], rec2
    from pipeline.driver import driver_job_name

    def driver_jobs() -> list:
        out = subprocess.run(["sacct", "-n", "-X", "-P", "-S", "now-10minutes", "-o", "JobID,JobName"],
                             capture_output=True, text=True).stdout
        return [ln for ln in out.splitlines() if ln.endswith(driver_job_name(work))]

    # (the controller hands ended jobs to the accounting daemon asynchronously: on a loaded machine
    # sacct has lagged behind the driver's own record, so wait until it knows the winner's job)
    wait_for(lambda: any(ln.startswith(f"{rec['job_id']}|") for ln in driver_jobs()), 60,
             "sacct to list the driver job", every=1)
    assert driver_jobs() == [f"{rec['job_id']}|{driver_job_name(work)}"]
    assert _each_once_done(work, 2)


def test_a_killed_driver_job_is_replaced_by_its_guardian_and_the_run_completes(tmp_path, slurm):
    from launcher_helpers import driver_record, require_partitions, running_now, status

    require_partitions("service")
    work = tmp_path / "w"
    env = toy_env({"toy": 3, "sleep_s": 6})
    r = run_cmd(toy_cmd(work, "slurm_local", "--detach"), env, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    first = driver_record(work)
    assert first.get("guardian"), first
    wait_for(lambda: driver_record(work).get("state") == "running" and running_now(work), 120, "a running shard")
    os.kill(int(driver_record(work)["pid"]), 9)  # the driver's process (this machine runs the job)
    killed_at = time.time()
    log = Path(first["log"])
    wait_for_text(log, f"guardian: driver job {first['job_id']} ended", 120)
    replaced_at = time.time()
    text = log.read_text()
    assert "killed by signal 9" in text or "failed with exit code" in text, text
    assert "replaced by driver job" in text and "(replacement 1 of at most 3)" in text, text
    wait_for(lambda: driver_record(work).get("state") in ("done", "failed"), 240, "the replacement driver", every=1)
    rec = driver_record(work)
    assert rec["state"] == "done" and rec["job_id"] != first["job_id"] and rec["replacements"] == 1, rec
    st = status(work)
    assert st.returncode == 0 and "run stopped" not in st.stdout, st.stdout
    assert _each_once_done(work, 3) and _overlaps_of_finished_runs(work) == [], toy_runs(work)
    print(f"\ndriver kill -9 -> replaced by its guardian in {replaced_at - killed_at:.1f} s")


def test_a_killed_local_driver_is_a_stopped_run_in_status_with_the_command_that_resumes_it(tmp_path):
    from launcher_helpers import driver_record, running_now, status

    work = tmp_path / "w"
    r = run_cmd(toy_cmd(work, "local", "--detach"), toy_env({"toy": 2, "sleep_s": 30}), timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    wait_for(lambda: running_now(work), 60, "a running shard")
    rec = driver_record(work)
    os.kill(int(rec["pid"]), 9)
    wait_for(lambda: not _alive(int(rec["pid"])) or _zombie(int(rec["pid"])), 10, "the driver to die")
    st = status(work)
    assert st.returncode == 4, st.stdout
    [line] = [ln for ln in st.stdout.splitlines() if ln.startswith("run stopped:")]
    assert "nothing drives it" in line and f"resume with: {rec['resume']}" in line, line
    assert rec["resume"].endswith("--detach") and str(work) in rec["resume"], rec
    run_cmd([sys.executable, str(TOY_LAUNCH), "cancel", "--workdir", str(work)], timeout=60)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except (OSError, IndexError):
        return False


def _preempt_counter(tmp_path: Path, *overrides: str, **counter) -> tuple[list, str]:
    """The counter (16 steps of 0.5 s unless ``counter`` says otherwise, no scheduled save) on Slurm, USR2 about 3 s into it (long
    before its time limit: a preemption); the launch completes by itself. Returns the rows of
    starts.log (count at start, Slurm restart count) and the shard's log."""
    work = tmp_path / "w"
    counter = {"target": 16, "step_s": 0.5, "save_every": 100000, **counter}
    spec = {"toy": 0, "counter": counter}
    log = tmp_path / "launch.log"
    p = start(toy_cmd(work, "slurm_local", "cluster.stages.counter.mem_gb=1", *overrides), toy_env(spec), log)
    try:
        starts = work / "counter" / "starts.log"
        wait_for(starts.exists, 90, "the counter to start")
        time.sleep(3)  # a few counts, none saved
        assert not (work / "counter" / "progress.json").exists()
        [(_, job)] = all_job_ids(work, "counter")
        subprocess.run(["scancel", "--signal=USR2", job], check=True)
        rc = p.wait(timeout=180)
    finally:
        if p.poll() is None:
            p.kill()
    assert rc == 0, log.read_text()
    assert json.loads((work / "counter" / "final.json").read_text()) == {"count": counter["target"]}
    shard_log = (work / ".pipeline" / "logs" / "once" / "counter" / "count.log").read_text()
    assert "a preemption; saving now and requeueing" in shard_log, shard_log
    return [ln.split() for ln in starts.read_text().splitlines()], shard_log


def test_a_preemption_signal_before_the_first_checkpoint_saves_now_and_requeues(tmp_path, slurm):
    runs_, _ = _preempt_counter(tmp_path)
    # the second run (SLURM_RESTART_COUNT=1) resumed from the count saved at the signal
    assert len(runs_) == 2 and runs_[0] == ["0", "0"] and int(runs_[1][0]) >= 4 and runs_[1][1] == "1", runs_


def test_a_preemption_saved_at_the_next_step_is_requeued_once_saved(tmp_path, slurm):
    """As training does: save_now only asks; the stage saves after its next step and ends run with
    SavedForPreemption; then the job is requeued."""
    runs_, shard_log = _preempt_counter(tmp_path, save_at_next_step="next")
    assert len(runs_) == 2 and runs_[0] == ["0", "0"] and int(runs_[1][0]) >= 4 and runs_[1][1] == "1", runs_
    assert "the stage saves at its next safe point; waiting at most 60 s" in shard_log, shard_log
    assert re.search(r"saved at count \d+\n", shard_log) and re.search(r"saved \d+ s after the preemption signal",
                                                                       shard_log), shard_log


def test_a_preemption_whose_save_never_comes_is_requeued_after_the_bound_with_one_line(tmp_path, slurm):
    # 40 steps: still counting when the 10 s bound ends
    runs_, shard_log = _preempt_counter(tmp_path, "cluster.signal_delay_s=30", target=40, save_at_next_step="never")
    # nothing saved: the requeued run starts over
    assert runs_ == [["0", "0"], ["0", "1"]], runs_
    assert ("no safe point to save at within 10 s of the preemption signal: requeueing without the save (the "
            "next run resumes from the last one: nothing saved yet)") in shard_log, shard_log


def test_a_controller_that_stays_down_ends_the_wait_within_the_bound_with_one_line(tmp_path, private_slurm):
    inst = private_slurm
    work = tmp_path / "w"
    log = tmp_path / "launch.log"
    p = start(toy_cmd(work, "slurm_local", "cluster.blocked_pending_after_s=10"),
              _env(inst, {"toy": 1, "sleep_s": 30, "sum": False}), log)
    try:
        wait_for(lambda: all_job_ids(work), 90, "the job to be submitted")
        inst.crash()
        t0 = time.time()
        rc = p.wait(timeout=120)
        took = time.time() - t0
    finally:
        if p.poll() is None:
            p.kill()
        inst.restart()
    out = log.read_text()
    assert rc == 2 and took < 60, (took, out)
    assert "warning: the scheduler has not answered for" in out, out
    [err] = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert "the scheduler has not answered for" in err and "rerun the same command once `squeue` answers" in err, err
    run_cmd([sys.executable, str(TOY_LAUNCH), "cancel", "--workdir", str(work)], _env(inst, {}), timeout=120)


def test_a_launch_during_a_maintenance_drain_waits_blocked_instead_of_refusing_the_request(tmp_path, private_slurm):
    # every node of the partition drained: sbatch --test-only says "Requested node configuration is
    # not available"; a launch (or a requeued driver) must wait, not fail on a wrong "rejects" line
    inst = private_slurm
    inst.cmd("scontrol", "update", "nodename=faults0", "state=drain", "reason=maintenance", check=True)
    work = tmp_path / "w"
    log = tmp_path / "launch.log"
    p = start(toy_cmd(work, "slurm_local"), _env(inst, {"toy": 1, "sum": False}), log)
    try:
        wait_for_text(log, "the step waits for it", 60)
        inst.resume_nodes()  # the maintenance ends
        rc = p.wait(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
        inst.resume_nodes()
    out = log.read_text()
    assert rc == 0 and "rejects" not in out, out
    assert _each_once_done(work, 1)


def test_a_recorded_job_id_now_held_by_another_job_is_not_adopted(tmp_path, slurm):
    # a controller restarted from older state hands job ids out again: the id recorded for a shard
    # may name a stranger's job; the launch must not wait on it (nor cancel it)
    from pipeline.state import StateStore

    work = tmp_path / "w"
    stranger = subprocess.run(["sbatch", "--parsable", "-J", "someone-else", "-t", "5", "-o", "/dev/null",
                               "--wrap", "sleep 120"], capture_output=True, text=True, check=True).stdout.strip()
    try:
        wait_for(lambda: subprocess.run(["squeue", "-h", "-j", stranger, "-o", "%T"], capture_output=True,
                                        text=True).stdout.strip() in ("RUNNING", "PENDING"), 30, "the stranger job")
        StateStore(work).record_jobs("toy", None, "slurm", tmp_path, {"part000": {"job_id": stranger}})
        c = run_cmd([sys.executable, str(TOY_LAUNCH), "cancel", "--workdir", str(work)], timeout=60)
        assert c.returncode == 0 and stranger not in c.stdout, c.stdout + c.stderr
        r = run_cmd(toy_cmd(work, "slurm_local"), toy_env({"toy": 1, "sum": False}), timeout=180)
        assert r.returncode == 0, r.stdout + r.stderr
        assert (f"shard part000: job {stranger} of an earlier launch was lost by the scheduler (its job id now "
                f"belongs to another job, 'someone-else')") in r.stdout, r.stdout
        assert "adopting" not in r.stdout and _each_once_done(work, 1)
        assert subprocess.run(["squeue", "-h", "-j", stranger, "-o", "%T"], capture_output=True,
                              text=True).stdout.strip() in ("RUNNING", "PENDING")  # left alone
    finally:
        subprocess.run(["scancel", stranger])
