"""Disk used per stage directory of a work dir, within a file budget (a large corpus's crop
outputs are millions of files: beyond the budget the size is estimated or shown as a lower bound)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List


@dataclass
class DiskEntry:
    path: str  # relative to the work dir
    bytes: int
    files: int
    complete: bool  # False: the walk stopped at its file budget
    estimated: bool = False  # bytes scaled from the walked files to an expected file count


def tree_size(path: Path, max_files: int) -> tuple:
    """(bytes on disk, files, complete) of a tree, walking at most ``max_files`` files."""
    total = files = 0
    stack = [path]
    while stack:
        d = stack.pop()
        try:
            it = os.scandir(d)
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue
        with it:
            for e in it:
                try:
                    if e.is_dir(follow_symlinks=False):
                        stack.append(e.path)
                        continue
                    st = e.stat(follow_symlinks=False)
                except OSError:
                    continue
                total += st.st_blocks * 512 if hasattr(st, "st_blocks") else st.st_size
                files += 1
                if files >= max_files:
                    return total, files, False
    return total, files, True


def disk_usage(workdir: Path, expected_files: Dict[str, int], max_files: int = 20000) -> List[DiskEntry]:
    """Disk used per stage directory (per sub-directory for crop and each iteration). A directory
    of more than ``max_files`` files (the crop outputs of a large corpus) is estimated from the
    files walked, scaled to ``expected_files[rel]`` when known (the crop's ok count), else shown
    as a lower bound."""
    out = []
    if not workdir.is_dir():
        return out
    tops = sorted((p for p in workdir.iterdir() if p.is_dir()), key=lambda p: _top_order(p.name))
    for top in tops:
        subdirs = [top] if top.name not in ("crop",) and not top.name.startswith("iter") else \
            sorted(p for p in top.iterdir() if p.is_dir()) + [top]
        for d in subdirs:
            rel = str(d.relative_to(workdir))
            if d == top and len(subdirs) > 1:  # files directly in it (summaries)
                total = files = 0
                for e in os.scandir(d):
                    if e.is_file(follow_symlinks=False):
                        total += e.stat().st_blocks * 512
                        files += 1
                out.append(DiskEntry(rel + "/ (files)", total, files, True))
                continue
            b, n, complete = tree_size(d, max_files)
            entry = DiskEntry(rel, b, n, complete)
            want = expected_files.get(rel)
            if not complete and want and n:
                entry.bytes, entry.files, entry.estimated = int(b / n * want), want, True
            out.append(entry)
    return out


def _top_order(name: str):
    fixed = ["crop", "manifest"]
    if name in fixed:
        return (0, fixed.index(name), "")
    if name.startswith("iter") and name[4:].isdigit():
        return (1, int(name[4:]), "")
    return (2, 0, name)
