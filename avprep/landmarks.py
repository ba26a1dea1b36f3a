"""68-point face landmarks with dlib.

Reference semantics (the default, ``mode="reference"``): every frame goes through dlib's HOG
frontal face detector with one upsampling; when it finds nothing, the CNN (mmod) detector is tried;
the 68-point predictor then runs on the face. With several faces the reference keeps whichever
dlib lists last; we keep the largest box (``face_rule="largest"``, the default), which is the
speaker in nearly every talking-head clip; ``face_rule="last"`` reproduces the reference.

``mode="fast"``, strategy "levels" (the default): the reference's HOG boxes without its
full-frame pyramid. A found face is followed by window scans of its pyramid level and the two
beside it (avprep/hog_levels.py: ``LevelScanner.track``); when they cannot tell, the levels of the
last face's size are scanned on the whole frame, and a lost face is searched for on a small frame,
then with the reference's own search (see ``_levels``). The predictor always runs at full
resolution on the box found, as the reference's. Strategy "track": detection only every
``detect_every`` frames on a frame downscaled to at most ``detect_width`` pixels; in between, the
predictor runs on the box around the previous frame's landmarks.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np

from avprep.hog_levels import LevelScanner

N_POINTS = 68


def model_dir() -> Path:
    # face_recognition_models' own accessors import pkg_resources, which recent setuptools dropped
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the package face-recognition-models is not installed (pip install face-recognition-models)")
    return Path(list(spec.submodule_search_locations)[0]) / "models"


@dataclass
class DetectorSettings:
    mode: str = "reference"  # reference | fast
    face_rule: str = "largest"  # largest | last (the reference's)
    upsample: int = 1
    cnn_fallback: bool = True
    detect_every: int = 10  # fast mode
    detect_width: int = 320  # fast mode
    fast_upsample: int = 0  # fast mode: HOG upsampling of the downscaled keyframe search
    # fast mode: "levels" (the reference's boxes, found on the pyramid levels of the last face:
    # avprep/hog_levels.py) or "track" (detection every detect_every frames, tracking in between)
    fast_strategy: str = "levels"
    level_margin: int = 1  # "levels": pyramid levels scanned below the last face's (shrinking faces)
    level_presteps: int = 1  # "levels": pyramid steps dlib computes itself before the scanned level
    # "levels": between full searches, scan only windows of the last face's level and the two beside
    # it (avprep/hog_levels.py, LevelScanner.track); 0 turns it off
    window: int = 128
    # "levels": with window scans, look for a larger face elsewhere in the frame (the coarser
    # levels of the whole frame) every this many frames
    larger_face_every: int = 25
    # "levels": window scans leave out a level beside the face's whose best score was this far below
    # the face's (0 = never), for up to level_refresh_every - 1 frames
    level_skip_margin: float = 0.7
    level_refresh_every: int = 4
    # "levels": while no face is found on the small frame, the reference's HOG search on the whole
    # frame runs once every this many frames (small faces; frames without one cost little)
    full_search_every: int = 25
    # "levels": the face is searched on every key_every-th frame ("key frames"); a frame between
    # two key frames with the same box gets that box, else the middle frame is scanned (windows
    # around the nearer box) and each half is settled the same way. 1 = every frame.
    key_every: int = 4


class LandmarkDetector:
    def __init__(self, settings: Optional[DetectorSettings] = None):
        import dlib

        self.s = settings or DetectorSettings()
        if self.s.mode not in ("reference", "fast"):
            raise ValueError(f"crop mode {self.s.mode!r}: reference or fast")
        if self.s.face_rule not in ("largest", "last"):
            raise ValueError(f"face_rule {self.s.face_rule!r}: largest or last")
        self._dlib = dlib
        self.hog = dlib.get_frontal_face_detector()
        self._predictor = None  # dlib's 68-point predictor (reference mode, strategy "track")
        self._batch_predictor = None  # the same predictor batched (avprep/shape_predictor.py)
        self._cnn = None
        self._prev: Optional[np.ndarray] = None
        self._since_detect = 0
        self._level: Optional[int] = None
        if self.s.fast_strategy not in ("levels", "track"):
            raise ValueError(f"fast_strategy {self.s.fast_strategy!r}: levels or track")

        self.scanner = LevelScanner(self.hog, upsample=self.s.upsample, presteps=self.s.level_presteps,
                                    window=self.s.window or 128)
        self._face = None  # "levels": the last face's box and the pyramid level it was found on
        self._face_level = 0
        self._since_larger = 0
        self._level_scores: dict = {}  # "levels": best window score per pyramid level, last scans
        self._since_all_levels = 0
        self._since_full = 1 << 30

    @property
    def predictor(self):
        if self._predictor is None:
            self._predictor = self._dlib.shape_predictor(str(model_dir() / "shape_predictor_68_face_landmarks.dat"))
        return self._predictor

    @property
    def batch_predictor(self):
        """dlib's predictor run on many frames at once, with dlib's exact landmarks (fast mode)."""
        if self._batch_predictor is None:
            from avprep.shape_predictor import ShapePredictor

            self._batch_predictor = ShapePredictor(model_dir() / "shape_predictor_68_face_landmarks.dat")
        return self._batch_predictor

    @property
    def cnn(self):
        if self._cnn is None:  # 10 MB model, loaded only when HOG first misses
            self._cnn = self._dlib.cnn_face_detection_model_v1(str(model_dir() / "mmod_human_face_detector.dat"))
        return self._cnn

    def reset(self) -> None:
        self._prev = None
        self._since_detect = 0
        self._level = None
        self._face = None
        self._since_larger = 0
        self._level_scores, self._since_all_levels = {}, 0
        self._since_full = 1 << 30  # the first frame without a face found gets the full search

    def _pick(self, rects):
        if not rects:
            return None
        if self.s.face_rule == "last":
            return rects[-1]
        return max(rects, key=lambda r: r.width() * r.height())

    def _detect(self, gray: np.ndarray, upsample: int):
        rects = list(self.hog(gray, upsample))
        if not rects and self.s.cnn_fallback:
            rects = [d.rect for d in self.cnn(gray)]  # as the reference: no upsampling
        return self._pick(rects)

    def _shape(self, gray: np.ndarray, rect) -> np.ndarray:
        shape = self.predictor(gray, rect)
        return np.array([(shape.part(i).x, shape.part(i).y) for i in range(N_POINTS)], dtype=np.int32)

    def __call__(self, gray: np.ndarray) -> Optional[np.ndarray]:
        """Landmarks (68, 2) int32 of one uint8 gray frame, or None when no face is found."""
        if self.s.mode == "reference":
            rect = self._detect(gray, self.s.upsample)
            return None if rect is None else self._shape(gray, rect)
        if self.s.fast_strategy == "levels":
            rect = self._levels(gray)
            return None if rect is None else self.batch_predictor([gray], [rect])[0]
        return self._fast(gray)

    def stream(self, frames: Iterable[np.ndarray], batch: int = 32) -> Iterator[Optional[np.ndarray]]:
        """Landmarks (or None) of each gray frame in order, as ``self(frame)`` gives them. In fast
        mode (strategy "levels", whose boxes do not depend on landmarks) the predictor runs on
        ``batch`` frames at once: up to ``batch`` frames are held until their landmarks are out."""
        if self.s.mode != "fast" or self.s.fast_strategy != "levels":
            yield from map(self, frames)
            return
        k = max(1, self.s.key_every)
        ready, gap, key_box = [], [], None  # boxes found; frames since the last key frame; its box
        for i, gray in enumerate(frames):
            if i == 0:
                key_box = self._levels(gray)
                ready.append((gray, key_box))
            else:
                gap.append(gray)
                if len(gap) == k:
                    box = self._levels(gray, frames_since=k)
                    ready += self._bridge(key_box, gap[:-1], box) + [(gray, box)]
                    key_box, gap = box, []
            if len(ready) >= batch:
                yield from self._shapes(ready)
                ready = []
        if gap:  # the last frame is a key frame too
            box = self._levels(gap[-1], frames_since=len(gap))
            ready += self._bridge(key_box, gap[:-1], box) + [(gap[-1], box)]
        yield from self._shapes(ready)

    def _bridge(self, before, grays: list, after) -> list:
        """(gray, box) of the frames between two key frames whose boxes are ``before`` and
        ``after``: where both ends of a stretch have the same box (or no face), the frames in it
        get it (the reference's box changes in ~10% of frames of a talking head, and seldom changes
        back within a few frames); else its middle frame is scanned and each half settled alike."""
        boxes = [None] * len(grays)

        def settle(lo_box, lo: int, hi: int, hi_box) -> None:  # the frames strictly between lo and hi
            if hi - lo <= 1:
                return
            if _same_box(lo_box, hi_box):
                boxes[lo + 1 : hi] = [lo_box] * (hi - lo - 1)
                return
            mid = (lo + hi) // 2
            boxes[mid] = self._box_near(grays[mid], lo_box if lo_box is not None else hi_box)
            settle(lo_box, lo, mid, boxes[mid])
            settle(boxes[mid], mid, hi, hi_box)

        settle(before, -1, len(grays), after)
        return list(zip(grays, boxes))

    def _box_near(self, gray: np.ndarray, rect):
        """The reference detector's box in a frame whose face is near ``rect`` (found in a frame a
        few frames away), or None: windows of its level and the two beside it, else those levels
        on the whole frame. Leaves the tracking state as it is."""
        level = self.scanner.level_of(rect)
        found, _ = self.scanner.track(gray, rect, level)
        if found is not None:
            return found.rect
        return self._pick(self.scanner.detect(gray, max(0, level - self.s.level_margin)))

    def _shapes(self, pending: list) -> list:
        found = [(g, r) for g, r in pending if r is not None]
        shapes = iter(self.batch_predictor([g for g, _ in found], [r for _, r in found]) if found else [])
        return [None if r is None else next(shapes) for _, r in pending]

    def _track_levels(self) -> tuple:
        """The levels to scan for the tracked face: its own and the two beside it, but a level
        whose best score was far below the face's (or had no box) is left out for a few frames
        (all three every level_refresh_every frames): the winner moves between levels slowly."""
        level = self._face_level
        self._since_all_levels += 1
        best = self._level_scores.get(level)
        if self._since_all_levels >= self.s.level_refresh_every or best is None:
            self._since_all_levels = 0
            return level - 1, level, level + 1
        return tuple(lv for lv in (level - 1, level, level + 1)
                     if lv == level or (self._level_scores.get(lv) or -1e9) >= best - self.s.level_skip_margin)

    def _levels(self, gray: np.ndarray, frames_since: int = 1):
        """The reference detector's box for this frame (dlib rectangle), or None. ``frames_since``:
        frames since the previous call (key frames), for the every-N-frames checks."""
        if self._face is not None and self.s.window:
            self._since_larger += frames_since
            larger = False
            if self._since_larger >= self.s.larger_face_every:
                # the reference keeps the largest face: is there one on coarser levels elsewhere?
                self._since_larger = 0
                larger = any(r.width() > 1.3 * self._face.width()
                             for r in self.scanner.detect(gray, self._face_level + 2))
            found = None
            if not larger:
                found, scores = self.scanner.track(gray, self._face, self._face_level, self._track_levels())
                self._level_scores.update(scores)
            if found is not None:
                if found.level != self._face_level:
                    self._level_scores, self._since_all_levels = {}, 0
                self._face, self._face_level = found.rect, found.level
                self._level = found.level
                return found.rect
        rects = []
        if self._level is not None:
            rects = self.scanner.detect(gray, max(0, self._level - self.s.level_margin))
        if not rects:
            # first frame, or the face left those levels: locate it on a small frame (CNN fallback
            # there too, so frames without a face cost little), then scan the levels of its size
            h, w = gray.shape
            scale = min(1.0, self.s.detect_width / w)
            small = gray if scale == 1.0 else _resize(gray, scale)
            up = self.s.fast_upsample if scale != 1.0 else self.s.upsample
            coarse = self._pick(list(self.hog(small, up)))
            if coarse is None:
                # a face too small for the small frame (under ~2 x width / detect_width times the
                # reference's smallest), or none: the reference's own HOG search, on the first such
                # frame and then once every full_search_every frames while nothing is found ...
                self._level = self._face = None
                self._since_full += frames_since
                if self._since_full >= self.s.full_search_every:
                    self._since_full = 0
                    rects = list(self.hog(gray, self.s.upsample))
                # ... and the CNN on the small frame (as the reference, whose CNN sees the whole frame)
                if not rects and self.s.cnn_fallback:
                    coarse = self._pick([d.rect for d in self.cnn(small)])
                if not rects and coarse is None:
                    return None
            if not rects:
                size = (coarse.right() - coarse.left() + 1) / scale
                level = self.scanner.level_of(self._dlib.rectangle(0, 0, int(size) - 1, int(size) - 1))
                rects = self.scanner.detect(gray, max(0, level - self.s.level_margin))
                if not rects:  # the reference's own search
                    rects = list(self.hog(gray, self.s.upsample)) or [self._refine(gray, coarse, scale) if scale != 1.0 else coarse]
        rect = self._pick(rects)
        if rect is None:
            self._level = self._face = None
            return None
        self._level = self.scanner.level_of(rect)
        self._face, self._face_level, self._since_larger = rect, self._level, 0
        self._level_scores, self._since_all_levels = {}, 0
        self._since_full = 1 << 30  # a face lost after this gets the full search at once
        return rect

    def _fast(self, gray: np.ndarray) -> Optional[np.ndarray]:
        dlib = self._dlib
        if self._prev is not None and self._since_detect < self.s.detect_every:
            # track: the last detection's box, moved with the face since then, so the predictor
            # sees a box like the detector's (it is sensitive to the box's placement)
            shift = self._prev.mean(axis=0) - self._anchor
            l, t, r, b = self._box
            rect = dlib.rectangle(int(round(l + shift[0])), int(round(t + shift[1])),
                                  int(round(r + shift[0])), int(round(b + shift[1])))
            pts = self._shape(gray, rect)
            # a jump (scene cut, occlusion) means the track is lost: detect again
            if np.abs(pts.mean(axis=0) - self._prev.mean(axis=0)).max() < 0.15 * (r - l):
                self._prev = pts
                self._since_detect += 1
                return pts
        h, w = gray.shape
        scale = min(1.0, self.s.detect_width / w)
        small = gray if scale == 1.0 else _resize(gray, scale)
        rect = self._detect(small, self.s.fast_upsample if scale != 1.0 else self.s.upsample)
        self._since_detect = 0
        if rect is None:
            self._prev = None
            return None
        if scale != 1.0:
            rect = self._refine(gray, rect, scale)
        self._prev = self._shape(gray, rect)
        self._box = (rect.left(), rect.top(), rect.right(), rect.bottom())
        self._anchor = self._prev.mean(axis=0)
        return self._prev

    def _refine(self, gray: np.ndarray, small_rect, scale: float):
        """The box the reference detector (full resolution, upsampled) would give, found by running
        it on a window around the face located at low resolution: the predictor's landmarks depend
        on the box, and a low-resolution box moves them by about half a pixel."""
        dlib = self._dlib
        l, t = small_rect.left() / scale, small_rect.top() / scale
        r, b = small_rect.right() / scale, small_rect.bottom() / scale
        m = 0.6 * max(r - l, b - t)
        h, w = gray.shape
        x0, y0 = max(0, int(l - m)), max(0, int(t - m))
        x1, y1 = min(w, int(r + m)), min(h, int(b + m))
        # fast_upsample here too: upsampling the window costs 4x and moved the ROIs by < 0.2 gray
        # levels on bench/crop.py
        rects = list(self.hog(np.ascontiguousarray(gray[y0:y1, x0:x1]), self.s.fast_upsample))
        if rects:
            best = self._pick(rects)
            return dlib.rectangle(best.left() + x0, best.top() + y0, best.right() + x0, best.bottom() + y0)
        return dlib.rectangle(int(round(l)), int(round(t)), int(round(r)), int(round(b)))


def _same_box(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return (a.left(), a.top(), a.right(), a.bottom()) == (b.left(), b.top(), b.right(), b.bottom())


def _resize(gray: np.ndarray, scale: float) -> np.ndarray:
    import cv2

    return cv2.resize(gray, (round(gray.shape[1] * scale), round(gray.shape[0] * scale)), interpolation=cv2.INTER_AREA)


def detect_all(frames: Iterable[np.ndarray], detector: LandmarkDetector) -> list:
    """Landmarks per frame (None where no face) for an iterable of gray frames."""
    detector.reset()
    return list(detector.stream(frames))
