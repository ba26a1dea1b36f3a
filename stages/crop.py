"""crop: per item (a video, or a segment of one), 68 face landmarks with dlib, a 96x96 gray
mouth ROI video at 25 fps aligned to the mean face, and 16 kHz mono 16-bit audio.

Outputs under ``WORKDIR/crop``: ``video/<id>.mp4``, ``audio/<id>.wav``, ``landmarks/<id>.npz``
(raw detections and the interpolated track: a re-crop never detects again), and per shard
``results/<shard>.jsonl``, one record per item: ``ok`` (paths relative to the crop dir, frame and
sample counts) or ``failed`` (the reason, naming the file). A video that cannot be decoded, has no
face in any frame, has no audio track or is too short gets a failure record, never a junk crop;
the shard still completes, and ``finalize`` fails the stage only above ``crop.max_failure_rate``.

Modes: ``reference`` follows the reference preparation exactly (HOG detection with upsampling on
every frame, CNN fallback, colour warp); ``fast`` (default) finds the reference's HOG boxes by
scanning only the pyramid levels of the last face (avprep/hog_levels.py; ``fast_strategy=track``
detects every ``detect_every`` frames and tracks in between instead), and warps the gray frame.
Both decode each item once when its frames fit in ``frame_cache_mb`` (see bench/crop.py).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from avprep import landmark_files
from avprep.quality import QualityBounds
from pipeline import atomic
from pipeline.errors import ConfigError, InputsMissing, StageFailed, raise_if_infrastructure
from pipeline.fingerprint import classify
from pipeline.stage import Shard, Stage, StageContext
from stages.corpus import id_list_settings

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
class Config:
    mode: str = "fast"  # fast | reference
    # with several faces in a frame: "largest" box (the speaker, nearly always) or "last" (reference)
    face_rule: str = "largest"
    cnn_fallback: bool = True  # CNN (mmod) detector when HOG finds no face
    upsample: int = 1  # HOG upsampling (reference: 1)
    detect_every: int = 10  # fast mode: full detection every N frames, tracking in between
    detect_width: int = 320  # fast mode: detection on a frame downscaled to this width
    # fast mode: HOG upsampling of the downscaled keyframe search (0: faces >= 80 px at detect_width;
    # 4x cheaper than 1, and the box is re-found at full resolution around the face anyway)
    fast_upsample: int = 0
    # fast mode: "levels" = the reference's detector boxes on every frame, searched only on the image
    # pyramid levels of the last face (avprep/hog_levels.py; ROIs within ~1 gray level of reference
    # mode's); "track" = detect every detect_every frames and track in between (faster, ~5-10 off)
    fast_strategy: str = "levels"
    level_margin: int = 1  # "levels": pyramid levels scanned below the last face's
    # "levels": how many of the last pyramid steps before the scanned level dlib computes itself
    # (its resampling; a single resize of the frame straight to that level moves boxes more often)
    level_presteps: int = 1
    window: int = 12  # landmark smoothing window (frames)
    fps: int = 25
    sample_rate: int = 16000
    # decoded frames kept for the cropping pass after detection (one decode instead of two); an
    # item whose frames exceed this is decoded a second time instead, so memory stays bounded
    frame_cache_mb: int = 512
    min_frames: int = 12  # shorter items are failures
    # landmarks that already exist (avprep/landmark_files.py: the reference's or auto_avsr's per-video
    # pickles, or another work dir's crop/landmarks): read instead of detecting faces
    landmarks_dir: Optional[str] = None
    # an item without a file in landmarks_dir: "fail" (a failure record naming the files looked
    # for) or "detect" (its faces are detected as without landmarks_dir)
    landmarks_missing: str = "fail"
    require_audio: bool = True
    crf: int = 18  # x264 quality of the ROI videos
    items_per_shard: int = 50
    n_shards: int = 0  # 0 = from items_per_shard
    max_failure_rate: float = 0.2  # finalize fails the stage above this share of failed items
    # per-item quality figures and the bounds outside which an item is flagged (not failed):
    # avprep/quality.py; each ok record gets a ``quality`` dict, each shard a contact sheet
    quality: QualityBounds = field(default_factory=QualityBounds)


class CropError(RuntimeError):
    """An item cannot be cropped; the message names the file and the reason."""


class NoFaceError(CropError):
    pass


@dataclass
class CropResult:
    video: Path
    audio: Optional[Path]
    landmarks: Path
    n_frames: int
    n_samples: int
    faces_found: int
    seconds: float
    quality: Optional[dict] = None  # avprep.quality.item_quality
    tiles: Optional[np.ndarray] = None  # a few ROI frames for the contact sheet
    rotation: int = 0  # degrees the source's frames were turned to be upright

    @property
    def fps(self) -> float:
        return self.n_frames / self.seconds if self.seconds else float("inf")


def _detector(cfg: Config):
    from avprep.landmarks import DetectorSettings, LandmarkDetector

    return LandmarkDetector(DetectorSettings(mode=cfg.mode, face_rule=cfg.face_rule, upsample=cfg.upsample,
                                             cnn_fallback=cfg.cnn_fallback, detect_every=cfg.detect_every,
                                             detect_width=cfg.detect_width,
                                             fast_upsample=cfg.fast_upsample,
                                             fast_strategy=cfg.fast_strategy, level_margin=cfg.level_margin,
                                             level_presteps=cfg.level_presteps))


def _frames(video: Path, cfg: Config, start, end) -> Iterator[np.ndarray]:
    from avprep import media

    # BGR converted with OpenCV's weights, what the reference's cv2 reader and detector see
    # (ffmpeg's own gray is the luma plane: 1-2 gray levels off)
    frames = media.iter_frames(video, "bgr24", fps=cfg.fps, start=start, end=end)
    return frames if cfg.mode == "reference" else map(_gray, frames)


def _gray(frame: np.ndarray) -> np.ndarray:
    if frame.ndim == 2:
        return frame
    import cv2

    return cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)


def detect_frames(frames, detector, cache_mb: float) -> tuple:
    """Landmarks per frame (None where no face), and the frames themselves while they fit in
    ``cache_mb`` (None beyond it: the caller decodes again)."""
    detector.reset()
    cached, size = [], 0

    def grays():
        nonlocal cached, size
        for frame in frames:
            if cached is not None:
                size += frame.nbytes
                if size > cache_mb * 2**20:
                    cached = None
                else:
                    cached.append(frame)
            yield _gray(frame)

    # the detector's stream runs the landmark predictor on batches of frames (fast mode)
    stream = getattr(detector, "stream", None)
    raw = list(stream(grays()) if stream is not None else map(detector, grays()))
    return raw, cached


def mouth_rois(frames, track: np.ndarray, cfg: Config) -> Iterator[np.ndarray]:
    """The 96x96 gray mouth ROIs of decoded frames (``_frames``) along a landmark track."""
    from avprep import align

    # both modes warp with the reference's float interpolation + truncation: it costs little
    # next to detection, and cv2's fixed-point uint8 path drifts by about half a gray level
    rois = align.crop_mouths(frames, track, window=cfg.window, exact=True)
    # reference mode warps the colour frame and converts the patch, as the reference does
    return (_gray(r) for r in rois) if cfg.mode == "reference" else rois


def read_frames(frames, cache_mb: float) -> tuple:
    """The number of decoded frames, and the frames while they fit in ``cache_mb`` (None beyond
    it: the caller decodes again)."""
    cached, size, n = [], 0, 0
    for frame in frames:
        n += 1
        if cached is not None:
            size += frame.nbytes
            cached = None if size > cache_mb * 2**20 else cached + [frame]
    return n, cached


def crop_item(video: Path, out_video: Path, out_audio: Optional[Path], out_landmarks: Path, cfg: Config,
              start: Optional[float] = None, end: Optional[float] = None, detector=None,
              imported: Optional[landmark_files.Imported] = None) -> CropResult:
    """Crop one video (or segment) into the three output files, each written atomically.
    Landmarks already saved in ``out_landmarks`` are reused; ``imported``: landmarks read from a
    file instead of detected (avprep/landmark_files.py)."""
    from avprep import align, media, quality

    t0 = time.time()
    video = Path(video)
    info = media.video_info(video)
    if cfg.require_audio and out_audio is not None and not info["has_audio"]:
        raise CropError(f"{video}: no audio track")
    # what the landmarks were detected on: a file left by another video (same name in a reused
    # --out dir, a re-encoded source) or another segment must not be reused
    source = {"video": str(video.resolve()), "size": video.stat().st_size, "start": start, "end": end,
              "fps": cfg.fps}
    if info["rotation"]:  # detected on the upright frames (older files saw them sideways)
        source["rotation"] = info["rotation"]
    if imported is not None:  # another landmarks file (or none: detected) is another source
        source["landmarks"] = {"file": str(imported.path.resolve()), "size": imported.path.stat().st_size,
                               "first_frame": imported.first_frame}
    source = json.dumps(source)
    saved = np.load(out_landmarks) if out_landmarks.exists() else None
    if saved is not None and ("source" not in saved or str(saved["source"]) != source):
        log.warning("%s: landmarks were detected on another input; detecting again", out_landmarks)
        saved = None
    cached = None
    if saved is not None:
        track, found, raw_arr = saved["interpolated"], int(saved["found"].sum()), saved["raw"]
        n = len(track)
    else:
        if imported is not None:
            n, cached = read_frames(_frames(video, cfg, start, end), cfg.frame_cache_mb)
            raw = landmark_files.fit(imported.path, landmark_files.read(imported.path), str(video), n, cfg.fps,
                                     imported.first_frame) if n else []
        else:
            detector = detector or _detector(cfg)
            raw, cached = detect_frames(_frames(video, cfg, start, end), detector, cfg.frame_cache_mb)
        n = len(raw)
        if n == 0:
            raise CropError(f"{video}: no frame could be decoded" + (f" in [{start}, {end}] s" if start or end else ""))
        media.check_complete(video, "video", n / cfg.fps, info["duration"], start, end)
        if n < cfg.min_frames:
            raise CropError(f"{video}: {n} frames at {cfg.fps} fps, shorter than crop.min_frames={cfg.min_frames}")
        track = align.interpolate_missing(raw)
        found = sum(r is not None for r in raw)
        if track is None:
            where = f" of {imported.path}" if imported is not None else ""
            raise NoFaceError(f"{video}: no face found in any of its {n} frames{where}")
        # detections are whole pixels; imported landmarks (auto_avsr's FAN) may be sub-pixel
        raw_arr = np.full((n, 68, 2), -1, dtype=np.int32 if imported is None else np.float64)
        for i, r in enumerate(raw):
            if r is not None:
                raw_arr[i] = r
        with atomic.atomic_path(out_landmarks) as tmp:
            save_npz(tmp, raw=raw_arr, interpolated=track, found=np.array([r is not None for r in raw]), source=source,
                     fps=cfg.fps, mode=cfg.mode)
    frames = iter(cached) if cached is not None else _frames(video, cfg, start, end)
    bounds = quality.bounds_of(cfg.quality)
    meter = quality.RoiMeter(n, bounds.sheet_frames)  # figures of the ROIs as they are encoded
    rois = meter.observe(mouth_rois(frames, track, cfg))
    try:
        n_written = media.write_gray_video(out_video, rois, fps=cfg.fps, crf=cfg.crf)
    except align.AlignmentError as e:
        raise CropError(f"{video}: {e}") from None
    n_samples = 0
    audio = None
    if out_audio is not None and info["has_audio"]:
        n_samples = media.extract_audio(video, out_audio, start=start, end=end, sr=cfg.sample_rate)
        audio = out_audio
        media.check_complete(video, "audio", n_samples / cfg.sample_rate, info["audio_duration"], start, end)
    q = quality.item_quality(raw_arr, track, meter, bounds, info["fps"], cfg.fps, info["rotation"], cfg.window)
    return CropResult(Path(out_video), audio, Path(out_landmarks), n_written, n_samples, found, time.time() - t0,
                      q, meter.tile_stack(), info["rotation"])


def save_npz(path: Path, **arrays) -> None:
    """``np.savez_compressed`` without the time stamps numpy's zip members carry (the write time):
    the same landmarks give the same bytes."""
    import io
    import zipfile

    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, value in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asanyarray(value), allow_pickle=False)
            member = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            member.compress_type = zipfile.ZIP_DEFLATED
            member.external_attr = 0o644 << 16
            zf.writestr(member, buf.getvalue())


def measure_item(video: Path, landmarks: Path, cfg: Config, start: Optional[float] = None,
                 end: Optional[float] = None) -> tuple:
    """(quality dict, sheet tiles) of an item an earlier, killed run of its shard cropped, measured
    as ``crop_item`` measures them: the ROIs cut again from the decoded source along the saved
    landmark track (no detection, no encoding), so a resumed shard's records and sheet are a
    straight run's, byte for byte (the encoded ROI video would move the figures: motion by ~10 %)."""
    from avprep import media, quality

    info = media.video_info(video)
    with np.load(landmarks) as saved:
        raw, track = saved["raw"], saved["interpolated"]
    bounds = quality.bounds_of(cfg.quality)
    meter = quality.RoiMeter(len(track), bounds.sheet_frames)
    for _ in meter.observe(mouth_rois(_frames(video, cfg, start, end), track, cfg)):
        pass
    q = quality.item_quality(raw, track, meter, bounds, info["fps"], cfg.fps, info["rotation"], cfg.window)
    return q, meter.tile_stack()


