"""``provenance.json`` beside a step's outputs: what made them.

Written when a step completes, into each of ``Stage.provenance_dirs`` (its output directory;
training and fine-tuning also their checkpoint directory, so a checkpoint copied elsewhere with its
directory still says what made it): the step, its fingerprint and resolved settings
(``pipeline.fingerprint``), the steps it read from (their fingerprints and provenance files), the
command line and directory of the launch that completed it, the project's commit, the library
versions, the host and the times. A step adopted from a work dir made before fingerprints gets one
saying so (the settings are the adopting launch's).

It records hosts and times, so it is not one of the outputs that are byte-identical between two
runs: comparisons of outputs leave ``provenance.json`` out (``PROVENANCE``).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

from pipeline import atomic
from pipeline.fingerprint import hostname
from pipeline.state import describe

PROVENANCE = "provenance.json"


def _iso(t: Optional[float]) -> Optional[str]:
    return None if t is None else time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t))


def _relative(path: Path, workdir: Path) -> str:
    try:
        return Path(path).resolve().relative_to(Path(workdir).resolve()).as_posix()
    except ValueError:
        return str(path)


def location(pipe, stage, iteration) -> Optional[Path]:
    """The step's main provenance file (in its first provenance dir)."""
    try:
        dirs = stage.provenance_dirs(pipe.context(iteration))
    except Exception:  # noqa: BLE001 - a stage that cannot say (misconfigured): no link
        return None
    return Path(dirs[0]) / PROVENANCE if dirs else None


def document(pipe, stage, iteration, record: dict, finished: Optional[float], shards: Optional[dict],
             generation: Optional[str] = None) -> dict:
    inputs = {}
    for key, fingerprint in sorted((record.get("inputs") or {}).items()):
        dep, _, scope = key.rpartition("@")
        dep_it = None if scope == "once" else int(scope[4:])
        where = location(pipe, pipe.stages[dep], dep_it) if dep in pipe.stages else None
        inputs[describe(dep, dep_it)] = {"fingerprint": fingerprint,
                                         "provenance": _relative(where, pipe.workdir) if where else None}
    versions = dict(record.get("versions") or {})
    started = record.get("started")
    doc = {
        "step": describe(stage.name, iteration),
        "stage": stage.name,
        "iteration": iteration,
        "fingerprint": record.get("fingerprint"),
        "settings_digest": record.get("settings_digest"),
        "settings": record.get("settings"),
        "inputs": inputs,
        "command": record.get("command") if finished is None else list(pipe.command),
        "cwd": os.getcwd(),
        "project": {"commit": versions.pop("project", None), "root": str(Path(__file__).resolve().parent.parent)},
        "versions": versions,
        "host": hostname(),
        "started": _iso(started),
        "finished": _iso(finished),
        "seconds": round(finished - started, 1) if finished and started else None,
        "shards": shards,
        "generation": generation or pipe.store.generation(stage.name, iteration) or None,
        "state": _relative(pipe.store.stage_state_dir(stage.name, iteration), pipe.workdir),
    }
    if record.get("recorded") == "adopted":
        doc["adopted"] = ("made before settings were recorded: the settings are those of the launch that "
                          f"adopted it, on {_iso(time.time())}")
    return doc


def write(pipe, stage, iteration, record: dict, finished: Optional[float], shards: Optional[dict],
          generation: Optional[str] = None) -> list[Path]:
    """Write the step's provenance into each of its provenance dirs that exists (``generation``:
    the one its outputs get, when they are not yet marked complete)."""
    doc = document(pipe, stage, iteration, record, finished, shards, generation)
    written = []
    for d in stage.provenance_dirs(pipe.context(iteration)):
        if Path(d).is_dir():
            atomic.write_json(Path(d) / PROVENANCE, doc)
            written.append(Path(d) / PROVENANCE)
    # where they are, with the record (the report links them without asking the stage)
    pipe.store.write_fingerprint(stage.name, iteration,
                                 {**record, "provenance": [_relative(p, pipe.workdir) for p in written]})
    return written


def clear(pipe, stage, iteration) -> None:
    """Outputs made anew: the provenance of the old ones goes (written again when the step completes)."""
    try:
        dirs = stage.provenance_dirs(pipe.context(iteration))
    except Exception:  # noqa: BLE001 - nothing to clear where the stage cannot say
        return
    for d in dirs:
        (Path(d) / PROVENANCE).unlink(missing_ok=True)
