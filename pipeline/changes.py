"""What a launch compares: each step's recorded fingerprint (``pipeline.fingerprint``) against the
settings of this launch.

- A step whose recorded settings differ from this launch's is *changed*. Unless it is redone
  anyway (stale, or under ``--force``), a launch that would run it or read from it refuses with
  one line naming the change and the two ways on: restore the value, or ``--redo-changed``
  (redo exactly the changed steps, then everything after them, as stale steps). ``--dry-run`` and
  ``status`` list every changed step with its keys (old -> new), the steps a redo makes again and
  their estimated cost.
- A change the stage follows by itself (``Stage.accepts_change``: ``train.max_update`` raised
  continues training) is a note, never a refusal.
- Other versions of the project or of a library that changes numbers are a note: the outputs are
  kept (``--force`` a step to redo it).
- A step made before fingerprints were recorded is adopted: the first launch that runs records the
  current settings as its own and says so in one line.
"""
from __future__ import annotations

import json
import re
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import ListConfig, OmegaConf

from pipeline import atomic, provenance
from pipeline import fingerprint as fp
from pipeline.errors import ConfigError
from pipeline.state import describe, scope_name


@dataclass
class StepChange:
    stage: str
    iteration: Optional[int]
    changed: list = field(default_factory=list)  # (key, old, new): refused until restored or redone
    accepted: list = field(default_factory=list)  # (key, old, new, note): followed by the stage itself
    stale: Optional[str] = None
    redo: list = field(default_factory=list)  # (stage, iteration): itself, then what reads it (recorded)
    cpu_hours: float = 0.0
    gpu_hours: float = 0.0
    redo_text: str = ""

    @property
    def name(self) -> str:
        return describe(self.stage, self.iteration)

    @property
    def key(self) -> tuple:
        return (self.stage, self.iteration)

    def keys_text(self) -> str:
        return ", ".join(fp.show_difference(k, old, new) for k, old, new in self.changed)

    def restore_text(self) -> str:
        return ", ".join(f"{k}={fp.show(old)}" for k, old, _ in self.changed)

    def cost_text(self) -> str:
        return f"est. {_hours(self.cpu_hours)} CPU-h, {_hours(self.gpu_hours)} GPU-h"

    def line(self) -> str:
        """``kmeans (iteration 1): changed kmeans.n_clusters 20 -> 7: redoes kmeans, labels, train
        (iteration 1) and iteration 2 (est. 0.4 CPU-h, 0 GPU-h)``."""
        if self.stale:
            return f"{self.name}: changed {self.keys_text()}: stale, so it is redone anyway ({self.stale})"
        return f"{self.name}: changed {self.keys_text()}: redoes {self.redo_text} ({self.cost_text()})"


def _hours(h: float) -> str:
    if not h:
        return "0"
    if h < 0.05:
        return "<0.1"
    return f"{h:,.1f}"


@dataclass
class Comparison:
    changes: dict = field(default_factory=dict)  # (stage, iteration) -> StepChange (changed or accepted keys)
    adopt: list = field(default_factory=list)  # complete steps made before fingerprints, in DAG order
    versions: dict = field(default_factory=dict)  # (name, old, new) -> [step names]
    notes: list = field(default_factory=list)
    settings: dict = field(default_factory=dict)  # (stage, iteration) -> current settings
    refusal: Optional[str] = None  # what a plain launch would refuse (a dry run shows it)

    def changed(self) -> list:
        """Steps with changes that are refused unless redone, in DAG order."""
        return [c for c in self.changes.values() if c.changed]

    def lines(self) -> list[str]:
        """What ``--dry-run`` and ``status`` print about settings and versions."""
        out = [c.line() for c in self.changed()]
        for c in self.changes.values():
            out += [f"{c.name}: {note}" for _k, _o, _n, note in c.accepted]
        if self.adopt:
            out.append(f"{len(self.adopt)} step(s) made before settings were recorded "
                       f"({_names([describe(*k) for k in self.adopt])}): the next launch records the current "
                       "settings as theirs")
        version = self.version_line()
        if version:
            out.append(version)
        return out + self.notes

    def launch_lines(self) -> list[str]:
        """What a launch that runs prints about them: notes only (changes it would not redo are
        refused before)."""
        out = [f"[{c.name}] {note}" for c in self.changes.values() for _k, _o, _n, note in c.accepted]
        version = self.version_line()
        return out + ([version] if version else []) + self.notes

    def version_line(self) -> Optional[str]:
        if not self.versions:
            return None
        parts = [f"{name} {old} -> {new} ({_names(steps)})" for (name, old, new), steps in sorted(self.versions.items())]
        return ("note: made with other versions: " + "; ".join(parts)
                + "; their outputs are kept (--force a step to redo it with these versions)")


