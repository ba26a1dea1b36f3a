"""Model inputs from decoded media, shared by the dataset and by feature extraction.

Video: gray ROI frames (T, 96, 96) uint8 -> /255 -> crop 88 -> (x - mean) / std.
Audio: 16 kHz int16 -> python_speech_features.logfbank (26 bins, 10 ms hop) -> stack
``stack_order`` consecutive frames (zero-padded to a multiple) -> 25 Hz vectors of 26*stack_order.
"""
import os
from typing import Optional, Tuple

import numpy as np
from python_speech_features import logfbank

AUDIO_SAMPLE_RATE = 16_000


def crop_frames(frames: np.ndarray, size: int, top: Optional[int] = None,
                left: Optional[int] = None) -> np.ndarray:
    """Crop (T, H, W) to (T, size, size); centred unless top/left given."""
    t, h, w = frames.shape[:3]
    if h < size or w < size:
        raise ValueError(f"frames of {h}x{w} are smaller than the crop size {size}")
    if top is None:
        top = int(round(h - size) / 2.0)
    if left is None:
        left = int(round(w - size) / 2.0)
    return frames[:, top:top + size, left:left + size]


def image_transform(frames_uint8: np.ndarray, crop_size: int, mean: float, std: float,
                    train_aug: bool = False, rng: Optional[np.random.RandomState] = None) -> np.ndarray:
    """(T, H, W) uint8 -> float32 (T, crop, crop). Training: random crop and a horizontal flip with
    probability 0.5; evaluation: centre crop. Computed in float64, as the reference does."""
    rng = rng if rng is not None else np.random
    x = frames_uint8.astype(np.float64) / 255.0
    if train_aug:
        h, w = x.shape[1:3]
        top = int(rng.randint(0, h - crop_size + 1))
        left = int(rng.randint(0, w - crop_size + 1))
        x = crop_frames(x, crop_size, top, left)
        if rng.random_sample() < 0.5:
            x = x[:, :, ::-1]
    else:
        x = crop_frames(x, crop_size)
    return ((x - mean) / std).astype(np.float32)


def stack_frames(feats: np.ndarray, stack_order: int) -> np.ndarray:
    """(T, F) -> (ceil(T / k), F * k): k consecutive frames side by side, zero-padded at the end."""
    n, dim = feats.shape
    rem = (-n) % stack_order
    if rem:
        feats = np.concatenate([feats, np.zeros((rem, dim), dtype=feats.dtype)], axis=0)
    return feats.reshape(-1, stack_order * dim)


def audio_features(wav: np.ndarray, stack_order: int = 4, sample_rate: int = AUDIO_SAMPLE_RATE) -> np.ndarray:
    """int16 (or int-valued float) mono samples -> float32 (T_25Hz, 26 * stack_order)."""
    if wav.ndim != 1:
        raise ValueError(f"audio must be mono, got shape {wav.shape}")
    if sample_rate != AUDIO_SAMPLE_RATE:
        raise ValueError(f"audio must be {AUDIO_SAMPLE_RATE} Hz, got {sample_rate}")
    fbank = logfbank(wav, samplerate=sample_rate).astype(np.float32)
    return stack_frames(fbank, stack_order)


def match_length(audio_feats: np.ndarray, n_frames: int) -> np.ndarray:
    """Cut or zero-pad stacked audio features to the number of video frames."""
    diff = len(audio_feats) - n_frames
    if diff < 0:
        pad = np.zeros((-diff, audio_feats.shape[1]), dtype=audio_feats.dtype)
        return np.concatenate([audio_feats, pad], axis=0)
    return audio_feats[:n_frames] if diff > 0 else audio_feats


def noise_gain(clean: np.ndarray, noise: np.ndarray, snr_db: float) -> float:
    """The factor that brings ``noise`` (already cut to the clean length) to ``snr_db`` below
    ``clean``: clean power / (gain^2 x noise power) = 10^(snr/10). 0 for silent noise."""
    clean_rms = np.sqrt(np.mean(np.square(clean, dtype=np.float64)))
    noise_rms = np.sqrt(np.mean(np.square(noise, dtype=np.float64)))
    if noise_rms == 0:
        return 0.0
    return float(clean_rms / (10 ** (snr_db / 20)) / noise_rms)


def fit_noise(noise: np.ndarray, length: int, offset: int = 0) -> np.ndarray:
    """``length`` samples of ``noise`` read cyclically from ``offset`` (a short noise repeats)."""
    if len(noise) == 0:
        raise ValueError("empty noise waveform")
    index = (np.arange(length) + int(offset)) % len(noise)
    return noise[index]


def mix_noise(clean: np.ndarray, noise: np.ndarray, snr_db: float, offset: int = 0) -> np.ndarray:
    """``clean`` + ``noise`` (read cyclically from ``offset``, cut to the clean length) scaled to
    ``snr_db``, as int16. A mixture that would clip is scaled down as a whole (speech and noise
    alike, so the SNR is kept), as the reference does; samples are rounded (the reference
    truncates), so the SNR of the int16 mixture is exact to well within 0.1 dB."""
    clean = clean.astype(np.float64)
    noise = fit_noise(noise.astype(np.float64), len(clean), offset)
    mixed = clean + noise * noise_gain(clean, noise, snr_db)
    hi, lo = np.iinfo(np.int16).max, np.iinfo(np.int16).min
    if len(mixed) and (mixed.max() > hi or mixed.min() < lo):
        scale = hi / mixed.max() if mixed.max() >= abs(mixed.min()) else lo / mixed.min()
        mixed = mixed * scale
    return np.clip(np.rint(mixed), lo, hi).astype(np.int16)


def read_video_gray(path: str) -> np.ndarray:
    """Decode a video into (T, H, W) uint8 grayscale frames (OpenCV)."""
    import cv2

    if not os.path.isfile(path):  # OpenCV reads a missing file as a video without frames
        raise FileNotFoundError(f"{path}: no such video file")
    cap = cv2.VideoCapture(path)
    frames = []
    try:
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY))
    finally:
        cap.release()
    if not frames:
        raise ValueError(f"{path}: no video frames could be decoded")
    return np.stack(frames)


def read_wav_int16(path: str) -> Tuple[np.ndarray, int]:
    import soundfile as sf

    wav, sr = sf.read(path, dtype="int16", always_2d=False)
    return wav, sr


def media_readers():
    """(read_gray_video, read_wav): the crop stage's readers (``avprep.media``, the decoders of what
    the pipeline trains on) when avprep is importable, else this module's equivalents."""
    try:
        from avprep.media import read_gray_video, read_wav  # optional: the plugin also runs without avprep
    except ImportError:
        return read_video_gray, read_wav_int16
    return read_gray_video, read_wav
