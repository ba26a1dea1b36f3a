"""Damaged sources made from the sample clips with the bundled ffmpeg: cut short (mp4, mkv, avi),
zeroed in the middle, empty. Each is a failure record whose reason names the damage, in words,
and leaves no output behind; the intact clip is cropped. And a crop shard killed half way and
resumed gives the same records and contact sheet, byte for byte, as one that ran straight.
A transcript with far more words than its audio can hold is flagged (words per second)."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from avprep import media
from corpus_helpers import freeze_listing, stage_ctx, touch
from stages import crop as crop_stage

REPO_ROOT = Path(__file__).resolve().parents[2]


def _cut(src: Path, dest: Path, share: float) -> None:
    data = src.read_bytes()
    touch(dest, data[: int(len(data) * share)])


def _records(ctx, stage, shard) -> dict:
    return {r["id"]: r for r in map(json.loads, stage.outputs(ctx, shard)[0].read_text().splitlines())}


def test_truncated_and_damaged_videos_fail_with_the_damage_named(tmp_path, clips):
    corpus = tmp_path / "corpus"
    good = clips["a"]
    touch(corpus / "intact.mp4", good.read_bytes())
    # a transcript far too long for 2.4 s of audio: not a failure, a quality flag
    touch(corpus / "intact.txt", " ".join(["word"] * 30).encode())
    for share in (45, 60, 80):
        _cut(good, corpus / f"cut{share}.mp4", share / 100)
    for ext, codecs in ((".mkv", ["-c", "copy"]), (".avi", ["-c:v", "mpeg4", "-q:v", "3", "-c:a", "mp3"])):
        full = tmp_path / f"full{ext}"
        subprocess.run([media.ffmpeg_exe(), "-nostdin", "-v", "error", "-y", "-i", str(good), *codecs, str(full)],
                       check=True)
        _cut(full, corpus / f"cut60{ext.replace('.', '_')}{ext}", 0.6)
    zeroed = bytearray(good.read_bytes())
    middle = len(zeroed) // 2
    zeroed[middle: middle + 20000] = bytes(20000)
    touch(corpus / "zeroed.mp4", bytes(zeroed))
    touch(corpus / "empty.mp4")
    ctx = stage_ctx(corpus, tmp_path / "work", items_per_shard=20, max_failure_rate=1.0)
    stage = crop_stage.CropStage()
    freeze_listing(stage, ctx)
    (shard,) = stage.shards(ctx)
    stats = stage.run(ctx, shard)
    recs = _records(ctx, stage, shard)
    assert recs["intact"]["status"] == "ok" and stats["ok"] == 1, recs["intact"]
    q = recs["intact"]["quality"]
    assert q["flags"] == ["fast_speech"] and abs(q["words_per_s"] - 30 / 2.38) < 0.1, q
    stated = media.video_info(good)["duration"]
    for share in (45, 60, 80):
        reason = recs[f"cut{share}"]["reason"]
        assert f"cut{share}.mp4: truncated: decoded " in reason and f"s of video of a stated {stated:.2f} s" in reason
    for name in ("cut60_mkv", "cut60_avi"):
        assert "truncated: decoded" in recs[name]["reason"], recs[name]
    assert "zeroed.mp4: damaged: the video decoder failed after" in recs["zeroed"]["reason"]
    assert "invalid data found when processing input" in recs["zeroed"]["reason"]
    assert recs["empty"]["reason"].endswith("empty.mp4: empty file (0 bytes)")
    assert not any("Errno" in r.get("reason", "") for r in recs.values())
    crop = ctx.stage_dir("crop")
    for kind in ("video", "audio", "landmarks"):  # a failed item leaves nothing behind
        assert sorted(p.stem for p in (crop / kind).iterdir()) == ["intact"], kind


KILLED_RUN = """
import sys
sys.path[:0] = [{repo!r}, {tests!r}]
from corpus_helpers import freeze_listing, stage_ctx
from stages import crop as crop_stage
ctx = stage_ctx({corpus!r}, {work!r}, items_per_shard=10)
stage = crop_stage.CropStage()
stage.run(ctx, stage.shards(ctx)[0])
"""


def test_a_shard_killed_and_resumed_gives_the_bytes_of_a_straight_run(tmp_path, clips):
    corpus = tmp_path / "corpus"
    for name, key in (("m1", "a"), ("m2", "b"), ("m3", "c")):
        touch(corpus / f"{name}.mp4", clips[key].read_bytes())
        touch(corpus / f"{name}.txt", clips[key].with_suffix(".txt").read_bytes())
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for work in (straight, resumed):
        freeze_listing(crop_stage.CropStage(), stage_ctx(corpus, work, items_per_shard=10))

    # killed (-9) once the first item is done
    script = KILLED_RUN.format(repo=str(REPO_ROOT), tests=str(Path(__file__).parent), corpus=str(corpus),
                               work=str(resumed))
    first_done = resumed / "crop" / "audio" / "m1.wav"  # written last
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO_ROOT)
    try:
        deadline = time.time() + 300
        while not first_done.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert first_done.exists() and not (resumed / "crop" / "results").exists()

    for work in (straight, resumed):
        ctx = stage_ctx(corpus, work, items_per_shard=10)
        stage = crop_stage.CropStage()
        (shard,) = stage.shards(ctx)
        assert stage.run(ctx, shard)["ok"] == 3
    for rel in ("results/00000.jsonl", "sheets/00000.png"):
        assert (resumed / "crop" / rel).read_bytes() == (straight / "crop" / rel).read_bytes(), rel
