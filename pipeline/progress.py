"""How far a run is and when it ends: per step shards done, failed, running and pending, and an
ETA for each step and for the whole launch, from the shard times measured so far or, before any
shard of a stage finished, from the plan's estimate (``Stage.estimate``); each ETA says which.

What it reads (all under ``WORKDIR/.pipeline/``, written by the runner; nothing of a stage):

- ``run_plan.json`` (``write_run_plan``, when a launch starts running its steps): the launch's
  steps in order, with what is known of each then: its shard count (None while its inputs do not
  exist yet), how many of its shards run at once, and the plan's estimate of one shard's wall
  time (None without an estimate).
- each step's ``_plan.json`` (``write_step_plan``, when the step starts): the same, for the
  shards it really has.
- the shard markers: ``stats.seconds`` of done markers (a sample of at most
  ``SAMPLE_DONE_MARKERS`` per step, so a refresh stays cheap at 10^4 shards) and the start time
  of running ones.

The ETA of a step is the work left (each running shard's measured mean minus its elapsed time,
plus the mean for each shard not started) spread over the shards that run at once; the whole
run's is the sum over its steps not complete (steps run one after another). Queue waits and
finalize are not in it. The basis, in order: ``measured`` (this step's done shards), ``measured
in iteration N`` (the same stage's shards of another iteration: an iteration's training predicts
the next), ``estimated`` (the plan), else unknown.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from pipeline import atomic
from pipeline.state import StageStatus, StateStore, _read, scope_name

RUN_PLAN = "run_plan.json"
STEP_PLAN = "_plan.json"
SAMPLE_DONE_MARKERS = 64  # done markers read per step for its mean shard time
SAMPLE_RUNNING_MARKERS = 256

MEASURED = "measured"
ESTIMATED = "estimated"


# --- what the runner records ---------------------------------------------------------------------
def parallelism(step, cluster) -> int:
    """How many of ``step``'s shards run at once: one for a multi-task step (its one job) and in
    the in-process debug executor, else ``cluster.array_parallelism``."""
    if step.stage.multi_task or cluster.get("executor") == "debug":
        return 1
    return max(1, int(cluster.get("array_parallelism", 1) or 1))


def plan_figures(step) -> tuple:
    """(one shard's wall time, jobs) from the stage's estimate of the whole step: its CPU (GPU)
    hours per job over the cores (GPUs) one job holds (at most the cores the estimate says it
    uses). (None, None) when the stage gives no estimate; no time without a compute figure."""
    try:
        est = step.stage.estimate(step.ctx)
    except Exception:  # an estimate must never stop a run (the dry run prints the error)
        return None, None
    if est is None:
        return None, None
    res = step.resources
    jobs = max(1, int(est.jobs or len(step.shards or ()) or 1))
    per_job = []
    slots = max(1, int(res.nodes) * int(res.tasks_per_node))
    if est.gpu_hours > 0 and res.gpus_per_task > 0:
        per_job.append(est.gpu_hours / jobs / (slots * int(res.gpus_per_task)))
    if est.cpu_hours > 0:
        cores = slots * max(1, int(res.cpus_per_task))
        if est.cpus:
            cores = min(cores, int(est.cpus))
        per_job.append(est.cpu_hours / jobs / cores)
    return (3600.0 * max(per_job) if per_job else None), jobs


def _plan_entry(step, cluster, with_estimate: bool) -> dict:
    shard_s, jobs = plan_figures(step) if with_estimate else (None, None)
    return {"stage": step.stage.name, "iteration": step.iteration,
            "n_shards": None if step.shards is None else len(step.shards),
            "parallelism": parallelism(step, cluster), "estimated_shard_s": shard_s,
            # the shard count while the step's inputs do not exist yet (its estimate's jobs)
            "estimated_shards": jobs if step.shards is None else None}


def write_run_plan(store: StateStore, steps: list, cluster) -> None:
    """The launch's steps and the plan's figures, for ``status`` and the report (steps already
    complete are listed without an estimate: nothing of them is left to run)."""
    entries = []
    for step in steps:
        complete = step.shards is not None and step.todo is not None and not step.todo
        entries.append(_plan_entry(step, cluster, with_estimate=not complete))
    atomic.write_json(store.root / RUN_PLAN, {"started": time.time(), "steps": entries})


def write_step_plan(store: StateStore, step, cluster) -> None:
    """A step's ``_plan.json`` when it starts: its shard count (what ``status`` shows as the
    total), how many run at once, the plan's estimate of one shard."""
    entry = _plan_entry(step, cluster, with_estimate=bool(step.todo))
    atomic.write_json(store.stage_state_dir(step.stage.name, step.iteration) / STEP_PLAN,
                      {k: entry[k] for k in ("n_shards", "parallelism", "estimated_shard_s")})


