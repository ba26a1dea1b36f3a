"""Mouth-ROI alignment as the AV-HuBERT reference preparation does it, written with numpy/cv2.

Per frame t: the landmarks of frames t .. t+W-1 (W = ``window``, 12) are averaged, a similarity
transform maps that average's stable points (nose, eye corners) onto the mean face in a 256x256
frame, the frame is warped with it (bilinear, black outside), and a 96x96 patch is cut around the
centre of the warped mouth points 48-67 of frame t. The last W-1 frames reuse the last transform.
Near the border the patch centre is clamped so that the patch lies inside the frame. The reference
also has "too much bias" checks with a 5-pixel threshold, but it runs each of them after the clamp
it guards, so they can never fire: the reference always clamps, and so do we.
"""
from __future__ import annotations

from collections import deque
from importlib import resources
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np

STABLE_POINTS = (33, 36, 39, 42, 45)
MOUTH = slice(48, 68)
STD_SIZE = (256, 256)
WINDOW = 12
CROP = 96


class AlignmentError(ValueError):
    pass


def mean_face() -> np.ndarray:
    with resources.as_file(resources.files("avprep") / "assets" / "20words_mean_face.npy") as p:
        return np.load(p)


def interpolate_missing(landmarks: Sequence[Optional[np.ndarray]]) -> Optional[np.ndarray]:
    """Fill frames without landmarks: linearly between detections, and by copying the nearest
    detection at the start and end. None when no frame has landmarks."""
    valid = [i for i, l in enumerate(landmarks) if l is not None]
    if not valid:
        return None
    out = np.zeros((len(landmarks), 68, 2), dtype=np.float64)
    for i in valid:
        out[i] = landmarks[i]
    for a, b in zip(valid[:-1], valid[1:]):
        if b - a > 1:
            steps = np.arange(1, b - a)[:, None, None] / (b - a)
            out[a + 1 : b] = out[a] + steps * (out[b] - out[a])
    out[: valid[0]] = out[valid[0]]
    out[valid[-1] + 1 :] = out[valid[-1]]
    return out


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """3x3 matrix of the least-squares similarity (rotation, uniform scale, translation) taking
    ``src`` points to ``dst`` (Umeyama's closed form, no reflection)."""
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    n, m = src.shape
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    cov = dst_c.T @ src_c / n
    d = np.ones(m)
    if np.linalg.det(cov) < 0:
        d[-1] = -1
    u, s, vt = np.linalg.svd(cov)
    rank = np.linalg.matrix_rank(cov)
    if rank == 0:
        raise AlignmentError("degenerate landmarks: no transform")
    rot = np.eye(m)
    if rank == m - 1:
        if np.linalg.det(u) * np.linalg.det(vt) > 0:
            rot = u @ vt
        else:
            dd = d.copy()
            dd[-1] = -1
            rot = u @ np.diag(dd) @ vt
    else:
        rot = u @ np.diag(d) @ vt
    scale = (s @ d) / src_c.var(axis=0).sum()
    t = np.eye(m + 1)
    t[:m, :m] = scale * rot
    t[:m, m] = dst_mean - scale * rot @ src_mean
    return t


