"""``launch.py status``: per iteration and stage, shards done / total, running, pending (with the
scheduler's reasons), failed (with log paths and last error lines), shards whose job ended without
a result (killed by a signal, time limit, out of memory: from sacct), a failed finalize, stale
steps; who drives the run (the detached driver or a foreground launch); and the ETA of the steps
under way and of the last launch (``pipeline.progress``: measured shard times, else the plan's
estimate).

Read from the marker files (one directory listing per step, failure markers) and the job records
of incomplete shards; the scheduler is asked once for all of those jobs (one squeue + one sacct
call), never once per shard, so it stays fast at 10^4 shards. No stage code is imported.
"""
from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Optional

from pipeline import procs
from pipeline.lease import MALFORMED, holder_alive
from pipeline.lock import describe_owner, lock_holder
from pipeline.progress import eta_lines, run_progress
from pipeline.scheduler import LocalScheduler, SchedulerError, SlurmScheduler
from pipeline.state import StageStatus, StateStore, _read


def collect(workdir: Path, order: Optional[list] = None, notes: Optional[list] = None) -> list[StageStatus]:
    store = StateStore(Path(workdir))
    out = []
    waiting = []  # (status, key, job record) of incomplete shards with a recorded job
    for it, stages in store.scopes():
        if order:
            stages = sorted(stages, key=lambda s: (order.index(s) if s in order else len(order), s))
        for stage in stages:
            d = store.stage_state_dir(stage, it)
            m = store.markers(stage, it)
            plan = _read(d / "_plan.json") or {}
            total = plan.get("n_shards")
            failed = []
            for key in sorted(m["failed"] - m["done"]):
                info = store.read_failed(stage, it, key) or {}
                failed.append((key, info.get("log", "?"), info.get("error", "?")))
            st = StageStatus(
                stage=stage, iteration=it, total=total, done=len(m["done"]), running=0, failed=failed,
                finalized=store.read_stage_done(stage, it) is not None,
                stage_error=(store.read_stage_failed(stage, it) or {}).get("error"),
                stale=store.stale_reason(stage, it),
            )
            out.append(st)
            if st.finalized and not st.stale:
                continue
            settled = m["done"] | m["failed"]
            records = store.job_records(stage, it) if (total is None or len(settled) < total) else {}
            for key, rec in records.items():
                if key not in settled:
                    waiting.append((st, key, rec))
            for key in m["running"] - settled - set(records):  # no job record (debug executor, older state)
                info = store.read_running(stage, it, key)
                if info is not None and procs.alive(info) is not False:
                    st.running += 1
    _ask_scheduler(waiting, notes if notes is not None else [])
    return out


def _ask_scheduler(waiting: list, notes: list) -> None:
    slurm = {str(r["job_id"]): r for _, _, r in waiting if r.get("executor") == "slurm"}
    local = {str(r["job_id"]): r for _, _, r in waiting if r.get("executor") == "local"}
    infos = {}
    if slurm:
        try:
            infos.update(SlurmScheduler().query(list(slurm)))
        except SchedulerError as e:
            notes.append(f"scheduler: no answer ({e}); running/pending counts are unknown")
    if local:
        infos.update(LocalScheduler().query_records(local))
    for st, key, rec in waiting:
        info = infos.get(str(rec["job_id"]))
        if info is None:
            continue
        if info.blocked:
            st.blocked.append((key, str(rec["job_id"]), info.describe()))
        if info.pending:
            st.pending += 1
            st.pending_reasons[info.reason or "no reason given"] = st.pending_reasons.get(info.reason or "no reason given", 0) + 1
        elif info.alive:
            st.running += 1
        else:
            why = ("its process ended without a result" if rec.get("executor") == "local" else info.describe())
            st.stopped.append((key, str(rec["job_id"]), why))


def driver_line(workdir: Path) -> tuple[Optional[str], Optional[bool]]:
    """(the driver's line, whether it still drives the run: None when nothing can tell)."""
    store = StateStore(Path(workdir))
    rec = _read(store.driver_file)
    if not rec:
        return None, False
    from pipeline.driver import describe_record, record_alive

    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(rec.get("since") or rec.get("submitted") or 0)))
    state = rec.get("state", "?")
    alive: Optional[bool] = False
    if state in ("submitted", "running"):
        alive, sched = record_alive(rec)
        if alive is False:
            state = f"ended ({sched})" if rec.get("executor") == "slurm" else "ended"
        elif rec.get("executor") == "slurm":
            state = sched
        else:
            state = "running" if alive else state
    return f"driver: {describe_record(rec)}, {state}, since {since}; log {rec.get('log')}", alive


def _launch_drives(workdir: Path) -> Optional[bool]:
    """Whether a foreground launch holding the lock still runs (None: on another host)."""
    owner, problem = lock_holder(Path(workdir))
    if problem or not owner or owner is MALFORMED or owner.get("role") == "driver":
        return False
    return holder_alive(owner)


