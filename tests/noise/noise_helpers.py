"""Helpers of the noise tests: launching the pipeline on copies of the smoke run, a small
audio-only manifest, a task over it, and synthetic noise recordings (tones, white noise, espeak-ng
speech) in several formats and rates."""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[2]

# small corpus noise: 4-talker babble and single-talker speech, 4 s clips
CORPUS_NOISE = ["noise.corpus_categories={babble: 4, speech: 1}", "noise.corpus_clips={train: 4, valid: 2, test: 2}",
                "noise.clip_seconds=4", "noise.clips_per_shard=3", "noise.files_per_shard=4"]


def launch(work: Path, corpus: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", "1")  # tiny models: threads only contend on a shared machine
    cmd = [sys.executable, str(REPO_ROOT / "launch.py"), "--preset", "smoke", "--cluster", "debug",
           "--workdir", str(work), "--corpus", str(corpus), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=timeout)


def launch_here(work: Path, corpus: Path, *args: str) -> subprocess.CompletedProcess:
    """``launch`` in this process (the debug executor runs the shards here too), without the run
    report written at the end of every launch (tested in tests/report): for the many quick
    launches of the noise stage's tests."""
    import io

    import pytest

    import launch as launcher
    import report

    out, err = io.StringIO(), io.StringIO()
    argv = ["--preset", "smoke", "--cluster", "debug", "--workdir", str(work), "--corpus", str(corpus), *args]
    with one_torch_thread(), pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(err):
        patch.setattr(report, "at_end_of_launch", lambda *a, **k: [])
        rc = launcher.main(argv)
    return subprocess.CompletedProcess(argv, rc, out.getvalue(), err.getvalue())


@contextlib.contextmanager
def one_torch_thread():
    """Tiny models in this process: more threads only contend on a shared machine (4x slower
    decoding measured under load)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def copy_steps(smoke_run: Path, work: Path, *steps: str) -> Path:
    """Copy finished steps (``manifest``, ``iter1/labels``, ...) of the smoke run: their outputs
    and their engine state, so the engine sees them complete in ``work``."""
    for step in steps:
        scope, _, stage = step.rpartition("/")
        shutil.copytree(smoke_run / step, work / step)
        state = Path(".pipeline") / "state" / (scope or "once") / stage
        shutil.copytree(smoke_run / state, work / state)
    return work


def noise_args(folders: dict) -> list:
    return ["noise.enabled=true", f"noise.dirs=[{','.join(folders['dirs'])}]", *CORPUS_NOISE]


def speechlike(n: int, seed: int = 0, amplitude: float = 3000) -> np.ndarray:
    """Bursts of harmonic sound with pauses (a stand-in for an utterance)."""
    rng = np.random.RandomState(seed)
    t = np.arange(n) / 16000
    envelope = (np.sin(2 * np.pi * 2.5 * t) > -0.2) * (0.5 + 0.5 * np.sin(2 * np.pi * 0.7 * t) ** 2)
    tone = sum(np.sin(2 * np.pi * f * t + rng.rand() * 6) / k for k, f in enumerate((140, 280, 420, 900), 1))
    return np.rint(amplitude * envelope * tone).astype(np.int16)


def speech_manifest(root: Path, n: int = 3, seconds: float = 2.0) -> Path:
    """``root/{valid}.tsv`` + ``.km`` + ``dict.km.txt`` over espeak-ng-free synthetic speech-like
    wavs (audio only: the video column is never read with modalities=[audio])."""
    import soundfile as sf

    (root / "audio").mkdir(parents=True, exist_ok=True)
    rows, labels = [], []
    for i in range(n):
        uid = f"spk{i % 2}/utt{i:02d}"
        frames = int(seconds * 25) + i
        wav = speechlike(frames * 640, seed=i)
        (root / "audio" / uid).parent.mkdir(parents=True, exist_ok=True)
        sf.write(str(root / "audio" / f"{uid}.wav"), wav, 16000, subtype="PCM_16")
        rows.append(f"{uid}\tvideo/{uid}.mp4\taudio/{uid}.wav\t{frames}\t{len(wav)}")
        labels.append(" ".join(str(k % 4) for k in range(frames)))
    for split in ("train", "valid"):
        (root / f"{split}.tsv").write_text(str(root) + "\n" + "\n".join(rows) + "\n")
        (root / f"{split}.km").write_text("\n".join(labels) + "\n")
    (root / "dict.km.txt").write_text("".join(f"{c} 1\n" for c in range(4)))
    return root


def noise_task(data: Path, **over):
    from omegaconf import OmegaConf

    from avhubert.task import AVHubertPretrainingConfig, AVHubertPretrainingTask

    cfg = OmegaConf.structured(AVHubertPretrainingConfig)
    base = dict(data=str(data), label_dir=str(data), labels=["km"], label_rate=25, sample_rate=25,
                normalize=False, stack_order_audio=4, pad_audio=True, random_crop=False, modalities=["audio"],
                max_sample_size=500, min_sample_size=5, max_trim_sample_size=500, image_aug=False)
    base.update(over)
    for k, v in base.items():
        cfg[k] = v
    return AVHubertPretrainingTask(cfg)


def write_audio(path: Path, samples: np.ndarray, rate: int) -> Path:
    """Float samples in [-1, 1] (n,) or (n, channels) to any format: libsndfile's by extension,
    mp3 through PyAV."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".mp3":
        import av

        mono = samples if samples.ndim == 1 else samples.mean(axis=1)
        with av.open(str(path), "w") as container:
            stream = container.add_stream("libmp3lame", rate=rate)
            stream.layout = "mono"
            frame = av.AudioFrame.from_ndarray(mono.astype(np.float32)[None], format="fltp", layout="mono")
            frame.sample_rate = rate
            for packet in stream.encode(frame):
                container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        return path
    import soundfile as sf

    sf.write(str(path), samples, rate, subtype="PCM_16")
    return path


def espeak(text: str, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["espeak-ng", "-w", str(path), text], check=True, capture_output=True)
    return path


def noise_folders(root: Path) -> dict:
    """A MUSAN-like root (music/, noise/, speech/) and a one-recording folder, made here:
    tones at 44.1 and 48 kHz (stereo), white and low-passed noise at 8 and 11.025 kHz, espeak-ng
    speech (wav at its 22.05 kHz, and mp3), a broken wav and a too-short one. Returns the
    ``noise.dirs`` entries and what each category should get."""
    rng = np.random.RandomState(0)

    def tones(seconds, rate, freqs):
        t = np.arange(int(seconds * rate)) / rate
        return np.stack([0.2 * np.sin(2 * np.pi * f * t) for f in freqs], 1)

    musan = root / "musan"
    write_audio(musan / "music" / "a" / "chord.wav", tones(12, 44100, (440, 554)), 44100)
    write_audio(musan / "music" / "b" / "fifth.wav", tones(11, 48000, (330, 495)), 48000)
    write_audio(musan / "music" / "c.flac", tones(13, 22050, (262, 392)), 22050)
    write_audio(musan / "noise" / "white.flac", rng.randn(8000 * 12) * 0.1, 8000)
    lowpassed = np.convolve(rng.randn(11025 * 14), np.ones(8) / 8, mode="same") * 0.3
    write_audio(musan / "noise" / "rumble.wav", lowpassed, 11025)
    write_audio(musan / "noise" / "hiss.wav", rng.randn(16000 * 5) * 0.05, 16000)
    write_audio(musan / "noise" / "short.wav", rng.randn(16000) * 0.1, 16000)
    (musan / "noise" / "broken.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunk, not audio")
    sentence = ("the noise stage cuts this synthetic voice into pieces of sixteen kilohertz audio, "
                "and the training mixes them into the corpus at a chosen signal to noise ratio")
    espeak(sentence, musan / "speech" / "talker.wav")
    import soundfile as sf

    voice, rate = sf.read(str(musan / "speech" / "talker.wav"))
    write_audio(musan / "speech" / "talker_mp3.mp3", voice, rate)
    hum = root / "hum_recording"
    t = np.arange(16000 * 35) / 16000
    write_audio(hum / "hum.wav", 0.1 * np.sin(2 * np.pi * 50 * t) + 0.01 * rng.randn(len(t)), 16000)
    return {"dirs": [str(musan), f"hum={hum}"], "musan": musan, "hum": hum}
