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
