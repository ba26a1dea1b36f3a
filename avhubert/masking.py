"""Span masks of AV-HuBERT pretraining, drawn exactly as the reference implementation draws them.

The reference (facebookresearch/av_hubert, ``avhubert/utils.py``) does not use fairseq's
``compute_mask_indices``: its own variant draws from numpy's legacy RNG (``np.random``, MT19937)
and, after drawing the spans of every item, cuts every item down to the smallest masked-frame
count of the batch. It also returns the runs of the final mask, which input masking uses to pick
the video frames that replace each run. This module re-implements those semantics, making the
same numpy calls in the same order, so that a ``RandomState`` seeded like the reference's global
RNG gives the reference's masks bit for bit (tests/avhubert/test_golden_objective.py replays the
golden step from its seed).

The draws come from the ``rng`` argument: a ``np.random.RandomState`` or the ``np.random`` module
itself (the process-wide legacy RNG, what the reference uses). During training the task hands the
model a generator derived from (seed, update, micro-batch, rank): see :func:`step_rng`.
"""
from typing import NamedTuple, Optional, Sequence, Tuple

import numpy as np

SELECTIONS = ("static", "uniform", "normal", "poisson")


class SpanMask(NamedTuple):
    """A (B, T) frame mask and its runs: maximal blocks of masked frames [start, end) of one item,
    in (item, start) order."""

    mask: np.ndarray  # (B, T) bool, True = masked
    batch: np.ndarray  # (R,) int64
    start: np.ndarray  # (R,) int64
    end: np.ndarray  # (R,) int64


