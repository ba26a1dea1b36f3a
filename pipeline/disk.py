"""Which filesystem a path is on, and how full it is: a "disk full" line names the disk."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional


def mount_point(path: Path) -> Path:
    path = Path(path).resolve()
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def free_line(path: Path) -> Optional[str]:
    """'filesystem /mnt/x: 12 KiB free' for the filesystem holding ``path`` (None if unknown)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    free = st.f_bavail * st.f_frsize
    inodes = "" if st.f_favail else ", no free inodes"
    return f"filesystem {mount_point(path)}: {_size(free)} free{inodes}"


def is_full(path: Path, below: int = 1 << 20) -> bool:
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < below or st.f_favail == 0


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
