"""Manifest rows and feature shard files.

A feature shard is ``{base}.npy`` (float32 or float16 (N, D), every utterance's frames one after
the other in tsv order) plus ``.len`` (frames per utterance, one integer a line), the layout of
the reference ``dump_*_feature.py`` scripts. :class:`ShardWriter` streams utterances into the
``.npy`` under a temporary name (never holding the shard in memory), rewrites the fixed-size header
with the final row count, fsyncs and renames. Two ways to read one:
- :class:`FeatureShard` reads row ranges with ``os.pread`` into fresh float32 arrays: nothing
  stays mapped, so a job's resident memory is what it keeps, not what it has read (pages of a
  memory-mapped file count in a process's RSS, and in a Slurm job's memory, once touched);
- ``open_shard`` memory-maps it (``np.load(mmap_mode="r")``), for tools and tests.
"""
from __future__ import annotations

import ast
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

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


def count_tsv_rows(path) -> int:
    """Rows of a manifest tsv (non-empty lines after the root line), counted without parsing."""
    n = -1
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                n += 1
    return max(n, 0)


def shard_range(n_items: int, rank: int, nshard: int) -> Tuple[int, int]:
    """Contiguous [start, end) of shard ``rank`` of ``nshard`` (merging shards = concatenating)."""
    if not 0 <= rank < nshard:
        raise ValueError(f"rank {rank} outside 0..{nshard - 1}")
    return n_items * rank // nshard, n_items * (rank + 1) // nshard


def shard_name(split: str, rank: int, nshard: int) -> str:
    return f"{split}_{rank}_{nshard}"


DTYPES = {"float32": "<f4", "float16": "<f2"}


def _header(n_rows: int, dim: int, descr: str = "<f4") -> bytes:
    d = "{'descr': '%s', 'fortran_order': False, 'shape': (%d, %d), }" % (descr, n_rows, dim)
    body_len = _HEADER_BYTES - len(_MAGIC) - 2
    if len(d) + 1 > body_len:
        raise ValueError(f"shape ({n_rows}, {dim}) does not fit the fixed npy header")
    body = d.ljust(body_len - 1) + "\n"
    return _MAGIC + body_len.to_bytes(2, "little") + body.encode("latin1")


class ShardWriter:
    """Append utterances ((T, D) arrays) to ``{base}.npy`` and their lengths to ``{base}.len``,
    stored as ``dtype`` (float32, or float16: half the disk, see the features stage).

    Use as a context manager; on a clean exit both files are complete and renamed (npy first, so a
    ``.len`` never exists without its ``.npy``); on an exception both temporaries are removed."""

    def __init__(self, npy_path, len_path, dim: int, dtype: str = "float32"):
        if dtype not in DTYPES:
            raise ValueError(f"feature storage dtype {dtype!r}: must be one of {', '.join(DTYPES)}")
        self.npy_path, self.len_path, self.dim = Path(npy_path), Path(len_path), int(dim)
        self.descr = DTYPES[dtype]
        self.lengths: List[int] = []
        self.n_rows = 0

    def __enter__(self):
        self.npy_path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = atomic.tmp_path_for(self.npy_path)
        self._f = open(self._tmp, "wb")
        self._f.write(_header(0, self.dim, self.descr))
        return self

    def append(self, feats: np.ndarray) -> None:
        feats = np.asarray(feats)
        if feats.ndim != 2 or feats.shape[1] != self.dim:
            raise ValueError(f"{self.npy_path}: utterance features must be (T, {self.dim}), got {feats.shape}")
        self._f.write(np.ascontiguousarray(feats, dtype=self.descr).tobytes())
        self.lengths.append(len(feats))
        self.n_rows += len(feats)

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self._f.seek(0)
                self._f.write(_header(self.n_rows, self.dim, self.descr))
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


class FeatureShard:
    """A feature shard read by row ranges (``os.pread``), each returned as a new float32 array.

    ``lengths`` / ``offsets`` (N+1 cumulative) locate utterance ``j`` at rows
    ``offsets[j]:offsets[j+1]``. The header is parsed once; no read maps the file."""

    def __init__(self, npy_path, len_path):
        self.npy_path, self.len_path = Path(npy_path), Path(len_path)
        with open(self.npy_path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(f)
            self._data_offset = f.tell()
        if len(shape) != 2 or fortran:
            raise ValueError(f"{npy_path}: expected a C-ordered 2-d feature array, got shape {shape}")
        self.n_rows, self.dim = int(shape[0]), int(shape[1])
        self.dtype = np.dtype(dtype)
        self.lengths = read_lengths(self.len_path)
        if int(self.lengths.sum()) != self.n_rows:
            raise ValueError(f"{npy_path}: {self.n_rows} rows but {len_path} sums to {int(self.lengths.sum())}")
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)
        self._fd: Optional[int] = None  # opened on the first read and kept: one open per shard

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __del__(self):
        self.close()

    @property
    def row_bytes(self) -> int:
        return self.dim * self.dtype.itemsize

    def read(self, start: int, end: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows [start, end) as float32 (into ``out`` when given: a (end - start, D) float32 view)."""
        start, end = int(start), int(end)
        if not 0 <= start <= end <= self.n_rows:
            raise ValueError(f"{self.npy_path}: rows [{start}, {end}) outside 0..{self.n_rows}")
        n = end - start
        raw = np.empty((n, self.dim), dtype=self.dtype)
        if n:
            view = memoryview(raw).cast("B")
            pos, want = 0, n * self.row_bytes
            if self._fd is None:
                self._fd = os.open(self.npy_path, os.O_RDONLY)
            while pos < want:
                got = os.preadv(self._fd, [view[pos:]], self._data_offset + start * self.row_bytes + pos)
                if got <= 0:
                    raise OSError(f"{self.npy_path}: file ends before row {end} (truncated shard?)")
                pos += got
        if out is None:
            return raw if self.dtype == np.float32 else raw.astype(np.float32)
        out[...] = raw
        return out

    def utterance(self, j: int) -> np.ndarray:
        return self.read(self.offsets[j], self.offsets[j + 1])

    def iter_utterance_groups(self, max_frames: int) -> Iterator[Tuple[int, int, np.ndarray]]:
        """(first utterance, end utterance, float32 frames) for consecutive utterances of about
        ``max_frames`` frames together (at least one utterance each): memory stays bounded."""
        u = 0
        n = len(self.lengths)
        while u < n:
            v = u + 1
            while v < n and self.offsets[v + 1] - self.offsets[u] <= max_frames:
                v += 1
            yield u, v, self.read(self.offsets[u], self.offsets[v])
            u = v


def read_rows_file(path) -> np.ndarray:
    """The tsv row indices (0-based) listed one a line (a sampled shard's ``.rows``)."""
    return np.array([int(x) for x in Path(path).read_text().split()], dtype=np.int64)


def iter_utterances(feats: np.ndarray, lengths: Sequence[int]) -> Iterator[np.ndarray]:
    offset = 0
    for n in lengths:
        yield feats[offset:offset + n]
        offset += n
