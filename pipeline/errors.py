"""Errors the launcher turns into one clear message and a non-zero exit (no traceback), and the
line between a problem with one input item and a problem of the job or its outputs."""
from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Iterable, Optional


class PipelineError(Exception):
    """Base class: the message is shown to the user as is."""


class ConfigError(PipelineError):
    """A setting, cluster config or input path is invalid; nothing was submitted."""


class PrerequisiteError(PipelineError):
    """A stage was asked for while a stage it depends on is incomplete."""


class StageFailed(PipelineError):
    """One or more shards of a stage failed (their log paths are in the message)."""


class LockHeld(PipelineError):
    """Another launch holds the work dir lock."""


class InputsMissing(PipelineError):
    """``Stage.shards`` cannot list the step's shards because the inputs they are planned from do
    not exist yet (the crop stage's frozen item list before the corpus was listed). The one
    exception by which a stage may say "not computable yet": the engine then counts the step as
    incomplete, or plans it once earlier steps of the launch ran. Any other exception of
    ``shards`` is a bug and is reported as one (one line, the traceback in a file)."""


class InfrastructureError(RuntimeError):
    """The job or its output side failed (disk full, I/O error, memory, a signal...), not the
    input item: the shard fails as a whole and a rerun retries every item it had not finished.
    The message is one line naming the cause and the path."""


# errno values that are never about an input item: the disk, the filesystem or the machine
_INFRA_ERRNOS = {
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk quota exceeded",
    errno.EIO: "I/O error",
    errno.EROFS: "read-only filesystem",
    errno.ENOMEM: "out of memory",
    errno.EMFILE: "too many open files",
    errno.ENFILE: "too many open files in the system",
    getattr(errno, "ESTALE", -1): "stale file handle (network filesystem)",
}
# errno values that are infrastructure when they concern an output path (the work dir)
_OUTPUT_ERRNOS = {errno.EACCES: "permission denied", errno.EPERM: "operation not permitted"}
# phrases by which subprocesses (ffmpeg, ...) report the same conditions on their stderr
_INFRA_PHRASES = {
    "no space left on device": errno.ENOSPC,
    "disk quota exceeded": errno.EDQUOT,
    "input/output error": errno.EIO,
    "read-only file system": errno.EROFS,
    "cannot allocate memory": errno.ENOMEM,
}


def infrastructure_cause(exc: BaseException, output_roots: Iterable[os.PathLike] = ()) -> Optional[str]:
    """One line describing ``exc`` when it is an error of the job or of its output side, None
    when it may be about the input item (then a per-item failure record is right).

    Infrastructure: anything that is not an ``Exception`` (signals turned into SystemExit or
    KeyboardInterrupt, submitit's preemption), ``MemoryError``, ``InfrastructureError``, an
    ``OSError`` whose errno is about the disk or machine (ENOSPC, EIO, ...), and a permission
    error on a path under one of ``output_roots`` (the work dir). The chain of causes is followed,
    so a library error raised from an ENOSPC still counts."""
    roots = [Path(r).resolve() for r in output_roots]
    seen = set()
    e: Optional[BaseException] = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if not isinstance(e, Exception):
            return f"{type(e).__name__}: interrupted ({e or 'signal'})"
        if isinstance(e, InfrastructureError):
            return str(e)
        if isinstance(e, MemoryError):
            return f"out of memory ({type(e).__name__})"
        if isinstance(e, OSError) and e.errno is not None:
            where = f" on {e.filename}" if e.filename else ""
            if e.errno in _INFRA_ERRNOS:
                return f"{_INFRA_ERRNOS[e.errno]}{where} ({os.strerror(e.errno)})"
            if e.errno in _OUTPUT_ERRNOS and e.filename and _under(e.filename, roots):
                return f"{_OUTPUT_ERRNOS[e.errno]}{where} (the work dir)"
        for line in str(e).splitlines():
            for phrase, code in _INFRA_PHRASES.items():
                if phrase in line.lower():
                    return f"{_INFRA_ERRNOS[code]}: {line.strip()}"
        e = e.__cause__ or e.__context__
    return None


def raise_if_infrastructure(exc: BaseException, output_roots: Iterable[os.PathLike] = ()) -> None:
    """In a per-item ``except`` block: re-raise ``exc`` (as ``InfrastructureError`` with one clear
    line, unless it is a BaseException such as a signal, raised as it is) when it is not the
    item's fault, so the shard fails and a rerun retries the item instead of recording it bad."""
    cause = infrastructure_cause(exc, output_roots)
    if cause is None:
        return
    if not isinstance(exc, Exception) or isinstance(exc, InfrastructureError):
        raise exc
    raise InfrastructureError(cause) from exc


def _under(path, roots) -> bool:
    try:
        p = Path(path).resolve()
    except (OSError, RuntimeError):
        return False
    return any(p == r or r in p.parents for r in roots)
