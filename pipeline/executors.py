"""Submitting a step's shards through submitit, adopting jobs that already run, and waiting.

- ``debug``: in-process, one shard after another (submitit's DebugExecutor); for stepping
  through a stage with a debugger.
- ``local``: one process group per shard on this machine (submitit's LocalExecutor, its
  controller started in a session of its own so it survives the launcher and the terminal), at
  most ``array_parallelism`` at once.
- ``slurm``: one sbatch job array per step (split into several arrays when the step has more
  shards than ``max_array_size``), throttled by ``array_parallelism``; a multi-task step (training)
  is one job of nodes x tasks_per_node tasks.

Adoption, never duplication: every submission is recorded (shard -> job id) before anything waits
on it (``StateStore.record_jobs``). A launch first asks the scheduler about the recorded job of
every incomplete shard (one squeue/sacct call; process liveness for local jobs): live jobs are
waited for, only dead ones are submitted again. The shard lease (``pipeline.lease``) covers the
rest: a job that starts on a shard another live job holds exits, and the waiting launcher follows
the holder.

Waiting reads the shards' markers (one directory listing per poll) and asks the scheduler every
``cluster.scheduler_poll_s`` about jobs that ended without a marker (their reason comes from sacct:
killed by a signal, time limit, out of memory, ...) and about pending reasons; a reason that
cannot clear by itself (``scheduler.FATAL_PENDING``) fails the shards after
``cluster.fatal_pending_after_s``. Progress: a bar in a terminal, timestamped lines in a log.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shlex
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import submitit

from pipeline import procs
from pipeline.config import PROJECT_ROOT, signal_delay_s
from pipeline.errors import StageFailed
from pipeline.lease import MALFORMED, holder_alive, holders_alive
from pipeline.scheduler import JobInfo, LocalScheduler, SchedulerError, SlurmScheduler, fatal_pending, sbatch_error_line
from pipeline.state import StateStore, scope_name
from pipeline.worker import CheckpointableShardTask, ShardTask

# how long a job may be gone from squeue without an accounting record before it is reported
ACCOUNTING_GRACE_S = 20.0
# scheduler polls a job may be unknown to squeue while sacct says it is pending or running before
# it counts as lost (sacct records an end a moment after it happens)
LOST_AFTER_POLLS = 3
# times one shard's job may be lost and submitted again within one launch
LOST_RESUBMITS = 3
# a held job of ours whose launch failed on a node is released this many times, then fails
HELD_RELEASES = 1
# seconds between two lines saying the scheduler still does not answer
SILENCE_LINE_S = 600.0
# how long a launch retries asking the scheduler about an earlier launch's jobs (a controller
# restarting) before it fails with one line
ADOPT_RETRY_S = 300.0
_INTERRUPTS = tuple(s for s in (getattr(signal, n, None) for n in ("SIGINT", "SIGTERM", "SIGHUP")) if s)


def workdir_tag(workdir: Path) -> str:
    """A short tag of the work dir in every Slurm job name: `launch.py cancel` can find this work
    dir's jobs even if one was never recorded."""
    return hashlib.sha1(str(Path(workdir).resolve()).encode()).hexdigest()[:6]


def job_name(step, workdir: Path) -> str:
    scope = "once" if step.iteration is None else f"it{step.iteration}"
    return f"{step.stage.name}-{scope}-{workdir_tag(workdir)}"


