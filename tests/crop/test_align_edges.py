"""The reference's edge handling of the 96x96 mouth cut (align_mouth.cut_patch): the centre is
clamped so the patch lies inside the 256x256 aligned frame; its threshold checks come after the
clamps and never fire, so a mouth far outside still gives a clamped patch, never an error."""
import numpy as np
import pytest

from avprep import align


@pytest.fixture
def frame():
    yy, xx = np.mgrid[0:256, 0:256]
    return (yy * 256 + xx).astype(np.int32)  # every pixel distinct: a patch tells where it was cut


@pytest.mark.parametrize("centre, top_left", [
    ((128.0, 200.0), (152, 80)),      # inside: rows/cols round(c) - 48
    ((128.5, 199.5), (152, 80)),      # halves round to even, as Python's round in the reference
    ((129.5, 100.5), (52, 82)),
    ((-40.0, 300.0), (160, 0)),       # far outside (beyond the reference's 5-pixel threshold): clamped
    ((40.0, 20.0), (0, 0)),
    ((251.0, 250.0), (160, 160)),
])
def test_cut_patch_clamps_like_the_reference(frame, centre, top_left):
    pts = np.array([[centre[0] - 3, centre[1] - 2], [centre[0] + 3, centre[1] + 2]])
    patch = align.cut_patch(frame, pts)
    assert patch.shape == (96, 96)
    y0, x0 = top_left
    np.testing.assert_array_equal(patch, frame[y0 : y0 + 96, x0 : x0 + 96])


@pytest.mark.parametrize("shift", [(0.0, 0.0), (-150.0, 40.0), (260.0, -120.0), (900.0, 900.0)])
@pytest.mark.parametrize("channels", [1, 3])
def test_patch_warp_equals_warping_the_whole_frame_then_cutting(shift, channels):
    """warp_patch interpolates only the 96x96 patch; it must give what warping the full 256x256
    aligned frame and cutting gives, at the frame's borders and fully outside it too (up to cv2's
    1/32-pixel coordinate rounding: at most 1 gray level, rarely)."""
    rng = np.random.default_rng(1)
    shape = (480, 640) if channels == 1 else (480, 640, 3)
    img = rng.integers(0, 256, shape, dtype=np.uint8)
    face = align.mean_face()
    angle = 0.2
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    pts = (face - 128) @ rot.T * 1.7 + (320, 240) + shift  # a rotated, scaled face in the frame
    t = align.similarity_transform(pts[list(align.STABLE_POINTS)], face[list(align.STABLE_POINTS)])
    for exact in (True, False):
        whole = align.cut_patch(align.warp(img, t, exact), align.apply_points(t, pts)[align.MOUTH])
        patch = align.warp_patch(img, t, pts[align.MOUTH], exact)
        assert patch.shape == whole.shape == (96, 96) + shape[2:]
        diff = np.abs(patch.astype(int) - whole)
        assert diff.max() <= 1 and diff.mean() < 0.01
