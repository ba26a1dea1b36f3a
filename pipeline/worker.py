"""What runs inside a job: one shard of one stage, with its log, markers and output checks."""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import submitit

from pipeline.stage import Shard, Stage, StageContext
from pipeline.state import StateStore, last_error_line

log = logging.getLogger("pipeline.worker")


def task_rank() -> tuple[int, int]:
    """(global rank, number of tasks) of this process inside a submitit job; (0, 1) outside one."""
    try:
        env = submitit.JobEnvironment()
        return env.global_rank, env.num_tasks
    except RuntimeError:  # not in a submitit job (debug executor runs in-process)
        return 0, 1


def job_id() -> str:
    try:
        return str(submitit.JobEnvironment().job_id)
    except RuntimeError:
        return f"inprocess-{os.getpid()}"


@contextlib.contextmanager
def shard_log(path: Path, redirect_fds: bool):
    """Send this shard's output to its own log file. In a job process (local/Slurm) the file
    descriptors 1 and 2 are redirected, so subprocesses and C libraries log there too; in-process
    (debug executor) only a logging handler is added, leaving the launcher's terminal alone."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    saved = None
    if redirect_fds:
        sys.stdout.flush()
        sys.stderr.flush()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        saved = (os.dup(1), os.dup(2))
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()
        if saved:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


class MissingOutputs(RuntimeError):
    pass


@dataclass
class ShardTask:
    """A picklable callable: ``task()`` runs the shard. Submitted once per shard (array element)
    or once per multi-task job (every rank calls it)."""

    stage: Stage
    ctx: StageContext
    shard: Shard
    in_process: bool = False

    def __call__(self) -> dict:
        store = StateStore(Path(self.ctx.workdir))
        stage, it, key = self.stage.name, self.ctx.iteration, self.shard.key
        rank, ntasks = task_rank()
        log_path = store.log_path(stage, it, key, rank)
        with shard_log(log_path, redirect_fds=not self.in_process):
            start = time.time()
            if rank == 0:
                store.mark_running(stage, it, key, {"job_id": job_id(), "log": str(log_path)})
            log.info("== %s %s (iteration %s) rank %d/%d on job %s", stage, key, it, rank, ntasks, job_id())
            try:
                stats = self.stage.run(self.ctx, self.shard) or {}
                if rank == 0:
                    missing = [str(p) for p in self.stage.outputs(self.ctx, self.shard) if not Path(p).exists()]
                    if missing:
                        raise MissingOutputs(
                            f"stage {stage} shard {key} returned but did not write: {', '.join(missing[:5])}"
                        )
            except BaseException as e:
                tb = traceback.format_exc()
                log.error("shard %s failed:\n%s", key, tb)
                if rank == 0 and not _is_preemption(e):
                    store.mark_failed(stage, it, key, last_error_line(tb), log_path, {"job_id": job_id()})
                raise
            if rank == 0:
                stats = dict(stats)
                stats.setdefault("seconds", round(time.time() - start, 3))
                store.mark_done(stage, it, key, stats, {"job_id": job_id(), "log": str(log_path)})
            log.info("== done in %.1fs", time.time() - start)
            return stats


def _is_preemption(e: BaseException) -> bool:
    # submitit raises these (or a plain SystemExit from the signal handler) when a job is
    # requeued: not a failure of the shard
    return isinstance(e, (KeyboardInterrupt, SystemExit))


class CheckpointableShardTask(ShardTask, submitit.helpers.Checkpointable):
    """On preemption (USR2) or timeout, submitit calls ``checkpoint`` and requeues the job with the
    same callable; the stage resumes from the checkpoints it wrote itself."""

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        log.warning("== %s %s: preempted or timed out, requeueing", self.stage.name, self.shard.key)
        return submitit.helpers.DelayedSubmission(self)