class SessionLocalExecutor(submitit.LocalExecutor):
    """submitit's local executor whose job controller leads a session of its own, so it outlives
    the launcher, its terminal (SIGHUP to the foreground process group) and a Ctrl-C, as a Slurm
    job would; ``cancel`` stops a job by signalling its process group.

    ``_submit_command`` is the method by which every submitit executor starts a job. submitit's
    local one starts the controller (``python -m submitit.local._local FOLDER``, configured by
    ``SUBMITIT_LOCAL_*`` variables) with a plain Popen and no parameter for its session; this one
    starts the same controller with the same environment in a new session. The job it returns
    is submitit's ``LocalJob`` (results, polling, cancel) as before. A submitit that changes what
    its controller reads fails every local job loudly (tests/engine), never silently; one whose
    ``start_controller`` takes other settings than those set here is refused before any job
    starts (``_check_controller``)."""

    CONTROLLER_SETTINGS = ("folder", "command", "tasks_per_node", "cuda_devices", "timeout_min", "signal_delay_s",
                           "stderr_to_stdout", "setup")

    def _submit_command(self, command: str):
        from submitit.local.local import LocalJob

        self._check_controller()

        ntasks = int(self.parameters.get("tasks_per_node", 1))
        n_gpus = int(self.parameters.get("gpus_per_node", 0))
        visible = self.parameters.get("visible_gpus", ())
        gpus = visible[:n_gpus] if visible else range(n_gpus)
        setup = list(self.parameters.get("setup", ()))
        env = dict(os.environ)
        env.update(
            SUBMITIT_EXECUTOR="local",
            SUBMITIT_LOCAL_COMMAND=command,
            SUBMITIT_LOCAL_NTASKS=str(ntasks),
            SUBMITIT_LOCAL_NODEID="0",
            SUBMITIT_LOCAL_JOB_NUM_NODES="1",
            SUBMITIT_LOCAL_TIMEOUT_S=str(int(60 * float(self.parameters.get("timeout_min", 2.0)))),
            SUBMITIT_LOCAL_SIGNAL_DELAY_S=str(int(self.parameters.get("signal_delay_s", 30))),
            SUBMITIT_STDERR_TO_STDOUT="1" if self.parameters.get("stderr_to_stdout", False) else "",
            SUBMITIT_LOCAL_WITH_SHELL="1" if setup else "",
            CUDA_VISIBLE_DEVICES=",".join(str(g) for g in gpus),
        )
        controller = [sys.executable, "-m", "submitit.local._local", str(self.folder)]
        cmd = " && ".join(setup + [shlex.join(controller)]) if setup else controller
        process = subprocess.Popen(cmd, shell=bool(setup), env=env, start_new_session=True)
        return LocalJob(folder=self.folder, job_id=str(process.pid), process=process, tasks=list(range(ntasks)))

    @classmethod
    def _check_controller(cls) -> None:
        import inspect

        from submitit.local import local

        got = tuple(inspect.signature(local.start_controller).parameters)
        if got != cls.CONTROLLER_SETTINGS:
            raise StageFailed(f"submitit {submitit.__version__}: its local job controller takes {', '.join(got)}, "
                              f"this pipeline starts it with {', '.join(cls.CONTROLLER_SETTINGS)}: pin submitit "
                              "to a version whose controller takes these (1.5.4 does)")


def make_executor(cluster, folder: Path, step, workdir: Optional[Path] = None) -> submitit.Executor:
    res = step.resources
    kind = cluster.executor
    delay = signal_delay_s(cluster, res.timeout_min)
    export_project_path()
    if kind == "debug":
        return submitit.DebugExecutor(folder)
    if kind == "local":
        ex = SessionLocalExecutor(folder, max_num_timeout=int(cluster.max_requeues))
        ex.update_parameters(
            timeout_min=res.timeout_min,
            tasks_per_node=res.tasks_per_node,
            nodes=1,
            gpus_per_node=res.gpus_per_task * res.tasks_per_node,
            signal_delay_s=delay,
        )
        return ex
    ex = submitit.AutoExecutor(folder, cluster="slurm", slurm_max_num_timeout=int(cluster.max_requeues))
    params = dict(
        name=job_name(step, workdir or step.ctx.workdir),
        timeout_min=res.timeout_min,
        cpus_per_task=res.cpus_per_task,
        nodes=res.nodes,
        tasks_per_node=res.tasks_per_node,
        slurm_array_parallelism=int(cluster.array_parallelism),
        slurm_signal_delay_s=delay,
    )
    params.update(slurm_params(cluster, res.partition, res.mem_gb, res.gpus_per_task * res.tasks_per_node))
    ex.update_parameters(**params)
    return ex


def slurm_params(cluster, partition: Optional[str], mem_gb: float, gpus_per_node: int) -> dict:
    """The submitit parameters every Slurm job of this cluster config gets."""
    params: dict[str, Any] = {}
    if mem_gb:
        params["mem_gb"] = mem_gb
    if gpus_per_node:
        params["gpus_per_node"] = gpus_per_node
    if partition:
        params["slurm_partition"] = partition
    if cluster.account:
        params["slurm_account"] = cluster.account
    if cluster.qos:
        params["slurm_qos"] = cluster.qos
    if cluster.setup:
        params["slurm_setup"] = list(cluster.setup)
    extra = dict(cluster.slurm_additional_parameters or {})
    if extra:
        params["slurm_additional_parameters"] = extra
    return params


def export_project_path() -> None:
    # workers (local processes, Slurm jobs) unpickle stage objects by module name: the project
    # root must be importable there whatever their working directory
    root = str(PROJECT_ROOT)
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([root, *parts])