def stopped_line(workdir: Path, statuses: list[StageStatus], driver_alive: Optional[bool]) -> Optional[str]:
    """'run stopped: ...; resume with ...' when the run is incomplete and nothing drives it."""
    incomplete = [s for s in statuses if not s.finalized or s.stale]
    rec = _read(StateStore(Path(workdir)).driver_file) or {}
    if driver_alive is not False or _launch_drives(workdir) is not False:
        return None
    if not incomplete and rec.get("state") in (None, "done"):
        return None
    if rec.get("state") == "done" and not any(s.failed or s.stage_error or s.stopped for s in incomplete):
        return None  # a launch of some steps only finished; the others were never asked for
    why = {"cancelled": "cancelled", "failed": f"the driver failed ({rec.get('error', '?')})"}.get(
        str(rec.get("state")), "nothing drives it (the driver or the launch ended)")
    if str(rec.get("state", "")).startswith("stopped"):
        why = f"the driver was {rec['state']}"
    resume = rec.get("resume") or "the same launch command"
    steps = ", ".join(s.stage if s.iteration is None else f"{s.stage} (iteration {s.iteration})" for s in incomplete[:4])
    more = f" and {len(incomplete) - 4} more" if len(incomplete) > 4 else ""
    return (f"run stopped: {why}; {len(incomplete)} step(s) incomplete ({steps}{more}); "
            f"resume with: {resume} (complete shards are kept)")


def lock_line(workdir: Path) -> Optional[str]:
    owner, problem = lock_holder(Path(workdir))
    if problem:
        return f"lock: {problem}"
    if not owner or owner is MALFORMED:
        return None
    if owner.get("role") == "driver":
        return None  # the driver line says it
    alive = holder_alive(owner)  # the one liveness rule of lock and lease holders
    if alive is False:
        return f"lock: left by a launch that is gone (pid {owner.get('pid')}); the next launch clears it"
    return f"launch: {describe_owner(owner)}"


def run_driven(workdir: Path) -> bool:
    """Whether the driver or a foreground launch drives the run now (or nothing can tell)."""
    return driver_line(workdir)[1] is not False or _launch_drives(workdir) is not False


def render(statuses: list[StageStatus], workdir: Path, header: Optional[list] = None) -> str:
    if not statuses and not header:
        return f"{workdir}: nothing recorded yet"
    lines = [f"work dir {workdir}", *(header or [])]
    if not statuses:
        return "\n".join(lines + ["nothing recorded yet"])
    lines.append(f"{'iteration':<10} {'stage':<10} {'done/total':>12} {'running':>8} {'pending':>8} {'failed':>7}  state")
    for s in statuses:
        total = "?" if s.total is None else str(s.total)
        n_failed = len(s.failed)
        if s.finalized and s.stale:
            state = "stale"
        elif s.finalized:
            state = "complete"
        elif s.failed or s.stage_error:
            state = "FAILED"
        elif s.running:
            state = "running"
        elif s.pending:
            state = "pending"
        else:
            state = "incomplete"
        it = "-" if s.iteration is None else str(s.iteration)
        lines.append(f"{it:<10} {s.stage:<10} {f'{s.done}/{total}':>12} {s.running:>8} {s.pending:>8} {n_failed:>7}  {state}")
        if s.stale:
            lines.append(f"    stale: {s.stale}; its shards run again at the next launch")
        if s.stage_error and not s.finalized and not s.failed:
            lines += _failure_lines(s.stage_error)
        for reason, n in Counter(s.pending_reasons).most_common():
            lines.append(f"    pending: {n} job(s), reason {reason}")
        for key, job, why in s.blocked[:20]:
            lines.append(f"    blocked {key} (job {job}): {why}")
        if len(s.blocked) > 20:
            lines.append(f"    ... and {len(s.blocked) - 20} more blocked shard(s)")
        for key, job, why in s.stopped[:20]:
            lines.append(f"    stopped {key} (job {job}): {why}; it runs again at the next launch")
        if len(s.stopped) > 20:
            lines.append(f"    ... and {len(s.stopped) - 20} more stopped shard(s)")
        for key, log, err in s.failed[:20]:
            lines.append(f"    failed {key}: {err}")
            lines.append(f"           log: {log}")
        if n_failed > 20:
            lines.append(f"    ... and {n_failed - 20} more failed shard(s)")
    return "\n".join(lines)


STEP_FAILURE_LINES = 12  # of a step's failure message (a failed finalize names its first items)


def _failure_lines(error: str) -> list[str]:
    """A step's failure message whole, its reasons one per line (the first ones when it is long)."""
    first, *rest = [line.strip() for line in error.strip().splitlines() if line.strip()] or ["?"]
    out = [f"    step failed: {first}"] + [f"      {line}" for line in rest[:STEP_FAILURE_LINES]]
    if len(rest) > STEP_FAILURE_LINES:
        out.append(f"      ... and {len(rest) - STEP_FAILURE_LINES} more line(s)")
    return out


EXIT_FAILED = 1  # a shard or a step failed
EXIT_STOPPED = 4  # the run is incomplete and nothing drives it, or a job waits until someone acts


def report(workdir: Path, order: Optional[list] = None) -> tuple[str, int]:
    """(text, exit code) of ``launch.py status``: 0 while the run goes on or is complete,
    ``EXIT_FAILED`` when a shard or a step failed, ``EXIT_STOPPED`` when it stopped (the line says
    how to resume it) or a job is blocked until someone acts (held, its nodes drained)."""
    workdir = Path(workdir)
    notes: list = []
    statuses = collect(workdir, order, notes)
    driver, driver_alive = driver_line(workdir)
    stopped = stopped_line(workdir, statuses, driver_alive) if statuses else None
    header = [line for line in (driver, lock_line(workdir), stopped) if line] + notes
    failed = any(s.failed or (s.stage_error and not s.finalized) for s in statuses)
    blocked = any(s.blocked for s in statuses)
    rc = EXIT_FAILED if failed else EXIT_STOPPED if (stopped or blocked) else 0
    driven = driver_alive is not False or _launch_drives(workdir) is not False
    eta = eta_lines(run_progress(workdir, statuses), running=driven) if statuses else []
    return "\n".join([render(statuses, workdir, header), *eta]), rc


__all__ = ["collect", "render", "report"]
