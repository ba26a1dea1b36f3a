"""A run's progress and ETA (pipeline/progress.py) and the application's view refreshed after every
step (pipeline/refresh.py), on the real launcher with the toy stages and the local executor."""
import json
import os
import sys
from pathlib import Path

from launcher_helpers import TOY_LAUNCH, keys, run, start, toy_cmd, toy_env, wait_for
from pipeline.progress import ESTIMATED, MEASURED, human_duration, run_progress, step_eta


def _status(work: Path, env: dict) -> str:
    r = run([sys.executable, str(TOY_LAUNCH), "status", "--workdir", str(work)], env=env, timeout=120)
    return r.stdout + r.stderr


def _cancel(work: Path, env: dict, proc) -> None:
    run([sys.executable, str(TOY_LAUNCH), "cancel", "--workdir", str(work)], env=env, timeout=120)
    proc.wait(timeout=60)


def _control(work: Path, name: str, text: str) -> None:
    (work / "control").mkdir(parents=True, exist_ok=True)
    (work / "control" / name).write_text(text)


def test_step_eta_spreads_the_work_left_over_the_shards_that_run_at_once():
    # 10 shards left, 2 of them running for 3 s and 9 s of 10 s each, 2 at a time
    assert step_eta(10, [3.0, 9.0], 10.0, 2) == (7 + 1 + 8 * 10) / 2
    assert step_eta(1, [25.0], 10.0, 4) == 0.0  # running longer than measured: nothing more counted
    assert step_eta(3, [], 10.0, 8) == 10.0  # fewer shards than lanes
    assert step_eta(0, [], 10.0, 2) == 0.0
    assert [human_duration(s) for s in (42, 600, 7500, 3 * 86400 + 7200)] == ["42 s", "10 min", "2 h 05 min", "3 d 2 h"]


def test_eta_is_the_plans_estimate_before_a_shard_finished_then_the_measured_time(tmp_path):
    work = tmp_path / "w"
    env = toy_env({"toy": 4, "sleep_s": 1, "estimate_s": 10, "sum": False})
    args = ["cluster.array_parallelism=1"]
    # the first shard hangs: nothing is done while it runs
    _control(work, "sleep_part000", "60")
    p = start(toy_cmd(work, "local", *args), env, tmp_path / "launch1.log")
    try:
        wait_for(lambda: "part000" in keys(work, "running"), 60, "shard part000 running")
        prog = run_progress(work)
        toy = prog.step("toy", None)
        assert (toy.total, toy.done, toy.running, toy.pending) == (4, 0, 1, 3)
        assert toy.basis == ESTIMATED and toy.shard_s == 10.0
        assert 30 <= toy.eta_s <= 40  # 3 x 10 s, and what is left of the running shard's 10 s
        assert prog.basis == ESTIMATED and prog.eta_s == toy.eta_s
        text = _status(work, env)
        assert "ETA toy: " in text and f"left ({ESTIMATED})" in text, text
        assert "ETA run: " in text, text
    finally:
        _cancel(work, env, p)
    # nothing drives the run now: no end time, the work left
    text = _status(work, env)
    assert "ETA run: 1 step(s) left, " in text and "of work left (estimated)" in text, text
    assert "ends about" not in text, text
    # the next launch: part000 and part001 run (1 s each), then part002 hangs
    (work / "control" / "sleep_part000").unlink()
    _control(work, "sleep_part002", "60")
    p = start(toy_cmd(work, "local", *args), env, tmp_path / "launch2.log")
    try:
        wait_for(lambda: {"part000", "part001"} <= keys(work, "done") and "part002" in keys(work, "running"),
                 90, "two shards done and part002 running")
        prog = run_progress(work)
        toy = prog.step("toy", None)
        assert (toy.done, toy.running, toy.pending, toy.failed) == (2, 1, 1, 0)
        assert toy.basis == MEASURED and 0.9 <= toy.shard_s < 5, toy
        assert toy.eta_s <= 2 * toy.shard_s  # the hanging shard's rest plus one more, far below the plan's 20 s
        text = _status(work, env)
        assert f"left ({MEASURED})" in text and f"({ESTIMATED})" not in text, text
    finally:
        _cancel(work, env, p)