def make_task(step, shard, in_process: bool, cluster=None):
    cls = CheckpointableShardTask if step.stage.checkpointable else ShardTask
    kind = cluster.executor if cluster is not None else ("debug" if in_process else "local")
    timeout = step.resources.timeout_min
    return cls(stage=step.stage, ctx=step.ctx, shard=shard, in_process=in_process, executor=kind,
               timeout_min=timeout, signal_delay_s=signal_delay_s(cluster, timeout) if cluster is not None else 90)


@contextlib.contextmanager
def signals_deferred():
    """Hold SIGINT/SIGTERM/SIGHUP while a submission and its record are written: an interrupt
    between sbatch and the record would leave a job no later launch knows about."""
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, _INTERRUPTS)
    except (AttributeError, ValueError, OSError):  # not the main thread / platform
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@dataclass
class Tracked:
    """A shard the launcher waits for, and the job that runs it."""

    shard: Any
    job_id: str
    record: dict
    popen: Any = None  # a local controller this process started (reaped here)
    adopted: bool = False
    ended_at: Optional[float] = None
    fatal_since: Optional[float] = None
    foreign_holder: Optional[dict] = None  # a live job of another executor holds the shard
    lost_polls: int = 0  # consecutive scheduler answers that did not know the job
    resubmits: int = 0  # times the shard was submitted again after its job was lost
    releases: int = 0  # times its job was released after being held on a failed launch
    held_said: str = ""  # the hold last reported (one line per job and reason)
    blocked_since: Optional[float] = None  # pending until someone acts (held, nodes drained) since


class SubmissionRejected(StageFailed):
    """sbatch refused the submission."""


def make_scheduler(cluster):
    return SlurmScheduler() if cluster.executor == "slurm" else LocalScheduler()


def query(scheduler, tracked: list, name: Optional[str] = None) -> dict[str, JobInfo]:
    """What the scheduler says about the tracked jobs. A live Slurm job whose name is not the
    step's ``name`` is not ours: its id was handed out again (a controller restarted from older
    state forgot our job), so ours is ``LOST``."""
    if isinstance(scheduler, SlurmScheduler):
        infos = scheduler.query([t.job_id for t in tracked])
        for job, info in infos.items():
            if name and info.alive and info.name and info.name != name:
                infos[job] = JobInfo(job, "LOST", f"its job id now belongs to another job, {info.name!r}")
        return infos
    return scheduler.query_records({t.job_id: t.record for t in tracked})


def run_shards(cluster, store: StateStore, step, todo: list, echo: Callable[[str], None] = print,
               while_waiting: Optional[Callable[[], None]] = None) -> list:
    """Run ``todo`` shards of ``step`` (adopting live recorded jobs); return [(shard key, log
    path, error line)] of the failures. ``while_waiting`` is called at every look while the jobs
    run."""
    folder = store.submitit_dir(step.stage.name, step.iteration)
    if cluster.executor == "debug":
        echo(f"[{step.name}] submitting {len(todo)}/{len(step.shards or todo)} shard(s) with the debug executor")
        for s in todo:
            store.clear_shard(step.stage.name, step.iteration, s.key)
        folder.mkdir(parents=True, exist_ok=True)
        return _run_debug(make_executor(cluster, folder, step), store, step, todo)
    scheduler = make_scheduler(cluster)
    adopted, to_submit = adopt(cluster, store, step, todo, scheduler, echo)
    for s in to_submit:
        store.clear_shard(step.stage.name, step.iteration, s.key)
    if to_submit:
        echo(f"[{step.name}] submitting {len(to_submit)}/{len(step.shards or todo)} shard(s) with the "
             f"{cluster.executor} executor")
    waiter = Waiter(cluster, store, step, scheduler, echo, adopted, while_waiting)
    if to_submit:
        folder.mkdir(parents=True, exist_ok=True)
        executor = make_executor(cluster, folder, step, store.workdir)
        if cluster.executor == "local":
            waiter.queue = list(to_submit)
            waiter.local_executor, waiter.folder = executor, folder
        else:
            waiter.tracked += submit_slurm(executor, folder, store, step, to_submit, cluster, echo)
    return waiter.wait()


