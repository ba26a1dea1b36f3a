"""crop: per item (a video, or a segment of one), 68 face landmarks with dlib, a 96x96 gray
mouth ROI video at 25 fps aligned to the mean face, and 16 kHz mono 16-bit audio.

Outputs under ``WORKDIR/crop``: ``video/<id>.mp4``, ``audio/<id>.wav``, ``landmarks/<id>.npz``
(raw detections and the interpolated track: a re-crop never detects again), and per shard
``results/<shard>.jsonl``, one record per item: ``ok`` (paths relative to the crop dir, frame and
sample counts) or ``failed`` (the reason, naming the file). A video that cannot be decoded, has no
face in any frame, has no audio track or is too short gets a failure record, never a junk crop;
the shard still completes, and ``finalize`` fails the stage only above ``crop.max_failure_rate``.

The processing of one item (modes ``reference`` and ``fast``, the settings of ``crop.*`` other than
the sharding ones) is ``avprep/crop.py``.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from avprep import landmark_files, media, quality
from avprep.crop import CropError, CropSettings, crop_item, crop_one_video, landmark_detector, measure_item
from pipeline import atomic
from pipeline.errors import ConfigError, InputsMissing, StageFailed, raise_if_infrastructure
from pipeline.fingerprint import classify
from pipeline.stage import Shard, Stage, StageContext
from stages import estimates, item_list as il
from stages.corpus import id_list_settings, scan_corpus, shown
from stages.corpus_size import CorpusSizes

log = logging.getLogger(__name__)


_GROUPING = "how items are grouped into jobs, frozen with the item list: each item's outputs are the same"


@classify(
    output=("mode", "face_rule", "cnn_fallback", "upsample", "detect_every", "detect_width", "fast_upsample",
            "fast_strategy", "level_margin", "level_presteps", "window", "fps", "sample_rate", "min_frames",
            "require_audio", "crf", "quality", "landmarks_dir", "landmarks_missing"),
    ignored={"frame_cache_mb": "memory only: an item whose frames do not fit is decoded twice, to the same frames",
             "items_per_shard": _GROUPING, "n_shards": _GROUPING,
             "max_failure_rate": "a check: the step fails above it, what is written is the same"})
@dataclass
class Config(CropSettings):
    """``cfg.crop``: how each video is cropped (``avprep.crop.CropSettings``) and how the items are
    sharded."""

    # landmarks that already exist (avprep/landmark_files.py: the reference's or auto_avsr's per-video
    # pickles, or another work dir's crop/landmarks): read instead of detecting faces
    landmarks_dir: Optional[str] = None
    # an item without a file in landmarks_dir: "fail" (a failure record naming the files looked
    # for) or "detect" (its faces are detected as without landmarks_dir)
    landmarks_missing: str = "fail"
    items_per_shard: int = 50
    n_shards: int = 0  # 0 = from items_per_shard
    max_failure_rate: float = 0.2  # finalize fails the stage above this share of failed items


def crop_video_main(argv: list) -> int:
    p = argparse.ArgumentParser(prog="launch.py crop-video",
                                description="Run the crop stage's code on one video: mouth ROI mp4, 16 kHz wav, landmarks.")
    p.add_argument("video")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--mode", choices=["reference", "fast"], default="fast")
    p.add_argument("--face-rule", choices=["largest", "last"], default="largest")
    p.add_argument("--landmarks", help="landmarks of this video to use instead of detecting faces (the reference's "
                                        "or auto_avsr's .pkl, or a crop's .npz)")
    a = p.parse_args(argv)
    cfg = Config(mode=a.mode, face_rule=a.face_rule)
    out = Path(a.out)
    name = Path(a.video).stem
    stale = out / f"{name}.landmarks.npz"
    if stale.exists():
        print(f"found {stale}: reused if it was detected on this video, else replaced")
    try:
        r = crop_one_video(a.video, out, cfg=cfg, landmarks=a.landmarks)
    except (CropError, OSError, RuntimeError, landmark_files.LandmarkFileError) as e:
        print(f"error: {e}")
        return 1
    print(f"{a.video}: {r.n_frames} frames at 25 fps, face found in {r.faces_found}/{r.n_frames}, "
          f"{r.fps:.1f} frames/s ({a.mode} mode)")
    if r.rotation:
        print(f"  stored turned: frames rotated {r.rotation} degrees (display matrix) to be upright")
    print(f"  video: {r.video}\n  audio: {r.audio if r.audio else '(no audio track)'}\n  landmarks: {r.landmarks}")
    if r.quality:
        q = r.quality
        print(f"  quality: face in {q['face_share']:.0%} of frames ({q['face_px']:.0f} px high), mouth motion "
              f"{q['motion']:.1f}, brightness {q['brightness']:.0f}, contrast {q['contrast']:.0f}, jitter {q['jitter']:.2f}"
              + "".join(f"\n  flagged: {quality.describe_flag(c, q, quality.bounds_of(cfg.quality))}" for c in q["flags"]))
    return 0


# ------------------------------------------------------------------------------------------ stage
def crop_dir(ctx: StageContext) -> Path:
    return ctx.with_iteration(None).stage_dir("crop")


def items_dir(ctx: StageContext) -> Path:
    """The frozen item list (stages/item_list.py)."""
    return crop_dir(ctx) / "items"


def status_lines(workdir: Path) -> list[str]:
    """``launch.py status``'s lines on the crop stage's last corpus listing (stages/item_list.py)."""
    return il.listing_status_lines(Path(workdir) / "crop" / "items")


def source_root(ctx: StageContext) -> Path:
    """Where the frozen items' relative source paths are looked up: the configured corpus dir
    (the corpus may have moved since it was listed)."""
    return Path(str(ctx.cfg.corpus)).expanduser().resolve()


# an item's output files: crop/<kind>/<id><suffix> (ids that would share one are refused when
# the corpus is listed: stages.corpus.output_clashes)
OUTPUTS = (("video", ".mp4"), ("audio", ".wav"), ("landmarks", ".npz"))


def output_paths(out: Path, item_id: str) -> dict:
    return {k: out / k / f"{item_id}{ext}" for k, ext in OUTPUTS}


def imported_landmarks(ctx: StageContext, cfg: Config, item) -> Optional[landmark_files.Imported]:
    """The item's file in ``crop.landmarks_dir`` (None: detect its faces), or a CropError when it
    has none and ``crop.landmarks_missing=fail``."""
    if not cfg.landmarks_dir:
        return None
    root = source_root(ctx)
    try:
        relative = Path(item.video).relative_to(root).as_posix()
    except ValueError:
        relative = None
    where = Path(cfg.landmarks_dir).expanduser()
    path = landmark_files.find(where, item.id, relative)
    if path is None:
        if cfg.landmarks_missing == "detect":
            return None
        looked = ", ".join(str(p.relative_to(where)) for p in landmark_files.candidates(where, item.id, relative))
        raise CropError(f"{item.video}: no landmarks file for it in crop.landmarks_dir={where} (looked for "
                        f"{looked}); add it, or crop.landmarks_missing=detect to detect its faces")
    # a file of the whole video (not of this item) starts at the video's first frame
    whole_video = path.with_suffix("") != where / item.id
    first = int(round(float(item.start or 0) * cfg.fps)) if whole_video else 0
    return landmark_files.Imported(path, first)


class CropStage(Stage):
    """Shards are slices of the frozen item list: ``prepare`` lists the corpus once per launch
    and appends what is new as new shards; ``shards`` reads only the list's small index and
    ``run`` reads only its own slice."""

    name = "crop"
    # the listing: which items there are (the LRS3 segmentation cuts items out of videos)
    reads = ("layout", "manifest.include_ids", "manifest.max_segment_seconds", "manifest.min_pause_seconds")
    libraries = ("numpy", "dlib|dlib-bin", "av", "imageio-ffmpeg", "opencv-python|opencv-python-headless")

    def __init__(self):
        # items dir -> index with the batch planned but not written (yet: commit_plan writes it)
        self._planned: dict = {}
        # items dir -> what commit_plan writes there: (index, new batch or None, its bytes, the
        # listing report's arguments)
        self._to_write: dict = {}
        # the corpus size every step's estimate works from, sized from this stage's listing of
        # the launch while there is no manifest
        self.corpus_sizes = CorpusSizes()

    def validate(self, ctx: StageContext) -> None:
        c = ctx.cfg.crop
        if c.mode not in ("fast", "reference"):
            raise ConfigError(f"crop.mode={c.mode!r}: fast or reference")
        if c.face_rule not in ("largest", "last"):
            raise ConfigError(f"crop.face_rule={c.face_rule!r}: largest or last")
        if not 0 <= c.max_failure_rate <= 1:
            raise ConfigError(f"crop.max_failure_rate={c.max_failure_rate}: a share between 0 and 1")
        if c.landmarks_missing not in ("fail", "detect"):
            raise ConfigError(f"crop.landmarks_missing={c.landmarks_missing!r}: fail or detect")
        if c.landmarks_dir and not Path(str(c.landmarks_dir)).expanduser().is_dir():
            raise ConfigError(f"crop.landmarks_dir={c.landmarks_dir}: no such directory")
        if c.landmarks_missing != "fail" and not c.landmarks_dir:
            raise ConfigError(f"crop.landmarks_missing={c.landmarks_missing} does nothing without crop.landmarks_dir")
        if c.window < 1 or c.min_frames < 1 or c.items_per_shard < 1:
            raise ConfigError("crop.window, crop.min_frames and crop.items_per_shard must be >= 1")
        corpus = ctx.cfg.get("corpus")
        if not corpus or not Path(corpus).is_dir():
            raise ConfigError(f"corpus {corpus!r}: no such directory (--corpus)")

    def settings(self, ctx: StageContext) -> dict:
        return {**super().settings(ctx), **id_list_settings(ctx.cfg, ("include_ids",))}

    # --- planning ---------------------------------------------------------------------------
    def prepare(self, ctx: StageContext, commit: bool) -> list[str]:
        listing = scan_corpus(ctx.cfg, echo=lambda line: print(f"[crop] {line}", flush=True),
                              output_suffixes=[suffix for _, suffix in OUTPUTS])
        lines = [f"corpus {listing.root} ({listing.layout}): {len(listing.items)} items listed in "
                 f"{listing.seconds:.1f} s"] + listing.problem_lines()
        lines += listing.ignored_lines(where=str(items_dir(ctx) / "ignored.tsv") if commit else None)
        lines += self.freeze(ctx, listing.items, listing.root, listing.layout, commit, listing.problems,
                             listing.ignored)
        self.corpus_sizes.note_listing(ctx, listing.items)  # the resource plan sizes the corpus from this listing
        return lines

    def freeze(self, ctx: StageContext, items: list, root: Path, layout: str, commit: bool = True,
               problems: Optional[dict] = None, ignored: Optional[dict] = None) -> list[str]:
        """Freeze ``items`` (the current listing) against the frozen list: the whole list the
        first time, the new items as a new batch of shards later. Returns lines for the user.
        ``problems``: the listing's per-item problems (kind -> messages), kept in listing.json;
        ``ignored``: the paths that are not items (kind -> paths), counted there and listed in
        ignored.tsv."""
        idir = items_dir(ctx)
        self._planned.pop(str(idir), None)
        self._to_write.pop(str(idir), None)
        try:
            index = il.read_index(idir)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{idir}: the frozen item list cannot be read ({e}); restore it or use a new "
                              "work dir") from None
        c = ctx.cfg.crop
        lines = []
        if index is None:
            index = il.Index(str(root), layout)
            new, changes = items, il.Changes(new=list(items))
            n_shards = int(c.n_shards)
        else:
            if index.layout != layout:
                raise ConfigError(
                    f"layout={layout}: the item list in {idir} was frozen from a '{index.layout}' corpus; "
                    "use another work dir for another corpus")
            if index.corpus != str(root):
                lines.append(f"the corpus was listed from {index.corpus} before, now from {root}: sources are "
                             "matched by their path relative to the corpus dir")
                index.corpus = str(root)
            changes = il.compare(idir, index, items, root)
            new, n_shards = changes.new, 0
        verb = "froze" if commit else "would freeze"
        if new:
            batch, data = il.new_batch(index, new, root, int(c.items_per_shard), n_shards)
            shards = f"shard {batch.first_shard:05d}" if len(batch.shards) == 1 else \
                f"shards {batch.first_shard:05d}-{batch.first_shard + len(batch.shards) - 1:05d}"
            what = "the item list" if not index.batches else (
                f"{len(new)} new items" + (f" ({changes.replanned} planned again: their problem is gone)"
                                           if changes.replanned else ""))
            lines.append(f"{verb} {what}: {len(new)} items in {len(batch.shards)} shards ({shards})")
            index.batches.append(batch)
            self._planned[str(idir)] = index
        elif index.batches:
            batch = data = None
            lines.append(f"no new items (frozen: {index.n_items} items in {index.n_shards} shards)")
        lines += changes.lines()
        if commit:
            self._to_write[str(idir)] = (index, batch if new else None, data if new else None,
                                         (len(items), changes, problems, ignored))
        summary = crop_dir(ctx) / "summary.json"
        if summary.is_file():
            s = json.loads(summary.read_text())
            lines.append(f"last crop summary: {s.get('ok')} ok, {s.get('failed')} failed of {s.get('items')} items")
        return lines

    def commit_plan(self, ctx: StageContext) -> None:
        idir = items_dir(ctx)
        if str(idir) not in self._to_write:
            return
        index, batch, data, report = self._to_write.pop(str(idir))
        if batch is not None:
            il.write_batch(idir, index, batch, data)
        il.write_listing_report(idir, *report)
        self._planned.pop(str(idir), None)  # the frozen list on disk is the plan now

    def _index(self, ctx: StageContext):
        idir = items_dir(ctx)
        index = self._planned.get(str(idir)) or il.read_index(idir)
        if index is None:
            raise InputsMissing(f"{idir}: no frozen item list yet (a launch of the crop stage lists the corpus)")
        return index

    def shards(self, ctx: StageContext) -> list:
        index = self._index(ctx)
        n = index.n_shards
        return [Shard(k, n, f"{k:05d}", {"batch": b.file, "offset": offset, "length": length, "count": count})
                for k, b, offset, length, count in index.slices()]

    def estimate(self, ctx: StageContext):
        return estimates.crop(ctx, self.corpus_sizes.of(ctx))

    def outputs(self, ctx, shard):
        return [crop_dir(ctx) / "results" / f"{shard.key}.jsonl"]

    def shard_items(self, ctx: StageContext, shard: Shard) -> list:
        p = shard.params
        return il.read_slice(items_dir(ctx), p["batch"], p["offset"], p["length"], p["count"], source_root(ctx))

    # --- running ------------------------------------------------------------------------------
    def run(self, ctx: StageContext, shard: Shard) -> dict:
        cfg = Config(**ctx.cfg.crop)
        bounds = quality.bounds_of(cfg.quality)
        out = crop_dir(ctx)
        items = self.shard_items(ctx, shard)
        detector = None
        records, n_ok, frames, t0 = [], 0, 0, time.time()
        sheet = []  # the ok items' ROI tiles, in record order: the shard's contact sheet
        for item in items:
            paths = output_paths(out, item.id)
            base = {"id": item.id, "split": item.split, "text": item.text}
            try:
                if item.error:
                    raise CropError(item.error)
                if all(p.exists() for p in paths.values()):  # done by an earlier, killed run of this shard
                    n_frames = media.header_frame_count(paths["video"]) or media.count_video_frames(paths["video"])
                    n_samples = media.count_wav_samples(paths["audio"])
                    q, tiles = measure_item(Path(item.video), paths["landmarks"], cfg, item.start, item.end)
                else:
                    imported = imported_landmarks(ctx, cfg, item)
                    if detector is None and imported is None:
                        detector = landmark_detector(cfg)
                    r = crop_item(Path(item.video), paths["video"], paths["audio"], paths["landmarks"], cfg,
                                  item.start, item.end, detector, imported)
                    n_frames, n_samples, q, tiles = r.n_frames, r.n_samples, r.quality, r.tiles
                q = quality.with_speech_rate(q, item.text, n_samples / cfg.sample_rate, bounds)
                q = {**q, "sheet_index": len(sheet)}
                sheet.append(quality.SheetEntry(item.id, tiles, q["flags"]))
                records.append({**base, "status": "ok", "video": paths["video"].relative_to(out).as_posix(),
                                "audio": paths["audio"].relative_to(out).as_posix(), "n_frames": n_frames,
                                "n_samples": n_samples, "video_bytes": paths["video"].stat().st_size,
                                "audio_bytes": paths["audio"].stat().st_size, "quality": q})
                n_ok += 1
                frames += n_frames
            except Exception as e:  # one broken video never kills the shard
                # ... but a full disk, an I/O error or a signal is not the video's fault: the shard
                # fails and a rerun retries the item
                raise_if_infrastructure(e, [out])
                if not item.error:  # a failed item leaves no outputs behind (a half-written item's)
                    for p in paths.values():
                        if p.is_file():
                            p.unlink()
                reason = str(e) if (item.error or item.video in str(e)) else f"{item.video}: {type(e).__name__}: {e}"
                reason = shown(reason)
                log.warning("crop failed: %s", reason)
                records.append({**base, "status": "failed", "reason": reason})
        if sheet:  # written before the results: a shard with results has its sheet
            quality.write_sheet(out / "sheets" / f"{shard.key}.png", sheet, bounds.sheet_frames)
        with atomic.atomic_open(self.outputs(ctx, shard)[0]) as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")
        dt = time.time() - t0
        return {"items": len(items), "ok": n_ok, "failed": len(items) - n_ok, "frames": frames,
                "flagged": sum(bool(e.flags) for e in sheet), "fps": round(frames / dt, 2) if dt else None}

    def final_outputs(self, ctx):
        return [crop_dir(ctx) / "summary.json"]

    def finalize(self, ctx: StageContext, shard_stats: dict) -> dict:
        out = crop_dir(ctx)
        latest = {}  # id -> (ok, frames): an item planned again has a later record that wins
        reasons = {}
        for shard in self.shards(ctx):
            for rec in il.read_json_lines(out / "results" / f"{shard.key}.jsonl"):
                ok = rec["status"] == "ok"
                latest[rec["id"]] = (ok, rec.get("n_frames", 0) if ok else 0)
                if ok:
                    reasons.pop(rec["id"], None)
                else:
                    reasons[rec["id"]] = rec["reason"]
        ok = sum(1 for good, _ in latest.values() if good)
        total = len(latest)
        failed = total - ok
        rate = failed / total if total else 1.0
        listing = il.read_listing_report(items_dir(ctx))
        summary = {"items": total, "ok": ok, "failed": failed, "failure_rate": round(rate, 4),
                   "frames": sum(n for _, n in latest.values()),
                   "flagged": sum(s.get("flagged", 0) for s in shard_stats.values()),  # avprep/quality.py
                   "last_listing": {k: listing.get(k, 0) for k in ("listed", "new", "removed", "changed")}}
        if rate > float(ctx.cfg.crop.max_failure_rate):
            first = [f"{i}: {r}" for i, r in sorted(reasons.items())[:10]]
            raise StageFailed(
                f"crop: {failed} of {total} items failed ({rate:.0%} > crop.max_failure_rate="
                f"{ctx.cfg.crop.max_failure_rate}); first reasons:\n  " + "\n  ".join(first)
                + f"\nall failures are in {out / 'results'}/*.jsonl")
        atomic.write_json(out / "summary.json", summary)
        return summary


STAGE = CropStage()
