"""Completion state of shards and stages, kept as small marker files under WORKDIR/.pipeline.

``state/<scope>/<stage>/<shard key>.done.json``     written by the worker after the shard's outputs
``state/<scope>/<stage>/<shard key>.failed.json``   the error's last line, the log path, the host
``state/<scope>/<stage>/<shard key>.running.json``  job id + host + pid while a worker runs it
``state/<scope>/<stage>/<shard key>.lease``         the job that may write the shard (pipeline.lease)
``state/<scope>/<stage>/_jobs/<time>-<pid>.json``   one per submission (an array, or a local job):
                                                    shard key -> scheduler job id, written right
                                                    after sbatch returned, before any waiting
``state/<scope>/<stage>/_inputs.json``              generations of the step's inputs when it ran
``state/<scope>/<stage>/_stage.done.json``          written after ``finalize`` succeeded (with the
                                                    step's generation and its inputs' generations)
``state/<scope>/<stage>/_stage.failed.json``        why the step failed (finalize, scheduler)
``state/<scope>/<stage>/_fingerprint.json``         the settings, inputs and versions the step's
                                                    outputs are made with (pipeline.fingerprint)
``logs/<scope>/<stage>/<shard key>.log``            one log per shard (rank suffix for rank > 0)

``scope`` is ``once`` for stages that run once and ``iter{N}`` for per-iteration ones. Markers are
written atomically, so a killed worker leaves either no marker or a whole one. ``status`` only lists
directories (one ``scandir`` per stage) and reads failure markers, which keeps it fast at 10^4 shards.
"""
from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from pipeline import atomic

STAGE_DONE = "_stage.done.json"
STAGE_FAILED = "_stage.failed.json"
INPUTS = "_inputs.json"
FINGERPRINT = "_fingerprint.json"
JOBS_DIR = "_jobs"


def scope_name(iteration: Optional[int]) -> str:
    return "once" if iteration is None else f"iter{iteration}"


def describe(stage: str, iteration: Optional[int]) -> str:
    """A step as the user reads it: ``kmeans (iteration 1)``, ``crop``."""
    return stage if iteration is None else f"{stage} (iteration {iteration})"


