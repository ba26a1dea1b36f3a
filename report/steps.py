"""The engine's record of a work dir as the report shows it: every recorded step with its shard
counts (the status command's reading of the markers), its state and its times."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from pipeline.changes import read_saved
from pipeline.state import StateStore, describe
from pipeline.status import collect as collect_status
from stages import get_stage

MARKERS_READ = 2000  # done markers read per step for job times; more are sampled


@dataclass
class StepInfo:
    stage: str
    iteration: Optional[int]
    total: Optional[int]
    done: int
    running: int
    failed: list  # (key, log, error)
    finalized: bool
    finished_at: Optional[float] = None  # the stage marker's time
    step_seconds: Optional[float] = None  # the wall time of the launch step that finalized it
    job_seconds: Optional[float] = None  # sum of the shards' own run times
    job_seconds_estimated: bool = False
    first_start: Optional[float] = None
    last_end: Optional[float] = None
    settings_digest: Optional[str] = None  # of the settings its outputs were made with (pipeline.fingerprint)
    provenance: Optional[str] = None  # its provenance.json, relative to the work dir
    changed: Optional[str] = None  # the last launch's settings differ: "key old -> new, ..."

    @property
    def name(self) -> str:
        return self.stage if self.iteration is None else f"{self.stage} (iteration {self.iteration})"

    @property
    def span(self) -> Optional[float]:
        """First shard start to last shard end (wall clock, across launches)."""
        return self.last_end - self.first_start if self.first_start and self.last_end else None

    @property
    def state(self) -> str:
        if self.finalized:
            return "complete"
        if self.failed:
            return "failed"
        if self.running:
            return "running"
        return "incomplete"


def collect_steps(workdir: Path, order: List[str]) -> List[StepInfo]:
    """Every recorded step with its shard counts (the status command's reading of the markers) and
    its times: the stage marker's, and the shards' run times from their done markers (at most
    MARKERS_READ read per step; beyond that an even sample, scaled: marked estimated)."""
    store = StateStore(workdir)
    changed = read_saved(workdir).get("changed") or {}
    out = []
    for s in collect_status(workdir, order):
        info = StepInfo(s.stage, s.iteration, s.total, s.done, s.running, list(s.failed), s.finalized)
        record = store.read_fingerprint(s.stage, s.iteration) or {}
        info.settings_digest = record.get("settings_digest")
        info.provenance = (record.get("provenance") or [None])[0]
        info.changed = changed.get(describe(s.stage, s.iteration))
        stage_done = store.read_stage_done(s.stage, s.iteration)
        if stage_done:
            info.finished_at = stage_done.get("time")
            info.step_seconds = (stage_done.get("summary") or {}).get("seconds")
        keys = sorted(store.markers(s.stage, s.iteration)["done"])
        if keys:
            step = max(1, len(keys) // MARKERS_READ)
            picked = keys[::step]
            total, n = 0.0, 0
            for key in picked:
                m = store.read_done(s.stage, s.iteration, key)
                if not m:
                    continue
                sec = float((m.get("stats") or {}).get("seconds") or 0.0)
                end = m.get("time")
                total += sec
                n += 1
                if end is not None:
                    info.last_end = max(info.last_end or end, end)
                    info.first_start = min(info.first_start or end - sec, end - sec)
            if n:
                info.job_seconds = total * len(keys) / n
                info.job_seconds_estimated = n < len(keys)
        out.append(info)
    return sorted(out, key=lambda s: _step_rank(s, order))


def _step_rank(s: "StepInfo", order: List[str]) -> tuple:
    """DAG order as a user reads it: crop, manifest, each iteration's stages, then fine-tuning."""
    after = False
    try:
        after = bool(getattr(get_stage(s.stage), "after_iterations", False))
    except Exception:  # a stage this checkout does not have: keep its recorded place
        pass
    phase = 2 if after else (0 if s.iteration is None else 1)
    return phase, s.iteration or 0, order.index(s.stage) if s.stage in order else len(order), s.stage
