"""What runs inside a job: one shard of one stage, with its log, lease, markers and output checks.

Order inside a job: take the shard's lease (rank 0; other ranks wait until rank 0 holds it for
this job, or gave up), record the running marker, run the stage, record done (or failed, with
one line: the infrastructure cause such as "disk full on ...", or the error's last line).

The time-limit signal (USR2, ``signal_delay_s`` before the limit) never reaches the stage as an
``Exception``: for a checkpointable stage it requeues the job through submitit when the stage made
progress since the job started (``Stage.progress``), otherwise the shard fails with "timed out
after N min ... raise cluster.stages.<stage>.timeout_min"; for other stages it fails the shard
with that line. The same signal long before the limit (more than ``signal_delay_s`` plus Slurm's
minute of slack) is a preemption: a checkpointable stage saves now (``Stage.save_now``) and the
job is requeued at once, whatever its progress; a stage that saves only at its next safe point
(training: the next update) gets up to ``signal_delay_s`` - 30 s for it, ends ``run`` with
``SavedForPreemption`` and the job is requeued then (past the bound: one log line, and the
requeue goes on without the save). Either way the failure is a ``ShardInterrupted`` (a BaseException), so no
per-item ``except Exception`` can record it as a bad input item.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import submitit

from pipeline import procs
from pipeline.errors import infrastructure_cause
from pipeline.lease import MALFORMED, describe_holder, new_token
from pipeline.stage import SavedForPreemption, Shard, Stage, StageContext
from pipeline.state import StateStore, last_error_line

log = logging.getLogger("pipeline.worker")

RANK0_WAIT_S = 600.0  # how long other ranks wait for rank 0 to take the lease


class ShardInterrupted(BaseException):
    """The job must stop now (its time limit, with nothing to requeue for). A BaseException, so
    per-item ``except Exception`` blocks let it through and the shard fails as a whole."""


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


def attempt() -> str:
    """Which run of this job this is (Slurm counts requeues)."""
    return os.environ.get("SLURM_RESTART_COUNT", "0")


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


def failure_line(exc: BaseException, tb: str, workdir: Path) -> str:
    """The one line a failed shard shows: the infrastructure cause when there is one (disk full
    on PATH, out of memory, ...), the time-limit message, else the error's last line."""
    if isinstance(exc, ShardInterrupted):
        return str(exc)
    cause = infrastructure_cause(exc, [workdir])
    if cause and isinstance(exc, Exception):
        if cause.startswith(("disk full", "disk quota")) and str(workdir) not in cause:
            # a tool's message may name only its input: say which disk is full
            from pipeline.disk import free_line

            cause += f" (writing to {workdir}; {free_line(workdir)})"
        return cause
    return last_error_line(tb) or type(exc).__name__


def _grew(before: Optional[int], now: Optional[int]) -> bool:
    return (-1 if now is None else now) > (-1 if before is None else before)


