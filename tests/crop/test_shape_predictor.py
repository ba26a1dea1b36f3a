"""The batched shape predictor (avprep/shape_predictor.py) against dlib's own: the same landmarks
to the pixel, on dlib's 68-point model with real frames and on random models dlib itself loads."""
import math

import cv2
import dlib
import numpy as np
import pytest

from avprep import media
from avprep.landmarks import model_dir
from avprep.shape_predictor import ModelFormatError, ShapePredictor, cached_model, load_model

MODEL = model_dir() / "shape_predictor_68_face_landmarks.dat"


@pytest.fixture(scope="module")
def predictor_68():
    return ShapePredictor(MODEL), dlib.shape_predictor(str(MODEL))


def _dlib_points(pred, gray, rect) -> np.ndarray:
    s = pred(gray, rect)
    return np.array([(p.x, p.y) for p in s.parts()], dtype=np.int32)


def test_68_point_model_gives_dlibs_landmarks_on_real_frames(source_videos, predictor_68):
    ours, theirs = predictor_68
    hog = dlib.get_frontal_face_detector()
    frames, rects = [], []
    for i, f in enumerate(media.iter_frames(source_videos["pyfeat_single_face"], "bgr24")):
        if i % 3:
            continue
        g = cv2.cvtColor(f, cv2.COLOR_BGR2GRAY)
        found = list(hog(g, 1))
        if not found:
            continue
        r = max(found, key=lambda r: r.area())
        frames.append(g)
        rects.append(r)
        # boxes the detector did not give: shifted, larger, smaller, and one reaching past the
        # frame's edge (feature pixels outside the frame read as 0)
        w = r.width()
        for dx, dy, grow in ((w // 7, -w // 9, 0), (0, 0, w // 5), (0, 0, -w // 6), (-r.left() - w // 3, 0, 0)):
            frames.append(g)
            rects.append(dlib.rectangle(r.left() + dx - grow, r.top() + dy - grow, r.right() + dx + grow,
                                        r.bottom() + dy + grow))
        if len(frames) >= 60:
            break
    assert len(frames) >= 40
    got = ours(frames, rects)
    want = np.stack([_dlib_points(theirs, g, r) for g, r in zip(frames, rects)])
    assert got.shape == (len(frames), 68, 2) and got.dtype == np.int32
    np.testing.assert_array_equal(got, want)
    # one frame at a time gives the same as a batch
    np.testing.assert_array_equal(ours(frames[:1], rects[:1])[0], want[0])
    assert ours([], []).shape == (0, 68, 2)


# ------------------------------------------------------------------- random models in dlib's format
def _int(v: int) -> bytes:
    mag = abs(int(v))
    body = mag.to_bytes(max(1, (mag.bit_length() + 7) // 8), "little")
    return bytes([len(body) | (0x80 if v < 0 else 0)]) + body


def _float(v: float) -> bytes:
    """dlib's float_details of a float32: 24-bit mantissa, zero low bytes shifted off."""
    m, e = math.frexp(float(np.float32(v)))
    mantissa, exponent = int(m * (1 << 24)), e - 24
    for _ in range(8):
        if mantissa & 0xFF:
            break
        mantissa >>= 8
        exponent += 8
    return _int(mantissa) + _int(exponent)


def _matrix(values) -> bytes:
    return _int(-len(values)) + _int(-1) + b"".join(_float(v) for v in values)


def _random_model(rng, points=7, cascades=3, trees=20, depth=3, feats=40) -> bytes:
    out = _int(1) + _matrix(rng.uniform(0.2, 0.8, 2 * points))
    out += _int(cascades)
    for _ in range(cascades):
        out += _int(trees)
        for _ in range(trees):
            splits = 2**depth - 1
            out += _int(splits)
            for _ in range(splits):
                out += _int(rng.integers(feats)) + _int(rng.integers(feats)) + _float(rng.uniform(-40, 40))
            out += _int(splits + 1)
            for _ in range(splits + 1):
                out += _matrix(rng.normal(0, 0.02, 2 * points))
    out += _int(cascades) + b"".join(_int(feats) + b"".join(_int(rng.integers(points)) for _ in range(feats))
                                     for _ in range(cascades))
    out += _int(cascades) + b"".join(_int(feats) + b"".join(_float(rng.uniform(-0.3, 0.3)) for _ in range(2 * feats))
                                     for _ in range(cascades))
    return out


def test_random_models_read_and_run_as_dlib_runs_them(tmp_path):
    rng = np.random.default_rng(7)
    noise = rng.integers(0, 256, (6, 120, 160)).astype(np.uint8)
    frames = [cv2.GaussianBlur(n, (0, 0), 3) for n in noise]
    for k, depth in enumerate((2, 3, 4)):
        path = tmp_path / f"model{k}.dat"
        path.write_bytes(_random_model(rng, depth=depth))
        theirs = dlib.shape_predictor(str(path))
        ours = ShapePredictor(load_model(path))
        rects = [dlib.rectangle(int(x), int(y), int(x + s), int(y + s))
                 for x, y, s in zip(rng.integers(-30, 120, 6), rng.integers(-30, 80, 6), rng.integers(30, 110, 6))]
        want = np.stack([_dlib_points(theirs, g, r) for g, r in zip(frames, rects)])
        np.testing.assert_array_equal(ours(frames, rects), want)
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(ModelFormatError):
        load_model(path)


def test_converted_model_is_cached(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("AVHUBERT_PIPELINE_MODEL_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "model.dat"
    path.write_bytes(_random_model(np.random.default_rng(1)))
    first = cached_model(path)
    entries = list((tmp_path / "cache").glob("*.npz"))
    assert len(entries) == 1
    again = cached_model(path)
    for name in ("initial", "split_idx1", "split_thresh", "leaves", "anchors", "deltas"):
        np.testing.assert_array_equal(getattr(first, name), getattr(again, name))
    entries[0].write_bytes(b"not a model")  # a damaged entry is converted again and replaced
    third = cached_model(path)
    np.testing.assert_array_equal(third.leaves, first.leaves)
    assert "converting the model again" in caplog.text
    assert np.load(entries[0])["leaves"].shape == first.leaves.shape
