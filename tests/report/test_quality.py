"""Unit tests of avprep/quality.py: the per-item figures, flags and contact sheets, on synthetic
ROI frames and landmark tracks whose answer is known."""
from __future__ import annotations

import numpy as np
import pytest

from avprep import align, quality


def _moving_rois(n, seed=0):
    """ROIs of a textured patch with a mouth-like bar that opens and closes (real motion) and a
    little sensor noise."""
    rng = np.random.default_rng(seed)
    base = rng.integers(60, 200, size=(96, 96)).astype(np.int16)
    out = []
    for t in range(n):
        f = base + rng.integers(-3, 4, size=base.shape)
        h = 4 + int(8 * abs(np.sin(t / 3)))
        f[48 - h : 48 + h, 28:68] = 20
        out.append(f.clip(0, 255).astype(np.uint8))
    return out


def _meter(frames, n_tiles=4):
    m = quality.RoiMeter(len(frames), n_tiles)
    passed = list(m.observe(iter(frames)))
    assert len(passed) == len(frames) and all(a is b for a, b in zip(passed, frames))  # frames pass unchanged
    return m


def test_roi_figures_tell_moving_frozen_and_blank_apart():
    bounds = quality.QualityBounds()
    moving = _meter(_moving_rois(50)).figures()
    assert moving["motion"] > 2 and moving["static_share"] == 0 and moving["blank_share"] == 0
    assert quality.flags(moving, bounds) == []

    frozen = _meter([_moving_rois(1)[0]] * 50).figures()
    assert frozen["motion"] == 0 and frozen["static_share"] == 1.0
    assert quality.flags(frozen, bounds) == ["no_motion", "frozen"]

    half_black = _moving_rois(50)[:25] + [np.zeros((96, 96), np.uint8)] * 25
    fig = _meter(half_black).figures()
    assert fig["blank_share"] == 0.5
    assert fig["brightness"] < 0.6 * moving["brightness"]
    assert "blank" in quality.flags(fig, bounds)


