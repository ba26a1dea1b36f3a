"""Generated audio-visual clips in the pipeline's manifest/label format, for training tests.

Each clip is a sequence of 10-frame segments; a segment's class sets the frame brightness and
stripe direction of the video and the pitch of the audio, and is the segment's label, so the
labels are learnable from either modality.
"""
from pathlib import Path

import numpy as np
import pytest

FPS = 25
SR = 16000
N_CLASSES = 6


def _write_mp4(path: Path, frames: np.ndarray) -> None:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18", "preset": "ultrafast"}
        for img in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="gray")
            for packet in stream.encode(frame.reformat(format="yuv420p")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _clip(rng: np.random.RandomState, n_frames: int):
    classes = rng.randint(0, N_CLASSES, size=(n_frames + 9) // 10).repeat(10)[:n_frames]
    yy, xx = np.mgrid[0:96, 0:96]
    frames = np.empty((n_frames, 96, 96), dtype=np.uint8)
    for t, c in enumerate(classes):
        stripes = np.sin((xx if c % 2 else yy) * (0.2 + 0.1 * c) + t * 0.5)
        frames[t] = np.clip(40 + 30 * c + 25 * stripes + rng.randn(96, 96) * 3, 0, 255).astype(np.uint8)
    samples_per_frame = SR // FPS
    tt = np.arange(samples_per_frame) / SR
    chunks = [np.sin(2 * np.pi * (200 + 150 * c) * (tt + t * samples_per_frame / SR))
              for t, c in enumerate(classes)]
    wav = (np.concatenate(chunks) * 8000 + rng.randn(n_frames * samples_per_frame) * 200).astype(np.int16)
    return frames, wav, classes


def make_av_corpus(root: Path, n_train: int = 6, n_valid: int = 2, label_rate: int = 100,
                   seed: int = 0, lengths=(40, 60)) -> Path:
    """Write video/, audio/, {train,valid}.tsv, {split}.km and dict.km.txt under ``root``."""
    import soundfile as sf

    rng = np.random.RandomState(seed)
    (root / "video").mkdir(parents=True, exist_ok=True)
    (root / "audio").mkdir(parents=True, exist_ok=True)
    per_frame = label_rate // FPS
    for split, n in (("train", n_train), ("valid", n_valid)):
        rows, labels = [], []
        for i in range(n):
            uid = f"{split}{i:02d}"
            frames, wav, classes = _clip(rng, int(rng.randint(lengths[0], lengths[1] + 1)))
            _write_mp4(root / "video" / f"{uid}.mp4", frames)
            sf.write(str(root / "audio" / f"{uid}.wav"), wav, SR, subtype="PCM_16")
            rows.append(f"{uid}\tvideo/{uid}.mp4\taudio/{uid}.wav\t{len(frames)}\t{len(wav)}")
            labels.append(" ".join(str(c) for c in classes.repeat(per_frame)))
        (root / f"{split}.tsv").write_text(str(root) + "\n" + "\n".join(rows) + "\n")
        (root / f"{split}.km").write_text("\n".join(labels) + "\n")
    (root / "dict.km.txt").write_text("".join(f"{c} 1\n" for c in range(N_CLASSES)))
    return root


@pytest.fixture(scope="session")
def av_corpus_100hz(tmp_path_factory) -> Path:
    return make_av_corpus(tmp_path_factory.mktemp("av100"), label_rate=100, seed=0)


@pytest.fixture(scope="session")
def av_corpus_25hz(tmp_path_factory) -> Path:
    return make_av_corpus(tmp_path_factory.mktemp("av25"), n_train=4, n_valid=2, label_rate=25, seed=1)