# --- reading it back -----------------------------------------------------------------------------
@dataclass
class StepProgress:
    stage: str
    iteration: Optional[int]
    total: Optional[int]  # shards (None: not known yet)
    done: int = 0
    failed: int = 0
    running: int = 0
    pending: int = 0  # neither done, failed nor running (queued or not submitted yet)
    complete: bool = False
    shard_s: Optional[float] = None  # mean wall time of one shard
    eta_s: Optional[float] = None  # time left of the step (0 when complete)
    basis: Optional[str] = None  # "measured", "measured in iteration N", "estimated"; None: unknown

    @property
    def scope(self) -> str:
        return scope_name(self.iteration)

    @property
    def state(self) -> str:
        if self.complete:
            return "complete"
        if self.failed:
            return "failed"
        if self.running:
            return "running"
        return "incomplete" if self.done else "pending"  # (status's word for a step begun)


@dataclass
class RunProgress:
    steps: List[StepProgress] = field(default_factory=list)
    eta_s: Optional[float] = None  # what is left of the launch's steps (those with a figure)
    basis: Optional[str] = None  # "measured", "estimated", "partly estimated"
    unknown: List[str] = field(default_factory=list)  # steps left without any figure
    started: Optional[float] = None  # when the launch started running its steps
    as_of: float = 0.0

    def step(self, stage: str, iteration: Optional[int]) -> Optional[StepProgress]:
        return next((s for s in self.steps if s.stage == stage and s.iteration == iteration), None)


def step_eta(left: int, running_elapsed: List[float], shard_s: float, lanes: int) -> float:
    """Seconds until ``left`` shards are done: each running shard needs ``shard_s`` minus what it
    ran already, each other one ``shard_s``, and ``lanes`` of them run at once."""
    if left <= 0:
        return 0.0
    running = sorted(running_elapsed, reverse=True)[:left]
    work = sum(max(shard_s - e, 0.0) for e in running) + (left - len(running)) * shard_s
    return work / max(1, min(lanes, left))


def mean_shard_seconds(store: StateStore, stage: str, iteration: Optional[int], done: set) -> Optional[float]:
    """Mean ``stats.seconds`` over an even sample of the step's done markers (None: none has it)."""
    keys = sorted(done)
    if not keys:
        return None
    stride = max(1, math.ceil(len(keys) / SAMPLE_DONE_MARKERS))
    seconds = []
    for key in keys[::stride]:
        s = ((store.read_done(stage, iteration, key) or {}).get("stats") or {}).get("seconds")
        if isinstance(s, (int, float)) and s >= 0:
            seconds.append(float(s))
    return sum(seconds) / len(seconds) if seconds else None


def _running_elapsed(store: StateStore, stage: str, iteration: Optional[int], keys: set, now: float) -> List[float]:
    out = []
    for key in sorted(keys)[:SAMPLE_RUNNING_MARKERS]:
        t = (store.read_running(stage, iteration, key) or {}).get("time")
        if isinstance(t, (int, float)):
            out.append(max(0.0, now - float(t)))
    return out