def adopt(cluster, store: StateStore, step, todo: list, scheduler, echo) -> tuple[list, list]:
    """Split ``todo`` into shards whose recorded (or lease-holding) job still lives — waited for,
    never submitted again — and shards to submit."""
    name, it = step.stage.name, step.iteration
    records = store.job_records(name, it)
    leases = store.markers(name, it)["lease"]
    candidates: dict[str, Tracked] = {}
    for s in todo:
        rec = records.get(s.key)
        if rec and rec.get("executor") == cluster.executor:
            candidates[s.key] = Tracked(s, str(rec["job_id"]), rec, adopted=True)
    if not candidates and not leases:
        return [], list(todo)
    deadline = time.time() + ADOPT_RETRY_S
    while True:
        try:
            infos = query(scheduler, list(candidates.values()), job_name(step, store.workdir))
            break
        except SchedulerError as e:
            if time.time() >= deadline:
                raise StageFailed(f"{step.name}: cannot ask the scheduler about the jobs of an earlier launch for "
                                  f"{ADOPT_RETRY_S:.0f} s ({e}): rerun the same command once `squeue` answers") from None
            time.sleep(min(15.0, float(cluster.scheduler_poll_s)))
    adopted, to_submit, holders = [], [], {}
    for s in todo:
        t = candidates.get(s.key)
        info = infos.get(t.job_id) if t else None
        if info is not None and (info.alive or info.state == "UNKNOWN"):
            if info.state == "UNKNOWN":
                raise StageFailed(f"{step.name}: shard {s.key} runs as a local job of host {t.record.get('host')} "
                                  f"(pid {t.record.get('pid')}): relaunch on that host, or stop it there with "
                                  f"`launch.py cancel`")
            adopted.append(t)
            continue
        if info is not None and info.lost:
            echo(f"[{step.name}] shard {s.key}: job {t.job_id} of an earlier launch was lost by the scheduler "
                 f"({info.reason}): submitting it again unless a live job holds the shard")
        holder = store.lease(name, it, s.key).holder() if s.key in leases else None
        if holder and holder is not MALFORMED:
            if t is not None and str(holder.get("job_id")) == t.job_id:
                store.lease(name, it, s.key).break_if_held_by(t.job_id)  # its job is over
            else:
                holders[s.key] = holder  # a job that took the shard but was never recorded?
                continue
        to_submit.append(s)
    # holders of leases nobody recorded (a launcher killed right after sbatch): one scheduler call
    alive = _holders_alive(holders)
    for key, is_alive in alive.items():
        if is_alive is None:
            h = holders[key]
            raise StageFailed(f"{step.name}: shard {key} is held by job {h.get('job_id')} of host {h.get('host')} "
                              f"(pid {h.get('pid')}), which cannot be checked from here: relaunch on that host, or "
                              f"remove {store.lease(name, it, key).path} if that job is gone")
    adopted += [Tracked(s, str(holders[s.key]["job_id"]), _record_of_holder(holders[s.key]), adopted=True)
                for s in todo if alive.get(s.key)]
    submit = {s.key for s in to_submit} | {k for k in holders if not alive.get(k)}
    to_submit = [s for s in todo if s.key in submit]
    if adopted:
        ids = _summarize_ids([t.job_id for t in adopted])
        echo(f"[{step.name}] adopting {len(adopted)} running job(s) of an earlier launch ({ids}); "
             f"they are waited for, not submitted again")
    return adopted, to_submit


def _holders_alive(holders: dict) -> dict:
    """{shard key: alive?} of lease holders (``lease.holders_alive``, one scheduler call); a Slurm
    job whose scheduler does not answer counts as alive: no second writer is started for it."""
    return {key: (True if live.alive is None and holders[key].get("executor") == "slurm" else live.alive)
            for key, live in holders_alive(holders).items()}


def _record_of_holder(holder: dict) -> dict:
    rec = {k: holder.get(k) for k in ("executor", "job_id", "host", "pid", "start", "boot")}
    return rec


