"""``launch.py status``: per iteration and stage, shards done / total, running, failed (with log
paths and last error lines), read from the marker files alone (no stage code is imported)."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Optional

from pipeline.state import StageStatus, StateStore


def _pid_dead_here(info: dict) -> bool:
    if info.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(info.get("pid", -1)), 0)
        return False
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError):
        return False


def collect(workdir: Path, order: Optional[list] = None) -> list[StageStatus]:
    store = StateStore(Path(workdir))
    out = []
    for it, stages in store.scopes():
        if order:
            stages = sorted(stages, key=lambda s: (order.index(s) if s in order else len(order), s))
        for stage in stages:
            d = store.stage_state_dir(stage, it)
            m = store.markers(stage, it)
            total = None
            plan = d / "_plan.json"
            if plan.exists():
                total = json.loads(plan.read_text()).get("n_shards")
            failed = []
            for key in sorted(m["failed"] - m["done"]):
                info = store.read_failed(stage, it, key) or {}
                failed.append((key, info.get("log", "?"), info.get("error", "?")))
            running = 0
            for key in m["running"] - m["done"] - m["failed"]:
                info = _read(d / f"{key}.running.json")
                if info is not None and not _pid_dead_here(info):
                    running += 1
            out.append(
                StageStatus(
                    stage=stage,
                    iteration=it,
                    total=total,
                    done=len(m["done"]),
                    running=running,
                    failed=failed,
                    finalized=store.read_stage_done(stage, it) is not None,
                )
            )
    return out


def _read(p: Path) -> Optional[dict]:
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def render(statuses: list[StageStatus], workdir: Path) -> str:
    if not statuses:
        return f"{workdir}: nothing recorded yet"
    lines = [f"work dir {workdir}", f"{'iteration':<10} {'stage':<10} {'done/total':>12} {'running':>8} {'failed':>7}  state"]
    for s in statuses:
        total = "?" if s.total is None else str(s.total)
        if s.finalized:
            state = "complete"
        elif s.failed:
            state = "FAILED"
        elif s.running:
            state = "running"
        else:
            state = "incomplete"
        it = "-" if s.iteration is None else str(s.iteration)
        lines.append(f"{it:<10} {s.stage:<10} {f'{s.done}/{total}':>12} {s.running:>8} {len(s.failed):>7}  {state}")
        for key, log, err in s.failed[:20]:
            lines.append(f"    failed {key}: {err}")
            lines.append(f"           log: {log}")
        if len(s.failed) > 20:
            lines.append(f"    ... and {len(s.failed) - 20} more failed shard(s)")
    return "\n".join(lines)
