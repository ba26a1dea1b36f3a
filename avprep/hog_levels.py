"""The reference's HOG face boxes at a fraction of the cost, by scanning only the coarse pyramid
levels where a face of the size just seen can be.

dlib's frontal detector with upsampling u scans an image pyramid: the frame upsampled 2^u times,
then shrunk by 5/6 per level. A face of width w (frame pixels) is found at level L with
2^u w (5/6)^L about the detector's 73-pixel window, and its box is that window mapped back to the
frame, so boxes move on a coarse grid (about 25 pixels for a 220-pixel face) and the 68-point
predictor, which is sensitive to the box, follows those jumps. A tracker cannot reproduce them;
this can: it resizes the frame straight to the exact size of level k (< the last face's level),
runs the detector there without upsampling, and maps each box back through dlib's own pyramid
geometry (``pyramid_down.rect_up``), so boxes land on the reference's grid. The level image is a
single resize to a finer level followed by ``presteps`` (1) of dlib's own pyramid steps, instead of
dlib's whole chain of resizes, so its pixels differ slightly; on bench/crop.py's video the landmarks
still equal the reference's in 95% of the frames (a straight resize to the scanned level, without
dlib's step, needed one more level scanned, 30% more work, for the same agreement). Cost: one
detector pass on a small image (a 220-pixel face in a 640x480 frame: a 246x184 image, ~4 ms
instead of ~100 ms).

Window scan (``LevelScanner.track``, used between full searches): the cost of the above is the
whole level images. A face that was just seen can only be found near its last box, on the level
where it was found and the two beside it, so each of those three levels is scanned only in a
window of ``window`` (128) level pixels around the last box, cut on the level's 8-pixel HOG
cell grid: the 3 x 3 detector positions around the last box's, each with the 52 pixels around its
box's centre that its features depend on (measured: exact from 55 on, not at 49), so their scores
are the ones a scan of the whole level image gives (tests/crop/test_hog_levels.py checks it on
dlib's own level images). Two things make that exact where dlib's Python API
alone would not be:
- a copy of the frontal detector with ``max_pyramid_levels`` set to 1 (patched in its serialized
  form), so a window is scanned on its own level only. With the stock detector dlib also scans the
  window's own smaller copies and its non-maximum suppression lets them remove the window's box;
  here suppression across levels is redone by us, as dlib does it (highest score wins).
- the window's pixels are sampled straight from the frame with dlib's exact level geometry
  (``level_geometry``: each of dlib's resizes maps output x to input x (n_in-1)/(n_out-1)), after
  a Gaussian blur of sigma 0.6 x the level's frame pixels per level pixel: that blur stands in for
  the smoothing of dlib's chain of bilinear resizes (it came out at 0.25-0.5 gray levels mean from
  dlib's own level images, half the error of the resize + pyramid step above).
A best box at the window's edge (the face moved more than a cell), or none, sends the caller back to
the full search.
"""
from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from typing import Optional

import numpy as np

WINDOW = 73  # width of the frontal detector's box at the level where it fires (dlib's model)
LEVEL_RATE = 6 / 5


CELL = 8  # HOG cell size of the frontal detector (pixels of a level image)
DETECTOR_WINDOW = 80  # its detection window (level pixels)
BLUR_PER_SCALE = 0.6  # window pixels: Gaussian sigma = this x frame pixels per level pixel


@dataclass
class Candidate:
    score: float  # dlib's detection confidence (score - threshold)
    rect: object  # dlib.rectangle in frame coordinates, as the reference detector reports it
    level: int  # pyramid level it was found on
    reliable: bool  # its detector position lies inside the window (not at a cut edge)