def _names(names: list, most: int = 4) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


# --- comparing -----------------------------------------------------------------------------------
def dag_steps(pipe, targets: list) -> list[tuple]:
    """The run's steps in DAG order: those of ``--stage all`` (enabled in this configuration) and
    the targets of this launch."""
    pairs = list(pipe.targets("all"))
    for t in targets:
        if t not in pairs:
            pairs.append(t)
    order = {name: i for i, name in enumerate(pipe.order)}
    rank = {p: i for i, p in enumerate(pairs)}
    return sorted(pairs, key=lambda p: rank[p] if p in rank else order.get(p[0], 0))


def current_inputs(pipe, stage, iteration) -> dict:
    """'stage@scope' -> the recorded fingerprint of each step ``stage`` reads from."""
    return {f"{d}@{scope_name(i)}": (pipe.store.read_fingerprint(d, i) or {}).get("fingerprint")
            for d, i in pipe.prerequisites(stage, iteration)}


def compare(pipe, targets: list) -> Comparison:
    """Compare every recorded step of the run with this launch's settings (reads only)."""
    store, result = pipe.store, Comparison()
    steps = dag_steps(pipe, targets)
    targeted = set(targets)
    edges: dict = defaultdict(list)  # step -> steps that read it
    for key in steps:
        stage = pipe.stages[key[0]]
        try:
            for dep in pipe.prerequisites(stage, key[1]):
                edges[dep].append(key)
        except Exception as e:  # noqa: BLE001 - a broken untargeted section must not stop the launch
            if key in targeted:
                raise
            result.notes.append(f"note: {describe(*key)}: its inputs are unknown ({e})")
    for key in steps:
        name, it = key
        stage = pipe.stages[name]
        record = store.read_fingerprint(name, it)
        if record is None:
            if store.read_stage_done(name, it) is not None:
                result.adopt.append(key)
            continue
        ctx = pipe.context(it)
        try:
            now = stage.settings(ctx)
        except Exception as e:  # noqa: BLE001
            if key in targeted:
                raise
            result.notes.append(f"note: {describe(*key)}: settings not compared ({type(e).__name__}: {e})")
            continue
        result.settings[key] = now
        if record.get("place") != stage.output_place(ctx):  # outputs go elsewhere: made there anew
            continue
        change = StepChange(name, it, stale=store.stale_reason(name, it))
        inert = stage.inert_settings(ctx)
        for k, old, new in fp.differences(record.get("settings") or {}, now):
            if new is None and k in inert:  # does nothing now: its switch's change (if any) is shown
                continue
            note = stage.accepts_change(ctx, k, old, new)
            if note:
                change.accepted.append((k, old, new, note))
            else:
                change.changed.append((k, old, new))
        try:
            inputs_now = sorted(current_inputs(pipe, stage, it))
        except Exception:  # noqa: BLE001 - reported above
            inputs_now = sorted(record.get("inputs") or {})
        inputs_then = sorted(record.get("inputs") or {})
        if inputs_now != inputs_then:
            change.changed.append(("(reads)", _shown_inputs(inputs_then), _shown_inputs(inputs_now)))
        for vname, old, new in fp.version_differences(record.get("versions") or {},
                                                      fp.versions(stage.libraries)):
            result.versions.setdefault((vname, old, new), []).append(describe(*key))
        if change.changed or change.accepted:
            result.changes[key] = change
    for change in result.changes.values():
        if change.changed:
            change.redo = _downstream(change.key, edges, steps, store, targeted)
            change.redo_text = redo_text(change.redo, steps, store, targeted)
            change.cpu_hours, change.gpu_hours = _cost(pipe, change.redo)
    return result


