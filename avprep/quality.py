"""Per-item crop quality: cheap figures from what the crop already holds in memory (the raw
detections, the landmark track, the ROI frames as they are written), flags for items outside
configurable bounds, and contact sheets (PNG grids of a few ROI frames per item).

A flag is not a failure: a flagged item stays in the manifest; the report lists it and the contact
sheet outlines it, so a user sees a black, frozen or shaky crop before training on it.

Figures (one dict per item, stored in the crop record as ``quality``):
- ``face_share``: share of frames where dlib found a face (the rest is interpolated);
- ``face_px``: median height in source pixels of the landmark box (brows to chin) where found;
- ``jitter``: RMS frame-to-frame second difference of the smoothed stable points the alignment is
  fitted on (nose, eye corners; the same ``window``-frame forward mean as ``align.crop_mouths``),
  in percent of the inter-ocular distance: shake the smoothing left in the ROI;
- ``roll_deg``: median angle of the eye line in the source frame (a sideways face);
- ``motion``: mean absolute difference of consecutive ROI frames in the mouth region (gray
  levels): a static or black ROI has none;
- ``static_share``: share of consecutive ROI pairs that are practically identical, beyond the
  duplicates the frame-rate conversion to 25 fps makes (``dup_share``, from the source's fps);
- ``brightness`` / ``contrast``: mean and standard deviation of the ROI pixels (mean over frames);
- ``blank_share``: share of ROI frames that are nearly uniform (black, white, a flat colour);
- ``rotation``: the display rotation applied to the source (degrees; 0 = none);
- ``words_per_s``: words of the transcript per second of the item's audio (items with a
  transcript): outside human speech, the transcript does not belong to this audio (a file cut
  short within the truncation margin, a segment cut wrongly, a transcript of another clip).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Optional, Sequence

import numpy as np

from pipeline import atomic
from pipeline.fingerprint import classify

# mouth region of the 96x96 ROI (centred on the mouth by the alignment): rows and columns used for
# the motion figure, so a moving background or collar at the patch edges counts less
MOUTH_ROWS = slice(24, 72)
MOUTH_COLS = slice(16, 80)
STATIC_LEVEL = 0.25  # mean |difference| below this (gray levels): a pair of identical frames
BLANK_STD = 4.0  # a frame whose pixels vary less than this (gray levels) shows nothing
STABLE_POINTS = (33, 36, 39, 42, 45)  # as avprep.align: what the alignment transform is fitted on


# every bound decides which items are flagged in the crop records and outlined on the contact sheets
@classify(output=("enabled", "min_face_share", "min_face_px", "max_jitter", "max_roll_deg", "min_motion",
                  "max_static_share", "min_brightness", "max_brightness", "min_contrast", "max_blank_share",
                  "sheet_frames", "min_words_per_s", "max_words_per_s"))
@dataclass
class QualityBounds:
    """``crop.quality.*``: an item outside these bounds is flagged (listed in the report, outlined
    on the contact sheet), never failed. Defaults leave every clip of the sample corpus unflagged."""

    enabled: bool = True
    min_face_share: float = 0.8  # frames with a detected face
    min_face_px: float = 40.0  # face height in source pixels: smaller faces give blurry ROIs
    max_jitter: float = 1.5  # % of the inter-ocular distance per frame, after smoothing
    max_roll_deg: float = 45.0  # eye line vs the horizontal in the source frame
    min_motion: float = 0.4  # gray levels: below it the mouth does not move
    max_static_share: float = 0.25  # identical consecutive ROIs beyond frame-rate duplicates
    min_brightness: float = 25.0
    max_brightness: float = 230.0
    min_contrast: float = 10.0
    max_blank_share: float = 0.1  # nearly uniform ROI frames
    # transcript words per second of audio: read speech runs at 2-3, fast speech rarely above 5
    min_words_per_s: float = 0.5
    max_words_per_s: float = 6.0
    sheet_frames: int = 4  # ROI frames per item on the contact sheet


def bounds_of(obj) -> QualityBounds:
    """QualityBounds from a dataclass, a dict or an omegaconf section (the crop stage's config)."""
    if isinstance(obj, QualityBounds):
        return obj
    if obj is None:
        return QualityBounds()
    get = obj.get if hasattr(obj, "get") else lambda k, d: getattr(obj, k, d)
    return QualityBounds(**{f.name: get(f.name, f.default) for f in fields(QualityBounds)})


# ------------------------------------------------------------------------------------------ figures
class RoiMeter:
    """Figures of ROI frames as they stream past (``observe`` wraps the generator that feeds the
    encoder): per-frame mean/std and the mouth-region difference to the previous frame, plus copies
    of ``n_tiles`` evenly spaced frames for the contact sheet. A few microseconds per frame."""

    def __init__(self, n_frames: int, n_tiles: int = 4):
        self.n_expected = max(int(n_frames), 1)
        k = max(0, min(int(n_tiles), self.n_expected))
        self.tile_index = sorted({min(self.n_expected - 1, (2 * i + 1) * self.n_expected // (2 * k)) for i in range(k)})
        self.tiles: list = []
        self.means: list = []
        self.stds: list = []
        self.diffs: list = []
        self._prev = None

    def observe(self, rois: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        import cv2

        wanted = set(self.tile_index)
        for i, roi in enumerate(rois):
            mean, std = cv2.meanStdDev(roi)
            self.means.append(float(mean[0, 0]))
            self.stds.append(float(std[0, 0]))
            mouth = roi[MOUTH_ROWS, MOUTH_COLS]
            if self._prev is not None:
                self.diffs.append(float(cv2.absdiff(mouth, self._prev).mean()))
            self._prev = mouth.copy()
            if i in wanted:
                self.tiles.append(np.array(roi, dtype=np.uint8))
            yield roi

    def tile_stack(self) -> np.ndarray:
        """(k, H, W) uint8 tiles (fewer when the item had fewer frames than expected)."""
        if not self.tiles:
            return np.zeros((0, 96, 96), np.uint8)
        return np.stack(self.tiles)

    def figures(self, dup_share: float = 0.0) -> dict:
        if not self.means:
            return {"brightness": 0.0, "contrast": 0.0, "blank_share": 1.0, "motion": 0.0, "static_share": 1.0}
        stds = np.asarray(self.stds)
        diffs = np.asarray(self.diffs) if self.diffs else np.zeros(1)
        static = float((diffs < STATIC_LEVEL).mean())
        return {
            "brightness": float(np.mean(self.means)),
            "contrast": float(stds.mean()),
            "blank_share": float((stds < BLANK_STD).mean()),
            "motion": float(diffs.mean()),
            "static_share": max(0.0, static - dup_share),
        }


def duplicate_share(source_fps: Optional[float], fps: float = 25.0) -> float:
    """Share of output frames that repeat their predecessor when a ``source_fps`` video is
    resampled to ``fps`` by nearest instant (a 15 fps source: 40%)."""
    if not source_fps or source_fps <= 0 or not math.isfinite(source_fps):
        return 0.0
    return max(0.0, 1.0 - float(source_fps) / float(fps))


def track_figures(raw: np.ndarray, track: np.ndarray, window: int = 12) -> dict:
    """Figures of the landmarks: ``raw`` (n, 68, 2) with -1 where no face was found (the crop's
    saved form), ``track`` (n, 68, 2) the interpolated track the alignment used."""
    raw = np.asarray(raw)
    track = np.asarray(track, dtype=np.float64)
    n = len(track)
    found = raw[:, 0, 0] >= 0 if len(raw) else np.zeros(0, bool)
    out = {"face_share": float(found.mean()) if n else 0.0}
    pts = raw[found].astype(np.float64)
    if len(pts):
        # brows (17-26) to chin (8): about the face box's height, whatever dlib's box was
        height = pts[:, 8, 1] - pts[:, 17:27, 1].min(axis=1)
        out["face_px"] = float(np.median(height))
        eye = pts[:, 45] - pts[:, 36]
        out["roll_deg"] = float(np.degrees(np.median(np.arctan2(eye[:, 1], eye[:, 0]))))
    else:
        out["face_px"] = 0.0
        out["roll_deg"] = 0.0
    out["jitter"] = smoothed_jitter(track, window)
    return out


def smoothed_jitter(track: np.ndarray, window: int = 12) -> float:
    """RMS second difference of the stable points after the alignment's forward ``window``-frame
    mean (``align.crop_mouths``; its last frames reuse the last mean, left out here: holding a
    transform is not shake), in % of the median inter-ocular distance."""
    n = len(track)
    w = min(window, n)
    if n - w + 1 < 3:
        return 0.0
    stable = np.asarray(track, dtype=np.float64)[:, list(STABLE_POINTS)]
    c = np.cumsum(np.concatenate([np.zeros((1,) + stable.shape[1:]), stable]), axis=0)
    smoothed = (c[w:] - c[:-w]) / w  # smoothed[t] = mean of frames t .. t+w-1
    d2 = smoothed[2:] - 2 * smoothed[1:-1] + smoothed[:-2]
    iod = float(np.median(np.linalg.norm(track[:, 45] - track[:, 36], axis=1)))
    if iod <= 0:
        return 0.0
    return float(np.sqrt((d2 ** 2).sum(axis=-1).mean()) / iod * 100.0)


def item_quality(raw: np.ndarray, track: np.ndarray, meter: RoiMeter, bounds: QualityBounds,
                 source_fps: Optional[float] = None, fps: float = 25.0, rotation: float = 0,
                 window: int = 12) -> dict:
    """The ``quality`` dict of one item's crop record: the figures (rounded: records stay small
    and byte-identical), ``rotation`` and ``flags`` (codes, see FLAGS)."""
    q = dict(track_figures(raw, track, window))
    dup = duplicate_share(source_fps, fps)
    q.update(meter.figures(dup))
    q["dup_share"] = dup
    q = {k: round(float(v), 4) for k, v in q.items()}
    q["rotation"] = int(rotation or 0)
    q["flags"] = flags(q, bounds)
    return q


# ------------------------------------------------------------------------------------------ flags
# code -> (figure, bound attribute, "min" | "max", what it means)
FLAGS = {
    "few_faces": ("face_share", "min_face_share", "min", "face found in too few frames"),
    "small_face": ("face_px", "min_face_px", "min", "face too small in the source"),
    "jitter": ("jitter", "max_jitter", "max", "landmarks shake after smoothing"),
    "roll": ("roll_deg", "max_roll_deg", "absmax", "face tilted or sideways"),
    "no_motion": ("motion", "min_motion", "min", "mouth region does not move"),
    "frozen": ("static_share", "max_static_share", "max", "frozen (repeated) frames"),
    "dark": ("brightness", "min_brightness", "min", "ROI too dark"),
    "bright": ("brightness", "max_brightness", "max", "ROI too bright"),
    "low_contrast": ("contrast", "min_contrast", "min", "ROI without contrast"),
    "blank": ("blank_share", "max_blank_share", "max", "blank (uniform) ROI frames"),
    "slow_speech": ("words_per_s", "min_words_per_s", "min", "too few transcript words for the audio"),
    "fast_speech": ("words_per_s", "max_words_per_s", "max", "too many transcript words for the audio"),
}


def with_speech_rate(q: Mapping, text: Optional[str], audio_seconds: float, bounds: QualityBounds) -> dict:
    """``q`` (an ``item_quality`` dict) with ``words_per_s`` of ``text`` over ``audio_seconds``
    (left out without a transcript or audio) and its flags evaluated again (kept last)."""
    out = {k: v for k, v in q.items() if k != "flags"}
    words = len(text.split()) if text else 0
    if words and audio_seconds > 0:
        out["words_per_s"] = round(words / audio_seconds, 4)
    out["flags"] = flags(out, bounds)
    return out


def flag_masks(values: Mapping[str, np.ndarray], bounds: QualityBounds) -> dict:
    """``{code: boolean array}`` over many items at once: ``values[figure]`` holds one value per
    item (NaN where an item lacks the figure: never flagged for it)."""
    out = {}
    if not bounds.enabled:
        return out
    for code, (figure, attr, kind, _) in FLAGS.items():
        if figure not in values:
            continue
        v, b = np.asarray(values[figure], dtype=np.float64), float(getattr(bounds, attr))
        with np.errstate(invalid="ignore"):
            out[code] = v < b if kind == "min" else v > b if kind == "max" else np.abs(v) > b
    return out


def flags(q: Mapping, bounds: QualityBounds) -> list:
    """Codes of the bounds an item's figures fall outside of (in FLAGS order)."""
    masks = flag_masks({f: np.array([float(q[f])]) for f, *_ in FLAGS.values() if f in q}, bounds)
    return [code for code, m in masks.items() if m[0]]


def describe_flag(code: str, q: Mapping, bounds: QualityBounds) -> str:
    """One line for a user: what the flag means, the item's figure and the bound (its config key)."""
    figure, attr, kind, meaning = FLAGS[code]
    v = q.get(figure)
    op = {"min": "<", "max": ">", "absmax": "|x| >"}[kind]
    return f"{meaning}: {figure} {_fmt(v)} {op} crop.quality.{attr}={_fmt(getattr(bounds, attr))}"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


# ------------------------------------------------------------------------------------ contact sheet
TILE = 96
SHEET_COLUMNS = 3  # items per row
LABEL_H = 16  # a line of text above an item's tiles
PAD = 6  # around each item's cell
GAP = 2  # between tiles
OUTLINE = 3  # the red frame of a flagged item
BACKGROUND = (38, 38, 38)  # BGR
FLAG_COLOUR = (40, 40, 230)  # BGR red
FLAG_TEXT_COLOUR = (140, 140, 255)  # a lighter red: readable on the dark background
TEXT_COLOUR = (235, 235, 235)


@dataclass
class SheetEntry:
    id: str
    tiles: np.ndarray  # (k, 96, 96) uint8 gray
    flags: Sequence[str] = ()


def cell_size(n_tiles: int) -> tuple:
    """(width, height) of one item's cell on a sheet."""
    n = max(n_tiles, 1)
    return 2 * PAD + n * TILE + (n - 1) * GAP, 2 * PAD + LABEL_H + TILE


def cell_box(index: int, n_tiles: int, columns: int = SHEET_COLUMNS) -> tuple:
    """(x, y, w, h) of item ``index``'s cell on a sheet: the report cuts an item's tiles out of
    its shard's sheet with it."""
    w, h = cell_size(n_tiles)
    return (index % columns) * w, (index // columns) * h, w, h


def render_sheet(entries: Sequence[SheetEntry], n_tiles: int, columns: int = SHEET_COLUMNS) -> np.ndarray:
    """A BGR image: one cell per entry (its id above its tiles), flagged entries framed in red
    with their flag codes. Deterministic (same entries, same pixels)."""
    import cv2

    columns = max(1, min(columns, len(entries) or 1))
    w, h = cell_size(n_tiles)
    rows = max(1, math.ceil(len(entries) / columns))
    img = np.empty((rows * h, columns * w, 3), np.uint8)
    img[:] = BACKGROUND
    for i, e in enumerate(entries):
        x0, y0, _, _ = cell_box(i, n_tiles, columns)
        ty = y0 + PAD + LABEL_H
        for j, tile in enumerate(e.tiles[:n_tiles]):
            tx = x0 + PAD + j * (TILE + GAP)
            img[ty : ty + TILE, tx : tx + TILE] = np.asarray(tile, np.uint8)[:TILE, :TILE, None]
        if e.flags:
            tiles_w = n_tiles * TILE + (n_tiles - 1) * GAP
            cv2.rectangle(img, (x0 + PAD - OUTLINE, ty - OUTLINE),
                          (x0 + PAD + tiles_w + OUTLINE - 1, ty + TILE + OUTLINE - 1), FLAG_COLOUR, OUTLINE)
        label = e.id + ("  [" + ",".join(e.flags) + "]" if e.flags else "")
        _put_text(img, label, x0 + PAD, y0 + PAD + LABEL_H - 5, w - 2 * PAD,
                  FLAG_TEXT_COLOUR if e.flags else TEXT_COLOUR)
    return img


def _put_text(img, text: str, x: int, y: int, max_w: int, colour) -> None:
    import cv2

    font, scale = cv2.FONT_HERSHEY_SIMPLEX, 0.38
    text = text.encode("ascii", "replace").decode()  # Hershey fonts draw ASCII only
    while text and cv2.getTextSize(text, font, scale, 1)[0][0] > max_w:
        text = ".." + text[3:]  # keep the end of a long id: its distinctive part
    cv2.putText(img, text, (x, y), font, scale, colour, 1, cv2.LINE_AA)


def write_sheet(path: Path, entries: Sequence[SheetEntry], n_tiles: int) -> None:
    """Render ``entries`` and write the PNG atomically."""
    png = encode_png(render_sheet(entries, n_tiles))
    with atomic.atomic_open(path, "wb") as f:
        f.write(png)


def encode_png(img: np.ndarray) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, 6])
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()


def sheet_tiles(sheet: np.ndarray, index: int, n_tiles: int) -> np.ndarray:
    """The cell of item ``index`` cut out of a decoded sheet (label and outline included)."""
    x, y, w, h = cell_box(index, n_tiles, sheet_columns(sheet, n_tiles))
    return sheet[y : y + h, x : x + w]


def sheet_columns(sheet: np.ndarray, n_tiles: int) -> int:
    """Columns of a sheet (a sheet of fewer items than SHEET_COLUMNS is narrower)."""
    return max(1, sheet.shape[1] // cell_size(n_tiles)[0])


def compose_cells(cells: Sequence[np.ndarray], columns: int = 4) -> np.ndarray:
    """Cells (equal-sized BGR images, e.g. cut from shard sheets) in a grid: the corpus sample sheet."""
    if not cells:
        return np.zeros((1, 1, 3), np.uint8)
    h, w = cells[0].shape[:2]
    columns = max(1, min(columns, len(cells)))
    rows = math.ceil(len(cells) / columns)
    img = np.empty((rows * h, columns * w, 3), np.uint8)
    img[:] = BACKGROUND
    for i, c in enumerate(cells):
        y, x = (i // columns) * h, (i % columns) * w
        img[y : y + c.shape[0], x : x + c.shape[1]] = c[:h, :w]
    return img
