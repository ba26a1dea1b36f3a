"""Fixtures of the features/kmeans/labels tests: a pipeline config of the real stage sections
and tiny manifests of generated media."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from golden_data import golden_file as golden  # noqa: F401  (the repo copy, else ../shared/golden)


def make_cfg(iterations=None, **sections):
    from omegaconf import OmegaConf

    from stages import features, kmeans, labels
    from stages.schedule import ScheduleConfig

    cfg = OmegaConf.create({
        "schedule": OmegaConf.structured(ScheduleConfig),
        "features": OmegaConf.structured(features.Config),
        "kmeans": OmegaConf.structured(kmeans.Config),
        "labels": OmegaConf.structured(labels.Config),
    })
    if iterations is not None:
        cfg.schedule = OmegaConf.merge(cfg.schedule, {"iterations": iterations})
    for name, values in sections.items():
        cfg[name] = OmegaConf.merge(cfg[name], values)
    return cfg


def write_wav(path: Path, wav: np.ndarray) -> None:
    import soundfile as sf

    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), wav.astype(np.int16), 16000, subtype="PCM_16")


def write_gray_mp4(path: Path, frames: np.ndarray) -> None:
    """(T, H, W) uint8 as an h264 25 fps mp4 (lossy) with PyAV."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "10"}
        for fr in frames:
            for pkt in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(fr), format="gray")):
                out.mux(pkt)
        for pkt in stream.encode():
            out.mux(pkt)


def write_manifest(manifest_dir: Path, split: str, root: Path, rows, texts=None) -> None:
    """rows: (id, video_rel, audio_rel, n_video_frames, n_audio_samples)."""
    manifest_dir.mkdir(parents=True, exist_ok=True)
    lines = [str(root)] + ["\t".join(map(str, r)) for r in rows]
    (manifest_dir / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    if texts is not None:
        (manifest_dir / f"{split}.wrd").write_text("".join(t + "\n" for t in texts))


def speechlike(n_samples: int, seed: int) -> np.ndarray:
    """Deterministic int16 audio with changing spectra (so MFCC clusters differ)."""
    rng = np.random.default_rng(seed)
    t = np.arange(n_samples) / 16000
    f0 = 120 + 80 * np.sin(2 * np.pi * 0.7 * t + seed)
    phase = 2 * np.cumsum(np.pi * f0 / 16000)
    x = sum(np.sin(h * phase) / h for h in range(1, 6)) * (0.5 + 0.5 * np.sin(2 * np.pi * 2 * t) ** 2)
    x = x + 0.05 * rng.normal(size=n_samples)
    return (x / np.abs(x).max() * 12000).astype(np.int16)


@pytest.fixture
def audio_corpus(tmp_path):
    """workdir with manifest/{train,valid}.tsv (+ .wrd) of generated wavs (no video needed for
    MFCC); train has 7 utterances, valid 3."""
    root = tmp_path / "crop"
    work = tmp_path / "work"
    texts = ["hello world", "the quick brown fox", "lips move", "a b c", "speech", "one two three", "go",
             "valid one", "valid two", "three"]
    rows = {"train": [], "valid": []}
    for i in range(10):
        split = "train" if i < 7 else "valid"
        n_frames = 20 + 7 * i
        n_samples = n_frames * 640 + (i % 3) * 100
        write_wav(root / "audio" / f"u{i}.wav", speechlike(n_samples, i))
        rows[split].append((f"u{i}", f"video/u{i}.mp4", f"audio/u{i}.wav", n_frames, n_samples))
    write_manifest(work / "manifest", "train", root, rows["train"], texts[:7])
    write_manifest(work / "manifest", "valid", root, rows["valid"], texts[7:])
    return work, rows