def _shown_inputs(keys: list) -> str:
    out = []
    for k in keys:
        dep, _, scope = k.rpartition("@")
        out.append(dep if scope == "once" else f"{dep} (iteration {scope[4:]})")
    return "[" + ", ".join(out) + "]"


def _downstream(start: tuple, edges: dict, steps: list, store, targeted: set) -> list:
    seen, todo = {start}, [start]
    while todo:
        for nxt in edges.get(todo.pop(), []):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return [s for s in steps if s in seen and (s == start or s in targeted or store.has_run(*s))]


def redo_text(redo: list, steps: list, store, targeted: set) -> str:
    """``kmeans, labels, train (iteration 1) and iteration 2``: an iteration all of whose steps
    (that ran) are redone by its number, consecutive ones as ``iterations 2-4``."""
    present: dict = defaultdict(set)  # iteration -> its steps that ran (or run now)
    for s in steps:
        if s[1] is not None and (s in targeted or store.has_run(*s)):
            present[s[1]].add(s)
    redone = set(redo)
    tokens: list = []
    part: list = []  # stage names of an iteration redone in part
    part_it: list = [None]
    whole: set = set()

    def flush():
        if part:
            tokens.extend(part[:-1] + [f"{part[-1]} (iteration {part_it[0]})"])
        part.clear()

    for name, it in redo:
        if it is None:
            flush()
            tokens.append(name)
        elif present[it] <= redone:
            if it in whole:
                continue
            flush()
            whole.add(it)
            m = re.fullmatch(r"iterations? (\d+)(?:-(\d+))?", tokens[-1]) if tokens else None
            if m and int(m.group(2) or m.group(1)) == it - 1:
                tokens[-1] = f"iterations {m.group(1)}-{it}"
            else:
                tokens.append(f"iteration {it}")
        else:
            if it != part_it[0]:
                flush()
                part_it[0] = it
            part.append(name)
    flush()
    return tokens[0] if len(tokens) == 1 else ", ".join(tokens[:-1]) + " and " + tokens[-1]


def _cost(pipe, redo: list) -> tuple[float, float]:
    cpu = gpu = 0.0
    for name, it in redo:
        try:
            est = pipe.stages[name].estimate(pipe.context(it))
        except Exception:  # noqa: BLE001 - an estimate never stops a launch
            est = None
        if est is not None:
            cpu += float(est.cpu_hours or 0)
            gpu += float(est.gpu_hours or 0)
    return cpu, gpu


