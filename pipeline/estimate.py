"""Resource estimates of a plan: what each step will write, hold and cost, and the free-space
check before a step is submitted.

The engine knows nothing of what a stage computes: a stage answers ``Stage.estimate(ctx)`` with
an :class:`Estimate` for the whole step (all its shards) or None. This module prints the figures
in ``--dry-run`` (``plan_lines``) and refuses to submit a step whose outputs would not fit on
the work dir's filesystem (``check_free_space``, one ``ConfigError`` line). It also notes a
scheduler request far above what a step needs (``oversized_requests``): on a busy cluster a job
that asks for 200 GB waits for a node with 200 GB free, though it peaks at 3.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from pipeline.errors import ConfigError


@dataclass
class Estimate:
    """Figures of one step (stage x iteration), all its shards together.

    ``disk_bytes``: what the step leaves on the work dir's filesystem (files it writes; negative
    when it deletes more than it writes). ``peak_ram_bytes``: resident memory of one job at its
    peak. ``jobs``: scheduler jobs (array tasks). ``cpu_hours`` / ``gpu_hours``: compute over all
    jobs. ``basis``: where the figures come from (corpus size source, measured costs), printed
    once per distinct line. ``hint``: what to change when the step does not fit."""

    disk_bytes: float = 0.0
    peak_ram_bytes: float = 0.0
    jobs: int = 0
    cpu_hours: float = 0.0
    gpu_hours: float = 0.0
    detail: str = ""
    basis: List[str] = field(default_factory=list)
    hint: str = ""
    cpus: int = 0

    def scaled(self, fraction: float) -> "Estimate":
        """The part of the step still to run (``fraction`` of its shards)."""
        f = max(0.0, min(1.0, fraction))
        return Estimate(self.disk_bytes * f, self.peak_ram_bytes, max(1, round(self.jobs * f)) if f else 0,
                        self.cpu_hours * f, self.gpu_hours * f, self.detail, list(self.basis), self.hint,
                        self.cpus)


def human_bytes(n: float) -> str:
    sign = "-" if n < 0 else ""
    n = abs(float(n))
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.1f} {unit}"
        n /= 1000
    return f"{sign}{n:.1f} PB"


def human_hours(h: float) -> str:
    if h == 0:
        return "0"
    if h < 0.1:
        return f"{h * 60:.1f} min"
    return f"{h:,.1f} h"


def step_estimate(step) -> Optional[Estimate]:
    """The stage's estimate of what is left of ``step`` (a runner Step), or None."""
    try:
        est = step.stage.estimate(step.ctx)
    except Exception as e:  # an estimate must never stop a launch
        return Estimate(detail=f"(no estimate: {type(e).__name__}: {e})")
    if est is None:
        return None
    if step.shards is not None and step.todo is not None and len(step.shards):
        est = est.scaled(len(step.todo) / len(step.shards))
    return est


def free_bytes(path: Path) -> int:
    """Free space (for an unprivileged writer) on the filesystem that holds ``path`` or, while it
    does not exist yet, its nearest existing parent."""
    p = Path(path).resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def plan_lines(steps, workdir: Path) -> List[str]:
    """The resource part of ``--dry-run``: one line per step (disk written, peak RAM per job,
    jobs, CPU and GPU hours), totals, the basis of the figures and the free space."""
    lines, bases, estimated = [], [], []
    total = Estimate()
    first_writer = None
    for step in steps:
        est = step_estimate(step)
        estimated.append((step, est))
        if est is None:
            lines.append(f"  {step.name:<26} (no estimate)")
            continue
        if step.todo is not None and not step.todo and step.shards:
            lines.append(f"  {step.name:<26} complete")
            continue
        ram = human_bytes(est.peak_ram_bytes) if est.peak_ram_bytes else "-"
        lines.append(f"  {step.name:<26} disk {human_bytes(est.disk_bytes):>9}   RAM/job {ram:>9}"
                     f"   jobs {est.jobs:>6,}   CPU {human_hours(est.cpu_hours):>10}   GPU {human_hours(est.gpu_hours):>10}"
                     + (f"   {est.detail}" if est.detail else ""))
        total.disk_bytes += est.disk_bytes  # net: a step that deletes counts negative
        total.cpu_hours += est.cpu_hours
        total.gpu_hours += est.gpu_hours
        total.peak_ram_bytes = max(total.peak_ram_bytes, est.peak_ram_bytes)
        if first_writer is None and est.disk_bytes > 0:
            first_writer = (step, est)
        for b in est.basis:
            if b not in bases:
                bases.append(b)
    free = free_bytes(workdir)
    out = ["resources (estimate):"] + lines
    out.append(f"  {'total (net)':<26} disk {human_bytes(total.disk_bytes):>9}   RAM/job {human_bytes(total.peak_ram_bytes):>9}"
               f" (largest)   CPU {human_hours(total.cpu_hours)}   GPU {human_hours(total.gpu_hours)}")
    out.append(f"  free on the work dir's filesystem: {human_bytes(free)}")
    out += [f"  basis: {b}" for b in bases]
    return out + oversized_requests(estimated)


