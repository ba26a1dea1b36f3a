"""Manifest rows and feature shard files.

A feature shard is ``{split}_{rank}_{nshard}.npy`` (float32 (N, D), every utterance's frames one
after the other in tsv order) plus ``.len`` (frames per utterance, one integer a line), the layout
of the reference ``dump_*_feature.py`` scripts. :class:`ShardWriter` streams utterances into the
``.npy`` under a temporary name (never holding the shard in memory), rewrites the fixed-size header
with the final row count, fsyncs and renames; readers open it with ``np.load(mmap_mode="r")``.
"""
from __future__ import annotations

import ast
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Sequence, Tuple

import numpy as np

from pipeline import atomic

_MAGIC = b"\x93NUMPY\x01\x00"
_HEADER_BYTES = 128  # whole header incl. magic: fixed, so the shape can be rewritten in place


@dataclass(frozen=True)
class Row:
    id: str
    video: str  # relative to the tsv root
    audio: str
    n_video_frames: int
    n_audio_samples: int


def read_tsv(path) -> Tuple[Path, List[Row]]:
    """(root, rows) of a manifest tsv (a relative root line is relative to the tsv's directory);
    a malformed row is a ValueError naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: manifest tsv not found (run the manifest stage first)")
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines:
        raise ValueError(f"{path}: empty manifest (no root line)")
    root = Path(lines[0].strip())
    if not root.is_absolute():  # the manifest stage writes the crop dir relative to the tsv
        root = Path(os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), root)))
    rows = []
    for n, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 5:
            raise ValueError(f"{path}:{n}: expected 5 tab-separated fields "
                             f"(id, video, audio, n_video_frames, n_audio_samples), got {len(parts)}")
        try:
            rows.append(Row(parts[0], parts[1], parts[2], int(parts[3]), int(parts[4])))
        except ValueError:
            raise ValueError(f"{path}:{n}: frame/sample counts must be integers: {line!r}") from None
    return root, rows


def shard_range(n_items: int, rank: int, nshard: int) -> Tuple[int, int]:
    """Contiguous [start, end) of shard ``rank`` of ``nshard`` (merging shards = concatenating)."""
    if not 0 <= rank < nshard:
        raise ValueError(f"rank {rank} outside 0..{nshard - 1}")
    return n_items * rank // nshard, n_items * (rank + 1) // nshard


def shard_name(split: str, rank: int, nshard: int) -> str:
    return f"{split}_{rank}_{nshard}"


def _header(n_rows: int, dim: int) -> bytes:
    d = "{'descr': '<f4', 'fortran_order': False, 'shape': (%d, %d), }" % (n_rows, dim)
    body_len = _HEADER_BYTES - len(_MAGIC) - 2
    if len(d) + 1 > body_len:
        raise ValueError(f"shape ({n_rows}, {dim}) does not fit the fixed npy header")
    body = d.ljust(body_len - 1) + "\n"
    return _MAGIC + body_len.to_bytes(2, "little") + body.encode("latin1")


class ShardWriter:
    """Append utterances (float32 (T, D)) to ``{base}.npy`` and their lengths to ``{base}.len``.

    Use as a context manager; on a clean exit both files are complete and renamed (npy first, so a
    ``.len`` never exists without its ``.npy``); on an exception both temporaries are removed."""

    def __init__(self, npy_path, len_path, dim: int):
        self.npy_path, self.len_path, self.dim = Path(npy_path), Path(len_path), int(dim)
        self.lengths: List[int] = []
        self.n_rows = 0

    def __enter__(self):
        self.npy_path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = atomic.tmp_path_for(self.npy_path)
        self._f = open(self._tmp, "wb")
        self._f.write(_header(0, self.dim))
        return self

    def append(self, feats: np.ndarray) -> None:
        feats = np.asarray(feats)
        if feats.ndim != 2 or feats.shape[1] != self.dim:
            raise ValueError(f"{self.npy_path}: utterance features must be (T, {self.dim}), got {feats.shape}")
        self._f.write(np.ascontiguousarray(feats, dtype="<f4").tobytes())
        self.lengths.append(len(feats))
        self.n_rows += len(feats)

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self._f.seek(0)
                self._f.write(_header(self.n_rows, self.dim))
                self._f.flush()
                os.fsync(self._f.fileno())
            self._f.close()
            if exc_type is None:
                os.replace(self._tmp, self.npy_path)
                atomic.write_text(self.len_path, "".join(f"{n}\n" for n in self.lengths))
        finally:
            if self._tmp.exists():
                self._tmp.unlink()
        return False


def read_lengths(len_path) -> np.ndarray:
    text = Path(len_path).read_text()
    return np.array([int(x) for x in text.split()], dtype=np.int64)


def open_shard(npy_path, len_path) -> Tuple[np.ndarray, np.ndarray]:
    """(memory-mapped (N, D) features, per-utterance lengths); checks that they agree."""
    feats = np.load(npy_path, mmap_mode="r")
    lengths = read_lengths(len_path)
    if feats.ndim != 2:
        raise ValueError(f"{npy_path}: expected a 2-d feature array, got shape {feats.shape}")
    if int(lengths.sum()) != len(feats):
        raise ValueError(f"{npy_path}: {len(feats)} rows but {len_path} sums to {int(lengths.sum())}")
    return feats, lengths


def iter_utterances(feats: np.ndarray, lengths: Sequence[int]) -> Iterator[np.ndarray]:
    offset = 0
    for n in lengths:
        yield feats[offset:offset + n]
        offset += n
