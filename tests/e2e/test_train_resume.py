"""The train stage as the engine runs it, without the engine: one submitit job of two tasks (the
local executor, so two gloo ranks), SIGKILLed mid-run, then submitted again. The second job must
resume from the checkpoint the first one left, continue the update count and only then write the
final checkpoint. (The whole pipeline, with the launcher's relaunch, is test_pipeline_local.py.)"""
from __future__ import annotations

import importlib.util
import os
import signal
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pipeline.stage import StageContext
from stages import fairseq_run, tensorboard, train as train_stage
from stages.schedule import ScheduleConfig

REPO_ROOT = Path(__file__).resolve().parents[2]


def _make_av_corpus():
    # the generated A/V clips of the avhubert tests (manifest + label format, learnable labels)
    path = REPO_ROOT / "tests" / "avhubert" / "conftest.py"
    spec = importlib.util.spec_from_file_location("_avhubert_test_clips", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_av_corpus


def _first_step_per_events_file(logdir: Path) -> list:
    out = []
    for path in tensorboard.events_files(logdir):
        steps = [s for s, *_ in tensorboard.read_scalars_file(path).get("loss", [])]
        out.append(min(steps) if steps else None)
    return out


@pytest.fixture
def iteration1(tmp_path):
    import shutil

    work = tmp_path / "work"
    _make_av_corpus()(work / "manifest", n_train=6, n_valid=2, label_rate=100, seed=3)
    labels = work / "iter1" / "labels"
    labels.mkdir(parents=True)
    for name in ("train.km", "valid.km", "dict.km.txt"):
        shutil.move(str(work / "manifest" / name), str(labels / name))
    smoke = OmegaConf.load(REPO_ROOT / "presets" / "smoke.yaml")
    cfg = OmegaConf.create({
        "workdir": str(work),
        "iterations": 2,
        "schedule": OmegaConf.merge(OmegaConf.structured(ScheduleConfig), smoke.schedule),
        "train": OmegaConf.merge(OmegaConf.structured(train_stage.Config), smoke.train,
                                 {"max_update": 6}),
    })
    return StageContext(cfg=cfg, workdir=work, iteration=1)


# ~2 min on 2 cores; the default suite covers the same with the whole pipeline (local executor:
# SIGKILL + relaunch; Slurm: a 2-rank job cancelled and relaunched, and preempted)
@pytest.mark.slow
def test_two_rank_job_killed_then_resubmitted_resumes(iteration1, tmp_path):
    import psutil
    import submitit

    ctx = iteration1
    stage = train_stage.STAGE
    stage.validate(ctx)
    (shard,) = stage.shards(ctx)
    ckpt_dir = ctx.stage_dir("train") / "checkpoints"
    last, final = ckpt_dir / "checkpoint_last.pt", ckpt_dir / "checkpoint_final.pt"

    executor = submitit.LocalExecutor(folder=str(tmp_path / "submitit"))
    executor.update_parameters(nodes=1, tasks_per_node=2, timeout_min=10)
    job = executor.submit(stage.run, ctx, shard)
    deadline = time.time() + 300
    killed_at = None
    while time.time() < deadline and job.state not in ("DONE", "FAILED", "INTERRUPTED"):
        updates = fairseq_run.checkpoint_updates(last)
        if updates is not None and updates >= 2:
            # SIGKILL both rank processes (not the submitit controller): nothing can clean up
            ranks = psutil.Process(job._process.pid).children(recursive=True)
            assert len([p for p in ranks if "python" in p.name().lower()]) >= 2, ranks
            for proc in ranks:
                proc.send_signal(signal.SIGKILL)
            killed_at = time.time()
            break
        time.sleep(0.3)
    assert killed_at is not None, f"no checkpoint at 2 updates within 300 s; job state {job.state}"
    with pytest.raises(Exception):
        job.results()
    resume_at = fairseq_run.checkpoint_updates(last)
    assert resume_at is not None and 2 <= resume_at < 6, resume_at
    assert not final.exists()  # not complete: the declared output is missing

    job = executor.submit(stage.run, ctx, shard)
    results = job.results()
    rank0 = results[0]
    assert rank0["world_size"] == 2 and rank0["backend"] == "gloo"
    assert rank0["resumed_from_updates"] == resume_at and rank0["num_updates"] == 6
    assert results[1] == {"rank": 1}
    assert fairseq_run.checkpoint_updates(final) == 6
    # the resumed run logged updates from resume_at + 1 on: the count went on, not from 1
    firsts = _first_step_per_events_file(ctx.stage_dir("train") / "tensorboard" / "train_inner")
    assert firsts[0] == 1 and firsts[-1] == resume_at + 1, firsts
    summary = stage.finalize(ctx, {"train": rank0})
    assert summary["resumed_at_updates"] == [resume_at + 1]
    assert summary["train_points"] == 6
    assert (ctx.stage_dir("train") / "loss.png").stat().st_size > 10_000
    # complete now: running again trains nothing and keeps the final checkpoint
    mtime = os.stat(final).st_mtime_ns
    again = stage.run(ctx, shard)
    assert again["trained"] is False and os.stat(final).st_mtime_ns == mtime