def crop_one_video(video, out_dir, mode: Optional[str] = None, cfg: Optional[Config] = None,
                   name: Optional[str] = None, landmarks: Optional[Path] = None) -> CropResult:
    """The crop stage's processing of one whole video into ``out_dir/<name>.{mp4,wav,landmarks.npz}``
    (used by ``launch.py crop-video`` and ``launch.py infer``). No audio track: no wav, no error."""
    cfg = cfg or Config()
    if mode:
        cfg = Config(**{**cfg.__dict__, "mode": mode})
    cfg = Config(**{**cfg.__dict__, "require_audio": False})
    out_dir = Path(out_dir)
    name = name or Path(video).stem
    return crop_item(Path(video), out_dir / f"{name}.mp4", out_dir / f"{name}.wav",
                     out_dir / f"{name}.landmarks.npz", cfg,
                     imported=landmark_files.Imported(Path(landmarks)) if landmarks else None)


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
        from avprep.quality import describe_flag, bounds_of

        q = r.quality
        print(f"  quality: face in {q['face_share']:.0%} of frames ({q['face_px']:.0f} px high), mouth motion "
              f"{q['motion']:.1f}, brightness {q['brightness']:.0f}, contrast {q['contrast']:.0f}, jitter {q['jitter']:.2f}"
              + "".join(f"\n  flagged: {describe_flag(c, q, bounds_of(cfg.quality))}" for c in q["flags"]))
    return 0