@dataclass
class ShardTask:
    """A picklable callable: ``task()`` runs the shard. Submitted once per shard (array element)
    or once per multi-task job (every rank calls it)."""

    stage: Stage
    ctx: StageContext
    shard: Shard
    in_process: bool = False
    executor: str = "local"
    timeout_min: float = 60
    signal_delay_s: int = 90

    def __call__(self) -> dict:
        store = StateStore(Path(self.ctx.workdir))
        stage, it, key = self.stage.name, self.ctx.iteration, self.shard.key
        rank, ntasks = task_rank()
        jid, run = job_id(), attempt()
        log_path = store.log_path(stage, it, key, rank)
        self._requeued = False
        self._requeue_after_save = None  # set while a preemption waits for the stage's deferred save
        with shard_log(log_path, redirect_fds=not self.in_process):
            lease = store.lease(stage, it, key)
            me = {"token": new_token(), "job_id": jid, "attempt": run, "executor": self.executor,
                  **procs.identity(), "time": time.time()}
            if rank == 0:
                holder = lease.acquire(me)
                if holder is not None:
                    self._back_off(store, jid, run, holder)
                    return {"backed_off_to": None if holder is MALFORMED else holder.get("job_id")}
                self._flag(store, "_taken", jid, run)
            elif not self._rank0_holds(store, lease, jid, run):
                log.warning("== %s %s: rank 0 of job %s did not take the shard: this rank exits", stage, key, jid)
                return {"rank": rank, "backed_off": True}
            started = time.time()
            progress0 = self._progress() if rank == 0 else None
            restore = self._watch_time_limit(store, started, progress0) if rank == 0 else (lambda: None)
            try:
                if rank == 0:
                    store.mark_running(stage, it, key, {"job_id": jid, "attempt": run, "log": str(log_path),
                                                        "executor": self.executor, "progress": progress0})
                log.info("== %s %s (iteration %s) rank %d/%d on job %s (run %s)", stage, key, it, rank, ntasks,
                         jid, run)
                try:
                    stats = self.stage.run(self.ctx, self.shard) or {}
                    if rank == 0:
                        missing = [str(p) for p in self.stage.outputs(self.ctx, self.shard) if not Path(p).exists()]
                        if missing:
                            raise MissingOutputs(
                                f"stage {stage} shard {key} returned but did not write: {', '.join(missing[:5])}"
                            )
                except BaseException as e:
                    if isinstance(e, SavedForPreemption) and rank != 0:  # rank 0 requeues the job
                        log.warning("== %s %s: rank %d saved with rank 0 for a preemption: %s", stage, key, rank, e)
                        return {"rank": rank, "saved_for_preemption": True}
                    if isinstance(e, SavedForPreemption) and self._requeue_after_save is not None:
                        log.warning("== %s %s: %s", stage, key, e)
                        try:
                            self._requeue_after_save()  # raises SystemExit: requeued
                        except ShardInterrupted as stop:  # requeued too often: the shard fails with it
                            e = stop
                    tb = traceback.format_exc()
                    if self._requeued:
                        log.warning("== %s %s: requeued (time limit or preemption); the next run resumes", stage, key)
                        raise
                    log.error("shard %s failed:\n%s", key, tb)
                    if rank == 0:
                        self._record_failure(store, failure_line(e, tb, Path(self.ctx.workdir)), log_path, jid,
                                             infrastructure=isinstance(e, (ShardInterrupted, SavedForPreemption))
                                             or infrastructure_cause(e, [self.ctx.workdir]) is not None)
                        lease.release(me)
                    raise
                if rank == 0:
                    stats = dict(stats)
                    stats.setdefault("seconds", round(time.time() - started, 3))
                    store.mark_done(stage, it, key, stats, {"job_id": jid, "log": str(log_path)})
                    lease.release(me)
                log.info("== done in %.1fs", time.time() - started)
                return stats
            finally:
                restore()

    # --- the lease -------------------------------------------------------------------------------
    def _back_off(self, store: StateStore, jid: str, run: str, holder: dict) -> None:
        log.warning("== %s %s: the shard is held by %s; job %s exits without touching its outputs",
                    self.stage.name, self.shard.key, describe_holder(holder), jid)
        self._flag(store, "_backoff", jid, run)  # tell the other ranks of this job not to start

    def _flag_path(self, store: StateStore, kind: str, jid: str, run: str) -> Path:
        return store.stage_state_dir(self.stage.name, self.ctx.iteration) / kind / f"{self.shard.key}.{jid}.{run}"

    def _flag(self, store: StateStore, kind: str, jid: str, run: str) -> None:
        """Rank 0's word to the other ranks of its job: ``_taken`` (it holds the lease) or
        ``_backoff`` (another job does). A flag, not only the lease: a shard that runs in less
        than a poll would release the lease before a late rank looks at it."""
        flag = self._flag_path(store, kind, jid, run)
        with contextlib.suppress(OSError):
            flag.parent.mkdir(parents=True, exist_ok=True)
            flag.touch()

    def _rank0_holds(self, store: StateStore, lease, jid: str, run: str) -> bool:
        """Other ranks: wait until rank 0 of this job holds the lease (True), or gave up (False)."""
        backoff, taken = (self._flag_path(store, k, jid, run) for k in ("_backoff", "_taken"))
        deadline = time.time() + RANK0_WAIT_S
        while time.time() < deadline:
            holder = lease.holder()
            if holder and holder is not MALFORMED and str(holder.get("job_id")) == jid \
                    and str(holder.get("attempt", "0")) == run:
                return True
            if backoff.exists():
                return False
            if taken.exists():
                return True
            time.sleep(0.2)
        raise RuntimeError(f"rank 0 of job {jid} did not take the lease {lease.path} within {RANK0_WAIT_S:.0f} s")

    # --- failures and the time limit -------------------------------------------------------------
    def _record_failure(self, store, line: str, log_path, jid: str, infrastructure: bool) -> None:
        stage, it, key = self.stage.name, self.ctx.iteration, self.shard.key
        try:
            store.mark_failed(stage, it, key, line, log_path, {"job_id": jid, "infrastructure": infrastructure})
        except OSError as e:  # a full disk: the launcher reports the job's end from the scheduler
            log.error("could not record the failure of shard %s: %s", key, e)

    def _save_now(self) -> bool:
        """The stage's ``save_now``: True when it saves at its next safe point (deferred)."""
        try:
            return bool(self.stage.save_now(self.ctx, self.shard))
        except Exception:  # noqa: BLE001 - the requeue goes on: the stage resumes from its last save
            log.warning("could not save shard %s before the requeue", self.shard.key, exc_info=True)
            return False

    def _progress(self) -> Optional[int]:
        if type(self.stage).progress is Stage.progress:
            return None
        try:
            return self.stage.progress(self.ctx, self.shard)
        except Exception:  # noqa: BLE001 - an unreadable checkpoint is "no progress known"
            log.warning("could not read the progress of shard %s", self.shard.key, exc_info=True)
            return None

    def _watch_time_limit(self, store: StateStore, started: float, progress0: Optional[int]):
        """Replace submitit's USR2 handler for this shard (see the module doc); returns the undo.

        Slurm sends the signal up to a minute earlier than asked (its timer's resolution): when it
        comes with no progress made yet and more than ``_DECIDE_BEFORE_S`` left, the decision
        waits for an alarm shortly before the limit, so a short limit is not cut short."""
        if self.in_process or not hasattr(signal, "SIGUSR2"):
            return lambda: None
        sig = submitit.JobEnvironment._usr_sig()
        previous = signal.getsignal(sig)
        previous_alarm = signal.getsignal(signal.SIGALRM)
        stage_name = self.stage.name
        has_progress = type(self.stage).progress is not Stage.progress
        limit_s = float(self.timeout_min) * 60

        def requeue(signum, frame, now):
            log.warning("== %s %s: signal after %.0f s, progress %s -> %s: requeueing", stage_name,
                        self.shard.key, time.time() - started, progress0, now)
            try:
                if callable(previous):
                    previous(sig, frame)
            except SystemExit:  # submitit requeued the job and exits this run
                self._requeued = True
                raise
            except submitit.core.utils.UncompletedJobError as e:  # requeued too often
                raise ShardInterrupted(f"stopped at its time limit too many times (cluster.max_requeues): "
                                       f"{last_error_line(str(e))}") from None

        def decide(signum, frame, final: bool):
            minutes = f"{self.timeout_min:g}"
            # only Slurm signals early; submitit's local controller signals exactly when asked
            early = not final and os.environ.get("SLURM_JOB_ID")
            left = limit_s - (time.time() - _job_start(started)) if early else 0.0
            if self.stage.checkpointable and early and left > self.signal_delay_s + _SLURM_SIGNAL_SLACK_S:
                if self._requeue_after_save is not None:
                    log.warning("== %s %s: another preemption signal; still waiting for the save",
                                stage_name, self.shard.key)
                    return None
                log.warning("== %s %s: signal %.0f s before the time limit: a preemption; saving now and "
                            "requeueing", stage_name, self.shard.key, left)
                if self._save_now():
                    return wait_for_save(signum, frame)
                return requeue(signum, frame, self._progress() if has_progress else None)
            now = self._progress() if has_progress else None
            if self.stage.checkpointable and (not has_progress or _grew(progress0, now)):
                return requeue(signum, frame, now)
            if early and left > 2 * _DECIDE_BEFORE_S:
                log.warning("== %s %s: time-limit signal %.0f s before the limit; deciding %.0f s before it",
                            stage_name, self.shard.key, left, _DECIDE_BEFORE_S)
                signal.signal(signal.SIGALRM, lambda s, f: decide(s, f, final=True))
                signal.alarm(max(1, int(left - _DECIDE_BEFORE_S)))
                return
            if self.stage.checkpointable:
                where = "nothing saved yet" if now is None else f"progress still {now}"
                raise ShardInterrupted(
                    f"timed out after {minutes} min without progress since it started ({where}): "
                    f"raise cluster.stages.{stage_name}.timeout_min"
                )
            raise ShardInterrupted(f"timed out after {minutes} min: raise cluster.stages.{stage_name}.timeout_min")

        def wait_for_save(signum, frame):
            """The stage saves at its next safe point and then ends ``run`` (SavedForPreemption):
            requeue then, or after the bound without the save (the preemptor kills after its grace
            period; signal_delay_s is the time the user gave a job to save before a kill)."""
            bound = max(10, int(self.signal_delay_s) - 30)
            asked = time.time()
            log.warning("== %s %s: the stage saves at its next safe point; waiting at most %d s", stage_name,
                        self.shard.key, bound)

            def saved():
                signal.alarm(0)
                log.warning("== %s %s: saved %.0f s after the preemption signal", stage_name, self.shard.key,
                            time.time() - asked)
                return requeue(signum, None, self._progress() if has_progress else None)

            def gave_up(s, f):
                now = self._progress() if has_progress else None
                last = "nothing saved yet" if now is None else f"progress {now}"
                log.warning("== %s %s: no safe point to save at within %d s of the preemption signal: "
                            "requeueing without the save (the next run resumes from the last one: %s)",
                            stage_name, self.shard.key, bound, last)
                return requeue(s, f, now)

            self._requeue_after_save = saved
            signal.signal(signal.SIGALRM, gave_up)
            signal.alarm(bound)
            return None

        signal.signal(sig, lambda s, f: decide(s, f, final=False))

        def undo():
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous_alarm)
            signal.signal(sig, previous)

        return undo


