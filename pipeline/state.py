"""Completion state of shards and stages, kept as small marker files under WORKDIR/.pipeline.

``state/<scope>/<stage>/<shard key>.done.json``     written by the worker after the shard's outputs
``state/<scope>/<stage>/<shard key>.failed.json``   the error's last line, the log path, the host
``state/<scope>/<stage>/<shard key>.running.json``  job id + host + pid while a worker runs it
``state/<scope>/<stage>/_stage.done.json``          written after ``finalize`` succeeded
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


def scope_name(iteration: Optional[int]) -> str:
    return "once" if iteration is None else f"iter{iteration}"


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
        """``{'done': keys, 'failed': keys, 'running': keys}`` from one directory listing."""
        out = {"done": set(), "failed": set(), "running": set()}
        try:
            entries = os.scandir(self.stage_state_dir(stage, iteration))
        except FileNotFoundError:
            return out
        with entries:
            for e in entries:
                name = e.name
                if not name.endswith(".json") or name.startswith((".tmp-", "_")):
                    continue
                key, _, kind = name[: -len(".json")].rpartition(".")
                if kind in out:
                    out[kind].add(key)
        return out

    # --- stage markers -------------------------------------------------------------------------
    def mark_stage_done(self, stage, iteration, summary: dict, n_shards: int) -> None:
        atomic.write_json(
            self.stage_state_dir(stage, iteration) / STAGE_DONE,
            {"summary": summary, "n_shards": n_shards, **_where()},
        )

    def clear_stage_done(self, stage, iteration) -> None:
        _unlink(self.stage_state_dir(stage, iteration) / STAGE_DONE)

    def read_stage_done(self, stage, iteration) -> Optional[dict]:
        return _read(self.stage_state_dir(stage, iteration) / STAGE_DONE)

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
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


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