# a request more than this many times a step's estimated peak is noted as oversized
OVERSIZED_FACTOR = 4.0


def oversized_requests(estimated) -> List[str]:
    """Notes for the scheduler requests (memory, CPUs per job) that exceed ``OVERSIZED_FACTOR``
    times the estimated peak of every step that uses them, one per config key, judged against
    the largest peak among the steps the key serves (a key such as ``cluster.defaults.mem_gb``
    serves several stages; one whose peak is unknown, e.g. training's, leaves the key unjudged).
    ``estimated``: (step, Estimate or None) pairs; steps already complete are not submitted and
    not judged. Only Slurm requests: the local executors reserve nothing."""
    from pipeline.config import setting_name

    by_key: dict = {}  # key -> [requested, its bytes or CPUs, largest peak (None: unknown), stage names]
    for step, est in estimated:
        cfg = step.ctx.cfg
        if cfg.cluster.get("executor") != "slurm" or (step.todo is not None and not step.todo and step.shards):
            continue
        res = step.resources
        # Slurm's --mem=NG is N GiB
        for field_name, requested, amount, peak in (
                ("mem_gb", res.mem_gb, res.mem_gb * 2**30, est.peak_ram_bytes if est else 0),
                ("cpus_per_task", res.cpus_per_task, res.cpus_per_task, est.cpus if est else 0)):
            if not requested:
                continue
            entry = by_key.setdefault(setting_name(cfg, step.stage.name, field_name), [requested, amount, 0.0, []])
            entry[2] = None if entry[2] is None or not peak else max(entry[2], peak)
            if step.stage.name not in entry[3]:
                entry[3].append(step.stage.name)
    notes = []
    for key, (requested, amount, peak, names) in by_key.items():
        if peak and amount > OVERSIZED_FACTOR * peak:
            shown = human_bytes(peak) if key.endswith("mem_gb") else f"{peak:g} CPUs"
            notes.append(f"  oversized request: {key}={requested:g} is {amount / peak:.0f}x the estimated peak of "
                         f"{', '.join(names)} ({shown} per job); a request near 2x the peak starts sooner in a busy queue")
    return notes


def check_plan_disk(steps, workdir: Path) -> None:
    """``check_free_space`` for the first step of a plan that has work left (what a launch would
    submit first): the dry run's refusal."""
    for step in steps:
        if step.todo is None or step.todo:
            check_free_space(step, workdir)
            return


def check_free_space(step, workdir: Path) -> None:
    """Refuse (ConfigError, one line) to submit ``step`` when what it writes exceeds the free
    space of the work dir's filesystem."""
    if not step.ctx.cfg.cluster.get("check_free_space", True):
        return
    est = step_estimate(step)
    if est is None or est.disk_bytes <= 0:
        return
    need = est.disk_bytes
    if step.shards and step.todo is not None and len(step.todo) < len(step.shards):
        # a resumed step writes only its shards left (a crop 90 % done needs a tenth of its size)
        need = est.disk_bytes * len(step.todo) / len(step.shards)
    free = free_bytes(workdir)
    if need > free:
        raise ConfigError(
            f"not enough disk for {step.name}: it writes ~{human_bytes(need)} under {workdir}, whose "
            f"filesystem has {human_bytes(free)} free; free space or choose a work dir on a larger filesystem"
            + (f" ({est.hint})" if est.hint else "") + " (cluster.check_free_space=false skips this estimate)")