def _summarize_ids(ids: list, limit: int = 6) -> str:
    ids = sorted(ids)
    text = ", ".join(ids[:limit])
    return text + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def submit_slurm(executor, folder: Path, store: StateStore, step, shards: list, cluster, echo) -> list:
    tracked = []
    size = int(cluster.max_array_size)
    for start in range(0, len(shards), size):
        chunk = shards[start : start + size]
        with signals_deferred():
            try:
                with contextlib.redirect_stderr(io.StringIO()), executor.batch():
                    jobs = [executor.submit(make_task(step, s, False, cluster)) for s in chunk]
            except (submitit.core.utils.FailedJobError, submitit.core.utils.FailedSubmissionError,
                    subprocess.SubprocessError) as e:
                raise SubmissionRejected(
                    f"{step.name}: sbatch rejected the job array: {sbatch_error_line(str(e))} "
                    f"(cluster {cluster.name}, partition {step.resources.partition or 'default'})"
                ) from None
            entries = {s.key: {"job_id": str(j.job_id)} for s, j in zip(chunk, jobs)}
            store.record_jobs(step.stage.name, step.iteration, "slurm", folder, entries)
        first = str(jobs[0].job_id).split("_")[0]
        echo(f"[{step.name}] submitted {'array ' if len(chunk) > 1 else 'job '}{first} ({len(chunk)} task(s))")
        tracked += [Tracked(s, str(j.job_id), {"executor": "slurm", **entries[s.key]}) for s, j in zip(chunk, jobs)]
    return tracked


def _run_debug(executor, store, step, todo) -> list:
    failures = []
    bar = _progress_bar(step, len(todo))
    for shard in todo:
        job = executor.submit(make_task(step, shard, True))
        try:
            job.result()
        except Exception as e:  # recorded by the worker; keep going with the other shards
            marker = store.read_failed(step.stage.name, step.iteration, shard.key) or {}
            failures.append((shard.key, marker.get("log", str(store.log_path(step.stage.name, step.iteration, shard.key))),
                             marker.get("error") or f"{type(e).__name__}: {e}"))
        bar.update(1)
    bar.close()
    return failures


