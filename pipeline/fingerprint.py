"""Step fingerprints: the settings, inputs and versions that made a step's outputs.

Every field of every settings dataclass (each stage's ``Config``, their nested sections, the
engine's own keys) is classified where it is declared, with :func:`classify`:

- ``output``: its value can change what a step writes (``kmeans.n_clusters``, ``crop.mode``);
- ``per_iteration``: the same, with a list holding one value per iteration (entry i for iteration
  i+1; a single value for every iteration): iteration N's step holds only its own entry, recorded
  as ``key[N]`` (``train.max_update[2]``);
- ``ignored``: cannot change what is written (resources, parallelism, devices, time limits, poll
  intervals, checks that only fail a step, report keys, ``features.keep``), each with the reason.

A field left out of all three (or named twice) is a ``TypeError`` when the module is imported, so
a new key cannot slip through unclassified.

A step's *settings* (``Stage.settings(ctx)``) are the resolved values of the classified keys it
reads: its own section plus ``Stage.reads``, resolved by the stage where a value only means
something once resolved (the schedule's K for ``kmeans.n_clusters: null``). Its *fingerprint* is a
digest of those settings, the fingerprints of the steps it reads from and the versions that
change numerics (the project's commit, ``Stage.libraries``). The engine records it when a step
starts (``_fingerprint.json`` in the step's state dir) and compares it at every launch
(``pipeline.changes``): other settings are a *change* (shown, refused until restored or
``--redo-changed``), other versions a note.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import socket
import subprocess
import typing
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Iterable, Mapping, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf

ATTRIBUTE = "__settings_classes__"
# files up to this size are identified by their content; bigger ones (checkpoints) by size + mtime
HASHED_FILE_BYTES = 64 << 20
PROJECT_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Classes:
    """How the fields of one settings dataclass bear on what a step writes."""

    output: frozenset
    per_iteration: frozenset
    ignored: Mapping[str, str]  # field -> why it cannot change what is written

    def kind(self, name: str) -> str:
        if name in self.output:
            return "output"
        if name in self.per_iteration:
            return "per_iteration"
        if name in self.ignored:
            return "ignored"
        raise KeyError(name)


def classify(*, output: Iterable[str] = (), per_iteration: Iterable[str] = (),
             ignored: Optional[Mapping[str, str]] = None):
    """Class decorator (above ``@dataclass``) classifying every field of a settings dataclass.
    Fields of a classified base class keep their classes and need not be listed again."""
    output, per_iteration, ignored = set(output), set(per_iteration), dict(ignored or {})

    def wrap(cls):
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"classify: {cls.__name__} is not a dataclass (put @classify above @dataclass)")
        inherited = [classes_of(base) for base in cls.__mro__[1:] if ATTRIBUTE in vars(base)]
        out, per, ign = set(output), set(per_iteration), dict(ignored)
        for parent in inherited:
            out |= parent.output
            per |= parent.per_iteration
            ign = {**parent.ignored, **ign}
        names = [f.name for f in dataclasses.fields(cls)]
        listed = [*output, *per_iteration, *ignored]
        twice = sorted({n for n in listed if listed.count(n) > 1})
        unknown = sorted(set(listed) - set(names))
        missing = [n for n in names if n not in out and n not in per and n not in ign]
        problems = ([f"not classified: {', '.join(missing)}"] if missing else []) + \
                   ([f"classified twice: {', '.join(twice)}"] if twice else []) + \
                   ([f"not fields: {', '.join(unknown)}"] if unknown else [])
        if problems:
            raise TypeError(f"{cls.__module__}.{cls.__qualname__}: {'; '.join(problems)} "
                            "(pipeline.fingerprint.classify: output, per_iteration or ignored with the reason)")
        empty = [n for n, why in ign.items() if not str(why).strip()]
        if empty:
            raise TypeError(f"{cls.__qualname__}: ignored settings need a reason: {', '.join(empty)}")
        setattr(cls, ATTRIBUTE, Classes(frozenset(out), frozenset(per), ign))
        return cls

    return wrap


def classes_of(cls) -> Optional[Classes]:
    """The classification of ``cls`` itself (not one inherited from a base it extends)."""
    return vars(cls).get(ATTRIBUTE) if isinstance(cls, type) else None


def unclassified(cls, prefix: str = "") -> list[str]:
    """Dotted names of the fields under ``cls`` (nested settings dataclasses included) that are
    not classified: what the classification test asserts to be empty."""
    classes = classes_of(cls)
    if classes is None:
        return [prefix.rstrip(".") or cls.__name__]
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        for nested in _dataclasses_in(hints.get(f.name)):
            out += unclassified(nested, f"{prefix}{f.name}.")
    return out


def _dataclasses_in(annotation) -> list:
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        return [annotation]
    return [t for arg in typing.get_args(annotation) for t in _dataclasses_in(arg)]


# --- resolving a step's settings -----------------------------------------------------------------
def _type_of(node) -> Optional[type]:
    if not isinstance(node, DictConfig):
        return None
    t = OmegaConf.get_type(node)
    return t if isinstance(t, type) and dataclasses.is_dataclass(t) else None


def _plain(value):
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def _pick(value, iteration: Optional[int]):
    """Iteration ``iteration``'s entry of a per-iteration setting (a list, or one value for all)."""
    if iteration is None or not isinstance(value, (list, tuple, ListConfig)):
        return value
    return value[iteration - 1] if 1 <= iteration <= len(value) else None


