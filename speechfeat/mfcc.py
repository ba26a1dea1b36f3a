"""Iteration-1 features: 13 Kaldi MFCCs + deltas + delta-deltas (39-d, 100 Hz).

Matches the reference ``dump_mfcc_feature.py`` (torchaudio.compliance.kaldi.mfcc with
``use_energy=False`` and torchaudio's defaults otherwise, then ``compute_deltas`` twice) without
torchaudio: the MFCCs come from kaldi-native-fbank with its options set to torchaudio's defaults
(dither 0 in particular; knf's default dither is not 0) and the deltas are computed here the way
torchaudio does (window 5, replicate padding at the clip edges).
"""
from __future__ import annotations

import numpy as np

SAMPLE_RATE = 16_000
FRAME_LENGTH = 400  # 25 ms at 16 kHz
FRAME_SHIFT = 160  # 10 ms
FEATURE_RATE = 100  # frames per second
DIM = 39


def n_mfcc_frames(n_samples: int) -> int:
    """Frames Kaldi makes of ``n_samples`` with snip_edges (the torchaudio default)."""
    if n_samples < FRAME_LENGTH:
        return 0
    return 1 + (int(n_samples) - FRAME_LENGTH) // FRAME_SHIFT


def _options():
    import kaldi_native_fbank as knf

    opts = knf.MfccOptions()
    fo = opts.frame_opts
    fo.samp_freq = SAMPLE_RATE
    fo.frame_shift_ms = 10.0
    fo.frame_length_ms = 25.0
    fo.dither = 0.0  # torchaudio's default; knf defaults to a small dither (not reproducible)
    fo.preemph_coeff = 0.97
    fo.remove_dc_offset = True
    fo.window_type = "povey"
    fo.round_to_power_of_two = True
    fo.snip_edges = True
    opts.mel_opts.num_bins = 23
    opts.mel_opts.low_freq = 20.0
    opts.mel_opts.high_freq = 0.0
    opts.num_ceps = 13
    opts.use_energy = False
    opts.raw_energy = True
    opts.cepstral_lifter = 22.0
    return opts


def kaldi_mfcc(wav: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """(n,) mono samples -> float32 (T, 13). int16 input is scaled to [-1, 1] first, as the
    reference reads audio with soundfile's float default."""
    import kaldi_native_fbank as knf

    if sample_rate != SAMPLE_RATE:
        raise ValueError(f"MFCC features need {SAMPLE_RATE} Hz audio, got {sample_rate} Hz")
    wav = np.asarray(wav)
    if wav.ndim != 1:
        raise ValueError(f"MFCC features need mono audio, got shape {wav.shape}")
    if wav.dtype == np.int16:
        x = wav.astype(np.float32) / 32768.0
    else:
        x = wav.astype(np.float32)
    n = n_mfcc_frames(len(x))
    if n == 0:
        return np.zeros((0, 13), dtype=np.float32)
    mfcc = knf.OnlineMfcc(_options())
    mfcc.accept_waveform(SAMPLE_RATE, x)
    mfcc.input_finished()
    if mfcc.num_frames_ready != n:  # would mean the options above are not snip_edges framing
        raise RuntimeError(f"kaldi-native-fbank made {mfcc.num_frames_ready} frames of {len(x)} samples, expected {n}")
    return np.asarray([mfcc.get_frame(i) for i in range(n)], dtype=np.float32).reshape(n, 13)


def deltas(feats: np.ndarray, win_length: int = 5) -> np.ndarray:
    """Time derivative of (T, F) features as torchaudio.functional.compute_deltas computes it
    along time: sum_k k * x[t + k] / (2 * sum_k k^2), k in -n..n, edges replicated."""
    if win_length < 3:
        raise ValueError("win_length must be at least 3")
    n = (win_length - 1) // 2
    denom = n * (n + 1) * (2 * n + 1) / 3
    x = np.asarray(feats, dtype=np.float32)
    if len(x) == 0:
        return x.copy()
    padded = np.concatenate([np.repeat(x[:1], n, axis=0), x, np.repeat(x[-1:], n, axis=0)], axis=0)
    t = len(x)
    out = np.zeros_like(x)
    for k in range(1, n + 1):
        out += k * (padded[n + k:n + k + t] - padded[n - k:n - k + t])
    return (out / denom).astype(np.float32)


def mfcc39(wav: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """(n,) audio -> float32 (T, 39) = [mfcc, delta, delta-delta] at 100 Hz."""
    m = kaldi_mfcc(wav, sample_rate)
    d = deltas(m)
    dd = deltas(d)
    return np.ascontiguousarray(np.concatenate([m, d, dd], axis=1), dtype=np.float32)
