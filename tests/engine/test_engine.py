"""Engine behaviour on the debug and local executors with the test-only stages (real submitit,
real subprocesses; nothing mocked)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine_toy_stages import CounterStage, SumStage, ToyStage
from pipeline.config import load_config
from pipeline.errors import ConfigError, LockHeld, PrerequisiteError, StageFailed
from pipeline.lock import WorkdirLock
from pipeline.runner import Pipeline
from pipeline.status import collect, render

ROOT = Path(__file__).resolve().parents[2]


def make(workdir, cluster, stages=None, order=None, force=False, overrides=()):
    cfg = load_config({}, preset=None, cluster=cluster, overrides=[f"workdir={workdir}", *overrides])
    stages = stages or {"toy": ToyStage(6), "sum": SumStage()}
    return Pipeline(cfg, stages, order or list(stages), Path(workdir), force=force, echo=lambda m: None)


def run_all(pipe, names="all", iterations=None):
    return pipe.run(pipe.plan(pipe.targets(names, iterations)))


def runs(workdir):
    p = Path(workdir) / "runs.log"
    return p.read_text().split("\n")[:-1] if p.exists() else []


@pytest.mark.parametrize("executor", ["debug", "local"])
def test_chain_runs_in_order_and_rerun_submits_nothing(tmp_path, executor):
    pipe = make(tmp_path, executor)
    results = run_all(pipe)
    assert (tmp_path / "sum" / "sum.txt").read_text() == "15\n"
    log = runs(tmp_path)
    assert len(log) == 7 and all(l.startswith("toy") for l in log[:6]) and log[6].startswith("sum")
    assert [r.submitted for r in results] == [6, 1]
    # one log per shard, named by scope, stage and shard
    assert (tmp_path / ".pipeline/logs/once/toy/part003.log").is_file()
    again = run_all(make(tmp_path, executor))
    assert [r.submitted for r in again] == [0, 0] and len(runs(tmp_path)) == 7


@pytest.mark.parametrize("executor", ["debug", "local"])
def test_failed_shard_is_reported_and_rerun_redoes_only_it(tmp_path, executor):
    (tmp_path / "control").mkdir()
    (tmp_path / "control" / "fail_part002").touch()
    with pytest.raises(StageFailed) as err:
        run_all(make(tmp_path, executor))
    msg = str(err.value)
    assert "part002" in msg and "asked to fail shard part002" in msg
    assert str(tmp_path / ".pipeline/logs/once/toy/part002.log") in msg
    assert "ValueError" in (tmp_path / ".pipeline/logs/once/toy/part002.log").read_text()
    # the other shards finished, the dependent stage did not start
    assert sorted(l.split()[-1] for l in runs(tmp_path)) == [f"part00{i}" for i in (0, 1, 3, 4, 5)]
    assert not (tmp_path / "sum").exists()
    [toy] = [s for s in collect(tmp_path) if s.stage == "toy"]
    assert (toy.done, toy.total, len(toy.failed)) == (5, 6, 1)
    assert "asked to fail" in render(collect(tmp_path), tmp_path)

    (tmp_path / "control" / "fail_part002").unlink()
    before = len(runs(tmp_path))
    run_all(make(tmp_path, executor))
    assert [l.split()[-1] for l in runs(tmp_path)[before:]] == ["part002", "sum15"]
    [toy] = [s for s in collect(tmp_path) if s.stage == "toy"]
    assert (toy.done, toy.failed, toy.finalized) == (6, [], True)


def test_force_redoes_complete_shards(tmp_path):
    run_all(make(tmp_path, "debug"))
    run_all(make(tmp_path, "debug", force=True), ["toy"])
    assert len(runs(tmp_path)) == 7 + 6


def test_missing_prerequisite_is_one_clear_error(tmp_path):
    pipe = make(tmp_path, "debug")
    with pytest.raises(PrerequisiteError, match=r"needs toy, which is incomplete.*--stage toy"):
        pipe.plan(pipe.targets(["sum"]))
    assert runs(tmp_path) == []


def test_only_missing_inputs_make_a_step_incomplete_a_bug_in_its_shards_is_a_bug(tmp_path):
    run_all(make(tmp_path, "debug"))
    pipe = make(tmp_path, "debug")
    sum_stage = pipe.stages["sum"]
    assert pipe.step_complete(sum_stage, None)
    (tmp_path / "control").mkdir()
    (tmp_path / "control" / "bug_in_shards").touch()  # shards() raises KeyError: not "incomplete"
    with pytest.raises(KeyError):
        pipe.step_complete(sum_stage, None)
    with pytest.raises(KeyError):
        pipe.plan(pipe.targets(["sum"]))
    (tmp_path / "control" / "bug_in_shards").unlink()
    (tmp_path / "toy" / "summary.json").unlink()  # its input gone: InputsMissing, the step is incomplete
    assert not pipe.step_complete(sum_stage, None)


def test_lost_output_makes_a_shard_incomplete_again(tmp_path):
    run_all(make(tmp_path, "debug"))
    (tmp_path / "toy" / "out_4.txt").unlink()
    results = run_all(make(tmp_path, "debug"))
    assert results[0].submitted == 1 and runs(tmp_path)[7:] == ["toy None part004"]


def test_iterations_chain_with_previous_iteration_dependency(tmp_path):
    stages = {"toy": ToyStage(2, per_iteration=True), "sum": SumStage(per_iteration=True, depends_on_previous=["sum"])}
    pipe = make(tmp_path, "debug", stages, overrides=["iterations=2"])
    steps = pipe.plan(pipe.targets("all"))
    assert [s.name for s in steps] == ["toy (iteration 1)", "sum (iteration 1)", "toy (iteration 2)", "sum (iteration 2)"]
    pipe.run(steps)
    assert (tmp_path / "iter2" / "sum" / "sum.txt").read_text() == "1\n"
    # one stage of one iteration; the previous iteration's prerequisite is checked
    (tmp_path / ".pipeline/state/iter1/sum/_stage.done.json").unlink()
    with pytest.raises(PrerequisiteError, match=r"sum \(iteration 1\)"):
        pipe.plan(pipe.targets(["sum"], [2]))


def test_config_validation_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown cluster 'nope'.*available: .*local"):
        load_config({}, preset=None, cluster="nope")
    with pytest.raises(ConfigError, match="array_paralelism"):
        load_config({}, preset=None, cluster="local", overrides=["cluster.array_paralelism=3"])
    with pytest.raises(ConfigError, match="cpus_per_task=0"):
        load_config({}, preset=None, cluster="local", overrides=["cluster.defaults.cpus_per_task=0"])
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config({}, preset=None, cluster="local", overrides=["iterations"])
    pipe = make(tmp_path, "local", overrides=["cluster.defaults.gpus_per_task=1"])
    with pytest.raises(ConfigError, match="GPU"):
        pipe.plan(pipe.targets("all"))
    pipe = make(tmp_path, "local", {"counter": CounterStage()}, overrides=["cluster.stages.counter.nodes=2"])
    with pytest.raises(ConfigError, match="2 nodes"):
        pipe.plan(pipe.targets("all"))
    assert not (tmp_path / ".pipeline").exists()


def test_dry_run_plan_submits_nothing(tmp_path):
    pipe = make(tmp_path, "local", overrides=["cluster.max_array_size=4"])
    text = pipe.describe_plan(pipe.plan(pipe.targets("all")))
    assert "shards: 6 to run / 6; jobs: 2 array(s) of 6 task(s)" in text
    assert "known once its inputs exist" in text and str(tmp_path / "toy") in text
    assert not (tmp_path / ".pipeline").exists() and not (tmp_path / "toy").exists()


def test_lock_refuses_a_second_launch_and_clears_a_stale_one(tmp_path):
    with WorkdirLock(tmp_path):
        with pytest.raises(LockHeld, match="in use by another launch"):
            WorkdirLock(tmp_path).acquire()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = tmp_path / ".pipeline" / "lock"
    import socket

    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "time": time.time()}))
    taken = WorkdirLock(tmp_path).acquire()
    assert taken.cleared_stale["pid"] == dead.pid
    taken.release()
    assert not lock.exists()


def test_sigkill_mid_shard_leaves_nothing_usable_and_rerun_redoes_it(tmp_path):
    (tmp_path / "control").mkdir()
    (tmp_path / "control" / "sleep_part001").write_text("60")
    script = f"""