def _flatten(node, prefix: str, iteration: Optional[int], out: dict) -> None:
    """The output settings under ``node`` (a structured section) as ``{dotted key: value}``."""
    t = _type_of(node)
    classes = classes_of(t) if t is not None else None
    if classes is None:
        raise TypeError(f"{prefix.rstrip('.') or 'the config'}: {getattr(t, '__name__', type(node).__name__)} "
                        "is not classified (pipeline.fingerprint.classify)")
    for f in dataclasses.fields(t):
        kind = classes.kind(f.name)
        if kind == "ignored":
            continue
        value = node.get(f.name)
        key = prefix + f.name
        if kind == "per_iteration" and iteration is not None:
            value, key = _pick(value, iteration), f"{key}[{iteration}]"
        _add(value, key, iteration, out)


def _add(value, key: str, iteration: Optional[int], out: dict) -> None:
    if _type_of(value) is not None:
        _flatten(value, key + ".", iteration, out)
    else:
        out[key] = _plain(value)


def resolve(cfg, keys: Iterable[str], iteration: Optional[int] = None) -> dict:
    """``{key: value}`` of the output settings named by ``keys`` (dotted: a section, a nested
    section or one field; a per-iteration field may be followed by a field of its entries, e.g.
    ``schedule.iterations.layer``). Sections absent from ``cfg`` give nothing (toy configs)."""
    out: dict = {}
    for dotted in keys:
        node, prefix = cfg, ""
        parts = dotted.split(".")
        for i, part in enumerate(parts):
            t = _type_of(node)
            classes = classes_of(t) if t is not None else None
            if classes is None or part not in {f.name for f in dataclasses.fields(t)}:
                if node is cfg or classes is None:  # a section this config does not have
                    break
                raise KeyError(f"{dotted}: no setting {part!r} in {t.__name__}")
            kind = classes.kind(part)
            if kind == "ignored":
                break
            value, key = node.get(part), prefix + part
            if kind == "per_iteration" and iteration is not None:
                value, key = _pick(value, iteration), f"{key}[{iteration}]"
            if i == len(parts) - 1:
                _add(value, key, iteration, out)
            node, prefix = value, key + "."
    return out


def kind_of(cfg, dotted: str) -> Optional[str]:
    """The class of the setting at ``dotted`` ('output', 'per_iteration', 'ignored'; a key inside a
    plain value, such as a list entry, has its field's class), or None when it is not a field of a
    classified section."""
    node, kind = cfg, None
    for part in dotted.split("."):
        t = _type_of(node)
        classes = classes_of(t) if t is not None else None
        if classes is None:
            return kind
        if part not in {f.name for f in dataclasses.fields(t)}:
            return None
        kind = classes.kind(part)
        node = node.get(part)
    return kind