def test_frame_rate_duplicates_are_not_frozen_frames():
    # a 15 fps source resampled to 25 fps repeats 40% of its frames: not a freeze
    src = _moving_rois(30)
    frames = [src[(k * 15) // 25] for k in range(50)]  # the same arrays repeated, as the decoder does
    dup = quality.duplicate_share(15.0)
    assert dup == pytest.approx(0.4)
    fig = _meter(frames).figures(dup)
    assert fig["static_share"] < 0.05
    assert "frozen" not in quality.flags(fig, quality.QualityBounds())
    assert quality.duplicate_share(None) == 0 and quality.duplicate_share(30.0) == 0


def test_tiles_are_evenly_spaced_copies():
    frames = [np.full((96, 96), i, np.uint8) for i in range(40)]
    m = _meter(frames, n_tiles=4)
    assert m.tile_index == [5, 15, 25, 35]
    assert [int(t[0, 0]) for t in m.tile_stack()] == [5, 15, 25, 35]
    short = _meter(frames[:2], n_tiles=4)  # fewer frames than tiles: one tile per frame
    assert len(short.tile_stack()) == 2


def _face_track(n, iod_scale=1.0, noise=0.0, angle_deg=0.0, missing=(), seed=0):
    """(raw, track): the mean face (moved, scaled, rotated) with landmark noise; -1 rows where missing."""
    rng = np.random.default_rng(seed)
    face = align.mean_face().astype(np.float64)
    c = face.mean(0)
    a = np.radians(angle_deg)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    frames = []
    for t in range(n):
        pts = (face - c) @ rot.T * iod_scale + c + np.array([100 + 0.5 * t, 80])  # steady drift
        frames.append(pts + rng.normal(0, noise, pts.shape))
    raw = np.array(frames)
    raw_saved = np.round(raw).astype(np.int32)
    found = [i not in missing for i in range(n)]
    raw_saved[~np.array(found)] = -1
    track = align.interpolate_missing([raw[i] if found[i] else None for i in range(n)])
    return raw_saved, track


def test_landmark_figures():
    raw, track = _face_track(60)
    f = quality.track_figures(raw, track)
    assert f["face_share"] == 1.0
    assert abs(f["roll_deg"]) < 1.0
    assert f["jitter"] < 0.05  # constant drift: no second difference
    face = align.mean_face()
    assert f["face_px"] == pytest.approx(face[8, 1] - face[17:27, 1].min(), abs=1.5)

    small = quality.track_figures(*_face_track(60, iod_scale=0.25))
    assert small["face_px"] == pytest.approx(f["face_px"] / 4, abs=1.5)
    assert "small_face" in quality.flags(small, quality.QualityBounds())

    tilted = quality.track_figures(*_face_track(60, angle_deg=60))
    assert tilted["roll_deg"] == pytest.approx(60, abs=1.5)
    assert "roll" in quality.flags(tilted, quality.QualityBounds())

    gaps = quality.track_figures(*_face_track(60, missing=set(range(30, 60))))
    assert gaps["face_share"] == 0.5
    assert "few_faces" in quality.flags(gaps, quality.QualityBounds())


def test_jitter_grows_with_landmark_noise_and_is_scale_free():
    calm = quality.track_figures(*_face_track(80, noise=0.3))["jitter"]
    shaky = quality.track_figures(*_face_track(80, noise=6.0))["jitter"]
    assert shaky > 5 * calm
    assert "jitter" in quality.flags({"jitter": shaky}, quality.QualityBounds())
    big = quality.track_figures(*_face_track(80, iod_scale=2.0, noise=12.0))["jitter"]
    assert big == pytest.approx(shaky, rel=0.3)  # twice the face, twice the noise: the same share


def test_item_quality_record_is_small_rounded_and_flagged():
    raw, track = _face_track(50)
    m = _meter([_moving_rois(1)[0]] * 50)
    q = quality.item_quality(raw, track, m, quality.QualityBounds(), source_fps=25.0, rotation=90)
    assert q["rotation"] == 90 and q["flags"] == ["no_motion", "frozen"]
    assert all(v == round(v, 4) for k, v in q.items() if isinstance(v, float))
    off = quality.item_quality(raw, track, m, quality.QualityBounds(enabled=False))
    assert off["flags"] == []
    text = quality.describe_flag("no_motion", q, quality.QualityBounds())
    assert "crop.quality.min_motion=0.4" in text and "motion 0" in text


def test_bounds_from_config_sections():
    from omegaconf import OmegaConf

    b = quality.bounds_of(OmegaConf.create({"min_motion": 1.5, "enabled": False}))
    assert b.min_motion == 1.5 and not b.enabled and b.max_jitter == quality.QualityBounds().max_jitter
    assert quality.bounds_of({"max_blank_share": 0.3}).max_blank_share == 0.3
    assert quality.bounds_of(None) == quality.QualityBounds()


def test_contact_sheet_cells_round_trip_and_flagged_items_are_framed(tmp_path):
    import cv2

    entries = []
    for i in range(7):
        tiles = np.stack([np.full((96, 96), 20 * i + j, np.uint8) for j in range(4)])
        entries.append(quality.SheetEntry(f"spk{i}/utt{i}", tiles, ["frozen"] if i == 4 else []))
    path = tmp_path / "00000.png"
    quality.write_sheet(path, entries, 4)
    sheet = cv2.imread(str(path), cv2.IMREAD_COLOR)
    w, h = quality.cell_size(4)
    assert sheet.shape == (3 * h, 3 * w, 3)  # 7 items, 3 per row
    for i, e in enumerate(entries):
        cell = quality.sheet_tiles(sheet, i, 4)
        y = quality.PAD + quality.LABEL_H
        for j in range(4):
            x = quality.PAD + j * (quality.TILE + quality.GAP)
            assert (cell[y + 5 : y + 90, x + 5 : x + 90] == e.tiles[j][0, 0]).all()
        # the red frame around the tiles: only on the flagged item
        red = cell[y - 2, quality.PAD + 10]
        assert (tuple(int(v) for v in red) == quality.FLAG_COLOUR) == bool(e.flags)
    # deterministic bytes: the same entries give the same file
    again = tmp_path / "again.png"
    quality.write_sheet(again, entries, 4)
    assert again.read_bytes() == path.read_bytes()
    sample = quality.compose_cells([quality.sheet_tiles(sheet, i, 4) for i in (0, 4, 6)], columns=2)
    assert sample.shape == (2 * h, 2 * w, 3)