def single_level_detector(hog):
    """A copy of the frontal face detector ``hog`` that scans only the image it is given (no
    pyramid): its serialized ``max_pyramid_levels`` (after cell size, padding and the detection
    window's size) is set to 1."""
    import dlib

    from avprep.shape_predictor import dlib_int_bytes

    fd, path = tempfile.mkstemp(suffix=".svm")
    os.close(fd)
    try:
        hog.save(path)
        with open(path, "rb") as f:
            data = f.read()
        head = b"".join(dlib_int_bytes(v) for v in (CELL, 0, DETECTOR_WINDOW, DETECTOR_WINDOW))
        i = data.find(head, 0, 64)
        levels = dlib_int_bytes(1000)
        if i < 0 or data[i + len(head) : i + len(head) + len(levels)] != levels:
            raise RuntimeError("unexpected layout of dlib's frontal face detector: cannot make a one-level scanner")
        j = i + len(head)
        with open(path, "wb") as f:
            f.write(data[:j] + dlib_int_bytes(1) + data[j + len(levels) :])
        return dlib.fhog_object_detector(path)
    finally:
        os.unlink(path)


class LevelScanner:
    def __init__(self, hog, upsample: int = 1, presteps: int = 1, window: int = 128):
        import dlib

        self._dlib = dlib
        self.hog = hog
        self.upsample = upsample
        self._p2 = dlib.pyramid_down(2)
        self._p6 = dlib.pyramid_down(6)
        self._shapes: dict = {}
        # the last ``presteps`` pyramid steps before the scanned level are dlib's own (see above)
        self.presteps = presteps
        self.window = window
        self._single = None
        self._shrunk = None  # (frame, k, its k x k block average): shared by a frame's windows

    @property
    def single(self):
        if self._single is None:
            self._single = single_level_detector(self.hog)
        return self._single

    def level_geometry(self, h: int, w: int, level: int) -> tuple:
        """(sx, sy): frame pixels per pixel of pyramid level ``level`` (level pixel x lies at frame
        x * sx). Every dlib resize, the upsampling ones included, maps output x to input
        x (n_in - 1) / (n_out - 1), so the chain is one scale per axis with no offset."""
        shapes = self.level_shapes(h, w)
        rows, cols = shapes[level]
        return (w - 1) / (cols - 1), (h - 1) / (rows - 1)

    def to_frame(self, left: float, top: float, right: float, bottom: float, level: int):
        """A box found on pyramid level ``level`` (level pixels) in frame coordinates, rounded as
        dlib rounds it: once after mapping up through the levels, then per upsampling step."""
        d = self._dlib
        up = _round(self._p6.rect_up(d.drectangle(left, top, right, bottom), level))
        for _ in range(self.upsample):
            up = _round(self._p2.rect_down(up))
        return up

    def level_shapes(self, h: int, w: int) -> list:
        """(rows, cols) of each pyramid level for an h x w frame, computed once per frame size with
        dlib's own resampling (the sizes depend on its rounding)."""
        key = (h, w)
        if key not in self._shapes:
            d = self._dlib
            r = d.rectangle(0, 0, w - 1, h - 1)
            for _ in range(self.upsample):
                r = self._p2.rect_up(r)
            img = np.zeros((r.bottom() + 1, r.right() + 1), np.uint8)
            shapes = [img.shape]
            while min(img.shape) >= WINDOW:
                img = self._p6(img)
                shapes.append(img.shape)
            self._shapes[key] = shapes
        return self._shapes[key]

    def level_of(self, rect) -> int:
        """Pyramid level at which the reference detector found a box of this size."""
        width = (rect.right() - rect.left() + 1) * 2 ** self.upsample
        return max(0, int(round(math.log(width / WINDOW) / math.log(LEVEL_RATE))))

    def detect(self, gray: np.ndarray, level: int) -> list:
        """Boxes (dlib rectangles in frame coordinates) the reference detector finds at pyramid
        levels >= ``level``."""
        import cv2

        d = self._dlib
        shapes = self.level_shapes(*gray.shape)
        level = min(level, len(shapes) - 1)
        if level == 0:
            return list(self.hog(gray, self.upsample))
        pre = min(self.presteps, level)
        rows, cols = shapes[level - pre]
        img = cv2.resize(gray, (cols, rows), interpolation=cv2.INTER_AREA)
        for _ in range(pre):
            img = self._p6(img)
        rects, _, _ = self.hog.run(img, 0, 0.0)
        out = []
        for x in rects:
            dx = d.drectangle(x.left(), x.top(), x.right(), x.bottom())
            # the level within our image: the one where the box has the window's size
            sub = min(range(len(shapes)), key=lambda l: abs(self._p6.rect_down(dx, l).width() - WINDOW))
            # dlib rounds once, after mapping from the detection level to the frame: undo our
            # image's rounding (exact: each level up expands), then map all levels at once
            at_level = _round(self._p6.rect_down(dx, sub))
            up = _round(self._p6.rect_up(d.drectangle(at_level.left(), at_level.top(), at_level.right(),
                                                      at_level.bottom()), level + sub))
            for _ in range(self.upsample):
                up = self._p2.rect_down(up)
            out.append(up)
        return out

    def window_bounds(self, shape: tuple, level: int, cx: float, cy: float) -> tuple:
        """(x0, y0, x1, y1) in level pixels: a ``window``-pixel square on the cell grid centred
        near frame point (cx, cy), clamped to the level image (whose edges are then the window's
        own, as in a full scan)."""
        rows, cols = self.level_shapes(*shape)[level]
        sx, sy = self.level_geometry(*shape, level)
        W = self.window
        x0 = min(max(0, int(round((cx / sx - W / 2) / CELL)) * CELL), max(0, (cols - W) // CELL * CELL))
        y0 = min(max(0, int(round((cy / sy - W / 2) / CELL)) * CELL), max(0, (rows - W) // CELL * CELL))
        x1, y1 = x0 + W, y0 + W
        # a few pixels short of the level's edge: take them in, so that the cut edge is the edge
        return x0, y0, cols if cols - x1 < 2 * CELL else x1, rows if rows - y1 < 2 * CELL else y1

    def window_image(self, gray: np.ndarray, level: int, bounds: tuple) -> np.ndarray:
        """The pixels of pyramid level ``level`` inside ``bounds``, sampled from the frame with
        dlib's level geometry after a blur standing in for its chain of resizes (module doc).
        For levels much coarser than the frame, the frame is first averaged over k x k blocks
        (k = frame pixels per level pixel // 1.5; once per frame) and the rest of the blur done on
        that: 4-9x less blurring work, about 0.05-0.1 gray levels further from dlib's pixels."""
        import cv2

        h, w = gray.shape
        x0, y0, x1, y1 = bounds
        sx, sy = self.level_geometry(h, w, level)
        k = max(1, int(max(sx, sy) // 1.5))
        src = gray
        if k > 1:
            if self._shrunk is None or self._shrunk[0] is not gray or self._shrunk[1] != k:
                small = cv2.resize(gray[: h // k * k, : w // k * k], (w // k, h // k), interpolation=cv2.INTER_AREA)
                self._shrunk = (gray, k, small)
            src = self._shrunk[2]
        # level pixel u lies at frame x = u sx, i.e. at (u sx - (k - 1) / 2) / k in the block average
        ax, bx = sx / k, -(k - 1) / (2 * k)
        ay, by = sy / k, -(k - 1) / (2 * k)
        sigma = math.sqrt(max((BLUR_PER_SCALE * max(sx, sy)) ** 2 - (k * k - 1) / 12, 0.0)) / k
        pad = int(math.ceil(3 * sigma)) + 2  # the blur's reach (OpenCV's kernel radius is 3 sigma)
        sh, sw = src.shape
        fx0, fy0 = max(0, int(x0 * ax + bx) - pad), max(0, int(y0 * ay + by) - pad)
        fx1 = min(sw, int(math.ceil((x1 - 1) * ax + bx)) + 2 + pad)
        fy1 = min(sh, int(math.ceil((y1 - 1) * ay + by)) + 2 + pad)
        part = src[fy0:fy1, fx0:fx1]
        if sigma > 0.05:
            part = cv2.GaussianBlur(part, (0, 0), sigma, borderType=cv2.BORDER_REPLICATE)
        m = np.array([[ax, 0.0, x0 * ax + bx - fx0], [0.0, ay, y0 * ay + by - fy0]])
        return cv2.warpAffine(part, m, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                              borderMode=cv2.BORDER_REPLICATE)

    def scan_level_window(self, img: np.ndarray, shape: tuple, level: int, bounds: tuple) -> list:
        """Candidates found in ``img``, the part ``bounds`` of pyramid level ``level`` of a frame
        of ``shape``, scanned on that level only."""
        rows, cols = self.level_shapes(*shape)[level]
        x0, y0, x1, y1 = bounds
        rects, scores, _ = self.single.run(img, 0, 0.0)
        out = []
        for r, score in zip(rects, scores):
            # a detector position whose window and one cell around it lie inside the cut (or reach
            # only edges of the level image itself) saw the same features as a full scan
            c_x, c_y = (r.left() + r.right()) / 2, (r.top() + r.bottom()) / 2
            # (a box's centre 52 level pixels or more from a cut edge: measured exact on dlib's own
            # level images from 55 on, and off by up to 0.03 in score at 49)
            need = DETECTOR_WINDOW / 2 + CELL + CELL / 2
            reliable = ((c_x - need >= 0 or x0 == 0) and (c_x + need <= x1 - x0 or x1 == cols)
                        and (c_y - need >= 0 or y0 == 0) and (c_y + need <= y1 - y0 or y1 == rows))
            out.append(Candidate(float(score), self.to_frame(r.left() + x0, r.top() + y0, r.right() + x0,
                                                              r.bottom() + y0, level), level, reliable))
        return out

    def scan_window(self, gray: np.ndarray, level: int, cx: float, cy: float) -> list:
        """Candidates on pyramid level ``level`` in a ``window``-pixel square of it centred near
        frame point (cx, cy)."""
        bounds = self.window_bounds(gray.shape, level, cx, cy)
        return self.scan_level_window(self.window_image(gray, level, bounds), gray.shape, level, bounds)

    def track(self, gray: np.ndarray, rect, level: int, levels=None) -> tuple:
        """The reference detector's box for the face last seen at ``rect`` (frame coordinates,
        found on pyramid level ``level``), from windows of levels level-1 .. level+1 (or the
        given ``levels``): (best Candidate or None, {level scanned: its best score or None}).
        None when the window scans cannot tell (no face there, or the best box still at a
        window's cut edge after one window re-centred on it)."""
        n_levels = len(self.level_shapes(*gray.shape))
        if levels is None:
            levels = (level - 1, level, level + 1)
        cx, cy = (rect.left() + rect.right()) / 2, (rect.top() + rect.bottom()) / 2
        found = []
        scanned = [lv for lv in levels if 0 <= lv < n_levels]
        for lv in scanned:
            found += self.scan_window(gray, lv, cx, cy)
        if not found:
            return None, dict.fromkeys(scanned)
        best = max(found, key=lambda c: c.score)
        if not best.reliable:  # the face moved: that level again, centred on the box found there
            r = best.rect
            found = [c for c in found if c.level != best.level]
            found += self.scan_window(gray, best.level, (r.left() + r.right()) / 2, (r.top() + r.bottom()) / 2)
            best = max(found, key=lambda c: c.score)
        scores = {lv: max((c.score for c in found if c.level == lv), default=None) for lv in scanned}
        return (best if best.reliable else None), scores


def _round(r):
    import dlib

    return dlib.rectangle(int(round(r.left())), int(round(r.top())), int(round(r.right())), int(round(r.bottom())))