def apply_points(t: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ t[:2, :2].T + t[:2, 2]


def warp(frame: np.ndarray, t: np.ndarray, exact: bool = True, size=STD_SIZE) -> np.ndarray:
    """Warp a uint8 frame into a frame of ``size`` (rows, cols; default the 256x256 aligned frame)
    with the affine map ``t`` (2x3 or 3x3). ``exact``: float bilinear interpolation then
    truncation to uint8, as the reference (skimage's warp then ``(x*255).astype(uint8)``);
    otherwise cv2's fixed-point uint8 path (faster, rounds)."""
    import cv2

    m, dsize = t[:2], (size[1], size[0])
    if exact:
        out = cv2.warpAffine(frame.astype(np.float32), m, dsize, flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        # the reference scales to [0, 1] and back: x/255*255 in float64 can land just under x
        return np.floor(out.astype(np.float64) / 255.0 * 255.0 + 1e-7).astype(np.uint8)
    return cv2.warpAffine(frame, m, dsize, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def patch_origin(points: np.ndarray, size=STD_SIZE, half: int = CROP // 2) -> tuple:
    """Top-left (x0, y0) of the 2*half square cut around the centre of ``points`` in a frame of
    ``size`` (rows, cols): the centre is clamped so that the patch lies inside the frame."""
    cx, cy = np.mean(points, axis=0)
    h, w = size[:2]
    cy = min(max(cy, half), h - half)
    cx = min(max(cx, half), w - half)
    # Python's round (half to even), as the reference
    return int(round(cx) - half), int(round(cy) - half)


def cut_patch(img: np.ndarray, points: np.ndarray, half: int = CROP // 2) -> np.ndarray:
    x0, y0 = patch_origin(points, img.shape, half)
    return np.copy(img[y0 : y0 + 2 * half, x0 : x0 + 2 * half])


def warp_patch(frame: np.ndarray, t: np.ndarray, points: np.ndarray, exact: bool = True,
               half: int = CROP // 2) -> np.ndarray:
    """``cut_patch(warp(frame, t), apply_points(t, points))`` without warping the whole 256x256
    frame: only the patch's pixels are interpolated, from the part of the source frame they map
    to. Bilinear sampling reads a pixel's 2x2 neighbourhood, so a 2-pixel margin around that part
    leaves every sample as it was; outside the frame stays black as before."""
    x0, y0 = patch_origin(apply_points(t, points), STD_SIZE, half)
    side = 2 * half
    m = t[:2].copy()
    m[:, 2] -= (x0, y0)  # patch coordinates -> source: the whole-frame map, shifted
    inv = np.linalg.inv(np.vstack([m, (0, 0, 1)]))
    corners = apply_points(inv, np.array([[0, 0], [side, 0], [0, side], [side, side]], dtype=np.float64))
    h, w = frame.shape[:2]
    sx0, sy0 = (max(0, int(np.floor(v)) - 2) for v in corners.min(0))
    sx1, sy1 = min(w, int(np.ceil(corners[:, 0].max())) + 3), min(h, int(np.ceil(corners[:, 1].max())) + 3)
    if sx0 >= sx1 or sy0 >= sy1:  # the patch maps entirely outside the frame: all black
        return np.zeros((side, side) + frame.shape[2:], dtype=np.uint8)
    m[:, 2] += m[:, :2] @ (sx0, sy0)  # read source coordinates relative to the cut-out part
    return warp(frame[sy0:sy1, sx0:sx1], m, exact, (side, side))


def crop_mouths(frames: Iterable[np.ndarray], landmarks: np.ndarray, window: int = WINDOW, exact: bool = True,
                face: Optional[np.ndarray] = None) -> Iterator[np.ndarray]:
    """96x96 mouth patches, one per frame, streamed (holds only ``window`` frames)."""
    face = mean_face() if face is None else face
    n = len(landmarks)
    margin = min(n, window)
    stable = list(STABLE_POINTS)
    q_frames: deque = deque()
    q_lms: deque = deque()
    t = None
    for i, frame in enumerate(frames):
        if i >= n:
            break
        q_frames.append(frame)
        q_lms.append(landmarks[i])
        if len(q_frames) == margin:
            smoothed = np.mean(np.stack(q_lms), axis=0)
            t = similarity_transform(smoothed[stable], face[stable])
            cur = q_lms.popleft()
            yield warp_patch(q_frames.popleft(), t, cur[MOUTH], exact)
    while q_frames:  # the last frames keep the last transform
        cur = q_lms.popleft()
        yield warp_patch(q_frames.popleft(), t, cur[MOUTH], exact)
