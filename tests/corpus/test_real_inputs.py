"""What real corpora contain, on real video: phone videos stored sideways with a display
rotation, file names that are not UTF-8, two videos with one id, transcripts in another encoding,
and a disk that fills up while cropping."""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from avprep import media
from pipeline.errors import InfrastructureError, raise_if_infrastructure
from avprep.crop import crop_one_video
from stages import crop as crop_stage
from stages import manifest as manifest_stage

from corpus_helpers import freeze_listing, stage_ctx, touch


def ffmpeg(*args: str) -> None:
    subprocess.run([media.ffmpeg_exe(), "-nostdin", "-v", "error", "-y", *args], check=True)


def test_a_phone_video_stored_sideways_gives_the_upright_crop(tmp_path, clips):
    """A clip, and the same pixels stored turned 90 degrees clockwise with a display matrix that
    says "turn back" (what phones write): same landmarks, same ROI video, byte for byte. Lossless
    4:4:4 encodings, so the two stored forms hold exactly the same pixels."""
    upright, stored, phone = tmp_path / "upright.mp4", tmp_path / "stored.mp4", tmp_path / "phone.mp4"
    ffmpeg("-i", str(clips["a"]), "-frames:v", "20", "-c:v", "libx264", "-qp", "0", "-pix_fmt", "yuv444p",
           "-c:a", "aac", str(upright))
    ffmpeg("-i", str(upright), "-vf", "transpose=1", "-c:v", "libx264", "-qp", "0", "-pix_fmt", "yuv444p",
           "-c:a", "copy", str(stored))
    ffmpeg("-display_rotation", "90", "-i", str(stored), "-c", "copy", str(phone))

    import av

    with av.open(str(phone)) as c:  # stored sideways...
        assert c.streams.video[0].codec_context.height == 640
    info = media.video_info(phone)  # ... shown upright
    assert (info["rotation"], info["width"], info["height"]) == (90, 640, 360)
    assert media.video_info(upright)["rotation"] == 0

    results = {}
    for name, video in (("upright", upright), ("phone", phone)):
        results[name] = crop_one_video(video, tmp_path / name, name="x")
    assert results["phone"].rotation == 90 and results["upright"].rotation == 0
    marks = {k: np.load(r.landmarks) for k, r in results.items()}
    assert marks["upright"]["found"].sum() >= 18
    np.testing.assert_array_equal(marks["phone"]["raw"], marks["upright"]["raw"])
    assert results["phone"].video.read_bytes() == results["upright"].video.read_bytes()


def _plain(tmp_path: Path, clips) -> Path:
    corpus = tmp_path / "corpus"
    raw = os.fsencode(corpus)
    touch(raw + b"/caf\xe9.mp4", clips["a"].read_bytes())  # a Latin-1 file name
    touch(raw + b"/caf\xe9.txt", "un café noir\n".encode())
    touch(corpus / "good.mp4", clips["b"].read_bytes())
    touch(corpus / "good.txt", b"a good clip\n")
    for ext in (".mp4", ".mov"):  # two videos, one id
        touch(corpus / f"dup{ext}", clips["c"].read_bytes())
    touch(corpus / "latin.mp4", clips["c"].read_bytes())
    touch(corpus / "latin.txt", "caf\xe9 cr\xe8me".encode("latin-1"))  # not UTF-8
    return corpus