def run_progress(workdir: Path, statuses: Optional[List[StageStatus]] = None,
                 now: Optional[float] = None) -> RunProgress:
    """The progress of the last launch's steps (from ``run_plan.json``; without one, of every
    recorded step). ``statuses``: ``pipeline.status.collect``'s answer (or records with the same
    ``stage``, ``iteration`` and ``running``), whose running counts come from the scheduler;
    without it a shard counts as running while its running marker exists."""
    store = StateStore(Path(workdir))
    now = time.time() if now is None else now
    plan = _read(store.root / RUN_PLAN) or {}
    by_step = {(s.stage, s.iteration): s for s in statuses or []}
    entries = plan.get("steps")
    if not isinstance(entries, list):
        entries = [{"stage": s.stage, "iteration": s.iteration} for s in statuses or []]
        if statuses is None:
            entries = [{"stage": st, "iteration": it} for it, names in store.scopes() for st in names]
    out = RunProgress(started=plan.get("started"), as_of=now)
    measured_by_stage: dict = {}  # stage -> [(iteration, mean shard seconds)]
    rows = []  # (step, its _plan.json, its run plan entry, running keys): timed once all are read
    for entry in entries:
        stage, it = entry.get("stage"), entry.get("iteration")
        if not isinstance(stage, str):
            continue
        step_plan = _read(store.stage_state_dir(stage, it) / STEP_PLAN) or {}
        m = store.markers(stage, it)
        st = by_step.get((stage, it))
        total = step_plan.get("n_shards", entry.get("n_shards"))
        failed = m["failed"] - m["done"]
        running_keys = m["running"] - m["done"] - failed
        sp = StepProgress(stage, it, total, done=len(m["done"]), failed=len(failed))
        sp.complete = store.read_stage_done(stage, it) is not None and not store.stale_reason(stage, it)
        if st is not None:
            sp.running = st.running
        else:
            sp.running = len(running_keys)
        if total is not None:
            sp.done = min(sp.done, total)
            sp.pending = max(0, total - sp.done - sp.failed - sp.running)
        sp.shard_s = mean_shard_seconds(store, stage, it, m["done"])
        if sp.shard_s is not None:
            sp.basis = MEASURED
            measured_by_stage.setdefault(stage, []).append((it, sp.shard_s))
        out.steps.append(sp)
        rows.append((sp, step_plan, entry, running_keys))
    for sp, step_plan, entry, running_keys in rows:
        if sp.complete:
            sp.eta_s = 0.0
            continue
        if sp.shard_s is None:
            other = measured_by_stage.get(sp.stage)
            if other:
                it, sp.shard_s = min(other, key=lambda x: abs((x[0] or 0) - (sp.iteration or 0)))
                sp.basis = MEASURED if it is None else f"{MEASURED} in iteration {it}"
            else:
                est = step_plan.get("estimated_shard_s", entry.get("estimated_shard_s"))
                if isinstance(est, (int, float)):
                    sp.shard_s, sp.basis = float(est), ESTIMATED
        # a step whose inputs did not exist when the launch started: its estimate's job count
        n_shards = sp.total if sp.total is not None else entry.get("estimated_shards")
        if sp.shard_s is None or not isinstance(n_shards, int):
            sp.basis = None
            out.unknown.append(f"{sp.stage}@{sp.scope}")
            continue
        lanes = int(step_plan.get("parallelism", entry.get("parallelism")) or 1)
        elapsed = _running_elapsed(store, sp.stage, sp.iteration, running_keys, now) if sp.running else []
        sp.eta_s = step_eta(n_shards - sp.done - sp.failed, elapsed, sp.shard_s, lanes)
    left = [s for s in out.steps if not s.complete]
    figures = [s for s in left if s.eta_s is not None]
    if figures:
        out.eta_s = sum(s.eta_s for s in figures)
        kinds = {ESTIMATED if s.basis == ESTIMATED else MEASURED for s in figures}
        out.basis = kinds.pop() if len(kinds) == 1 else f"partly {ESTIMATED}"
    elif not left and out.steps:
        out.eta_s, out.basis = 0.0, MEASURED
    return out


# --- saying it -------------------------------------------------------------------------------------
def human_duration(seconds: float) -> str:
    if seconds < 1:
        return "< 1 s"
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def eta_text(eta_s: Optional[float], basis: Optional[str], now: float, running: bool = True) -> str:
    """``2 h 05 min left (measured), ends about 2026-12-07 15:20 UTC``, or why there is none
    (``running`` False: nothing runs now, so nothing ends; the time is the work left)."""
    if eta_s is None:
        return "unknown (no shard finished and no estimate)"
    if not running:
        return f"{human_duration(eta_s)} of work left ({basis})"
    end = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(now + eta_s))
    return f"{human_duration(eta_s)} left ({basis}), ends about {end}"


def eta_lines(progress: RunProgress, running: bool = True) -> List[str]:
    """What ``status`` prints: the ETA of the steps under way (else the next one) and of the whole
    launch (the report lists every step). ``running``: whether a launch (or the driver) drives the
    run now; when none does, the times are the work left (status's "run stopped" line says how
    to resume)."""
    left = [s for s in progress.steps if not s.complete]
    if not progress.steps:
        return []
    if not left:
        return ["ETA: every step of the last launch is complete"]
    lines = []
    for s in [s for s in left if s.done or s.running or s.failed] or left[:1]:
        name = s.stage if s.iteration is None else f"{s.stage} (iteration {s.iteration})"
        if s.failed:
            lines.append(f"ETA {name}: {s.failed} shard(s) failed; the step ends when the others do, "
                         f"and the failed ones run again at the next launch")
        lines.append(f"ETA {name}: {eta_text(s.eta_s, s.basis, progress.as_of, running)}"
                     + (f"; one shard takes {human_duration(s.shard_s)}" if s.shard_s is not None else ""))
    run = f"{len(left)} step(s) left, " + eta_text(progress.eta_s, progress.basis, progress.as_of, running)
    if progress.unknown and progress.eta_s is not None:
        run += f"; not counting {', '.join(progress.unknown)} (no figure yet)"
    lines.append(f"ETA run: {run}")
    return lines


__all__ = ["RunProgress", "StepProgress", "eta_lines", "eta_text", "human_duration", "run_progress",
           "step_eta", "write_run_plan", "write_step_plan"]