@dataclass
class StateStore:
    workdir: Path

    @property
    def root(self) -> Path:
        return Path(self.workdir) / ".pipeline"

    def stage_state_dir(self, stage: str, iteration: Optional[int]) -> Path:
        return self.root / "state" / scope_name(iteration) / stage

    def log_path(self, stage: str, iteration: Optional[int], key: str, rank: int = 0) -> Path:
        suffix = "" if rank == 0 else f".rank{rank}"
        return self.root / "logs" / scope_name(iteration) / stage / f"{key}{suffix}.log"

    @property
    def driver_file(self) -> Path:
        return self.root / "driver.json"

    @property
    def driver_dir(self) -> Path:
        return self.root / "driver"

    def submitit_dir(self, stage: str, iteration: Optional[int]) -> Path:
        # a fresh folder per launch: Slurm job ids restart when a cluster's state is wiped, and an
        # old result file must never be taken for a new job's
        return self.root / "submitit" / scope_name(iteration) / stage / time.strftime("%Y%m%d-%H%M%S")

    def _marker(self, stage: str, iteration: Optional[int], key: str, kind: str) -> Path:
        return self.stage_state_dir(stage, iteration) / f"{key}.{kind}.json"

    # --- shard markers -------------------------------------------------------------------------
    def mark_running(self, stage, iteration, key, info: dict) -> None:
        atomic.write_json(self._marker(stage, iteration, key, "running"), {**info, **_where()})

    def mark_done(self, stage, iteration, key, stats: dict, extra: Optional[dict] = None) -> None:
        atomic.write_json(self._marker(stage, iteration, key, "done"), {"stats": stats, **(extra or {}), **_where()})
        for kind in ("failed", "running"):
            _unlink(self._marker(stage, iteration, key, kind))

    def mark_failed(self, stage, iteration, key, error: str, log: Path, extra: Optional[dict] = None) -> None:
        atomic.write_json(
            self._marker(stage, iteration, key, "failed"),
            {"error": error, "log": str(log), **(extra or {}), **_where()},
        )
        _unlink(self._marker(stage, iteration, key, "running"))

    def clear_shard(self, stage, iteration, key) -> None:
        for kind in ("done", "failed", "running"):
            _unlink(self._marker(stage, iteration, key, kind))

    def read_done(self, stage, iteration, key) -> Optional[dict]:
        return _read(self._marker(stage, iteration, key, "done"))

    def read_failed(self, stage, iteration, key) -> Optional[dict]:
        return _read(self._marker(stage, iteration, key, "failed"))

    def markers(self, stage: str, iteration: Optional[int]) -> dict[str, set]:
        """``{'done': keys, 'failed': keys, 'running': keys, 'lease': keys}`` from one directory
        listing."""
        out = {"done": set(), "failed": set(), "running": set(), "lease": set()}
        try:
            entries = os.scandir(self.stage_state_dir(stage, iteration))
        except FileNotFoundError:
            return out
        with entries:
            for e in entries:
                name = e.name
                if name.startswith((".tmp-", "_")):
                    continue
                if name.endswith(".lease"):
                    out["lease"].add(name[: -len(".lease")])
                    continue
                if not name.endswith(".json"):
                    continue
                key, _, kind = name[: -len(".json")].rpartition(".")
                if kind in out:
                    out[kind].add(key)
        return out

    def read_running(self, stage, iteration, key) -> Optional[dict]:
        return _read(self._marker(stage, iteration, key, "running"))

    def lease(self, stage, iteration, key):
        from pipeline.lease import ShardLease

        return ShardLease(self.stage_state_dir(stage, iteration), key)

    # --- job records -----------------------------------------------------------------------------
    def record_jobs(self, stage, iteration, executor: str, folder, jobs: dict[str, dict]) -> Path:
        """Record one submission: shard key -> {job_id, ...}. Written before the launcher waits, so
        a later launch (or a requeued driver) finds every job it may have to adopt."""
        name = f"{time.time_ns():020d}-{os.getpid()}.json"
        path = self.stage_state_dir(stage, iteration) / JOBS_DIR / name
        atomic.write_json(path, {"executor": executor, "folder": str(folder), "submitted": time.time(),
                                 "host": socket.gethostname(), "jobs": jobs})
        return path

    def job_records(self, stage, iteration) -> dict[str, dict]:
        """The latest recorded job of every shard that was ever submitted:
        ``{key: {job_id, executor, folder, submitted, ...}}``."""
        d = self.stage_state_dir(stage, iteration) / JOBS_DIR
        try:
            names = sorted(n for n in os.listdir(d) if n.endswith(".json") and not n.startswith(".tmp-"))
        except FileNotFoundError:
            return {}
        out: dict[str, dict] = {}
        for name in names:
            rec = _read(d / name)
            if not rec:
                continue
            common = {k: rec.get(k) for k in ("executor", "folder", "submitted")}
            for key, job in (rec.get("jobs") or {}).items():
                out[key] = {**common, **job}
        return out

    # --- stage markers -------------------------------------------------------------------------
    def mark_stage_done(self, stage, iteration, summary: dict, n_shards: int, generation: str = "",
                        inputs: Optional[dict] = None, shards: str = "") -> None:
        """``generation`` changes each time the step's outputs are made anew; ``inputs`` are the
        generations of its prerequisites it was made from (a step whose inputs were redone since
        is stale); ``shards`` a digest of its shard keys (new shards = new outputs)."""
        atomic.write_json(
            self.stage_state_dir(stage, iteration) / STAGE_DONE,
            {"summary": summary, "n_shards": n_shards, "generation": generation, "inputs": inputs or {},
             "shards": shards, **_where()},
        )
        _unlink(self.stage_state_dir(stage, iteration) / STAGE_FAILED)

    def clear_stage_done(self, stage, iteration) -> None:
        _unlink(self.stage_state_dir(stage, iteration) / STAGE_DONE)

    def read_stage_done(self, stage, iteration) -> Optional[dict]:
        return _read(self.stage_state_dir(stage, iteration) / STAGE_DONE)

    def mark_stage_failed(self, stage, iteration, error: str) -> None:
        atomic.write_json(self.stage_state_dir(stage, iteration) / STAGE_FAILED, {"error": error, **_where()})

    def clear_stage_failed(self, stage, iteration) -> None:
        _unlink(self.stage_state_dir(stage, iteration) / STAGE_FAILED)

    def read_stage_failed(self, stage, iteration) -> Optional[dict]:
        return _read(self.stage_state_dir(stage, iteration) / STAGE_FAILED)

    def generation(self, stage, iteration) -> str:
        return (self.read_stage_done(stage, iteration) or {}).get("generation") or ""

    def stale_reason(self, stage, iteration, _memo: Optional[dict] = None) -> Optional[str]:
        """Why the step's outputs are out of date: a prerequisite recorded when it ran
        (``_inputs.json``, 'stage@scope' -> generation) has been redone since, or is itself stale.
        None when not stale or unknown (a step that never ran, or recorded before generations)."""
        memo = {} if _memo is None else _memo
        if (stage, iteration) in memo:
            return memo[(stage, iteration)]
        memo[(stage, iteration)] = None  # (the DAG has no cycles; this only guards against one)
        recorded = self.read_inputs(stage, iteration)
        if recorded is None:
            recorded = (self.read_stage_done(stage, iteration) or {}).get("inputs") or {}
        redone, stale = [], []
        for key, gen in sorted(recorded.items()):
            dep, _, scope = key.rpartition("@")
            dep_it = None if scope == "once" else int(scope[4:]) if scope[4:].isdigit() else None
            name = dep if dep_it is None else f"{dep} (iteration {dep_it})"
            now = self.generation(dep, dep_it)
            if gen and now and now != gen:
                redone.append(name)
            elif now and self.stale_reason(dep, dep_it, memo):
                stale.append(name)
        why = None
        if redone:
            why = f"its input{'s' if len(redone) > 1 else ''} {', '.join(redone)} {'were' if len(redone) > 1 else 'was'} redone since it ran"
        elif stale:
            why = f"its input{'s' if len(stale) > 1 else ''} {', '.join(stale)} {'are' if len(stale) > 1 else 'is'} stale"
        memo[(stage, iteration)] = why
        return why

    def write_inputs(self, stage, iteration, inputs: dict, carry_generation: Optional[str], shards: str) -> None:
        """What a step runs from: its inputs' generations, the generation its outputs keep when
        this run only repairs them (None: they are made anew), a digest of its shard keys."""
        atomic.write_json(self.stage_state_dir(stage, iteration) / INPUTS,
                          {"inputs": inputs, "carry_generation": carry_generation, "shards": shards})

    def read_inputs_record(self, stage, iteration) -> dict:
        return _read(self.stage_state_dir(stage, iteration) / INPUTS) or {}

    def read_inputs(self, stage, iteration) -> Optional[dict]:
        rec = _read(self.stage_state_dir(stage, iteration) / INPUTS)
        return None if rec is None else rec.get("inputs", {})

    def write_fingerprint(self, stage, iteration, record: dict) -> None:
        atomic.write_json(self.stage_state_dir(stage, iteration) / FINGERPRINT, record)

    def read_fingerprint(self, stage, iteration) -> Optional[dict]:
        return _read(self.stage_state_dir(stage, iteration) / FINGERPRINT)

    def has_run(self, stage, iteration) -> bool:
        """Whether the step ever started (it has a record of its inputs or of its completion)."""
        d = self.stage_state_dir(stage, iteration)
        return (d / INPUTS).is_file() or (d / STAGE_DONE).is_file()

    def scopes(self) -> list[tuple[Optional[int], list[str]]]:
        """Recorded (iteration, [stage, ...]) pairs, in iteration order."""
        root = self.root / "state"
        if not root.is_dir():
            return []
        found = []
        for scope in root.iterdir():
            if scope.name == "once":
                it = None
            elif scope.name.startswith("iter") and scope.name[4:].isdigit():
                it = int(scope.name[4:])
            else:
                continue
            found.append((it, sorted(p.name for p in scope.iterdir() if p.is_dir())))
        return sorted(found, key=lambda x: -1 if x[0] is None else x[0])


def _where() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}


def _unlink(p: Path) -> None:
    try:
        p.unlink()
    except FileNotFoundError:
        pass


def _read(p: Path) -> Optional[dict]:
    try:
        with open(p) as f:
            data = json.load(f)
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def new_generation() -> str:
    """A token that is different every time a step's outputs are made anew."""
    import uuid

    return f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"


def last_error_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else ""


@dataclass
class StageStatus:
    stage: str
    iteration: Optional[int]
    total: Optional[int]
    done: int
    running: int
    failed: list = field(default_factory=list)  # (key, log, error)
    finalized: bool = False
    pending: int = 0
    pending_reasons: dict = field(default_factory=dict)  # reason -> count
    stopped: list = field(default_factory=list)  # (key, job id, why): its job ended without a result
    blocked: list = field(default_factory=list)  # (key, job id, why): pending until someone acts (held, drained)
    stage_error: Optional[str] = None  # _stage.failed.json
    stale: Optional[str] = None  # why the step's outputs are out of date