class Waiter:
    """Waits for a step's jobs: submits queued local shards as room frees up, collects results
    from the markers, asks the scheduler about the rest, prints progress."""

    def __init__(self, cluster, store: StateStore, step, scheduler, echo, tracked: list,
                 while_waiting: Optional[Callable[[], None]] = None):
        self.cluster, self.store, self.step, self.scheduler, self.echo = cluster, store, step, scheduler, echo
        self.while_waiting = while_waiting
        self.tracked: list[Tracked] = list(tracked)
        self.queue: list = []
        self.local_executor = None
        self.folder: Optional[Path] = None
        self.failures: list = []
        self.infos: dict[str, JobInfo] = {}
        self.last_query = 0.0
        self.scheduler_errors = 0
        self.executor = None  # a Slurm executor for shards submitted again (made on first use)
        self.silent_since: Optional[float] = None  # the scheduler has not answered since
        self.silence_said = 0.0

    # --- local submissions -----------------------------------------------------------------------
    def _submit_local(self) -> None:
        parallelism = int(self.cluster.array_parallelism)
        while self.queue and len(self.tracked) < parallelism:
            shard = self.queue.pop(0)
            with signals_deferred():
                job = self.local_executor.submit(make_task(self.step, shard, False, self.cluster))
                popen = getattr(job, "_process", None)
                rec = {"job_id": str(job.job_id), **procs.identity(int(job.job_id))}
                self.store.record_jobs(self.step.stage.name, self.step.iteration, "local", self.folder, {shard.key: rec})
            self.tracked.append(Tracked(shard, str(job.job_id), {"executor": "local", **rec}, popen=popen))
            self.last_query = 0.0  # ask about it at once

    # --- the loop --------------------------------------------------------------------------------
    def wait(self) -> list:
        total = len(self.tracked) + len(self.queue)
        progress = Progress(self.step.name, total, self.echo, float(self.cluster.progress_interval_s))
        poll = float(self.cluster.poll_interval_s)
        every = poll if self.cluster.executor == "local" else max(poll, float(self.cluster.scheduler_poll_s))
        done = 0
        try:
            while self.tracked or self.queue:
                if self.queue:
                    self._submit_local()
                now = time.time()
                if now - self.last_query >= every:
                    self._query()
                    self.last_query = now
                # markers are read after the scheduler was asked: a job seen gone before this
                # listing and without a marker in it really ended without one
                markers = self.store.markers(self.step.stage.name, self.step.iteration)
                still, lost = [], []
                for t in self.tracked:
                    if t.popen is not None:
                        t.popen.poll()  # reap our own finished controllers
                    outcome = self._outcome(t, markers, now)
                    if outcome is None:
                        still.append(t)
                    elif outcome == "done":
                        done += 1
                    elif outcome == "lost":
                        lost.append(t)
                    else:
                        self.failures.append(outcome)
                self.tracked = still
                if lost:
                    self._resubmit_lost(lost)
                self._fail_unschedulable(now)
                self._handle_held(now)
                progress.show(done, self._counts(), len(self.failures), len(self.queue))
                if self.while_waiting is not None and (self.tracked or self.queue):
                    self.while_waiting()
                if self.tracked or self.queue:
                    time.sleep(poll)
        finally:
            progress.close(done, len(self.failures))
        return self.failures

    def _query(self) -> None:
        if not self.tracked:
            return
        try:
            self.infos = query(self.scheduler, self.tracked, job_name(self.step, self.store.workdir))
            self.scheduler_errors, self.silent_since = 0, None
            for t in self.tracked:
                info = self.infos.get(t.job_id)
                t.lost_polls = t.lost_polls + 1 if info is not None and info.lost else 0
        except SchedulerError as e:  # slurmctld restarting, a slow sacct: try again next time
            self.scheduler_errors += 1
            now = time.time()
            self.silent_since = self.silent_since or now
            silent, bound = now - self.silent_since, float(self.cluster.blocked_pending_after_s)
            if silent >= bound:
                raise StageFailed(
                    f"{self.step.name}: the scheduler has not answered for {silent / 60:.0f} min ({e}); the "
                    f"submitted jobs keep running: rerun the same command once `squeue` answers (it adopts them)"
                ) from None
            if self.scheduler_errors == 3 or now - self.silence_said >= SILENCE_LINE_S:
                self.silence_said = now
                self.echo(f"[{self.step.name}] warning: the scheduler has not answered for {silent:.0f} s ({e}); "
                          f"still waiting (at most {bound:.0f} s, cluster.blocked_pending_after_s)")

    def _counts(self) -> dict:
        running, reasons = 0, Counter()
        for t in self.tracked:
            info = self.infos.get(t.job_id)
            if info is not None and info.pending:
                reasons[info.reason or "no reason given"] += 1
            elif info is not None and info.lost:
                reasons["lost by the scheduler"] += 1
            else:
                running += 1
        return {"running": running, "pending": reasons}

    def _outcome(self, t: Tracked, markers: dict, now: float):
        """None while the shard's job runs; 'done'; or a failure (key, log, error line)."""
        name, it, key = self.step.stage.name, self.step.iteration, t.shard.key
        if key in markers["done"]:
            if not self.step.stage.multi_task:
                return "done"
            # a multi-task job: rank 0 recorded the shard; done once the other ranks ended too
            info = self.infos.get(t.job_id)
            if info is not None and not info.alive:
                return "done"
            self.last_query = 0.0
            return None
        if key in markers["failed"]:
            marker = self.store.read_failed(name, it, key) or {}
            return key, marker.get("log", str(self.store.log_path(name, it, key))), marker.get("error", "failed")
        info = self.infos.get(t.job_id)
        if info is None or info.alive:
            return None
        if info.lost and t.lost_polls < LOST_AFTER_POLLS:
            self.last_query = 0.0  # ask again at once: a few answers, not a few minutes
            return None
        if self._follow_lease(t):
            return None
        if info.lost and t.resubmits < LOST_RESUBMITS:
            # the lost job's own process may still run on a node the controller has not yet
            # cleaned: its lease says so (its pid on this host); never start a second writer
            holder = self.store.lease(name, it, key).holder()
            if holder and holder is not MALFORMED and holder_alive(holder):
                return None
            return "lost"
        if info.state == "ENDED" and self.cluster.executor == "slurm":
            t.ended_at = t.ended_at or now
            if now - t.ended_at < ACCOUNTING_GRACE_S:
                self.last_query = 0.0  # sacct writes a moment after the end
                return None
        return self._failure_without_marker(t, info)

    def _follow_lease(self, t: Tracked) -> bool:
        """A job that found its shard held by another live job stepped back: wait for that one."""
        holder = self.store.lease(self.step.stage.name, self.step.iteration, t.shard.key).holder()
        if not holder or holder is MALFORMED or str(holder.get("job_id")) == t.job_id:
            return False
        if not holder_alive(holder):
            return False
        if holder.get("executor") not in (self.cluster.executor, None):
            # a live job of another executor (an earlier launch with another cluster config)
            t.foreign_holder = holder
            return False
        self.echo(f"[{self.step.name}] shard {t.shard.key}: job {t.job_id} stepped back for job "
                  f"{holder.get('job_id')}, which holds the shard; waiting for that one")
        t.job_id, t.record, t.popen, t.ended_at = str(holder["job_id"]), _record_of_holder(holder), None, None
        self.last_query = 0.0
        return True

    def _failure_without_marker(self, t: Tracked, info: JobInfo) -> tuple:
        name, it, key = self.step.stage.name, self.step.iteration, t.shard.key
        if t.foreign_holder is not None:
            h = t.foreign_holder
            why = (f"the shard is held by the live {h.get('executor')} job {h.get('job_id')} of an earlier launch: "
                   f"wait for it, or stop it with `launch.py cancel`")
        elif self.cluster.executor == "local":
            why = "its process ended without recording a result (killed, e.g. by SIGKILL or the out-of-memory killer)"
        else:
            why = info.describe()
            if info.state == "TIMEOUT":
                why += f": raise cluster.stages.{name}.timeout_min"
            elif info.state == "OUT_OF_MEMORY":
                why += f": raise cluster.stages.{name}.mem_gb"
        why = f"job {t.job_id}: {why}" + disk_hint(self.store.workdir)
        log = self.store.log_path(name, it, key)
        try:
            # a job that ended without a result failed as a job (killed, out of memory, time limit,
            # a full disk), never because of an input item: the shard runs again
            self.store.mark_failed(name, it, key, why, log,
                                   {"job_id": t.job_id, "scheduler_state": info.state, "infrastructure": True})
        except OSError:  # the disk is full: the failure is still reported by this launch
            pass
        return key, str(log), why

    def _resubmit_lost(self, lost: list) -> None:
        """Submit again the shards whose job the scheduler lost (no marker, no live lease holder),
        one line each naming the job and why."""
        name, it = self.step.stage.name, self.step.iteration
        for t in lost:
            info = self.infos[t.job_id]
            self.echo(f"[{self.step.name}] shard {t.shard.key}: job {t.job_id} was lost by the scheduler "
                      f"({info.reason}) and no live job holds the shard: submitting it again")
            self.store.clear_shard(name, it, t.shard.key)
        if self.executor is None:
            self.folder = self.folder or self.store.submitit_dir(name, it)
            self.folder.mkdir(parents=True, exist_ok=True)
            self.executor = make_executor(self.cluster, self.folder, self.step, self.store.workdir)
        again = submit_slurm(self.executor, self.folder, self.store, self.step, [t.shard for t in lost],
                             self.cluster, self.echo)
        for old, new in zip(lost, again):
            new.resubmits = old.resubmits + 1
        self.tracked += again
        self.last_query = 0.0

    def _handle_held(self, now: float) -> None:
        """A blocked job (held, its nodes drained or down) is said once, with its reason and the
        command that lets it go on. Ours held after a failed launch is released ``HELD_RELEASES``
        times; held again, its shard fails (cancelled). Any other blocked job fails its shard after
        ``cluster.blocked_pending_after_s``."""
        failed, expired = [], []
        bound = float(self.cluster.blocked_pending_after_s)
        for t in self.tracked:
            info = self.infos.get(t.job_id)
            if info is None or not info.blocked:
                t.held_said, t.blocked_since = "", None
                continue
            t.blocked_since = t.blocked_since or now
            if not info.launch_failed and now - t.blocked_since >= bound:
                expired.append((t, info))
                continue
            if info.launch_failed and t.releases < HELD_RELEASES:
                try:
                    self.scheduler.release([t.job_id])
                except SchedulerError as e:
                    self.echo(f"[{self.step.name}] shard {t.shard.key}: job {t.job_id} is held ({info.reason}) "
                              f"and releasing it failed ({e}); trying again at the next poll")
                    continue
                t.releases += 1
                t.held_said = ""
                self.infos.pop(t.job_id, None)  # its state changed: ask again
                self.last_query = 0.0
                self.echo(f"[{self.step.name}] shard {t.shard.key}: job {t.job_id} was held by the scheduler "
                          f"({info.reason}); released it (`scontrol release {t.job_id}`)")
            elif info.launch_failed:
                failed.append((t, info))
            elif t.held_said != info.reason:
                t.held_said = info.reason
                self.echo(f"[{self.step.name}] shard {t.shard.key}: job {t.job_id} is {info.describe()}; "
                          f"the step waits for it (at most {bound:.0f} s, cluster.blocked_pending_after_s)")
        if failed:
            self._give_up(failed, lambda t, info: (
                f"job {t.job_id} was held again after its launch failed ({info.reason}) and it had been released "
                f"{t.releases} time(s); cancelled: `sinfo -R` says why its node refused it"), "held_reason")
        if expired:
            self._give_up(expired, lambda t, info: (
                f"job {t.job_id} was {info.describe()} for {bound:.0f} s (cluster.blocked_pending_after_s); "
                f"cancelled: rerun the same command once it can start"), "pending_reason")

    def _fail_unschedulable(self, now: float) -> None:
        """Jobs pending for a reason that cannot clear fail their shards (and are cancelled)."""
        stuck = []
        for t in self.tracked:
            info = self.infos.get(t.job_id)
            if info is not None and info.pending and fatal_pending(info.reason):
                t.fatal_since = t.fatal_since or now
                if now - t.fatal_since >= float(self.cluster.fatal_pending_after_s):
                    stuck.append((t, info.reason))
            else:
                t.fatal_since = None
        if stuck:
            self._give_up(stuck, lambda t, reason: (
                f"job {t.job_id} cannot start: pending for reason {reason} ({explain_pending(reason)}); cancelled"),
                "pending_reason")

    def _give_up(self, stuck: list, why_of: Callable, field: str) -> None:
        """Cancel the jobs of [(tracked, reason)] and fail their shards (infrastructure failures:
        a rerun submits them again)."""
        with contextlib.suppress(SchedulerError):
            self.scheduler.cancel([t.job_id for t, _ in stuck])
        gone = {id(t) for t, _ in stuck}
        self.tracked = [t for t in self.tracked if id(t) not in gone]
        name, it = self.step.stage.name, self.step.iteration
        for t, reason in stuck:
            why = why_of(t, reason)
            log = self.store.log_path(name, it, t.shard.key)
            with contextlib.suppress(OSError):
                self.store.mark_failed(name, it, t.shard.key, why, log,
                                       {"job_id": t.job_id, field: str(getattr(reason, "reason", reason)),
                                        "infrastructure": True})
            self.failures.append((t.shard.key, str(log), why))