def test_names_duplicates_and_encodings_end_to_end(tmp_path, clips, caplog):
    corpus = _plain(tmp_path, clips)
    ctx = stage_ctx(corpus, tmp_path / "work", items_per_shard=10, max_failure_rate=0.6)
    stage = crop_stage.CropStage()
    with caplog.at_level(logging.WARNING):
        lines = "\n".join(freeze_listing(stage, ctx))
        (shard,) = stage.shards(ctx)
        stats = stage.run(ctx, shard)
    assert "1 duplicate ids" in lines and "1 unusable transcripts" in lines, lines
    assert stats["ok"] == 2 and stats["failed"] == 2
    crop = ctx.stage_dir("crop")
    recs = {r["id"]: r for r in map(json.loads, (crop / "results" / f"{shard.key}.jsonl").read_text().splitlines())}
    assert sorted(recs) == ["caf%E9", "dup", "good", "latin"]
    cafe = recs["caf%E9"]
    assert cafe["status"] == "ok" and cafe["video"] == "video/caf%E9.mp4" and cafe["text"] == "un café noir"
    saved = np.load(crop / "landmarks" / "caf%E9.npz")
    assert os.fsencode(json.loads(str(saved["source"]))["video"]).endswith(b"/caf\xe9.mp4")  # the exact source
    assert "2 videos give the id 'dup' (dup.mp4, dup.mov)" in recs["dup"]["reason"]
    assert "latin.txt is not valid UTF-8 (byte 0xe9 at offset 3)" in recs["latin"]["reason"]
    assert not (crop / "video" / "dup.mp4").exists() and not (crop / "video" / "latin.mp4").exists()
    assert "crop failed: transcript" in caplog.text

    summary = stage.finalize(ctx, {shard.key: stats})
    assert (summary["ok"], summary["failed"], summary["last_listing"]["listed"]) == (2, 2, 4)
    mstats = manifest_stage.STAGE.run(ctx, manifest_stage.STAGE.shards(ctx)[0])
    out = ctx.stage_dir("manifest")
    tsv = (out / "train.tsv").read_bytes().decode("utf-8")  # strict: valid UTF-8
    assert [r.split("\t")[0] for r in tsv.splitlines()[1:]] == ["caf%E9", "good"]
    assert (out / "train.wrd").read_text(encoding="utf-8") == "un café noir\na good clip\n"
    failures = [json.loads(x) for x in (out / "failures.jsonl").read_text().splitlines()]
    assert [(f["id"], f["stage"]) for f in failures] == [("dup", "crop"), ("latin", "crop")]
    assert mstats["counts"]["train"] == 2


def test_ffmpeg_reports_a_full_disk_as_the_jobs_error(tmp_path):
    """ffmpeg's own message for a full disk (writing to /dev/full) becomes OSError(ENOSPC), which
    the per-item loops re-raise (the shard fails and is retried) instead of recording the item."""
    proc = subprocess.run([media.ffmpeg_exe(), "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i", "sine",
                           "-t", "1", "-f", "wav", "/dev/full"], capture_output=True, text=True)
    assert proc.returncode != 0
    wav = tmp_path / "work" / "crop" / "audio" / "x.wav"
    exc = media._ffmpeg_failed("/corpus/x.mp4", "audio extraction failed", proc.stderr, wav)
    assert isinstance(exc, OSError) and exc.errno == errno.ENOSPC
    # the hint names the disk that is full (the work dir's), not the input video's
    with pytest.raises(InfrastructureError, match=f"^disk full on {wav} "):
        raise_if_infrastructure(exc, [tmp_path])
    plain = media._ffmpeg_failed("x.mp4", "encoding failed", "Invalid data found when processing input")
    assert isinstance(plain, media.MediaError)


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MB tmpfs (mounting needs root; skipped elsewhere)."""
    mount = tmp_path / "small"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_fails_the_shard_and_records_nothing(tmp_path, clips, small_disk):
    corpus = tmp_path / "corpus"
    touch(corpus / "clip.mp4", clips["a"].read_bytes())
    # the landmarks are already there (a re-crop): the first write is ffmpeg's ROI video
    done = crop_one_video(corpus / "clip.mp4", tmp_path / "first", name="clip")
    ctx = stage_ctx(corpus, small_disk / "work")
    stage = crop_stage.CropStage()
    freeze_listing(stage, ctx)
    landmarks = ctx.stage_dir("crop") / "landmarks" / "clip.npz"
    landmarks.parent.mkdir(parents=True)
    shutil.copy(done.landmarks, landmarks)
    free = shutil.disk_usage(small_disk).free
    (small_disk / "filler").write_bytes(b"\0" * (free - 8192))
    (shard,) = stage.shards(ctx)
    with pytest.raises(InfrastructureError, match="disk full"):
        stage.run(ctx, shard)
    assert not stage.outputs(ctx, shard)[0].exists()  # no failure record: a rerun retries the item