_DECIDE_BEFORE_S = 8.0  # how long before the limit a deferred time-limit decision is taken
# Slurm sends the time-limit signal up to a minute before the asked time (its timer's resolution);
# a signal with more than signal_delay_s + this left is not the time limit's
_SLURM_SIGNAL_SLACK_S = 90.0


def _job_start(fallback: float) -> float:
    """When this run of the Slurm job started (scontrol), else a bit before ``fallback``."""
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        import subprocess
        from datetime import datetime

        try:
            out = subprocess.run(["scontrol", "show", "job", job, "-o"], capture_output=True, text=True,
                                 timeout=10).stdout
            stamp = next(f.split("=", 1)[1] for f in out.split() if f.startswith("StartTime="))
            return datetime.fromisoformat(stamp).timestamp()
        except (OSError, subprocess.SubprocessError, StopIteration, ValueError):
            pass
    return fallback - 10.0


class CheckpointableShardTask(ShardTask, submitit.helpers.Checkpointable):
    """On the time-limit signal with progress made (or a preemption signal), submitit calls
    ``checkpoint`` and requeues the job with the same callable; the stage resumes from the
    checkpoints it wrote itself."""

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        log.warning("== %s %s: stopped before its end, requeueing", self.stage.name, self.shard.key)
        return submitit.helpers.DelayedSubmission(self)
