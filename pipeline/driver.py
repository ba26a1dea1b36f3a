"""Who drives the DAG: the launcher in a terminal, or a detached driver that does not depend on it.

- Foreground: the launch holds the work dir lock; SIGHUP (SSH logout), SIGTERM and SIGINT end it
  with one line: the submitted jobs keep running, the same command resumes (it adopts them),
  ``launch.py cancel`` stops them. Local jobs run in sessions of their own, so they survive too.
- ``--detach`` with the local executor: the same launch as a background process in a new session
  (no terminal, stdin from /dev/null, output appended to ``.pipeline/driver/driver.log``).
- ``--detach`` with Slurm: a driver job (``cluster.driver``: 1 CPU, its own partition, time and
  memory) submitted through submitit. At its time limit (signal ahead of it) or on preemption it
  is requeued; the new run takes over its own lock and resumes the DAG where it stopped, adopting
  the jobs that still run.
- ``launch.py cancel``: stops the driver (or a foreground launch of this host), then cancels every
  job recorded for the work dir (plus any live Slurm job carrying the work dir's tag in its name),
  and waits until none runs. State stays consistent: nothing is marked done that is not, and the
  next launch resumes.

The driver's record, ``.pipeline/driver.json``: kind, job id or pid (with its start time), log,
state and since when; ``status`` shows it.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import importlib.util
import io
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import submitit

from pipeline import atomic, procs
from pipeline.config import driver_request, signal_delay_s, to_yaml
from pipeline.errors import ConfigError, PipelineError
from pipeline.estimate import check_plan_disk
from pipeline.executors import export_project_path, signals_deferred, slurm_params, workdir_tag
from pipeline.lease import holder_alive, holders_alive
from pipeline.lock import HANDOVER_ENV, WorkdirLock, describe_owner, lock_holder
from pipeline.scheduler import LocalScheduler, RequestChecker, SchedulerError, SlurmScheduler, sbatch_error_line
from pipeline.state import StateStore, _read

SIGNALS = tuple(s for s in (getattr(signal, n, None) for n in ("SIGHUP", "SIGTERM", "SIGINT")) if s)


class Interrupted(BaseException):
    """A signal ended the launch (raised in the main thread by the handlers below)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


