"""Submitting a step's shards through submitit and waiting for them.

- ``debug``: in-process, one shard after another (submitit's DebugExecutor); for stepping
  through a stage with a debugger.
- ``local``: one process per shard on this machine (submitit's LocalExecutor), at most
  ``array_parallelism`` at once.
- ``slurm``: one sbatch job array per step (split into several arrays when the step has more
  shards than ``max_array_size``), throttled by ``array_parallelism``; a multi-task step (training)
  is one job of nodes x tasks_per_node tasks.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import submitit

from pipeline.config import PROJECT_ROOT
from pipeline.state import StateStore, last_error_line
from pipeline.worker import CheckpointableShardTask, ShardTask


def make_executor(cluster, folder: Path, step) -> submitit.Executor:
    res = step.resources
    kind = cluster.executor
    name = f"{step.stage.name}-{'once' if step.iteration is None else 'it' + str(step.iteration)}"
    _export_project_path()
    if kind == "debug":
        return submitit.DebugExecutor(folder)
    if kind == "local":
        ex = submitit.LocalExecutor(folder, max_num_timeout=int(cluster.max_requeues))
        ex.update_parameters(
            timeout_min=res.timeout_min,
            tasks_per_node=res.tasks_per_node,
            nodes=1,
            gpus_per_node=res.gpus_per_task * res.tasks_per_node,
        )
        return ex
    ex = submitit.AutoExecutor(folder, cluster="slurm", slurm_max_num_timeout=int(cluster.max_requeues))
    params = dict(
        name=name,
        timeout_min=res.timeout_min,
        cpus_per_task=res.cpus_per_task,
        nodes=res.nodes,
        tasks_per_node=res.tasks_per_node,
        slurm_array_parallelism=int(cluster.array_parallelism),
    )
    if res.mem_gb:
        params["mem_gb"] = res.mem_gb
    if res.gpus_per_task:
        params["gpus_per_node"] = res.gpus_per_task * res.tasks_per_node
    if cluster.partition:
        params["slurm_partition"] = cluster.partition
    if cluster.account:
        params["slurm_account"] = cluster.account
    if cluster.qos:
        params["slurm_qos"] = cluster.qos
    if cluster.setup:
        params["slurm_setup"] = list(cluster.setup)
    extra = dict(cluster.slurm_additional_parameters or {})
    if extra:
        params["slurm_additional_parameters"] = extra
    ex.update_parameters(**params)
    return ex


def _export_project_path() -> None:
    # workers (local processes, Slurm jobs) unpickle stage objects by module name: the project
    # root must be importable there whatever their working directory
    root = str(PROJECT_ROOT)
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([root, *parts])


def make_task(step, shard, in_process: bool):
    cls = CheckpointableShardTask if step.stage.checkpointable else ShardTask
    return cls(stage=step.stage, ctx=step.ctx, shard=shard, in_process=in_process)


def run_shards(cluster, store: StateStore, step, todo: list, echo: Callable[[str], None] = print) -> list:
    """Run ``todo`` shards of ``step``; return [(shard key, log path, error line)] of failures."""
    folder = store.submitit_dir(step.stage.name, step.iteration)
    folder.mkdir(parents=True, exist_ok=True)
    executor = make_executor(cluster, folder, step)
    if cluster.executor == "debug":
        return _run_debug(executor, store, step, todo)
    if cluster.executor == "local":
        return _run_throttled(executor, store, step, todo, int(cluster.array_parallelism), cluster.poll_interval_s)
    jobs = []
    size = int(cluster.max_array_size)
    for start in range(0, len(todo), size):
        chunk = todo[start : start + size]
        with executor.batch():
            chunk_jobs = [executor.submit(make_task(step, s, False)) for s in chunk]
        jobs += list(zip(chunk, chunk_jobs))
        echo(f"[{step.name}] submitted array {chunk_jobs[0].job_id.split('_')[0]} ({len(chunk)} task(s))")
    return _wait(store, step, jobs, cluster.poll_interval_s)


def _run_debug(executor, store, step, todo) -> list:
    failures = []
    bar = _progress(step, len(todo))
    for shard in todo:
        job = executor.submit(make_task(step, shard, True))
        try:
            job.result()
        except Exception as e:  # recorded by the worker; keep going with the other shards
            failures.append(_failure(store, step, shard, e, job))
        bar.update(1)
    bar.close()
    return failures


def _run_throttled(executor, store, step, todo, parallelism: int, poll: float) -> list:
    pending = list(todo)
    running: list = []
    failures: list = []
    bar = _progress(step, len(todo))
    while pending or running:
        while pending and len(running) < parallelism:
            shard = pending.pop(0)
            running.append((shard, executor.submit(make_task(step, shard, False))))
        time.sleep(min(poll, 0.2))
        running = _reap(store, step, running, failures, bar)
    bar.close()
    return failures


def _wait(store, step, jobs: list, poll: float) -> list:
    failures = []
    bar = _progress(step, len(jobs))
    remaining = list(jobs)
    while remaining:
        time.sleep(poll)
        remaining = _reap(store, step, remaining, failures, bar)
    bar.close()
    return failures


def _reap(store, step, jobs: list, failures: list, bar) -> list:
    """Collect the finished jobs of ``jobs`` (failures appended); return those still running."""
    still = []
    for shard, job in jobs:
        if job.done():
            f = _collect(store, step, shard, job)
            if f:
                failures.append(f)
            bar.update(1)
        else:
            still.append((shard, job))
    return still


def _collect(store, step, shard, job) -> Optional[tuple]:
    try:
        exc = job.exception()
    except Exception as e:  # e.g. submitit cannot read a result file of a killed job
        exc = e
    if exc is None and store.read_done(step.stage.name, step.iteration, shard.key) is not None:
        return None
    if exc is None:
        exc = RuntimeError("the job ended without recording the shard as complete")
    return _failure(store, step, shard, exc, job)


def _failure(store, step, shard, exc, job) -> tuple:
    name, it = step.stage.name, step.iteration
    marker = store.read_failed(name, it, shard.key)
    if marker is None:
        # the worker never got to record it: killed (OOM, scancel, node failure) or crashed early
        err = last_error_line(str(exc)) or type(exc).__name__
        log = store.log_path(name, it, shard.key)
        extra = {"job_id": str(getattr(job, "job_id", "")), "scheduler_log": str(_stderr_path(job))}
        store.mark_failed(name, it, shard.key, f"{type(exc).__name__}: {err}", log, extra)
        marker = store.read_failed(name, it, shard.key)
    return shard.key, marker.get("log"), marker.get("error")


def _stderr_path(job) -> str:
    try:
        return str(job.paths.stderr)
    except Exception:
        return ""


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _progress(step, total: int):
    if not sys.stderr.isatty():
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=step.name, unit="shard", leave=True)