def test_a_later_iteration_is_timed_by_the_same_stage_of_an_earlier_one(tmp_path):
    work = tmp_path / "w"
    env = toy_env({"toy": 2, "sleep_s": 1, "per_iteration": True, "estimate_s": 100})
    r = run(toy_cmd(work, "local", "--iteration", "1"), env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    _control(work, "sleep_part000", "60")
    p = start(toy_cmd(work, "local", "--iterations", "2", "cluster.array_parallelism=1"), env, tmp_path / "launch.log")
    try:
        wait_for(lambda: "part000" in keys(work, "running", iteration=2), 60, "iteration 2 running")
        prog = run_progress(work)
        assert prog.step("toy", 1).complete and prog.step("sum", 1).complete
        toy2 = prog.step("toy", 2)
        assert toy2.basis == f"{MEASURED} in iteration 1" and toy2.shard_s < 5, toy2
        assert toy2.eta_s < 10  # not the plan's 2 x 100 s
        # the sum stage has no estimate and never ran: the run's ETA says it leaves it out
        assert prog.unknown == ["sum@iter2"]
        text = _status(work, env)
        assert f"left ({MEASURED} in iteration 1)" in text and "not counting sum@iter2" in text, text
    finally:
        _cancel(work, env, p)


def test_the_view_is_refreshed_after_a_step_in_the_background_and_stopped_at_the_end(tmp_path):
    work = tmp_path / "w"
    # a refresh that would take 10 minutes: the launch neither waits for it nor starts a second one
    env = toy_env({"toy": 2, "sleep_s": 0.5, "refresh": {"sleep_s": 600}})
    r = run(toy_cmd(work, "local"), env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    starts = (work / "refresh-starts.txt").read_text().splitlines()
    assert len(starts) == 1  # after toy; after sum the first one still ran: skipped
    pid, nice, oom = map(int, starts[0].split())
    assert (nice, oom) == (19, 1000)  # it yields the CPU to the run, and the OOM killer takes it first
    wait_for(lambda: not _alive(pid), 20, f"the refresh (pid {pid}) stopped")
    assert not (work / "refreshes.jsonl").exists()
    assert (work / ".pipeline" / "logs" / "refresh.log").exists()
    # a launch that finds every step complete changed nothing: no refresh
    r = run(toy_cmd(work, "local"), env=env, timeout=300)
    assert r.returncode == 0 and "everything was already complete" in r.stdout, r.stdout + r.stderr
    assert len((work / "refresh-starts.txt").read_text().splitlines()) == 1


def test_a_long_step_gets_its_view_refreshed_while_its_jobs_run(tmp_path):
    """A step that trains for days must not leave the report as it was when the step started: while
    its jobs run, the view is rewritten every cluster.view_refresh_s (one at a time)."""
    work = tmp_path / "w"
    env = toy_env({"toy": 2, "sleep_s": 12, "refresh": {}})
    r = run(toy_cmd(work, "local", "cluster.view_refresh_s=2"), env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    recs = [json.loads(line) for line in (work / "refreshes.jsonl").read_text().splitlines()]
    during = [rec for rec in recs if any(s["stage"] == "toy" and s["state"] == "running" for s in rec["steps"])]
    assert len(during) >= 2, recs  # ~12 s of toy jobs, a refresh due every 2 s
    assert all(b["started"] - a["started"] >= 1.9 for a, b in zip(recs, recs[1:]) if b in during), recs
    # the default (15 min) leaves a short run with its after-step refreshes only
    work2 = tmp_path / "w2"
    r = run(toy_cmd(work2, "local"), env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    recs = [json.loads(line) for line in (work2 / "refreshes.jsonl").read_text().splitlines()]
    assert not any(s["state"] == "running" for rec in recs for s in rec["steps"] if s["stage"] == "toy"), recs


def test_a_detached_runs_view_shows_the_steps_done_so_far_and_a_failed_refresh_is_one_warning_line(tmp_path):
    work = tmp_path / "w"
    env = toy_env({"toy": 2, "sleep_s": 3, "per_iteration": True, "refresh": {}})
    r = run(toy_cmd(work, "local", "--iterations", "2", "--detach"), env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    driver_log = work / ".pipeline" / "driver" / "driver.log"
    wait_for(lambda: "done: 4 step(s)" in driver_log.read_text(), 120, "the detached driver's end")
    recs = [json.loads(line) for line in (work / "refreshes.jsonl").read_text().splitlines()]
    first = {(s["stage"], s["iteration"]): s for s in recs[0]["steps"]}
    assert first[("toy", 1)]["state"] == "complete" and first[("toy", 1)]["done"] == 2
    toy2 = first[("toy", 2)]
    assert toy2["state"] in ("pending", "running") and toy2["done"] == 0  # (a slow refresh reads later)
    assert toy2["basis"] == f"{MEASURED} in iteration 1" and toy2["eta_s"] is not None
    if toy2["state"] == "pending":
        assert toy2["eta_s"] > 0
    # a failing refresh: the run goes on and ends well, the failure is one line naming its log
    work2 = tmp_path / "w2"
    env = toy_env({"toy": 2, "sleep_s": 3, "per_iteration": True, "refresh": {"fail": True}})
    r = run(toy_cmd(work2, "local", "--iterations", "2"), env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    warnings = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("warning: refreshing")]
    assert warnings and "toy refresh: asked to fail" in warnings[0] and "refresh.log" in warnings[0], r.stdout
    assert "done: 4 step(s)" in r.stdout


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (not reaped yet by its parent) has ended
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False

