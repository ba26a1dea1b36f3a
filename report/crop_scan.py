"""The crop records of a work dir summarised for the report: ``crop/results/*.jsonl`` holds one
record per item (1.2M at paper scale), so each results file is summarised once into a cache
(``report/crop_scan.json``, keyed by the file's size and mtime and by the quality bounds) and a
later report reads only the shards that changed. A shard's summary keeps counts, failure reasons
grouped, rotations, quality histograms, every flagged item (for ``flagged.tsv``) and a few sampled
items for the corpus sample sheet; ``SheetCache`` cuts an item's tiles from its shard's contact
sheet. The report opens no media: rotations and figures are as the crop recorded them.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from avprep import quality
from pipeline import atomic

log = logging.getLogger(__name__)

CACHE_VERSION = 4  # 3: rotations per angle; 4: words per second
ROTATED_EXAMPLES = 3  # rotated item ids kept per shard
SAMPLES_PER_SHARD = 4  # candidates for the corpus sample sheet

# fixed histogram bins of the quality figures (the last bin takes everything above its start)
HIST_BINS = {
    "face_share": (0.0, 1.0, 20),
    "face_px": (0.0, 400.0, 20),
    "jitter": (0.0, 5.0, 20),
    "roll_deg": (-90.0, 90.0, 20),
    "motion": (0.0, 20.0, 20),
    "static_share": (0.0, 1.0, 20),
    "brightness": (0.0, 255.0, 20),
    "contrast": (0.0, 100.0, 20),
    "blank_share": (0.0, 1.0, 20),
    "words_per_s": (0.0, 10.0, 20),
}
# figures kept with each flagged item (the report's table and flagged.tsv)
FLAGGED_FIGURES = ("face_share", "face_px", "jitter", "roll_deg", "motion", "static_share", "brightness",
                   "contrast", "blank_share", "words_per_s", "rotation")


def histogram(figure: str, values: np.ndarray) -> list:
    """Counts of ``values`` (NaN: left out) in the figure's fixed bins; values beyond the range
    fall into the first or last bin."""
    lo, hi, n = HIST_BINS[figure]
    v = values[~np.isnan(values)]
    idx = np.clip(((v - lo) / (hi - lo) * n).astype(np.int64), 0, n - 1)
    return np.bincount(idx, minlength=n).tolist()

_LEADING_FILE = re.compile(r"^(?:[A-Za-z]:)?/.*?\.\w{1,5}: ")  # the crop's "<video>: reason" (spaces allowed)
_PATH = re.compile(r"(?:[A-Za-z]:)?/[^\s:'\"]+")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def reason_group(reason: str) -> str:
    """A failure reason without its file names and numbers, so equal causes count together
    ("no face found in any of its N frames")."""
    text = _LEADING_FILE.sub("", reason, count=1)
    return _NUMBER.sub("N", _PATH.sub("<file>", text))[:200]


def summarise_shard(key: str, lines, bounds: quality.QualityBounds) -> dict:
    """The report's summary of one crop results file (its lines). Flags are evaluated against
    ``bounds`` (the current config's), so relaxing a bound and rerunning ``launch.py report``
    shows its effect without cropping again (the contact sheets keep the crop-time outlines).
    Figures are gathered per shard and compared and binned as arrays: ~20 us per record."""
    s = {"items": 0, "ok": 0, "failed": 0, "frames": 0, "with_quality": 0, "rotated": 0,
         "rotations": {}, "rotated_examples": [], "splits": {}, "reasons": {}, "reason_examples": {},
         "flag_counts": {}, "flagged": [],
         "hist": {}, "n_sheet": 0, "samples": []}
    qs, meta = [], []  # the ok records' quality dicts, and (id, split, sheet index) of each
    for line in lines:
        if not line.strip():
            continue
        rec = json.loads(line)
        s["items"] += 1
        if rec.get("status") != "ok":
            s["failed"] += 1
            g = reason_group(str(rec.get("reason", "?")))
            s["reasons"][g] = s["reasons"].get(g, 0) + 1
            s["reason_examples"].setdefault(g, [rec.get("id"), rec.get("reason")])
            continue
        s["ok"] += 1
        s["frames"] += int(rec.get("n_frames") or 0)
        split = rec.get("split") or "?"
        s["splits"][split] = s["splits"].get(split, 0) + 1
        q = rec.get("quality")
        if q:
            qs.append(q)
            meta.append((rec["id"], split, q.get("sheet_index")))
    s["with_quality"] = len(qs)
    # the rotation the crop applied to turn the source upright, as recorded (never probed here:
    # the report opens no media)
    for (item_id, _, _), q in zip(meta, qs):
        angle = int(q.get("rotation") or 0) % 360
        if angle:
            s["rotated"] += 1
            s["rotations"][str(angle)] = s["rotations"].get(str(angle), 0) + 1
            if len(s["rotated_examples"]) < ROTATED_EXAMPLES:
                s["rotated_examples"].append([item_id, angle])
    nan = float("nan")
    values = {f: np.array([q.get(f, nan) for q in qs], dtype=np.float64) for f in HIST_BINS}
    s["hist"] = {f: histogram(f, v) for f, v in values.items()}
    masks = quality.flag_masks(values, bounds)
    any_flag = np.zeros(len(qs), bool)
    for code, m in masks.items():
        if m.any():
            s["flag_counts"][code] = int(m.sum())
            any_flag |= m
    for i in np.flatnonzero(any_flag):
        item_id, split, index = meta[i]
        s["flagged"].append({"id": item_id, "shard": key, "sheet_index": index, "split": split,
                             "flags": [c for c, m in masks.items() if m[i]],
                             "q": {f: qs[i][f] for f in FLAGGED_FIGURES if f in qs[i]}})
    on_sheet = [(i, m[2]) for i, m in enumerate(meta) if m[2] is not None]
    s["n_sheet"] = len(on_sheet)
    # a few items per shard for the corpus sample sheet, spread over the shard from an offset
    # chosen by its key (the same items every time)
    k = min(SAMPLES_PER_SHARD, len(on_sheet))
    offset = zlib.crc32(key.encode()) % max(len(on_sheet), 1)
    for j in range(k):
        i, index = on_sheet[(offset + j * len(on_sheet) // k) % len(on_sheet)]
        s["samples"].append({"id": meta[i][0], "shard": key, "sheet_index": int(index),
                             "flags": [c for c, m in masks.items() if m[i]]})
    return s


@dataclass
class CropScan:
    shards: int = 0
    items: int = 0
    ok: int = 0
    failed: int = 0
    frames: int = 0
    with_quality: int = 0
    rotated: int = 0
    rotations: Counter = field(default_factory=Counter)  # degrees (str) -> items
    rotated_examples: List[list] = field(default_factory=list)  # [id, degrees], a few per shard
    splits: Counter = field(default_factory=Counter)
    reasons: Counter = field(default_factory=Counter)
    reason_examples: Dict[str, list] = field(default_factory=dict)
    flag_counts: Counter = field(default_factory=Counter)
    flagged: List[dict] = field(default_factory=list)
    hist: Dict[str, list] = field(default_factory=dict)
    samples: List[dict] = field(default_factory=list)  # a few per shard with a sheet
    shards_read: int = 0  # results files parsed now (the others came from the cache)

    @property
    def n_flagged(self) -> int:
        return len(self.flagged)


def scan_crop(crop_dir: Path, cache_path: Optional[Path], bounds: quality.QualityBounds) -> Optional[CropScan]:
    """Summary of every ``crop/results/*.jsonl`` (None when there is none), reusing the cached
    summary of each file whose size and mtime did not change (and the same bounds)."""
    results = crop_dir / "results"
    try:
        entries = sorted((e for e in os.scandir(results) if e.name.endswith(".jsonl") and not e.name.startswith(".")),
                         key=lambda e: e.name)
    except FileNotFoundError:
        return None
    if not entries:
        return None
    bounds_key = json.dumps(dataclasses.asdict(bounds), sort_keys=True)
    cache = _read_cache(cache_path, bounds_key)
    fresh: dict = {}
    scan = CropScan(hist={f: [0] * HIST_BINS[f][2] for f in HIST_BINS})
    for e in entries:
        key = e.name[: -len(".jsonl")]
        try:
            st = e.stat()
        except FileNotFoundError:  # replaced while we listed: its next version is read next time
            continue
        stamp = [st.st_size, st.st_mtime_ns]
        hit = cache.get(key)
        if hit and hit.get("stamp") == stamp:
            summary = hit["summary"]
        else:
            try:
                with open(e.path, encoding="utf-8") as f:
                    summary = summarise_shard(key, f, bounds)
            except (OSError, ValueError) as err:
                log.warning("report: cannot read %s: %s", e.path, err)
                continue
            scan.shards_read += 1
        fresh[key] = {"stamp": stamp, "summary": summary}
        _add(scan, summary)
    scan.shards = len(fresh)
    if cache_path is not None and (scan.shards_read or set(fresh) != set(cache)):
        try:
            atomic.write_text(cache_path, json.dumps({"version": CACHE_VERSION, "bounds": bounds_key, "shards": fresh}, separators=(",", ":")))
        except OSError as err:  # a read-only work dir still gets its report printed elsewhere
            log.warning("report: cannot write the crop scan cache %s: %s", cache_path, err)
    return scan


def _read_cache(path: Optional[Path], bounds_key: str) -> dict:
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    ok = data.get("version") == CACHE_VERSION and data.get("bounds") == bounds_key
    return data.get("shards", {}) if ok else {}


def _add(scan: CropScan, s: dict) -> None:
    for k in ("items", "ok", "failed", "frames", "with_quality", "rotated"):
        setattr(scan, k, getattr(scan, k) + int(s.get(k, 0)))
    scan.splits.update(s.get("splits", {}))
    scan.rotations.update(s.get("rotations", {}))
    scan.rotated_examples.extend(s.get("rotated_examples", []))
    scan.reasons.update(s.get("reasons", {}))
    for g, ex in s.get("reason_examples", {}).items():
        scan.reason_examples.setdefault(g, ex)
    scan.flag_counts.update(s.get("flag_counts", {}))
    scan.flagged.extend(s.get("flagged", []))
    for f, counts in s.get("hist", {}).items():
        if f in scan.hist and len(counts) == len(scan.hist[f]):
            scan.hist[f] = [a + b for a, b in zip(scan.hist[f], counts)]
    scan.samples.extend(s.get("samples", []))


class SheetCache:
    """Decoded shard sheets, a few at a time (each is read for the cells cut from it)."""

    def __init__(self, sheets_dir: Path, n_tiles: int):
        self.dir, self.n_tiles, self.cache = sheets_dir, n_tiles, {}

    def cell(self, shard: str, index):
        """The item's cell of its shard's contact sheet (BGR array), None where there is none."""
        import cv2

        if index is None:
            return None
        if shard not in self.cache:
            if len(self.cache) >= 4:  # a decoded sheet of 50 items is ~10 MB
                self.cache.clear()
            p = self.dir / f"{shard}.png"
            self.cache[shard] = cv2.imread(str(p), cv2.IMREAD_COLOR) if p.is_file() else None
        sheet = self.cache[shard]
        if sheet is None:
            return None
        cell = quality.sheet_tiles(sheet, int(index), self.n_tiles)
        return cell if cell.size else None
