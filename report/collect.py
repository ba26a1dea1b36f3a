"""What the report shows, gathered from a work dir (complete, partial or failed; any size).

Every reader here costs O(shards) or O(files it must show), never O(items), except the crop scan:
``crop/results/*.jsonl`` holds one record per item, so it is summarised per shard into a cache
(``report/crop_scan.json``, keyed by each results file's size and mtime) and a later report reads
only the shards that changed. The summary keeps counts, failure reasons grouped, quality
histograms, every flagged item (for ``flagged.tsv``) and one sampled item per shard.
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

log = logging.getLogger(__name__)

CACHE_VERSION = 3  # 3: rotations per angle
ROTATED_EXAMPLES = 3  # rotated item ids kept per shard
MARKERS_READ = 2000  # done markers read per step for job times; more are sampled
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
}
# figures kept with each flagged item (the report's table and flagged.tsv)
FLAGGED_FIGURES = ("face_share", "face_px", "jitter", "roll_deg", "motion", "static_share", "brightness",
                   "contrast", "blank_share", "rotation")


def histogram(figure: str, values: np.ndarray) -> list:
    """Counts of ``values`` (NaN: left out) in the figure's fixed bins; values beyond the range
    fall into the first or last bin."""
    lo, hi, n = HIST_BINS[figure]
    v = values[~np.isnan(values)]
    idx = np.clip(((v - lo) / (hi - lo) * n).astype(np.int64), 0, n - 1)
    return np.bincount(idx, minlength=n).tolist()


# ------------------------------------------------------------------------------------------ crop
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
        from pipeline import atomic

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


# ------------------------------------------------------------------------------------ engine state
@dataclass
class StepInfo:
    stage: str
    iteration: Optional[int]
    total: Optional[int]
    done: int
    running: int
    failed: list  # (key, log, error)
    finalized: bool
    finished_at: Optional[float] = None  # the stage marker's time
    step_seconds: Optional[float] = None  # the wall time of the launch step that finalized it
    job_seconds: Optional[float] = None  # sum of the shards' own run times
    job_seconds_estimated: bool = False
    first_start: Optional[float] = None
    last_end: Optional[float] = None
    settings_digest: Optional[str] = None  # of the settings its outputs were made with (pipeline.fingerprint)
    provenance: Optional[str] = None  # its provenance.json, relative to the work dir
    changed: Optional[str] = None  # the last launch's settings differ: "key old -> new, ..."

    @property
    def state(self) -> str:
        if self.finalized:
            return "complete"
        if self.failed:
            return "failed"
        if self.running:
            return "running"
        return "incomplete"


def collect_steps(workdir: Path, order: List[str]) -> List[StepInfo]:
    """Every recorded step with its shard counts (the status command's reading of the markers) and
    its times: the stage marker's, and the shards' run times from their done markers (at most
    MARKERS_READ read per step; beyond that an even sample, scaled: marked estimated)."""
    from pipeline.state import StateStore
    from pipeline.status import collect

    from pipeline.changes import read_saved
    from pipeline.state import describe

    store = StateStore(workdir)
    changed = read_saved(workdir).get("changed") or {}
    out = []
    for s in collect(workdir, order):
        info = StepInfo(s.stage, s.iteration, s.total, s.done, s.running, list(s.failed), s.finalized)
        record = store.read_fingerprint(s.stage, s.iteration) or {}
        info.settings_digest = record.get("settings_digest")
        info.provenance = (record.get("provenance") or [None])[0]
        info.changed = changed.get(describe(s.stage, s.iteration))
        stage_done = store.read_stage_done(s.stage, s.iteration)
        if stage_done:
            info.finished_at = stage_done.get("time")
            info.step_seconds = (stage_done.get("summary") or {}).get("seconds")
        keys = sorted(store.markers(s.stage, s.iteration)["done"])
        if keys:
            step = max(1, len(keys) // MARKERS_READ)
            picked = keys[::step]
            total, n = 0.0, 0
            for key in picked:
                m = store.read_done(s.stage, s.iteration, key)
                if not m:
                    continue
                sec = float((m.get("stats") or {}).get("seconds") or 0.0)
                end = m.get("time")
                total += sec
                n += 1
                if end is not None:
                    info.last_end = max(info.last_end or end, end)
                    info.first_start = min(info.first_start or end - sec, end - sec)
            if n:
                info.job_seconds = total * len(keys) / n
                info.job_seconds_estimated = n < len(keys)
        out.append(info)
    return sorted(out, key=lambda s: _step_rank(s, order))


def _step_rank(s: "StepInfo", order: List[str]) -> tuple:
    """DAG order as a user reads it: crop, manifest, each iteration's stages, then fine-tuning."""
    after = False
    try:
        from stages import get_stage

        after = bool(getattr(get_stage(s.stage), "after_iterations", False))
    except Exception:  # a stage this checkout does not have: keep its recorded place
        pass
    phase = 2 if after else (0 if s.iteration is None else 1)
    return phase, s.iteration or 0, order.index(s.stage) if s.stage in order else len(order), s.stage


# ------------------------------------------------------------------------------------------ disk
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


# ------------------------------------------------------------------------------------ stage outputs
def read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def iterations_present(workdir: Path, configured: int) -> List[int]:
    found = {int(p.name[4:]) for p in workdir.glob("iter*") if p.name[4:].isdigit()}
    return sorted(found | set(range(1, configured + 1)))


def loss_series(tensorboard_dir: Path) -> dict:
    """``{"train": [(update, loss)], "valid": [...]}`` from fairseq's TensorBoard logs (the train
    stage's reader: a record cut by a kill ends its file, a step logged again keeps its latest)."""
    from stages.train import read_scalars

    if not tensorboard_dir.is_dir():
        return {}
    out = {}
    try:
        train = read_scalars(tensorboard_dir / "train_inner").get("loss", []) or \
            read_scalars(tensorboard_dir / "train").get("loss", [])
        valid = read_scalars(tensorboard_dir / "valid").get("loss", [])
    except Exception as e:  # a damaged log must not cost the whole report
        log.warning("report: cannot read %s: %s", tensorboard_dir, e)
        return {}
    if train:
        out["train"] = [(s, v) for s, v, *_ in train]
    if valid:
        out["valid"] = [(s, v) for s, v, *_ in valid]
    return out


def count_lines(path: Path) -> Optional[int]:
    try:
        with open(path, "rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    except OSError:
        return None


def read_listing(items_dir: Path) -> Optional[dict]:
    """The frozen item list and what the last listing found (``stages/item_list.py``): from
    ``index.json`` the frozen items, shards and batches (a few numbers per batch), from
    ``listing.json`` the counts, the first removed/changed ids and the per-item problems. None
    when the crop stage has not frozen a list here. Raises ValueError for a malformed file."""
    index_path, listing_path = items_dir / "index.json", items_dir / "listing.json"
    if not index_path.is_file() and not listing_path.is_file():
        return None
    out: dict = {"dir": items_dir}
    if index_path.is_file():
        index = json.loads(index_path.read_text())
        batches = index.get("batches") or []
        out.update({"corpus": index.get("corpus"), "layout": index.get("layout"), "batches": len(batches),
                    "frozen": sum(int(b.get("items", 0)) for b in batches),
                    "shards": sum(len(b.get("shards") or []) for b in batches)})
    if listing_path.is_file():
        listing = json.loads(listing_path.read_text())
        if not isinstance(listing, dict):
            raise ValueError(f"{listing_path}: not a JSON object")
        out["listing"] = listing
    return out


def units_dirs(workdir: Path, cfg: Optional[dict]) -> List[Path]:
    """Where units runs of this work dir are: ``units.out_dir`` of the last launch's config (it
    may lie outside the work dir) and ``WORKDIR/units``, those holding a units run's files."""
    configured = ((cfg or {}).get("units") or {}).get("out_dir")
    candidates = ([Path(str(configured)).expanduser()] if configured else []) + [workdir / "units"]
    out = []
    for d in candidates:
        d = d if d.is_absolute() else workdir / d
        if d not in out and any((d / f).exists() for f in ("summary.json", "settings.json", "shards")):
            out.append(d)
    return out


def quality_bounds(cfg: Optional[dict]) -> quality.QualityBounds:
    """The bounds of the last launch's config (the crop stage's ``crop.quality``)."""
    return quality.bounds_of(((cfg or {}).get("crop") or {}).get("quality"))
