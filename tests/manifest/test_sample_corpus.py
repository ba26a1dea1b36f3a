"""The sample corpus (tools/sample_corpus.py): real clips with synthesized speech and transcripts,
in the plain layout, with train/valid/test id lists."""
from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from omegaconf import OmegaConf

from stages.corpus import list_items
from tools.sample_corpus import ensure_sample_corpus

REPO_ROOT = Path(__file__).resolve().parents[2]


def _streams(path: Path):
    import av

    with av.open(str(path)) as container:
        video = container.streams.video[0]
        audio = container.streams.audio[0]
        fps = float(video.average_rate)
        n_frames = sum(1 for _ in container.decode(video=0))
        return fps, n_frames, audio.sample_rate, audio.channels


def _extract_audio(path: Path, wav: Path) -> np.ndarray:
    import imageio_ffmpeg

    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-y", "-i", str(path), "-vn",
                    "-ac", "1", "-ar", "16000", "-c:a", "pcm_s16le", str(wav)], check=True)
    samples, rate = sf.read(str(wav), dtype="float32")
    assert rate == 16000
    return samples


def test_sample_corpus_clips(sample_corpus, tmp_path):
    record = json.loads((sample_corpus / "corpus.json").read_text())
    clips = record["clips"]
    assert record["layout"] == "plain" and len(clips) >= 16
    assert len({c["text"] for c in clips}) == len(clips)  # distinct sentences
    for clip in clips:
        video = sample_corpus / f"{clip['id']}.mp4"
        fps, n_frames, rate, channels = _streams(video)
        assert n_frames == clip["n_frames"] and 1.9 <= n_frames / fps <= 4.0, clip["id"]
        assert (rate, channels) == (16000, 1)
        transcript = (sample_corpus / f"{clip['id']}.txt").read_text().strip()
        assert transcript == clip["text"] and len(transcript.split()) >= 3
    # the speech track covers the clip exactly and is audible (not the sources' silence)
    for clip in clips[:: max(1, len(clips) // 4)]:
        samples = _extract_audio(sample_corpus / f"{clip['id']}.mp4", tmp_path / "a.wav")
        fps, n_frames, _, _ = _streams(sample_corpus / f"{clip['id']}.mp4")
        assert abs(len(samples) - n_frames / fps * 16000) <= 16, clip["id"]
        assert np.abs(samples).max() > 0.1, clip["id"]
    assert "Pexels" in (sample_corpus / "SOURCES.md").read_text()


def test_sample_corpus_splits_through_the_plain_layout(sample_corpus):
    cfg = OmegaConf.create({"corpus": str(sample_corpus), "layout": "plain",
                            "manifest": {"valid_ids": "splits/valid.lst", "test_ids": "splits/test.lst"}})
    items = list_items(cfg)
    assert len(items) >= 16
    assert Counter(i.split for i in items) == {"train": len(items) - 4, "valid": 2, "test": 2}
    assert all(i.text and Path(i.video).is_file() for i in items)
    # the preset wires the same lists
    smoke = OmegaConf.load(REPO_ROOT / "presets" / "smoke.yaml")
    assert smoke.manifest.valid_ids == "splits/valid.lst" and smoke.manifest.test_ids == "splits/test.lst"


def test_sample_corpus_is_not_in_git():
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True).stdout.split()
    media = [p for p in tracked if Path(p).suffix.lower() in (".mp4", ".avi", ".mov", ".mkv", ".webm", ".wav", ".whl")]
    assert media == []


def test_cli_builds_into_a_given_dir(sample_corpus, tmp_path):
    out = tmp_path / "corpus"
    proc = subprocess.run([sys.executable, "-m", "tools.sample_corpus", "--out", str(out)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out.resolve())
    mine = json.loads((out / "corpus.json").read_text())["clips"]
    cached = json.loads((sample_corpus / "corpus.json").read_text())["clips"]
    key = lambda c: (c["id"], c["text"], c["n_frames"])  # noqa: E731
    assert [key(c) for c in mine] == [key(c) for c in cached]  # deterministic
    assert not list(tmp_path.glob(".tmp-*"))  # the temporary build dir was renamed away
    assert ensure_sample_corpus(out) == out.resolve()  # present: returned as is


def test_refuses_an_incomplete_dir(tmp_path):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "x.mp4").write_bytes(b"")
    with pytest.raises(FileExistsError, match="not a complete sample corpus"):
        ensure_sample_corpus(tmp_path / "half")
