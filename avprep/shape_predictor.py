"""dlib's 68-point shape predictor, run on many frames at once with numpy, with dlib's exact results.

dlib's predictor (an ensemble of regression trees, Kazemi & Sullivan 2014) walks 15 cascades of
500 trees per call; each tree's leaf adds a 136-float vector to the shape. The leaves are 65 MB,
so one call reads ~4 MB scattered over them: on a busy machine (a crop job on every core, or
other people's jobs) a call costs 3-4 ms of CPU instead of ~0.6 ms on a quiet one, most of it
waiting for memory. Here the same arithmetic runs on a batch of frames at once, cascade by
cascade, so each cascade's trees are read once per batch and the work is a few large numpy
operations: 0.8-0.9 ms a frame in batches of 32 where dlib took 2.7-3.1 ms (the dev machine at
load ~10; bench/README.md).

The results are dlib's to the bit (tests/crop/test_shape_predictor.py compares them on real
frames): every step is computed in dlib's precision and order. The feature pixels are placed with
float32 arithmetic as dlib's ``extract_feature_pixel_values`` does, rounded as dlib rounds a point
(floor(x + 0.5)); a split goes left when ``float(a) - float(b) > thresh``; the leaves are added to
the shape one tree after the other in float32 (``scipy.sparse``'s CSR product accumulates row by
row into its output in that order; a matrix product does not and moves landmarks by a pixel in a
few percent of frames: the predictor is that sensitive to rounding). The landmarks depend on
every gray level the same way, so the frames must be exactly what dlib would be given.

The model is dlib's own file (face_recognition_models' ``shape_predictor_68_face_landmarks.dat``),
read with ``load_model``: dlib's serialization writes every number as a control byte (sign bit,
byte count) and its bytes, so a plain reader walks 33 million numbers (~10 s in Python). Instead
every leaf, which starts with the same bytes (the matrix size, -136 x -1), is decoded at once for
all leaves, and only the layout around them is walked in Python (2-3 s). ``cached_model`` keeps
the converted arrays (``model_cache_dir()``), so a crop shard loads them in a fraction of a second.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy.sparse import _sparsetools  # csr_matvecs: y += A x, row by row, in A's order

log = logging.getLogger(__name__)
CACHE_FORMAT = 1  # bump when ShapeModel's arrays change meaning


class ModelFormatError(ValueError):
    """The file is not a dlib shape predictor of the layout this reader knows."""


@dataclass
class ShapeModel:
    initial: np.ndarray  # (2P,) float32: the mean shape in box coordinates [0, 1]
    n_splits: int  # splits per tree (complete trees: n_splits + 1 leaves)
    split_idx1: np.ndarray  # (C, T * n_splits) intp: feature pixel of each split (tree-major)
    split_idx2: np.ndarray  # (C, T * n_splits) intp
    split_thresh: np.ndarray  # (C, T * n_splits) float32
    leaves: np.ndarray  # (C, T * (n_splits + 1), 2P) float32
    anchors: np.ndarray  # (C, K) intp: the shape point each feature pixel is placed from
    deltas: np.ndarray  # (C, K, 2) float32: its offset from that point (mean-shape coordinates)

    @property
    def n_points(self) -> int:
        return len(self.initial) // 2

    @property
    def n_trees(self) -> int:
        return self.split_idx1.shape[1] // self.n_splits


# ------------------------------------------------------------------------------------ file reader
class _Reader:
    """Sequential reader of dlib's serialized numbers (for the small parts of the file)."""

    def __init__(self, data: bytes, pos: int = 0):
        self.data, self.pos = data, pos

    def int(self) -> int:
        d, p = self.data, self.pos
        if p >= len(d):
            raise ModelFormatError("file ends early")
        ctrl = d[p]
        n = ctrl & 0x0F
        if not 1 <= n <= 8:
            raise ModelFormatError(f"bad number at byte {p}")
        v = int.from_bytes(d[p + 1 : p + 1 + n], "little")
        self.pos = p + 1 + n
        return -v if ctrl & 0x80 else v

    def float(self) -> float:
        mantissa, exponent = self.int(), self.int()
        return float(np.ldexp(np.float64(mantissa), exponent))

    def float_matrix(self) -> np.ndarray:
        rows, cols = -self.int(), -self.int()
        return np.array([self.float() for _ in range(rows * cols)], dtype=np.float32)


