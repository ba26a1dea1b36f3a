"""Write-then-rename helpers: an output path either does not exist or is complete.

Temporary names live in the same directory (so ``os.replace`` is atomic) and carry a ``.tmp-``
prefix plus the pid, so a half-written file from a killed worker is never mistaken for output
and never collides with a concurrent writer.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Iterator, Union

PathLike = Union[str, os.PathLike]


def tmp_path_for(path: PathLike) -> Path:
    p = Path(path)
    # keep the suffix so libraries that choose a format by extension (np.save, ffmpeg, sf) still work
    return p.with_name(f".tmp-{os.getpid()}-{p.name}")


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path to write to; on success fsync and rename it to ``path``;
    on error remove it."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(final)
    try:
        yield tmp
        if tmp.exists():
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = "w", **kwargs) -> Iterator:
    with atomic_path(path) as tmp:
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()


def write_text(path: PathLike, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def write_json(path: PathLike, obj) -> None:
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True, default=str)
