"""Cropping of one video (or a segment of one): 68 face landmarks with dlib, a 96x96 gray mouth
ROI video at 25 fps aligned to the mean face, and 16 kHz mono 16-bit audio; each output written
atomically. The crop stage (``stages/crop.py``) runs ``crop_item`` on every item of its shard;
``crop_one_video`` is the same processing of one whole video (``launch.py crop-video``,
``launch.py infer``, ``avhubert.api``).

Modes: ``reference`` follows the reference preparation exactly (HOG detection with upsampling on
every frame, CNN fallback, colour warp); ``fast`` (default) finds the reference's HOG boxes by
scanning only the pyramid levels of the last face (avprep/hog_levels.py; ``fast_strategy=track``
detects every ``detect_every`` frames and tracks in between instead), and warps the gray frame.
Both decode each item once when its frames fit in ``frame_cache_mb`` (see bench/crop.py).
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from avprep import align, landmark_files, media, quality
from avprep.landmarks import DetectorSettings, LandmarkDetector
from avprep.quality import QualityBounds
from pipeline import atomic

log = logging.getLogger(__name__)


@dataclass
class CropSettings:
    """How one video is cropped (the crop stage's ``Config`` adds its sharding and failure
    settings)."""

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
    require_audio: bool = True
    crf: int = 18  # x264 quality of the ROI videos
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


def landmark_detector(cfg: CropSettings):
    """The landmark detector of these settings (dlib models load on first use)."""
    return LandmarkDetector(DetectorSettings(mode=cfg.mode, face_rule=cfg.face_rule, upsample=cfg.upsample,
                                             cnn_fallback=cfg.cnn_fallback, detect_every=cfg.detect_every,
                                             detect_width=cfg.detect_width,
                                             fast_upsample=cfg.fast_upsample,
                                             fast_strategy=cfg.fast_strategy, level_margin=cfg.level_margin,
                                             level_presteps=cfg.level_presteps))


def decoded_frames(video: Path, cfg: CropSettings, start, end) -> Iterator[np.ndarray]:
    """The frames of ``video`` (or of [start, end] s) at ``cfg.fps`` as detection sees them: BGR in
    reference mode, gray otherwise."""
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


def mouth_rois(frames, track: np.ndarray, cfg: CropSettings) -> Iterator[np.ndarray]:
    """The 96x96 gray mouth ROIs of decoded frames (``_frames``) along a landmark track."""
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


def crop_item(video: Path, out_video: Path, out_audio: Optional[Path], out_landmarks: Path, cfg: CropSettings,
              start: Optional[float] = None, end: Optional[float] = None, detector=None,
              imported: Optional[landmark_files.Imported] = None) -> CropResult:
    """Crop one video (or segment) into the three output files, each written atomically.
    Landmarks already saved in ``out_landmarks`` are reused; ``imported``: landmarks read from a
    file instead of detected (avprep/landmark_files.py)."""
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
            n, cached = read_frames(decoded_frames(video, cfg, start, end), cfg.frame_cache_mb)
            raw = landmark_files.fit(imported.path, landmark_files.read(imported.path), str(video), n, cfg.fps,
                                     imported.first_frame) if n else []
        else:
            detector = detector or landmark_detector(cfg)
            raw, cached = detect_frames(decoded_frames(video, cfg, start, end), detector, cfg.frame_cache_mb)
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
    frames = iter(cached) if cached is not None else decoded_frames(video, cfg, start, end)
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
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, value in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asanyarray(value), allow_pickle=False)
            member = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            member.compress_type = zipfile.ZIP_DEFLATED
            member.external_attr = 0o644 << 16
            zf.writestr(member, buf.getvalue())


def measure_item(video: Path, landmarks: Path, cfg: CropSettings, start: Optional[float] = None,
                 end: Optional[float] = None) -> tuple:
    """(quality dict, sheet tiles) of an item an earlier, killed run of its shard cropped, measured
    as ``crop_item`` measures them: the ROIs cut again from the decoded source along the saved
    landmark track (no detection, no encoding), so a resumed shard's records and sheet are a
    straight run's, byte for byte (the encoded ROI video would move the figures: motion by ~10 %)."""
    info = media.video_info(video)
    with np.load(landmarks) as saved:
        raw, track = saved["raw"], saved["interpolated"]
    bounds = quality.bounds_of(cfg.quality)
    meter = quality.RoiMeter(len(track), bounds.sheet_frames)
    for _ in meter.observe(mouth_rois(decoded_frames(video, cfg, start, end), track, cfg)):
        pass
    q = quality.item_quality(raw, track, meter, bounds, info["fps"], cfg.fps, info["rotation"], cfg.window)
    return q, meter.tile_stack()


def crop_one_video(video, out_dir, mode: Optional[str] = None, cfg: Optional[CropSettings] = None,
                   name: Optional[str] = None, landmarks: Optional[Path] = None) -> CropResult:
    """The crop stage's processing of one whole video into ``out_dir/<name>.{mp4,wav,landmarks.npz}``
    (used by ``launch.py crop-video``, ``launch.py infer`` and ``avhubert.api``). No audio track: no
    wav, no error. ``landmarks``: a landmarks file of the video to use instead of detecting faces
    (``avprep/landmark_files.py``)."""
    cfg = dataclasses.replace(cfg or CropSettings(), **({"mode": mode} if mode else {}), require_audio=False)
    out_dir = Path(out_dir)
    name = name or Path(video).stem
    return crop_item(Path(video), out_dir / f"{name}.mp4", out_dir / f"{name}.wav",
                     out_dir / f"{name}.landmarks.npz", cfg,
                     imported=landmark_files.Imported(Path(landmarks)) if landmarks else None)