import sys; sys.path[:0] = [{str(ROOT)!r}, {str(Path(__file__).parent)!r}]
import cloudpickle, engine_toy_stages as T; cloudpickle.register_pickle_by_value(T)
from test_engine import make, run_all
run_all(make({str(tmp_path)!r}, "local"))
"""
    launcher = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    running = tmp_path / ".pipeline/state/once/toy/part001.running.json"
    deadline = time.time() + 60
    while time.time() < deadline and not (running.exists() and list((tmp_path / "toy").glob(".tmp-*out_1.txt"))):
        time.sleep(0.2)
    assert running.exists(), "the shard never started"
    os.kill(json.loads(running.read_text())["pid"], signal.SIGKILL)
    out, _ = launcher.communicate(timeout=120)
    assert launcher.returncode != 0 and "part001" in out
    assert not (tmp_path / "toy" / "out_1.txt").exists()
    assert not (tmp_path / ".pipeline/state/once/toy/part001.done.json").exists()
    assert not (tmp_path / "sum").exists()
    (tmp_path / "control" / "sleep_part001").unlink()
    results = run_all(make(tmp_path, "local"))
    assert results[0].submitted == 1 and (tmp_path / "sum" / "sum.txt").read_text() == "15\n"


def test_multi_task_stage_records_rank0_on_local_executor(tmp_path):
    stages = {"counter": CounterStage(target=3, step_s=0.05)}
    pipe = make(tmp_path, "local", stages, overrides=["cluster.stages.counter.tasks_per_node=2"])
    run_all(pipe)
    d = tmp_path / "counter"
    assert json.loads((d / "rank1.json").read_text()) == {"rank": 1, "ntasks": 2}
    done = json.loads((tmp_path / ".pipeline/state/once/counter/count.done.json").read_text())
    assert done["stats"]["count"] == 3 and done["stats"]["ntasks"] == 2


def test_a_stage_can_drop_a_dependency_for_its_configuration(tmp_path):
    class Standalone(SumStage):
        given_input = False

        def dependencies(self, ctx):
            return () if self.given_input else self.depends_on

    stage = Standalone()
    pipe = make(tmp_path, "debug", {"toy": ToyStage(2), "sum": stage})
    with pytest.raises(PrerequisiteError):
        pipe.plan(pipe.targets(["sum"]))
    stage.given_input = True
    assert [s.name for s in pipe.plan(pipe.targets(["sum"]))] == ["sum"]


def test_a_submitit_whose_local_controller_changed_is_refused_before_a_job_starts(tmp_path, monkeypatch):
    # the local executor starts submitit's controller itself (in a session of its own) with the
    # settings of submitit's start_controller: another submitit's controller is one error line
    from submitit.local import local

    def start_controller(folder, command, tasks_per_node=1, cuda_devices="", timeout_min=5.0, signal_delay_s=30,
                         stderr_to_stdout=False, setup=(), new_setting=None):  # a newer submitit's, say
        raise AssertionError("not called")

    monkeypatch.setattr(local, "start_controller", start_controller)
    with pytest.raises(StageFailed, match=r"its local job controller takes .*new_setting.*pin submitit"):
        run_all(make(tmp_path, "local", {"toy": ToyStage(2)}))
    assert runs(tmp_path) == []
