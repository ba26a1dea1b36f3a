"""The corpus size the resource plan (``Stage.estimate``) works from: 25 fps video frames and
items per split, from the best source present.

The manifest tsvs when they exist (exact frames per split), else the item list with the frames of
items the crop stage has recorded and, for the rest, durations from their segment bounds or from
the container headers of a seeded sample of their source videos, extrapolated to all of them (the
plan says which).

Every step of a plan asks, so ``CorpusSizes`` keeps the answer per launch while its sources are
unchanged; the crop stage owns the one a launch uses (``stages.crop.STAGE.corpus_sizes``) and
gives it its listing (``note_listing``): the corpus is listed once per launch (a second walk of
1.2M files would cost minutes).
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Dict, Optional, Tuple

from avprep import media
from pipeline.stage import StageContext
from stages import item_list as il
from stages.corpus import list_items
from stages.estimates import VIDEO_RATE, CorpusSize


class CorpusSizes:
    """The corpus size per work dir and state of its sources (manifest, crop records), computed
    once per launch."""

    def __init__(self):
        self._sizes: Dict[tuple, CorpusSize] = {}

    def note_listing(self, ctx: StageContext, items: list) -> None:
        """The crop stage's listing of this launch, used for the size while no manifest exists."""
        key = _size_key(ctx)
        if key[3] is None and key not in self._sizes:
            self._sizes[key] = _from_items(Path(ctx.workdir), ctx.cfg, items=items)

    def of(self, ctx: StageContext) -> CorpusSize:
        """The corpus size from the best source present."""
        workdir = Path(ctx.workdir)
        tsv = workdir / "manifest" / "train.tsv"
        key = _size_key(ctx)
        if key not in self._sizes:
            self._sizes[key] = _from_manifest(workdir / "manifest") if tsv.is_file() else _from_items(workdir, ctx.cfg)
        return self._sizes[key]


def _size_key(ctx: StageContext) -> tuple:
    workdir = Path(ctx.workdir)
    tsv = workdir / "manifest" / "train.tsv"
    results = workdir / "crop" / "results"
    return (str(workdir), str(ctx.cfg.get("corpus")), str(ctx.cfg.get("layout") or "plain"),
            tsv.stat().st_mtime_ns if tsv.is_file() else None,
            len(list(results.glob("*.jsonl"))) if results.is_dir() else 0)


def _from_manifest(manifest: Path) -> CorpusSize:
    size = CorpusSize(source="corpus size: the manifest tsvs (exact frame counts)")
    for split in ("train", "valid", "test"):
        size.items[split], size.frames[split] = _tsv_frames(manifest / f"{split}.tsv")
    return size


def _tsv_frames(path: Path) -> Tuple[int, int]:
    if not path.is_file():
        return 0, 0
    n = frames = 0
    with open(path, encoding="utf-8") as f:
        next(f, None)
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) == 5:
                n += 1
                frames += int(parts[3])
    return n, frames


def _crop_records(workdir: Path) -> Dict[str, int]:
    frames = {}
    for path in sorted((workdir / "crop" / "results").glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            if rec.get("status") == "ok":
                frames[rec["id"]] = int(rec["n_frames"])
    return frames


def _from_items(workdir: Path, cfg, probe: int = 48, items: Optional[list] = None) -> CorpusSize:
    if items is None:  # the frozen item list if there is one (no walk of the corpus), else a listing
        idir = workdir / "crop" / "items"
        index = il.read_index(idir) if idir.is_dir() else None
        if index is not None:
            root = Path(index.corpus)
            items = [il.record_item(rec, root) for rec in il.iter_records(idir, index)]
        else:
            items = list_items(cfg)
    cropped = _crop_records(workdir)
    known: Dict[str, int] = {}
    unknown = []
    for it in items:
        if it.id in cropped:
            known[it.id] = cropped[it.id]
        elif it.start is not None and it.end is not None:
            known[it.id] = round((it.end - it.start) * VIDEO_RATE)
        else:
            unknown.append(it)
    parts = []
    if cropped:
        parts.append(f"{sum(1 for i in items if i.id in cropped)} items' frames from the crop records")
    mean = 0.0
    if unknown:
        rng = random.Random(0)
        sources = sorted({it.video for it in unknown})
        sample = rng.sample(sources, min(probe, len(sources)))
        durations = []
        for src in sample:
            try:
                d = media.video_info(src).get("duration")
            except Exception:  # an unreadable source is the crop stage's business
                d = None
            if d:
                durations.append(float(d))
        mean = sum(durations) / len(durations) if durations else 0.0
        parts.append(f"{len(unknown)} items at the mean duration of {len(durations)} sampled sources' container "
                     f"headers ({mean:.1f} s), extrapolated")
    size = CorpusSize(source=f"corpus size: {len(items)} listed items; " + "; ".join(parts))
    for it in items:
        f = known.get(it.id, round(mean * VIDEO_RATE))
        size.items[it.split] = size.items.get(it.split, 0) + 1
        size.frames[it.split] = size.frames.get(it.split, 0) + f
    return size