@contextlib.contextmanager
def interrupts_raise():
    """SIGHUP, SIGTERM and SIGINT raise ``Interrupted`` in the main thread (the lock is then
    released by its context manager and one line is printed)."""

    def handler(signum, frame):
        raise Interrupted(signum)

    saved = {}
    for sig in SIGNALS:
        try:
            saved[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread
            pass
    try:
        yield
    finally:
        for sig, old in saved.items():
            signal.signal(sig, old)


def interrupted_message(e: Interrupted, cfg, workdir: Path) -> str:
    if cfg is not None and cfg.cluster.executor == "debug":
        return f"interrupted by {e.name}: rerun the same command to resume (complete shards are kept)"
    where = "Slurm jobs" if cfg is not None and cfg.cluster.executor == "slurm" else "local jobs (own sessions)"
    return (f"interrupted by {e.name}: the {where} already submitted keep running; rerun the same command to "
            f"resume (it waits for them, never starts them twice), or stop them with "
            f"`python launch.py cancel --workdir {workdir}`")


# --- the driver record ---------------------------------------------------------------------------
def read_record(store: StateStore) -> Optional[dict]:
    return _read(store.driver_file)


def update_record(store: StateStore, **fields) -> None:
    rec = read_record(store) or {}
    rec.update(fields)
    try:
        atomic.write_json(store.driver_file, rec)
    except OSError:  # a full disk must not hide why the run stopped
        pass


def driver_log(store: StateStore) -> Path:
    return store.driver_dir / "driver.log"


def record_alive(rec: dict) -> tuple[Optional[bool], str]:
    """(alive?, state line) of a recorded driver (the holders' liveness rule of ``pipeline.lease``)."""
    live = holders_alive({0: rec})[0]
    return live.alive, live.state


# --- the foreground / driver run -----------------------------------------------------------------
def workdir_lock(cfg, role: str) -> WorkdirLock:
    """The work dir lock as this launch takes it (``role`` 'driver' in a detached driver, whose
    Slurm job id lets its requeued run take its own lock over)."""
    extra = {"executor": cfg.cluster.executor}
    if role == "driver" and cfg.cluster.executor == "slurm" and os.environ.get("SLURM_JOB_ID"):
        extra.update(job_id=_slurm_job_id())
    return WorkdirLock(Path(cfg.workdir), role=role, extra=extra)


def run_locked(cfg, pipe, steps, role: str = "launch", echo: Callable[[str], None] = print,
               on_started: Optional[Callable[[], None]] = None):
    """Run the planned steps (checked, shards not computed yet) holding the work dir lock. Nothing
    of the work dir is written before the lock is held: the shards are computed under it
    (``Stage.prepare`` plans in memory), then the first step's disk estimate is checked, then the
    plans are written (``Stage.commit_plan``), ``on_started`` is called and the steps run. In a detached driver the record is kept up
    to date."""
    workdir = Path(cfg.workdir)
    store = StateStore(workdir)
    with workdir_lock(cfg, role) as lock:
        if lock.cleared_stale:
            echo(f"cleared a stale lock left by {describe_owner(lock.cleared_stale)}")
        if role == "driver":
            update_record(store, state="running", since=time.time(), host=procs.hostname(), pid=os.getpid(),
                          start=procs.start_time(os.getpid()), boot=procs.boot_id(),
                          attempt=os.environ.get("SLURM_RESTART_COUNT", "0"))
        pipe.plan_shards(steps)  # planned in memory: nothing written yet
        check_plan_disk(steps, workdir)  # the first step's own check, before anything of it is written
        pipe.commit_plans(steps)
        if on_started is not None:
            on_started()
        atomic.write_text(workdir / ".pipeline" / "config.yaml", to_yaml(cfg))
        return pipe.run(steps)


def _slurm_job_id() -> str:
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID", "")


# --- detaching -------------------------------------------------------------------------------------
def check_can_detach(cfg, store: StateStore, lock_checked: bool = False) -> None:
    if cfg.cluster.executor == "debug":
        raise ConfigError("--detach needs the local or slurm executor (debug runs in this process)")
    if not lock_checked:
        workdir_lock(cfg, "launch").check_free()
    rec = read_record(store)
    if rec and rec.get("state") in ("submitted", "running"):
        alive, _ = record_alive(rec)
        if alive:
            raise ConfigError(f"a driver already runs for {store.workdir} ({describe_record(rec)}); "
                              f"`python launch.py cancel --workdir {store.workdir}` stops it")


def start_driver(cfg, store: StateStore, driver_argv: list, entry: "DriverEntry") -> dict:
    """Start the detached driver holding the work dir lock, and hand the lock to it: of two
    launches at the same instant, one starts a driver, the other is refused by the lock, and
    ``driver.json`` only ever describes the driver that holds it."""
    check_can_detach(cfg, store)
    with workdir_lock(cfg, "launch") as lock:
        check_can_detach(cfg, store, lock_checked=True)  # again under the lock
        if cfg.cluster.executor == "slurm":
            rec = detach_slurm(cfg, driver_argv, store, entry, lock)
        else:
            rec = detach_local(entry.command([*driver_argv, "--driver"]), store, lock)
        if cfg.cluster.executor == "slurm":
            rec["guardian"] = submit_guardian(cfg, store, rec["job_id"], driver_argv, entry)
            update_record(store, guardian=rec["guardian"])
    # the one command that resumes the run if it stops (`status` shows it)
    rec["resume"] = shlex.join(entry.command([*driver_argv, "--detach"]))
    update_record(store, resume=rec["resume"])
    return rec


MAX_DRIVER_REPLACEMENTS = 3  # driver jobs that died (killed, node failure, out of memory) replaced per run


def guardian_job_name(workdir: Path) -> str:
    return f"driverguard-{workdir_tag(workdir)}"


def submit_guardian(cfg, store: StateStore, driver_job: str, driver_argv: list, entry: "DriverEntry") -> Optional[str]:
    """A small job that starts only if the driver job ends in a failed state (``afternotok``:
    killed, node failure, out of memory, time limit past its requeues) and then starts a new
    driver (``--replace-driver``). When the driver ends well the dependency can never be met and
    Slurm removes the guardian (``--kill-on-invalid-dep``). Returns its job id (None, with a
    warning line, when sbatch refuses it: the run goes on, unguarded)."""
    from pipeline.scheduler import Request

    cluster, d = cfg.cluster, cfg.cluster.driver
    partition = d.partition or cluster.partition
    req = Request(partition, 1, 1, 1, float(d.mem_gb or 0), 0, 10, cluster.account, cluster.qos,
                  dict(cluster.slurm_additional_parameters or {}))
    args = [a for a in req.sbatch_args(partition or "") if partition or not a.startswith("--partition")]
    cmd = shlex.join(entry.command([*driver_argv, "--replace-driver", str(driver_job)]))
    try:
        return SlurmScheduler().submit([
            f"--dependency=afternotok:{driver_job}", "--kill-on-invalid-dep=yes",
            f"--job-name={guardian_job_name(store.workdir)}", f"--chdir={os.getcwd()}",
            f"--output={store.driver_dir / 'guardian-%j.log'}", *args,
            "--wrap", " && ".join([*(cluster.setup or []), cmd])])
    except SchedulerError as e:
        print(f"warning: the driver's guardian job was refused ({e}): a killed driver will not be replaced; "
              f"`status` says when the run stops", file=sys.stderr)
        return None


def replace_driver(cfg, store: StateStore, dead_job: str, driver_argv: list, entry: "DriverEntry",
                   echo: Callable[[str], None] = print) -> int:
    """Run by the guardian job: start a new driver in place of ``dead_job`` (bounded by
    ``MAX_DRIVER_REPLACEMENTS``); one line in the driver log either way."""
    rec = read_record(store) or {}
    log = driver_log(store)

    def say(line: str) -> None:
        echo(line)
        with contextlib.suppress(OSError), open(log, "a") as f:
            f.write(f"== {time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")

    if str(rec.get("job_id")) != dead_job or rec.get("state") not in ("submitted", "running"):
        say(f"guardian: driver job {dead_job} is not the run's live driver any more (record: job "
            f"{rec.get('job_id')}, {rec.get('state')}): nothing to replace")
        return 0
    alive, why = record_alive(rec)
    if alive is not False:
        say(f"guardian: driver job {dead_job} is {why}: nothing to replace")
        return 0
    done = int(rec.get("replacements", 0))
    if done >= MAX_DRIVER_REPLACEMENTS:
        update_record(store, state="failed", since=time.time(),
                      error=f"driver job {dead_job} ended ({why}) after {done} replacement(s)")
        say(f"guardian: driver job {dead_job} ended ({why}); it was replaced {done} time(s) already "
            f"(at most {MAX_DRIVER_REPLACEMENTS}): the run stops; `{rec.get('resume', 'the launch command')}` resumes it")
        return 1
    new = start_driver(cfg, store, driver_argv, entry)
    update_record(store, replacements=done + 1)
    say(f"guardian: driver job {dead_job} ended ({why}): replaced by driver job {new['job_id']} "
        f"(replacement {done + 1} of at most {MAX_DRIVER_REPLACEMENTS})")
    return 0


def detach_local(cmd: list, store: StateStore, lock: WorkdirLock) -> dict:
    """Start ``cmd`` (a launch with --driver) as a background process that survives logout."""
    log = driver_log(store)
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", **{HANDOVER_ENV: lock.me["token"]})
    with open(log, "ab") as out:
        out.write(f"\n== {time.strftime('%Y-%m-%d %H:%M:%S')} detached driver: {' '.join(cmd)}\n".encode())
        out.flush()
        # (not under signals_deferred: the driver would inherit the blocked signals)
        p = subprocess.Popen(cmd, cwd=os.getcwd(), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                             start_new_session=True, env=env)
        with signals_deferred():
            rec = {"executor": "local", "state": "submitted", "submitted": time.time(), "log": str(log), "cmd": cmd,
                   "job_id": f"pid {p.pid}", **procs.identity(p.pid)}
            atomic.write_json(store.driver_file, rec)
            lock.hand_over({"executor": "local", **procs.identity(p.pid)})
    return rec


@dataclass(frozen=True)
class DriverEntry:
    """How a detached driver runs the application's launcher again: the module ``module`` (found
    with ``paths`` first on ``sys.path``: a checkout's root, or nothing for an installed package)
    whose ``main(argv)`` is the launcher and which runs it when executed as a script."""

    module: str
    paths: tuple = ()

    def import_module(self):
        for path in reversed(self.paths):
            if path not in sys.path:
                sys.path.insert(0, path)
        return importlib.import_module(self.module)

    def script(self) -> str:
        """The module's file, for the local detached driver (a process of its own)."""
        spec = None
        if self.paths and "." not in self.module:
            spec = importlib.machinery.PathFinder.find_spec(self.module, list(self.paths))
        spec = spec or importlib.util.find_spec(self.module)
        if spec is None or not spec.origin or not spec.has_location:
            raise ConfigError(f"--detach: cannot find the launcher module {self.module!r} (paths {list(self.paths)})")
        return spec.origin

    def command(self, argv: list) -> list:
        return [sys.executable, self.script(), *argv]


@dataclass
class DriverTask(submitit.helpers.Checkpointable):
    """The Slurm driver job: the same launch in-process, output appended to the driver log. On
    its time-limit signal (or a preemption signal) submitit requeues it with this same callable."""

    argv: list
    cwd: str
    log: str
    entry: DriverEntry

    def __call__(self) -> int:
        os.chdir(self.cwd)
        launcher = self.entry.import_module()

        Path(self.log).parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        print(f"\n== {time.strftime('%Y-%m-%d %H:%M:%S')} driver job {_slurm_job_id()} run "
              f"{os.environ.get('SLURM_RESTART_COUNT', '0')} on {procs.hostname()}", flush=True)
        rc = launcher.main([*self.argv, "--driver"])
        if rc:
            sys.exit(rc)
        return rc

    def checkpoint(self, *args, **kwargs):
        print(f"== {time.strftime('%Y-%m-%d %H:%M:%S')} driver: time limit or preemption, requeueing", flush=True)
        return submitit.helpers.DelayedSubmission(self)


def detach_slurm(cfg, argv: list, store: StateStore, entry: DriverEntry, lock: WorkdirLock) -> dict:
    cluster, d = cfg.cluster, cfg.cluster.driver
    if cluster.check_requests:
        try:
            RequestChecker().check(driver_request(cfg))
        except SchedulerError as e:
            raise ConfigError(f"cannot check the driver job's request against the cluster: {e}") from None
    log = driver_log(store)
    folder = store.driver_dir / "submitit"
    folder.mkdir(parents=True, exist_ok=True)
    export_project_path()
    ex = submitit.AutoExecutor(folder, cluster="slurm", slurm_max_num_timeout=int(d.max_requeues))
    partition = d.partition or cluster.partition
    ex.update_parameters(name=driver_job_name(store.workdir), timeout_min=int(d.timeout_min),
                         cpus_per_task=int(d.cpus_per_task), nodes=1, tasks_per_node=1,
                         slurm_signal_delay_s=signal_delay_s(cluster, d.timeout_min),
                         **slurm_params(cluster, partition, float(d.mem_gb or 0), 0))
    with signals_deferred():
        os.environ[HANDOVER_ENV] = lock.me["token"]  # exported to the job by sbatch
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                job = ex.submit(DriverTask(list(argv), os.getcwd(), str(log), entry))
        except (submitit.core.utils.FailedJobError, submitit.core.utils.FailedSubmissionError) as e:
            raise ConfigError(f"sbatch rejected the driver job: {sbatch_error_line(str(e))}") from None
        finally:
            os.environ.pop(HANDOVER_ENV, None)
        rec = {"executor": "slurm", "state": "submitted", "submitted": time.time(), "log": str(log),
               "job_id": str(job.job_id), "partition": partition, "argv": list(argv)}
        atomic.write_json(store.driver_file, rec)
        lock.hand_over({"executor": "slurm", "job_id": str(job.job_id)})
    return rec


def describe_record(rec: dict) -> str:
    if rec.get("executor") == "slurm":
        return f"Slurm job {rec.get('job_id')}"
    return f"pid {rec.get('pid')} on {rec.get('host')}"


def detached_message(rec: dict, cfg, workdir: Path) -> str:
    if rec["executor"] == "slurm":
        d = cfg.cluster.driver
        head = (f"detached: Slurm job {rec['job_id']} drives the pipeline (partition {rec.get('partition') or 'default'}, "
                f"{d.cpus_per_task} CPU, {d.timeout_min} min, requeued at its time limit and resumed)")
    else:
        head = f"detached: process {rec['pid']} drives the pipeline in the background (it survives logout)"
    return "\n".join([
        head,
        f"  log:    {rec['log']}",
        f"  status: python launch.py status --workdir {workdir}",
        f"  follow: tail -f {rec['log']}",
        f"  stop:   python launch.py cancel --workdir {workdir}",
    ])


# --- cancel ----------------------------------------------------------------------------------------
def _stop_process(info: dict, wait_s: float = 30.0) -> bool:
    """SIGTERM a process of this host (its handler ends it cleanly), SIGKILL after ``wait_s``."""
    if procs.alive(info) is not True:
        return False
    pid = int(info["pid"])
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.time() + wait_s
    while time.time() < deadline and procs.alive(info):
        time.sleep(0.1)
    if procs.alive(info):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return True


def all_job_records(store: StateStore) -> dict[str, dict]:
    """Every recorded job of the work dir, by job id (latest record per shard of every step)."""
    out = {}
    for it, stages in store.scopes():
        for stage in stages:
            for key, rec in store.job_records(stage, it).items():
                out[str(rec["job_id"])] = rec
    return out


def driver_job_name(workdir: Path) -> str:
    """The Slurm job name of the work dir's driver (stage jobs are ``<stage>-<scope>-<tag>``)."""
    return f"driver-{workdir_tag(workdir)}"


def cancel(workdir: Path, echo: Callable[[str], None] = print, wait_s: float = 60.0) -> int:
    store = StateStore(Path(workdir))
    if not store.root.is_dir():
        raise PipelineError(f"{workdir}: no pipeline state here (nothing to cancel)")
    stopped = []
    slurm = SlurmScheduler()
    records = all_job_records(store)
    rec = read_record(store)
    uses_slurm = (rec or {}).get("executor") == "slurm" or any(r.get("executor") == "slurm" for r in records.values())
    # 0. the driver's guardian, before the driver: a cancelled driver must not be replaced
    if uses_slurm:
        guards = [j for j, name in _jobs_named(slurm, workdir_tag(store.workdir)).items()
                  if name == guardian_job_name(store.workdir)]
        if guards:
            _cancel_slurm(guards, slurm, wait_s, echo)
    # 1. whoever submits: the driver, or a foreground launch of this host; nothing new after this
    if rec and rec.get("state") in ("submitted", "running"):
        alive, state = record_alive(rec)
        if rec.get("executor") == "slurm":
            jid = str(rec.get("job_id"))
            if alive is None:
                raise PipelineError(f"cannot ask the scheduler about the driver job {jid}: {state}")
            if alive:
                _cancel_slurm([jid], slurm, wait_s, echo)
                stopped.append(f"the driver job {jid}")
        elif _stop_process(rec):
            stopped.append(f"the driver (pid {rec.get('pid')})")
        update_record(store, state="cancelled", since=time.time())
    tagged: dict = {}
    if uses_slurm:
        # a driver job of this work dir that its record does not name (the record of an earlier one)
        tagged = _jobs_named(slurm, workdir_tag(store.workdir))
        drivers = sorted(j for j, name in tagged.items() if name == driver_job_name(store.workdir))
        if drivers:
            _cancel_slurm(drivers, slurm, wait_s, echo)
            stopped += [f"the driver job {j}" for j in drivers]
            tagged = _jobs_named(slurm, workdir_tag(store.workdir))  # what it submitted meanwhile
    owner, problem = lock_holder(store.workdir)
    if problem:
        echo(f"note: {problem}")
    elif owner and owner.get("role") == "launch":
        alive = holder_alive(owner)
        if alive is True:
            _stop_process(owner)
            stopped.append(f"the launch (pid {owner.get('pid')})")
        elif alive is None:
            echo(f"note: a launch on host {owner.get('host')} (pid {owner.get('pid')}) holds the lock: stop it there")
    # 2. the jobs: every recorded one, plus any live Slurm job named with this work dir's tag
    records = all_job_records(store)  # read again: a launch stopped above may have recorded more
    local = {j: r for j, r in records.items() if r.get("executor") == "local"}
    slurm_ids = [j for j, r in records.items() if r.get("executor") == "slurm"]
    cancelled = LocalScheduler().cancel_records(local) if local else []
    if uses_slurm:
        try:
            # a live job of a recorded id whose name is not this work dir's: the id was handed out
            # again (a controller restarted from older state); someone else's job, left alone
            tag = f"-{workdir_tag(store.workdir)}"
            live = [j for j, i in slurm.query(slurm_ids).items() if i.alive and (not i.name or i.name.endswith(tag))]
        except SchedulerError as e:
            raise PipelineError(f"cannot ask the scheduler which jobs run: {e}") from None
        stage_jobs = [j for j, name in tagged.items() if name != driver_job_name(store.workdir)]
        todo = sorted(set(live) | set(stage_jobs))
        if todo:
            _cancel_slurm(todo, slurm, wait_s, echo)
            cancelled += todo
    if cancelled:
        ids = sorted(cancelled)
        stopped.append(f"{len(ids)} job(s) ({', '.join(ids[:8])}{' ...' if len(ids) > 8 else ''})")
    if not stopped:
        echo(f"nothing runs for {store.workdir}")
    else:
        echo(f"cancelled {', '.join(stopped)} of {store.workdir}; rerun the launch command to resume "
             f"(complete shards are kept)")
    return 0


def _jobs_named(slurm: SlurmScheduler, tag: str) -> dict:
    try:
        return slurm.jobs_named(f"-{tag}")
    except SchedulerError as e:
        raise PipelineError(f"cannot ask the scheduler which jobs run: {e}") from None


def _cancel_slurm(job_ids: list, slurm: SlurmScheduler, wait_s: float,
                  echo: Callable[[str], None] = print) -> None:
    """scancel, then wait (at most ``wait_s``) until none is alive; past the bound, one line."""
    slurm.cancel(job_ids)
    if not _wait_gone(lambda: any(i.alive for i in slurm.query(job_ids).values()), wait_s):
        ids = ", ".join(job_ids[:8])
        echo(f"note: job(s) {ids} still listed {wait_s:.0f} s after scancel (a node that does not answer?): "
             f"`squeue -j {job_ids[0]}` follows them; an administrator clears a stuck one with "
             f"`scontrol update nodename=NODE state=down reason=...`")


def _wait_gone(still_alive: Callable[[], bool], wait_s: float) -> bool:
    """Wait until ``still_alive()`` is false (True) or ``wait_s`` passed (False)."""
    deadline = time.time() + wait_s
    while time.time() < deadline:
        try:
            if not still_alive():
                return True
        except SchedulerError:
            pass
        time.sleep(0.5)
    return False