# ------------------------------------------------------------------------------------------ stage
def crop_dir(ctx: StageContext) -> Path:
    return ctx.with_iteration(None).stage_dir("crop")


def items_dir(ctx: StageContext) -> Path:
    """The frozen item list (stages/item_list.py)."""
    return crop_dir(ctx) / "items"


def status_lines(workdir: Path) -> list[str]:
    """``launch.py status``'s lines on the crop stage's last corpus listing (stages/item_list.py)."""
    from stages import item_list as il

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
        # items dir -> index with the batch a dry run planned but did not write
        self._planned: dict = {}

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
        from stages.corpus import scan_corpus

        listing = scan_corpus(ctx.cfg, echo=lambda line: print(f"[crop] {line}", flush=True),
                              output_suffixes=[suffix for _, suffix in OUTPUTS])
        lines = [f"corpus {listing.root} ({listing.layout}): {len(listing.items)} items listed in "
                 f"{listing.seconds:.1f} s"] + listing.problem_lines()
        lines += listing.ignored_lines(where=str(items_dir(ctx) / "ignored.tsv") if commit else None)
        lines += self.freeze(ctx, listing.items, listing.root, listing.layout, commit, listing.problems,
                             listing.ignored)
        from stages import estimates

        estimates.note_listing(ctx, listing.items)  # the resource plan sizes the corpus from this listing
        return lines

    def freeze(self, ctx: StageContext, items: list, root: Path, layout: str, commit: bool = True,
               problems: Optional[dict] = None, ignored: Optional[dict] = None) -> list[str]:
        """Freeze ``items`` (the current listing) against the frozen list: the whole list the
        first time, the new items as a new batch of shards later. Returns lines for the user.
        ``problems``: the listing's per-item problems (kind -> messages), kept in listing.json;
        ``ignored``: the paths that are not items (kind -> paths), counted there and listed in
        ignored.tsv."""
        from stages import item_list as il

        idir = items_dir(ctx)
        self._planned.pop(str(idir), None)
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
            if commit:
                il.write_batch(idir, index, batch, data)
            else:
                index.batches.append(batch)
                self._planned[str(idir)] = index
        elif index.batches:
            lines.append(f"no new items (frozen: {index.n_items} items in {index.n_shards} shards)")
        lines += changes.lines()
        if commit:
            il.write_listing_report(idir, len(items), changes, problems, ignored)
        summary = crop_dir(ctx) / "summary.json"
        if summary.is_file():
            s = json.loads(summary.read_text())
            lines.append(f"last crop summary: {s.get('ok')} ok, {s.get('failed')} failed of {s.get('items')} items")
        return lines

    def _index(self, ctx: StageContext):
        from stages import item_list as il

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
        from stages import estimates

        return estimates.crop(ctx)

    def outputs(self, ctx, shard):
        return [crop_dir(ctx) / "results" / f"{shard.key}.jsonl"]

    def shard_items(self, ctx: StageContext, shard: Shard) -> list:
        from stages import item_list as il

        p = shard.params
        return il.read_slice(items_dir(ctx), p["batch"], p["offset"], p["length"], p["count"], source_root(ctx))

    # --- running ------------------------------------------------------------------------------
    def run(self, ctx: StageContext, shard: Shard) -> dict:
        from avprep import media, quality
        from stages.corpus import shown

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
                        detector = _detector(cfg)
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
        from stages import item_list as il

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
