"""Real training against a 1 minute Slurm time limit (slow; the default suite has the same engine
rule on a toy stage, tests/engine/test_slurm.py). Iteration 1's data is a generated A/V corpus
(the avhubert tests' clips); training is the smoke preset's tiny model, 2 gloo ranks.

- checkpoints every 1000 updates: nothing is saved before the limit, so the job is not requeued
  (it would restart from nothing every time: the issue's 21 requeues) and the step fails with
  "timed out after 1 min without progress ...: raise cluster.stages.train.timeout_min";
- checkpoints every update (2 min limit): the run saves progress, so the job is requeued at the
  limit and its next run resumes from its last checkpoint;
- a preemption (USR2 long before the limit) before the first checkpoint: the training saves at its
  next update, the job is requeued and its next run goes on from that update to max_update.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.errors import StageFailed
from pipeline.runner import Pipeline
from pipeline.stage import Stage
from pipeline.state import StateStore
from stages import config_sections
from stages import train as train_stage

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
REPO_ROOT = Path(__file__).resolve().parents[2]


class GivenLabels(Stage):
    """Iteration 1's labels, made by the test (the train stage's only prerequisite)."""

    name = "labels"
    per_iteration = True

    def shards(self, ctx):
        return []


def _pipeline(work: Path, max_update: int, save_interval: int, timeout_min: int = 1) -> Pipeline:
    import importlib.util

    spec = importlib.util.spec_from_file_location("_clips", REPO_ROOT / "tests" / "avhubert" / "conftest.py")
    clips = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(clips)
    clips.make_av_corpus(work / "manifest", n_train=6, n_valid=2, label_rate=100, seed=3)
    labels = work / "iter1" / "labels"
    labels.mkdir(parents=True)
    for name in ("train.km", "valid.km", "dict.km.txt"):
        shutil.move(str(work / "manifest" / name), str(labels / name))
    StateStore(work).mark_stage_done("labels", 1, {}, 0, generation="given")
    cfg = load_config(config_sections(), preset="smoke", cluster="slurm_local", overrides=[
        f"workdir={work}", "iterations=1", f"train.max_update={max_update}",
        f"cluster.stages.train.timeout_min={timeout_min}",
        # (an epoch of this corpus is one update: epochs are not saved either)
        f"train.overrides=[checkpoint.save_interval_updates={save_interval},checkpoint.save_interval={save_interval},"
        "'model.resnet_layers=[1,0,0,0]']",
    ])
    return Pipeline(cfg, {"labels": GivenLabels(), "train": train_stage.STAGE}, ["labels", "train"], work,
                    echo=print)


def _runs(job_id: str) -> list:
    out = subprocess.run(["sacct", "-X", "-D", "-n", "-P", "-j", job_id, "-o", "JobID,State"],
                         capture_output=True, text=True).stdout
    return out.split()


def test_training_with_nothing_saved_before_a_one_minute_limit_fails_once(slurm, tmp_path):
    pipe = _pipeline(tmp_path / "work", max_update=100000, save_interval=1000)
    with pytest.raises(StageFailed) as err:
        pipe.run(pipe.plan(pipe.targets(["train"], [1])))
    assert ("timed out after 1 min without progress since it started (nothing saved yet): raise "
            "cluster.stages.train.timeout_min") in str(err.value), str(err.value)
    job = json.loads(next((tmp_path / "work" / ".pipeline/state/iter1/train/_jobs").glob("*.json")).read_text())
    runs = _runs(job["jobs"]["train"]["job_id"])
    assert len(runs) == 1 and "REQUEUED" not in runs[0], runs


def test_training_that_saves_progress_is_requeued_at_its_limit_and_resumes(slurm, tmp_path):
    # 2 min: on a loaded 2-core machine a 1 min job may not reach its first update
    import threading
    import time

    work = tmp_path / "work"
    pipe = _pipeline(work, max_update=100000, save_interval=1, timeout_min=2)
    errors = []
    runner = threading.Thread(target=lambda: _run_catching(pipe, errors))
    runner.start()
    log = work / ".pipeline" / "logs" / "iter1" / "train" / "train.log"
    deadline = time.time() + 900
    while time.time() < deadline and "(run 1)" not in (log.read_text(errors="replace") if log.exists() else ""):
        time.sleep(2)
    text = log.read_text(errors="replace")
    job = json.loads(next((work / ".pipeline/state/iter1/train/_jobs").glob("*.json")).read_text())["jobs"]["train"]["job_id"]
    time.sleep(20)  # the second run loads its checkpoint
    subprocess.run(["scancel", job], check=True)
    runner.join(timeout=300)
    text = log.read_text(errors="replace")
    assert "(run 1)" in text and "requeueing" in text, text[-3000:]
    second = text.split("(run 1)", 1)[1]
    resumed = [int(m) for m in re.findall(r"resuming at (\d+) updates", second)]
    assert resumed and resumed[0] >= 1, second[:3000]


def _run_catching(pipe, errors):
    try:
        pipe.run(pipe.plan(pipe.targets(["train"], [1])))
    except Exception as e:  # the test cancels the job: expected
        errors.append(e)


def test_a_preemption_before_the_first_checkpoint_saves_at_the_next_update_and_resumes_there(slurm, tmp_path):
    import re
    import threading
    import time

    work = tmp_path / "work"
    max_update = 12
    pipe = _pipeline(work, max_update=max_update, save_interval=1000, timeout_min=30)  # no scheduled save
    log = work / ".pipeline" / "logs" / "iter1" / "train" / "train.log"
    ckpt_dir = work / "iter1" / "train" / "checkpoints"
    signalled = {}

    def preempt():  # USR2 once training reached its second update, nothing saved yet
        deadline = time.time() + 600
        while time.time() < deadline:
            text = log.read_text(errors="replace") if log.exists() else ""
            updates = [int(u) for u in re.findall(r'"num_updates": "?(\d+)', text)]
            if updates and max(updates) >= 2:
                signalled["at"] = max(updates)
                signalled["saved_before"] = sorted(p.name for p in ckpt_dir.glob("*.pt"))
                job = json.loads(next((work / ".pipeline/state/iter1/train/_jobs").glob("*.json")).read_text())
                subprocess.run(["scancel", "--signal=USR2", job["jobs"]["train"]["job_id"]], check=True)
                return
            time.sleep(0.2)

    sender = threading.Thread(target=preempt, daemon=True)
    sender.start()
    pipe.run(pipe.plan(pipe.targets(["train"], [1])))  # completes by itself
    sender.join(timeout=10)
    text = log.read_text(errors="replace")
    assert signalled.get("saved_before") == [], (signalled, text[-3000:])
    assert "a preemption; saving now and requeueing" in text, text[-3000:]
    saved = [int(u) for u in re.findall(r"preemption: saving checkpoint_last\.pt at update (\d+)", text)]
    assert len(saved) == 1 and signalled["at"] <= saved[0] < max_update, (signalled, saved, text[-3000:])
    assert re.search(r"saved \d+ s after the preemption signal", text), text[-3000:]
    # the requeued run (Slurm's restart count 1) resumed from that update, not from 0
    second = text.split("(run 1)", 1)[1]
    assert re.findall(r"resuming at (\d+) updates", second)[:1] == [str(saved[0])], second[:3000]
    assert train_stage.checkpoint_updates(ckpt_dir / "checkpoint_final.pt") == max_update