def dlib_int_bytes(value: int) -> bytes:
    """dlib's serialization of an integer: a control byte (sign bit, byte count), then the
    magnitude's bytes, little-endian."""
    mag = abs(value)
    body = mag.to_bytes(max(1, (mag.bit_length() + 7) // 8), "little")
    return bytes([len(body) | (0x80 if value < 0 else 0)]) + body


class _Numbers:
    """Decodes runs of serialized numbers from many start offsets of one file at once."""

    def __init__(self, data: bytes):
        self.size = len(data)
        padded = np.frombuffer(data + bytes(16), np.uint8)
        self.ctrl = padded
        # every 8-byte little-endian word, starting at every byte (an overlapping view, no copy)
        self.words = np.ndarray(shape=(len(data) + 8,), dtype="<u8", buffer=padded, strides=(1,))
        self.masks = np.array([(1 << (8 * n)) - 1 for n in range(8)] + [(1 << 64) - 1] * 8, dtype=np.uint64)

    def run(self, starts: np.ndarray, count: int, block: int = 8192) -> tuple:
        """(values (len(starts), count) int64, end offsets): ``count`` numbers read one after
        the other from each start. Offsets that are not really the start of numbers give
        garbage (the caller keeps only the runs that fit the file's layout). Runs are read a
        block at a time: a block's bytes stay in the cache while its numbers are read."""
        out = np.empty((len(starts), count), np.int64)
        ends = np.empty(len(starts), np.int64)
        for b0 in range(0, len(starts), block):
            pos = np.minimum(starts[b0 : b0 + block].astype(np.int64), self.size)
            vals = np.empty((count, len(pos)), np.int64)
            for i in range(count):
                ctrl = self.ctrl[pos]
                n = ctrl & 0x0F
                value = (self.words[pos + 1] & self.masks[n]).view(np.int64)
                vals[i] = value
                np.negative(value, out=vals[i], where=ctrl >= 0x80)
                pos += 1 + n
                np.minimum(pos, self.size, out=pos)
            out[b0 : b0 + block] = vals.T
            ends[b0 : b0 + block] = pos
        return out, ends


_POWERS = np.ldexp(1.0, np.arange(-1100, 1024))  # 2^e for e in [-1100, 1023] (0 below float64's range)


def _floats(mantissa_exponent: np.ndarray) -> np.ndarray:
    """float32 values of serialized floats: (..., 2k) int64 pairs (mantissa, exponent) -> (..., k).
    mantissa x 2^exponent is exact in float64 for a float32's 24-bit mantissa."""
    m, e = mantissa_exponent[..., 0::2], mantissa_exponent[..., 1::2]
    return (m * _POWERS[np.clip(e, -1100, 1023) + 1100]).astype(np.float32)


def load_model(path) -> ShapeModel:
    """Read a dlib shape predictor file (``shape_predictor.save``'s format, version 1)."""
    data = Path(path).read_bytes()
    r = _Reader(data)
    if r.int() != 1:
        raise ModelFormatError(f"{path}: not a dlib shape predictor (version)")
    initial = r.float_matrix()
    n_coords = len(initial)
    n_cascades = r.int()
    numbers = _Numbers(data)
    # every leaf starts with its matrix header (-2P rows, -1 column): decode all of them at once
    header = dlib_int_bytes(-n_coords) + dlib_int_bytes(-1)
    leaf_starts = np.array([m.start() for m in re.finditer(re.escape(header), data)], dtype=np.int64)
    leaf_values, leaf_ends = numbers.run(leaf_starts + len(header), 2 * n_coords)
    leaf_row = {int(s): i for i, s in enumerate(leaf_starts)}
    # a tree (its splits, then its leaves) starts where the previous tree's last leaf ends, or
    # after a cascade's tree count: decode a tree head from every leaf end at once
    tree_starts = leaf_ends
    head_row = {int(s): i for i, s in enumerate(tree_starts)}
    n_trees = n_splits = None
    heads = None
    split_rows, leaf_rows = [], []
    for _ in range(n_cascades):
        t = r.int()
        n_trees = t if n_trees is None else n_trees
        if t != n_trees:
            raise ModelFormatError(f"{path}: cascades with different numbers of trees")
        for _ in range(n_trees):
            if n_splits is None:  # the first tree tells the depth
                n_splits = _Reader(data, r.pos).int()
                heads, head_ends = numbers.run(np.r_[tree_starts, r.pos], 2 + 4 * n_splits)
            row = head_row.get(r.pos, len(tree_starts))
            if row == len(tree_starts):  # after a tree count: decode this head alone
                one, one_end = numbers.run(np.array([r.pos]), 2 + 4 * n_splits)
                head, end = one[0], int(one_end[0])
            else:
                head, end = heads[row], int(head_ends[row])
            if head[0] != n_splits or head[-1] != n_splits + 1:
                raise ModelFormatError(f"{path}: trees that are not complete, or of different depths")
            split_rows.append(head[1:-1])
            r.pos = end
            for _ in range(n_splits + 1):
                row = leaf_row.get(r.pos)
                if row is None:
                    raise ModelFormatError(f"{path}: unexpected data at byte {r.pos} (a leaf expected)")
                leaf_rows.append(row)
                r.pos = int(leaf_ends[row])
    anchors = []
    for _ in range(r.int()):
        anchors.append([r.int() for _ in range(r.int())])
    deltas = []
    for _ in range(r.int()):
        deltas.append([(r.float(), r.float()) for _ in range(r.int())])
    if r.pos != len(data):
        raise ModelFormatError(f"{path}: {len(data) - r.pos} bytes after the model")
    C, T, S = n_cascades, n_trees, n_splits
    splits = np.array(split_rows).reshape(C, T * S, 4)
    return ShapeModel(
        initial=initial,
        n_splits=S,
        split_idx1=splits[..., 0].astype(np.intp),
        split_idx2=splits[..., 1].astype(np.intp),
        split_thresh=_floats(splits[..., 2:]).reshape(C, T * S),
        leaves=_floats(leaf_values[np.array(leaf_rows)]).reshape(C, T * (S + 1), n_coords),
        anchors=np.array(anchors, dtype=np.intp),
        deltas=np.array(deltas, dtype=np.float32),
    )


def model_cache_dir() -> Path:
    """Where converted models are kept: ``$AVHUBERT_PIPELINE_MODEL_CACHE``, else a per-user
    directory in the system's temp dir (node-local on a cluster: each node converts once)."""
    env = os.environ.get("AVHUBERT_PIPELINE_MODEL_CACHE")
    if env:
        return Path(env).expanduser()
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    return Path(tempfile.gettempdir()) / f"avhubert-pipeline-{uid}" / "models"


def cached_model(path) -> ShapeModel:
    """``load_model(path)``, converted once and then read back from ``model_cache_dir()`` (a few
    hundredths of a second instead of seconds: every crop shard loads it). The cache entry is
    keyed by the file's path, size and modification time; one that cannot be written or read is
    simply not used."""
    path = Path(path).resolve()
    st = path.stat()
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    key = f"{path.stem}-v{CACHE_FORMAT}-{st.st_size}-{st.st_mtime_ns}-{digest}"
    entry = model_cache_dir() / f"{key}.npz"
    if entry.is_file():
        try:
            with np.load(entry, allow_pickle=False) as z:
                fields = {f.name: z[f.name] for f in dataclasses.fields(ShapeModel) if f.name != "n_splits"}
                return ShapeModel(n_splits=int(z["n_splits"]), **fields)
        except Exception as e:  # noqa: BLE001 - a bad cache entry is replaced below
            log.warning("%s: unreadable (%s); converting the model again", entry, e)
    model = load_model(path)
    try:
        entry.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=entry.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **dataclasses.asdict(model))
            os.replace(tmp, entry)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as e:
        log.info("%s: not cached (%s)", entry, e)
    return model


# ---------------------------------------------------------------------------------------- predictor
class ShapePredictor:
    """dlib's shape predictor on a batch of (gray frame, box) pairs (see the module doc)."""

    def __init__(self, model):
        self.m = model if isinstance(model, ShapeModel) else cached_model(model)
        m = self.m
        self.n_feats = m.deltas.shape[1]
        ref = m.initial.reshape(-1, 2).astype(np.float64)
        self._ref_centred = ref - ref.mean(0)
        self._ref_var = float((self._ref_centred ** 2).sum())
        self._tree_nodes = np.arange(m.n_trees) * m.n_splits
        self._tree_leaves = np.arange(m.n_trees) * (m.n_splits + 1)
        self._depth = int(np.log2(m.n_splits + 1))
        if 2 ** self._depth != m.n_splits + 1:
            raise ModelFormatError("trees that are not complete")

    def __call__(self, frames: Sequence[np.ndarray], rects) -> np.ndarray:
        """Landmarks (N, P, 2) int32 of N uint8 gray frames, each with its box ``rects[i]``
        (dlib rectangles or (left, top, right, bottom) rows): dlib's ``predictor(frame, rect)``."""
        m = self.m
        n = len(frames)
        if n == 0:
            return np.zeros((0, m.n_points, 2), np.int32)
        box = np.array([(r.left(), r.top(), r.right(), r.bottom()) if hasattr(r, "left") else tuple(r)
                        for r in rects], dtype=np.float64)
        left, top = box[:, :1], box[:, 1:2]
        # dlib's unnormalizing transform: box corner (0, 0) -> (left, top), (1, 1) -> (right, bottom)
        width, height = box[:, 2:3] - left, box[:, 3:4] - top
        frames = [np.ascontiguousarray(f, dtype=np.uint8) for f in frames]
        if len({f.shape for f in frames}) != 1 or frames[0].ndim != 2:
            raise ValueError("frames must be 2-D gray images of one size")
        h, w = frames[0].shape
        pixels = np.stack(frames).reshape(-1)
        frame_base = (np.arange(n) * (h * w))[:, None]
        feat_base = (np.arange(n) * self.n_feats)[:, None]
        shape = np.repeat(m.initial[None], n, axis=0)  # (n, 2P) float32
        ones = np.ones(n * m.n_trees, np.float32)
        indptr = np.arange(0, n * m.n_trees + 1, m.n_trees, dtype=np.intp)
        for c in range(len(m.deltas)):
            # the similarity taking the mean shape to the current one (its linear part, as float32)
            pts = shape.reshape(n, -1, 2).astype(np.float64)
            cen = pts - pts.mean(axis=1, keepdims=True)
            rx, ry = self._ref_centred[:, 0], self._ref_centred[:, 1]
            a = ((cen[..., 0] @ rx + cen[..., 1] @ ry) / self._ref_var).astype(np.float32)[:, None]
            b = ((cen[..., 1] @ rx - cen[..., 0] @ ry) / self._ref_var).astype(np.float32)[:, None]
            # feature pixels: tform * delta + anchor point (float32), then into the frame (double)
            dx, dy = m.deltas[c, :, 0], m.deltas[c, :, 1]
            anchor = shape.reshape(n, -1, 2)[:, m.anchors[c]]
            fx = a * dx - b * dy + anchor[..., 0]
            fy = b * dx + a * dy + anchor[..., 1]
            x = np.floor(left + fx * width + 0.5).astype(np.intp)
            y = np.floor(top + fy * height + 0.5).astype(np.intp)
            inside = (x >= 0) & (x < w) & (y >= 0) & (y < h)
            values = np.where(inside, pixels[frame_base + np.where(inside, y * w + x, 0)], 0)
            feats = values.astype(np.float32).reshape(-1)
            # down the trees, all frames and trees at once: left when f[idx1] - f[idx2] > thresh
            i1, i2, th = m.split_idx1[c], m.split_idx2[c], m.split_thresh[c]
            node = np.zeros((n, m.n_trees), np.intp)
            for _ in range(self._depth):
                k = self._tree_nodes + node
                left_go = (feats[feat_base + i1[k]] - feats[feat_base + i2[k]]) > th[k]
                node = 2 * node + 2 - left_go
            leaf = self._tree_leaves + (node - m.n_splits)
            # shape += leaf of tree 0, then tree 1, ... (float32, dlib's order): a CSR product
            # accumulates into its output row by row
            out = np.ascontiguousarray(shape)
            _sparsetools.csr_matvecs(n, m.leaves.shape[1], m.leaves.shape[2], indptr, leaf.reshape(-1), ones,
                                     m.leaves[c].reshape(-1), out.reshape(-1))
            shape = out
        pts = shape.reshape(n, -1, 2).astype(np.float64)
        x = np.floor(left + pts[..., 0] * width + 0.5)
        y = np.floor(top + pts[..., 1] * height + 0.5)
        return np.stack([x, y], axis=-1).astype(np.int32)