def explain_pending(reason: str) -> str:
    known = {
        "PartitionConfig": "the request exceeds what the partition's nodes offer: CPUs, memory or GPUs",
        "PartitionNodeLimit": "more nodes than the partition has or allows",
        "PartitionTimeLimit": "a time limit above the partition's MaxTime",
        "InvalidAccount": "cluster.account is not valid on this cluster",
        "InvalidQOS": "cluster.qos is not valid on this cluster",
        "BadConstraints": "the constraints (slurm_additional_parameters) match no node",
        "DependencyNeverSatisfied": "it depends on a job that failed",
    }
    if reason in known:
        return known[reason]
    if "Minutes" in reason:
        return "the account's compute-time budget is used up"
    return "it cannot clear by itself"


def disk_hint(workdir: Path) -> str:
    """'; disk full on the work dir (filesystem ...: 0 B free)' when it is, else ''."""
    from pipeline.disk import free_line, is_full

    return f"; disk full on the work dir ({free_line(workdir)})" if is_full(workdir) else ""


class Progress:
    """A bar per step in a terminal; in a log (the driver's, CI's) a timestamped line every
    ``interval`` seconds and when the step ends, so a long wait is never silent."""

    def __init__(self, name: str, total: int, echo, interval: float):
        self.name, self.total, self.echo, self.interval = name, total, echo, interval
        self.started = self.last = time.time()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=name, unit="shard", leave=True)

    def _line(self, done: int, counts: dict, failed: int, queued: int) -> str:
        pending = counts["pending"]
        n_pending = sum(pending.values()) + queued
        reasons = ", ".join(f"{r} {n}" if len(pending) > 1 else r for r, n in pending.most_common(3))
        return (f"{done}/{self.total} done, {counts['running']} running, {n_pending} pending"
                + (f" ({reasons})" if reasons else "") + f", {failed} failed")

    def show(self, done: int, counts: dict, failed: int, queued: int) -> None:
        if self.bar is not None:
            self.bar.n = done + failed
            self.bar.set_postfix_str(self._line(done, counts, failed, queued), refresh=True)
            return
        now = time.time()
        if now - self.last >= self.interval:
            self.last = now
            self.echo(f"{time.strftime('%Y-%m-%d %H:%M:%S')} [{self.name}] {self._line(done, counts, failed, queued)}")

    def close(self, done: int, failed: int) -> None:
        if self.bar is not None:
            self.bar.n = done + failed
            self.bar.close()


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _progress_bar(step, total: int):
    if not sys.stderr.isatty():
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=step.name, unit="shard", leave=True)


__all__ = ["run_shards", "make_executor", "make_task", "workdir_tag", "job_name", "scope_name"]