# --- settings that do nothing ---------------------------------------------------------------------
def check_unused(pipe, targets: list) -> None:
    """A setting that does nothing is one ``ConfigError`` line, before anything is submitted:
    ``nodes``/``tasks_per_node`` of a stage that runs one task per shard; on the command line, a
    per-iteration list longer than the run's iterations, an output setting of a stage that is not
    part of this run or that does nothing in every step of it (``Stage.inert_settings``),
    resources of a stage that does not exist."""
    cfg = pipe.cfg
    given = {o.split("=", 1)[0].strip(): o.split("=", 1)[1] for o in pipe.overrides if "=" in o}
    multi = [n for n, st in pipe.stages.items() if st.multi_task]
    stage_resources = cfg.cluster.get("stages") or {}
    for name in stage_resources:
        stage = pipe.stages.get(name)
        if stage is None:
            if any(k == f"cluster.stages.{name}" or k.startswith(f"cluster.stages.{name}.") for k in given):
                raise ConfigError(f"cluster.stages.{name}: there is no stage {name!r} (stages: {', '.join(pipe.order)})")
            continue
        if stage.multi_task:
            continue
        for key in ("nodes", "tasks_per_node"):
            value = stage_resources[name].get(key)
            if value is not None and int(value) != 1:
                raise ConfigError(
                    f"cluster.stages.{name}.{key}={value} does nothing: {name} runs one task per shard "
                    f"({'only ' + ', '.join(multi) + ' use' if multi else 'no stage here uses'} nodes and "
                    "tasks_per_node); remove it")
    readers: dict = defaultdict(set)  # config section -> stages whose outputs depend on it
    for name, stage in pipe.stages.items():
        readers[stage.config_section or name].add(name)
    for name, stage in pipe.stages.items():
        for key in stage.reads:
            if key.split(".")[0] in readers:
                readers[key.split(".")[0]].add(name)
    run_steps = dag_steps(pipe, targets)
    running = {name for name, _ in run_steps}
    for key, text in given.items():
        kind = fp.kind_of(cfg, key)
        if kind not in ("output", "per_iteration"):
            continue
        value = OmegaConf.select(cfg, key, default=None)
        if kind == "per_iteration" and isinstance(value, (list, ListConfig)) and len(value) > pipe.n_iterations:
            n = pipe.n_iterations
            raise ConfigError(
                f"{key} has {len(value)} entries but this run has {n} iteration(s): "
                f"entr{'y' if len(value) == n + 1 else 'ies'} {n + 1}{'' if len(value) == n + 1 else f'-{len(value)}'} "
                f"do{'es' if len(value) == n + 1 else ''} nothing (set iterations={len(value)} or shorten the list)")
        section = key.split(".")[0]
        owners = [(n, it) for n, it in run_steps if (pipe.stages[n].config_section or n) == section]
        reasons = [pipe.stages[n].inert_settings(pipe.context(it)).get(key) for n, it in owners]
        if owners and all(reasons):
            raise ConfigError(f"{key}={text} does nothing: {reasons[0]}; remove it")
        if section in readers and not readers[section] & running:
            names = sorted(readers[section], key=pipe.order.index)
            raise ConfigError(
                f"{key}={text} does nothing: {' and '.join(names)} {'is' if len(names) == 1 else 'are'} not part of "
                f"this run in this configuration (see {section}.enabled); run it with --stage {names[0]}, or leave "
                "the setting out")


# --- refusing ------------------------------------------------------------------------------------
def check(pipe, steps: list, comparison: Comparison) -> None:
    """Refuse (one ``ConfigError`` line) a launch that would run a changed step without being
    asked to redo it, or read from a changed step it does not run; mark the changed steps it
    redoes (``Step.redo``)."""
    planned = {(s.stage.name, s.iteration) for s in steps}
    for step in steps:
        change = comparison.changes.get((step.stage.name, step.iteration))
        if change is None or not change.changed or change.stale:
            continue
        if pipe.force or pipe.redo_changed:
            step.redo = change
            continue
        more = len([c for c in comparison.changed() if not c.stale]) - 1
        _refuse(pipe, comparison,
                f"{change.name} was made with other settings ({change.keys_text()}): restore "
                f"{change.restore_text()}, or add --redo-changed to redo {change.redo_text} ({change.cost_text()})"
                + (f"; {more} more changed step(s): --dry-run lists them" if more > 0 else ""))
        return
    for step in steps:
        for dep in _all_prerequisites(pipe, step.stage, step.iteration):
            change = comparison.changes.get(dep)
            if dep in planned or change is None or not change.changed or change.stale:
                continue
            hint = f"--stage {dep[0]}" + (f" --iteration {dep[1]}" if dep[1] else "")
            _refuse(pipe, comparison,
                    f"{step.name} reads {change.name}, which was made with other settings ({change.keys_text()}): "
                    f"restore {change.restore_text()}, or redo it first: `python launch.py {hint} --redo-changed` "
                    "(or --stage all --redo-changed)")
            return