def mask_runs(mask: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(batch, start, end) int64 arrays of the runs of True in each row of a (B, T) mask."""
    mask = np.asarray(mask, dtype=bool)
    batch, starts, ends = [], [], []
    for i, row in enumerate(mask):
        edges = np.flatnonzero(np.diff(np.concatenate([[False], row, [False]]).astype(np.int8)))
        starts.append(edges[0::2])
        ends.append(edges[1::2])
        batch.append(np.full(len(edges) // 2, i))
    if not starts:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    return tuple(np.concatenate(x).astype(np.int64) for x in (batch, starts, ends))


def _span_lengths(rng, n_spans: int, length: int, selection: str, other: float):
    if selection == "static":
        return np.full(n_spans, length)
    if selection == "uniform":
        return rng.randint(other, length * 2 + 1, size=n_spans)
    if selection == "normal":
        return [max(1, int(round(x))) for x in rng.normal(length, other, size=n_spans)]
    if selection == "poisson":
        return [int(round(x)) for x in rng.poisson(length, size=n_spans)]
    raise ValueError(f"mask selection must be one of {SELECTIONS}, got {selection!r}")


def _non_overlapping_spans(rng, n_frames: int, lengths, min_space: int) -> np.ndarray:
    """Spans placed one at a time, longest first, each in a free part of the sequence chosen with
    probability proportional to its size; a part too small for the span is skipped."""
    masked = []
    parts = [(0, n_frames)]
    shortest = min(lengths)
    for length in sorted(lengths, reverse=True):
        sizes = np.array([e - s if e - s >= length + min_space else 0 for s, e in parts], dtype=np.int64)
        total = sizes.sum()
        if total == 0:
            break
        s, e = parts.pop(rng.choice(len(parts), p=sizes / total))
        start = rng.randint(s, e - length)
        masked.extend(range(start, start + length))
        if start - s - min_space >= shortest:
            parts.append((s, start - min_space + 1))
        if e - start - shortest - min_space > shortest:
            parts.append((start + length + min_space, e))
    return np.asarray(masked, dtype=np.int64)


def _overlapping_spans(rng, n_frames: int, lengths, n_spans: int) -> np.ndarray:
    """Span starts drawn without replacement; spans may overlap."""
    shortest = min(lengths)
    if n_frames - shortest <= n_spans:
        shortest = n_frames - n_spans - 1
    starts = rng.choice(n_frames - shortest, n_spans, replace=False)
    return np.asarray([s + k for s, n in zip(starts, lengths) for k in range(n)], dtype=np.int64)


def draw_span_mask(shape: Tuple[int, int], padding_mask, prob: float, length: int, rng,
                   selection: str = "static", other: float = 0.0, min_masks: int = 0,
                   no_overlap: bool = False, min_space: int = 0) -> SpanMask:
    """Draw the span mask of a (B, T) batch with the reference's semantics.

    Per item: ``int(prob * n / length + u)`` spans (u uniform in [0, 1), at least ``min_masks``),
    n = the item's unpadded length (T without a padding mask); span starts without replacement
    from [0, n - length), overlaps allowed (or the recursive no-overlap placement). Then every item
    is cut down to the smallest masked-frame count in the batch by keeping a random subset of its
    masked frames. numpy calls, in order: one ``rand()`` for a batch-level span count (unused when
    a padding mask is given, drawn anyway), per item ``rand()`` (with a padding mask) then the span
    draws, then one ``choice`` per item that has more than the smallest count.

    Differs from the reference only where the reference crashes: an item with no span (possible
    with ``min_masks=0``) stays unmasked instead of raising IndexError.
    """
    n_items, n_frames = shape
    if padding_mask is not None:
        if hasattr(padding_mask, "detach"):
            padding_mask = padding_mask.detach().cpu().numpy()
        padded = np.asarray(padding_mask, dtype=bool).sum(axis=1)
    batch_spans = max(min_masks, int(prob * n_frames / float(length) + rng.rand()))

    per_item = []
    for i in range(n_items):
        if padding_mask is not None:
            size = n_frames - int(padded[i])
            n_spans = max(min_masks, int(prob * size / float(length) + rng.rand()))
        else:
            size, n_spans = n_frames, batch_spans
        if n_spans == 0:
            per_item.append(np.zeros(0, dtype=np.int64))
            continue
        lengths = _span_lengths(rng, n_spans, length, selection, other)
        if sum(lengths) == 0:
            lengths[0] = min(length, size - 1)
        if no_overlap:
            frames = _non_overlapping_spans(rng, size, lengths, min_space)
        else:
            frames = _overlapping_spans(rng, size, lengths, n_spans)
        per_item.append(np.unique(frames[frames < size]))

    mask = np.zeros((n_items, n_frames), dtype=bool)
    fewest = min(len(f) for f in per_item) if per_item else 0
    for i, frames in enumerate(per_item):
        if len(frames) > fewest:
            frames = rng.choice(frames, fewest, replace=False)
        mask[i, frames] = True
    return SpanMask(mask, *mask_runs(mask))


def draw_source_starts(runs: SpanMask, n_frames: int, rng,
                       item_lengths: Optional[Sequence[int]] = None) -> np.ndarray:
    """``same_seq`` input masking: for each video run [start, end) of length L (in run order), the
    first frame s of the L frames of the same item that replace it. s is drawn uniformly from
    [0, limit) without [max(0, start - L), end), so that the source never overlaps the run; one
    ``choice(candidates, size=1)`` per run (none when there is no candidate: s = 0).

    limit = ``n_frames``, the padded batch length (the reference: a short item's run can be filled
    from its padding), or the item's own length when ``item_lengths`` is given."""
    starts = np.zeros(len(runs.start), dtype=np.int64)
    for r, (b, start, end) in enumerate(zip(runs.batch, runs.start, runs.end)):
        span = int(end - start)
        limit = n_frames if item_lengths is None else int(item_lengths[b])
        candidates = np.setdiff1d(np.arange(limit), np.arange(max(0, start - span), end))
        if len(candidates) > 0:
            starts[r] = int(rng.choice(candidates, size=1)[0])
    return starts


def source_frames(runs: SpanMask, starts: np.ndarray, n_frames: int,
                  item_lengths: Optional[Sequence[int]] = None) -> Tuple[np.ndarray, np.ndarray]:
    """(item, frame) of the frame copied into each masked frame, in row-major (item, frame) order
    of the mask: run r takes frames starts[r] .. starts[r] + L - 1 of its own item, clipped to the
    last frame (of the batch, or of the item with ``item_lengths``)."""
    items, frames = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.int64)]
    for b, start, end, src in zip(runs.batch, runs.start, runs.end, starts):
        last = (n_frames if item_lengths is None else int(item_lengths[b])) - 1
        items.append(np.full(int(end - start), b, dtype=np.int64))
        frames.append(np.arange(src, src + end - start).clip(max=max(last, 0)).astype(np.int64))
    return np.concatenate(items), np.concatenate(frames)


def step_rng(seed: int, *keys: int) -> np.random.RandomState:
    """A legacy-numpy generator for the mask draws of one forward pass, a pure function of the run's
    seed and ``keys`` (split, update number, micro-batch, rank): training resumed from a checkpoint
    draws the same masks as the uninterrupted run, with nothing to save."""
    entropy = [int(seed) % (1 << 64)] + [int(k) % (1 << 64) for k in keys]
    return np.random.RandomState(np.random.SeedSequence(entropy).generate_state(8))
