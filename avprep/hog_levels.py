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
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

WINDOW = 73  # width of the frontal detector's box at the level where it fires (dlib's model)
LEVEL_RATE = 6 / 5


class LevelScanner:
    def __init__(self, hog, upsample: int = 1, presteps: int = 1):
        import dlib

        self._dlib = dlib
        self.hog = hog
        self.upsample = upsample
        self._p2 = dlib.pyramid_down(2)
        self._p6 = dlib.pyramid_down(6)
        self._shapes: dict = {}
        # the last ``presteps`` pyramid steps before the scanned level are dlib's own (see above)
        self.presteps = presteps

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


def _round(r):
    import dlib

    return dlib.rectangle(int(round(r.left())), int(round(r.top())), int(round(r.right())), int(round(r.bottom())))