def _refuse(pipe, comparison: Comparison, message: str) -> None:
    """A launch refuses; a dry run keeps the message to show it with the plan."""
    if pipe.dry_run:
        comparison.refusal = message
        return
    raise ConfigError(message)


def _all_prerequisites(pipe, stage, iteration) -> list:
    seen, todo, out = set(), [(stage.name, iteration)], []
    while todo:
        name, it = todo.pop()
        for dep in pipe.prerequisites(pipe.stages[name], it):
            if dep not in seen:
                seen.add(dep)
                out.append(dep)
                todo.append(dep)
    return out


# --- recording -----------------------------------------------------------------------------------
CHANGES_FILE = "changes.json"  # in .pipeline/: what the report marks


def save(pipe, targets: list) -> None:
    """After a launch ran (or failed): the steps whose recorded settings still differ from this
    launch's (steps it did not redo), for the run report (``.pipeline/changes.json``)."""
    try:
        comparison = compare(pipe, targets)
    except Exception as e:  # noqa: BLE001 - the report then says settings were not compared
        doc = {"error": f"{type(e).__name__}: {e}"}
    else:
        doc = {"changed": {c.name: c.keys_text() for c in comparison.changed()}, "lines": comparison.lines()}
    try:
        atomic.write_json(pipe.store.root / CHANGES_FILE, doc)
    except OSError:  # a full disk: the launch's own error says it (this runs as it ends)
        pass


def read_saved(workdir) -> dict:
    try:
        return json.loads((Path(workdir) / ".pipeline" / CHANGES_FILE).read_text())
    except (OSError, ValueError):
        return {}

def make_record(pipe, stage, iteration, how: str = "run") -> dict:
    ctx = pipe.context(iteration)
    record = fp.make_record(stage.settings(ctx), current_inputs(pipe, stage, iteration), fp.versions(stage.libraries),
                            how)
    place = stage.output_place(ctx)
    if place is not None:
        record["place"] = place
    old = pipe.store.read_fingerprint(stage.name, iteration) or {}
    same = old.get("fingerprint") == record["fingerprint"] and old.get("recorded") == how
    record["started"] = old.get("started") if same and old.get("started") else time.time()
    record["command"] = list(pipe.command)
    if old.get("provenance"):  # where its provenance.json files are (pipeline.provenance.write)
        record["provenance"] = old["provenance"]
    return record


def record_start(pipe, step) -> dict:
    """Record what the step's outputs are made with, before anything of it runs."""
    record = make_record(pipe, step.stage, step.iteration)
    pipe.store.write_fingerprint(step.stage.name, step.iteration, record)
    return record


def adopt(pipe, comparison: Comparison) -> list[str]:
    """Record the current settings of the complete steps made before fingerprints (DAG order,
    so each step's inputs are recorded before it); one line for the user."""
    if not comparison.adopt:
        return []
    for name, it in comparison.adopt:
        stage = pipe.stages[name]
        record = make_record(pipe, stage, it, how="adopted")
        record["started"] = None
        pipe.store.write_fingerprint(name, it, record)
        provenance.write(pipe, stage, it, record, finished=None, shards=None)
    return [f"adopted {len(comparison.adopt)} step(s) made before settings were recorded "
            f"({_names([describe(*k) for k in comparison.adopt])}): this launch's settings are recorded as "
            "theirs (.pipeline/state/*/*/_fingerprint.json)"]


def accept(pipe, step, comparison: Comparison) -> None:
    """A complete step whose only differences are ones the stage follows by itself, with nothing
    left to run: its outputs stand for the new settings, so they are recorded."""
    change = comparison.changes.get((step.stage.name, step.iteration))
    if change is not None and change.accepted and not change.changed:
        record_start(pipe, step)
