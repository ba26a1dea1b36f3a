"""The engine on a real Slurm cluster (scripts/slurm_local.sh start): sbatch arrays, failures and
reruns, a two-stage chain, and a checkpointable 2-task job requeued by a preemption signal."""
import json
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
