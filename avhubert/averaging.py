"""Checkpoint averaging with the semantics of fairseq's ``scripts/average_checkpoints.py``.

Which checkpoints: the final one and the numbered ones a run saved before it
(``checkpoint_<epoch>_<updates>.pt`` every ``checkpoint.save_interval_updates`` within an epoch,
``checkpoint<epoch>.pt`` at epoch ends when epoch checkpoints are on), by the update count each
holds, newest first (files of one update count are the same weights and count once). fairseq's
script takes one kind or the other (``--num-update-checkpoints`` / ``--num-epoch-checkpoints``);
an epoch shorter than ``save_interval_updates`` saves only epoch checkpoints, so both count here. How: every parameter summed over the checkpoints in its own dtype
(half precision as float32), floating-point sums divided by N, integer ones floor-divided; every
checkpoint must hold the same parameter names; the other entries (config, optimizer history,
extra state) are the newest checkpoint's.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import torch

UPDATE_CHECKPOINT = re.compile(r"checkpoint_\d+_(\d+)\.pt$")


class AveragingError(ValueError):
    pass


def checkpoint_updates(state: dict) -> Optional[int]:
    history = state.get("optimizer_history") or []
    return int(history[-1]["num_updates"]) if history and "num_updates" in history[-1] else None


# what fairseq saves besides the numbered checkpoints: never counted as "saved checkpoints"
NOT_SAVED_STATES = re.compile(r"checkpoint_(last|best|final|averaged)\.pt$|checkpoint\.best_")


def last_checkpoints(checkpoint_dir: Path, final: Path, final_updates: int, n: int, updates_of) -> list[Path]:
    """The newest ``n`` checkpoints by update count: ``final`` (at ``final_updates``) and the
    numbered ones saved before it (``checkpoint_<epoch>_<updates>.pt`` every
    ``save_interval_updates``, ``checkpoint<epoch>.pt`` at epoch ends), newest first; fewer when
    fewer were saved. ``updates_of(path)``: a checkpoint's update count (None: unreadable)."""
    numbered = []
    for p in Path(checkpoint_dir).glob("checkpoint*.pt"):
        if p == final or NOT_SAVED_STATES.search(p.name):
            continue
        updates = updates_of(p)
        if updates is not None and updates < final_updates:
            numbered.append((updates, p.name, p))
    numbered.sort(key=lambda t: (t[0], t[1]), reverse=True)
    seen, out = {final_updates}, [final]
    for updates, _, p in numbered:  # one file per update count (an epoch end saved twice is one state)
        if updates not in seen:
            seen.add(updates)
            out.append(p)
    return out[:n]


def average_states(states: list[dict], names: Optional[list[str]] = None) -> dict:
    """The average of checkpoint states (given newest first); the result carries the newest
    one's other entries."""
    if not states:
        raise AveragingError("no checkpoints to average")
    names = names or [f"checkpoint {k}" for k in range(len(states))]
    keys = list(states[0]["model"].keys())
    sums: dict = {}
    for state, name in zip(states, names):
        params = state["model"]
        if sorted(params.keys()) != sorted(keys):
            missing = sorted(set(keys) ^ set(params.keys()))[:5]
            raise AveragingError(f"{name} has other parameters than {names[0]} ({missing}): not the same model")
        for k in keys:
            p = params[k]
            if p.dtype == torch.float16:
                p = p.float()
            sums[k] = p.clone() if k not in sums else sums[k] + p
    n = len(states)
    averaged = {}
    for k, v in sums.items():
        averaged[k] = v.div(n) if v.is_floating_point() else torch.div(v, n, rounding_mode="floor")
    out = dict(states[0])
    out["model"] = averaged
    return out


def average_checkpoints(paths: list[Path], load) -> dict:
    """The averaged state of ``paths`` (newest first), each read with ``load(path)``."""
    return average_states([load(str(p)) for p in paths], [str(p) for p in paths])
