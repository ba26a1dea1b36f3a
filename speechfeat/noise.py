"""Noise for noise-robust training and evaluation: reading any audio file as 16 kHz mono,
loudness normalisation, babble made of corpus utterances, pieces of long recordings, and the
seeded train/valid/test assignment of noise sources. Pure functions (no pipeline state); the
noise stage (``stages/noise.py``) plans and writes with them. Mixing speech and noise at a given
SNR is ``avhubert.features.mix_noise`` (the dataset and decoding use it).

Loudness here is a gated RMS level in dB relative to int16 full scale: 400 ms blocks with 75 %
overlap, blocks below -70 dBFS dropped, then blocks more than 10 dB below the mean of the rest
dropped (the block and gating scheme of ITU-R BS.1770, without its K-weighting filter), so the
pauses of an utterance do not make it louder after normalisation.
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

SAMPLE_RATE = 16_000
INT16_FULL_SCALE = 32768.0
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".m4a", ".aac", ".aif", ".aiff", ".wma")

_BLOCK_S, _HOP_S = 0.4, 0.1
_ABSOLUTE_GATE_DB, _RELATIVE_GATE_DB = -70.0, -10.0


class AudioError(ValueError):
    """An audio file cannot be used as noise; the message names the file and the reason."""


# ------------------------------------------------------------------------------------ reading


def read_audio(path) -> Tuple[np.ndarray, int]:
    """(samples float64 (n, channels) in int16 units, sample rate) of any audio file: libsndfile
    formats through soundfile, everything else (mp3, m4a, ...) through PyAV."""
    import soundfile as sf

    path = Path(path)
    try:
        data, sr = sf.read(str(path), dtype="float64", always_2d=True)
        return data * INT16_FULL_SCALE, int(sr)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as sf_error:
        if path.suffix.lower() in (".wav", ".flac", ".aif", ".aiff"):  # libsndfile's own formats
            raise AudioError(f"{path}: cannot be decoded ({sf_error})") from None
    return _read_with_pyav(path)


def _read_with_pyav(path: Path) -> Tuple[np.ndarray, int]:
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise AudioError(f"{path}: no audio stream")
            stream = container.streams.audio[0]
            chunks, sr = [], None
            for frame in container.decode(stream):
                sr = sr or frame.sample_rate
                array = frame.to_ndarray()
                if frame.format.is_planar:  # (channels, n) -> (n, channels)
                    array = array.T
                else:  # packed: (1, n * channels)
                    array = array.reshape(-1, len(frame.layout.channels))
                chunks.append(_to_float_int16_units(array))
    except AudioError:
        raise
    except Exception as e:  # PyAV raises many error types for broken files
        raise AudioError(f"{path}: cannot be decoded ({type(e).__name__}: {e})") from None
    if not chunks:
        raise AudioError(f"{path}: no audio samples")
    return np.concatenate(chunks), int(sr)


def _to_float_int16_units(array: np.ndarray) -> np.ndarray:
    if np.issubdtype(array.dtype, np.floating):
        return array.astype(np.float64) * INT16_FULL_SCALE
    info = np.iinfo(array.dtype)
    return array.astype(np.float64) * (INT16_FULL_SCALE / (info.max + 1))


def to_mono(samples: np.ndarray) -> np.ndarray:
    """(n, channels) or (n,) -> (n,): the mean of the channels."""
    return samples if samples.ndim == 1 else samples.mean(axis=1)


def resample(samples: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    """Polyphase resampling (scipy's ``resample_poly``, Kaiser window) of a mono signal."""
    if rate == target:
        return samples
    from scipy.signal import resample_poly

    g = math.gcd(int(rate), int(target))
    return resample_poly(samples, target // g, rate // g)


def load_mono_16k(path) -> np.ndarray:
    """Any audio file as float64 16 kHz mono samples in int16 units."""
    samples, rate = read_audio(path)
    if samples.size == 0:
        raise AudioError(f"{path}: no audio samples")
    mono = resample(to_mono(samples), rate)
    if not np.all(np.isfinite(mono)):
        raise AudioError(f"{path}: non-finite samples")
    return mono


def to_int16(samples: np.ndarray) -> np.ndarray:
    """Round to int16; a signal that would clip is scaled down as a whole (its shape is kept)."""
    peak = float(np.max(np.abs(samples))) if samples.size else 0.0
    if peak > 32767.0:
        samples = samples * (32767.0 / peak)
    return np.rint(samples).astype(np.int16)


# ------------------------------------------------------------------------------------ loudness


def loudness_db(samples: np.ndarray, rate: int = SAMPLE_RATE) -> float:
    """Gated RMS level in dBFS (see the module docstring); -inf for silence."""
    x = np.asarray(samples, dtype=np.float64) / INT16_FULL_SCALE
    block, hop = int(_BLOCK_S * rate), int(_HOP_S * rate)
    if len(x) <= block:
        powers = np.array([np.mean(x * x)]) if len(x) else np.zeros(1)
    else:
        n_blocks = 1 + (len(x) - block) // hop
        csum = np.concatenate([[0.0], np.cumsum(x * x)])
        starts = np.arange(n_blocks) * hop
        powers = (csum[starts + block] - csum[starts]) / block
    with np.errstate(divide="ignore"):
        levels = 10 * np.log10(powers)
    kept = powers[levels > _ABSOLUTE_GATE_DB]
    if kept.size == 0:
        return float("-inf")
    relative_gate = 10 * np.log10(kept.mean()) + _RELATIVE_GATE_DB
    kept = kept[10 * np.log10(kept) > relative_gate]
    return float(10 * np.log10(kept.mean()))


def normalise_loudness(samples: np.ndarray, target_db: float) -> np.ndarray:
    """``samples`` scaled to ``target_db`` gated loudness (silence is returned unchanged)."""
    level = loudness_db(samples)
    if not math.isfinite(level):
        return np.asarray(samples, dtype=np.float64)
    return np.asarray(samples, dtype=np.float64) * 10 ** ((target_db - level) / 20)


# ------------------------------------------------------------------------------------ babble


def plan_talker_streams(rng: np.random.RandomState, durations: np.ndarray, talkers: int, length: int,
                        usable: Optional[np.ndarray] = None) -> List[List[int]]:
    """For each of ``talkers`` streams, the indices (into ``durations``, samples per utterance)
    of the utterances that follow one another to fill ``length`` samples: every talker speaks the
    whole clip, so an N-talker babble has N voices at every instant. Utterances are distinct within
    the clip while the pool lasts. ``usable`` (the indices with audio, precomputed by a caller
    planning many clips) keeps the cost of a clip independent of the pool's size."""
    if talkers < 1 or length < 1:
        raise ValueError(f"talkers ({talkers}) and length ({length}) must be positive")
    durations = np.asarray(durations)
    usable = np.flatnonzero(durations > 0) if usable is None else usable
    if len(usable) == 0:
        raise ValueError("no utterance with audio to make babble from")
    used: set = set()
    streams = []
    for _ in range(talkers):
        stream, filled = [], 0
        while filled < length:
            if len(used) == len(usable):
                used.clear()
            index = int(usable[rng.randint(0, len(usable))])
            while index in used:
                index = int(usable[rng.randint(0, len(usable))])
            used.add(index)
            stream.append(index)
            filled += int(durations[index])
        streams.append(stream)
    return streams


def talker_stream(utterances: Sequence[np.ndarray], length: int, level_db: float,
                  offset: int = 0) -> np.ndarray:
    """One talker: the utterances, each normalised to ``level_db``, one after the other, starting
    ``offset`` samples into the first one (so talkers do not all start with an utterance onset),
    cut to ``length`` (zero-padded when they are too short)."""
    pieces = [normalise_loudness(u, level_db) for u in utterances]
    joined = np.concatenate(pieces)[offset:] if pieces else np.zeros(0)
    out = np.zeros(length, dtype=np.float64)
    out[: min(length, len(joined))] = joined[:length]
    return out


def babble(streams: Sequence[np.ndarray], level_db: float) -> np.ndarray:
    """The sum of equally loud talker streams, normalised to ``level_db``, as int16."""
    mixed = np.sum(np.stack(streams), axis=0)
    return to_int16(normalise_loudness(mixed, level_db))


# ------------------------------------------------------------------------------------ pieces and splits


def cut_pieces(n_samples: int, piece: int, min_piece: int) -> List[Tuple[int, int]]:
    """(start, stop) of consecutive ``piece``-sample pieces of a recording; the last, shorter one
    is kept when it has at least ``min_piece`` samples (the reference: 10 s pieces, 3 s minimum)."""
    bounds = []
    for start in range(0, n_samples, piece):
        stop = min(start + piece, n_samples)
        if stop - start >= min_piece:
            bounds.append((start, stop))
    return bounds


def seeded_unit(seed: int, *keys: str) -> float:
    """A number in [0, 1) fixed by ``seed`` and ``keys`` (sha256: the same on every machine and
    Python version, unlike ``hash``)."""
    digest = hashlib.sha256("\x1f".join([str(seed), *map(str, keys)]).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def split_counts(n: int, valid_fraction: float, test_fraction: float) -> Tuple[int, int, int]:
    """(train, valid, test) counts of ``n`` units: rounded fractions, at least one valid and one
    test unit when the fraction is positive and there are at least three units."""
    n_valid = round(valid_fraction * n)
    n_test = round(test_fraction * n)
    if n >= 3:
        n_valid = max(n_valid, 1 if valid_fraction > 0 else 0)
        n_test = max(n_test, 1 if test_fraction > 0 else 0)
    n_valid = min(n_valid, n)
    n_test = min(n_test, n - n_valid)
    return n - n_valid - n_test, n_valid, n_test


def assign_splits(keys: Sequence[str], seed: int, valid_fraction: float, test_fraction: float,
                  salt: str = "") -> dict:
    """``{key: split}``: the keys ordered by ``seeded_unit(seed, salt, key)``, the first
    ``split_counts`` valid, the next test, the rest train. The rule depends only on the keys and
    the seed, not on listing order."""
    ordered = sorted(keys, key=lambda k: (seeded_unit(seed, salt, k), k))
    _, n_valid, n_test = split_counts(len(ordered), valid_fraction, test_fraction)
    out = {}
    for i, key in enumerate(ordered):
        out[key] = "valid" if i < n_valid else "test" if i < n_valid + n_test else "train"
    return out