def file_content(path) -> str:
    """What a file holds, for a fingerprint: a digest of its bytes up to 64 MB, its size and
    modification time beyond (checkpoints), or 'missing'."""
    p = Path(str(path)).expanduser()
    try:
        st = p.stat()
    except OSError:
        return "missing"
    if st.st_size <= HASHED_FILE_BYTES:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return f"sha256 {h.hexdigest()[:16]}"
    return f"{st.st_size} bytes, modified {st.st_mtime_ns}"


def file_identity(path) -> str:
    """A settings value naming a file, as a fingerprint holds it: the path and its content."""
    p = Path(str(path)).expanduser()
    return f"{p} ({file_content(p)})"


# --- versions ------------------------------------------------------------------------------------
_PROJECT: dict = {}


def project_version() -> str:
    """The project's git commit (``+dirty`` with uncommitted changes to tracked files), or
    'unknown' outside a git checkout."""
    if "v" not in _PROJECT:
        try:
            head = subprocess.run(["git", "-C", str(PROJECT_ROOT), "rev-parse", "HEAD"], capture_output=True,
                                  text=True, timeout=10)
            commit = head.stdout.strip() if head.returncode == 0 else ""
            dirty = subprocess.run(["git", "-C", str(PROJECT_ROOT), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10) if commit else None
            _PROJECT["v"] = (commit[:12] + ("+dirty" if dirty is not None and dirty.stdout.strip() else "")) or "unknown"
        except (OSError, subprocess.SubprocessError):
            _PROJECT["v"] = "unknown"
    return _PROJECT["v"]


def library_versions(libraries: Iterable[str]) -> dict:
    """``{name: version}`` of installed distributions; an entry ``"a|b"`` takes the first of
    those distributions that is installed and is recorded as ``a`` (``"dlib|dlib-bin"``)."""
    out = {}
    for entry in libraries:
        names = entry.split("|")
        version = None
        for name in names:
            try:
                version = metadata.version(name)
                break
            except metadata.PackageNotFoundError:
                continue
        out[names[0]] = version
    return out


def versions(libraries: Iterable[str]) -> dict:
    return {"project": project_version(), **library_versions(libraries)}


# --- records -------------------------------------------------------------------------------------
def digest(obj, length: int = 16) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def make_record(settings: dict, inputs: dict, versions_: dict, how: str = "run") -> dict:
    """What ``_fingerprint.json`` holds: ``inputs`` = 'stage@scope' -> that step's fingerprint;
    ``how``: 'run' (recorded when the step started) or 'adopted' (made before fingerprints)."""
    return {"fingerprint": digest({"settings": settings, "inputs": inputs, "versions": versions_}),
            "settings_digest": digest(settings, 12), "settings": settings, "inputs": inputs,
            "versions": versions_, "recorded": how}


def differences(recorded: dict, current: dict) -> list[tuple]:
    """``[(key, old, new)]`` of the settings that differ (a key on one side only: None there)."""
    keys = sorted(set(recorded) | set(current))
    return [(k, recorded.get(k), current.get(k)) for k in keys if recorded.get(k) != current.get(k)]


def show(value) -> str:
    if value is None:
        return "(unset)"
    if isinstance(value, str):
        return value if value and not any(c.isspace() for c in value) else json.dumps(value)
    return json.dumps(value, separators=(",", ":"))


def show_difference(key: str, old, new) -> str:
    return f"{key} {show(old)} -> {show(new)}"


def version_differences(recorded: dict, current: dict) -> list[tuple]:
    """``[(name, old, new)]`` of versions that differ, only for names recorded on both sides."""
    return [(k, recorded[k], current[k]) for k in sorted(recorded) if k in current and recorded[k] != current[k]]


def hostname() -> str:
    return socket.gethostname()
