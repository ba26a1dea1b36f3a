"""The noise domain code without the pipeline: SNR mixing, loudness, resampling, babble planning,
pieces and seeded splits (speechfeat/noise.py, avhubert/features.py), and the dataset's noise
draws (per-utterance seeding, categories, an utterance never mixed with its own talker)."""
from __future__ import annotations

import numpy as np
import pytest

from avhubert import features as feat
from noise_helpers import speechlike
from speechfeat import noise as nz


def measured_snr(clean: np.ndarray, mixed: np.ndarray, scale: float = 1.0) -> float:
    clean = clean.astype(np.float64) * scale
    added = mixed.astype(np.float64) - clean
    return 10 * np.log10(np.sum(clean ** 2) / np.sum(added ** 2))


@pytest.mark.parametrize("snr", [-5.0, 0.0, 5.0, 12.5])
def test_mix_at_snr_is_exact(snr):
    clean = speechlike(40000)
    noise = (np.random.RandomState(1).randn(9000) * 2000).astype(np.int16)  # shorter: read cyclically
    mixed = feat.mix_noise(clean, noise, snr, offset=4321)
    assert mixed.dtype == np.int16 and len(mixed) == len(clean)
    assert abs(measured_snr(clean, mixed) - snr) < 0.1
    # the offset is where the noise starts: the added signal is the noise read from there
    gain = feat.noise_gain(clean, feat.fit_noise(noise.astype(np.float64), len(clean), 4321), snr)
    expected = np.rint(clean + gain * noise[(np.arange(len(clean)) + 4321) % len(noise)])
    assert np.abs(mixed - expected).max() <= 1


def test_mix_that_would_clip_is_scaled_as_a_whole():
    clean = speechlike(32000, amplitude=30000)
    noise = (np.random.RandomState(2).randn(32000) * 8000).astype(np.int16)
    mixed = feat.mix_noise(clean, noise, -5.0)
    assert np.abs(mixed.astype(np.int64)).max() >= 32766  # scaled to full scale, not clipped
    # speech and noise were scaled alike: regress the mixture on the speech and on the noise
    # (read cyclically from offset 0): both coefficients share the scale, the SNR is the requested one
    speech, heard = clean.astype(np.float64), feat.fit_noise(noise.astype(np.float64), len(clean))
    (a, b), residual, *_ = np.linalg.lstsq(np.stack([speech, heard], 1), mixed.astype(np.float64), rcond=None)
    assert 0.1 < a < 0.6  # well below 1: it was scaled down
    assert np.sqrt(residual[0] / len(clean)) < 0.6  # rounding only
    snr = 20 * np.log10(a * np.sqrt(np.mean(speech ** 2)) / (b * np.sqrt(np.mean(heard ** 2))))
    assert abs(snr + 5.0) < 0.1


def test_gated_loudness_ignores_pauses_and_normalises():
    loud = speechlike(32000)
    with_pause = np.concatenate([loud, np.zeros(64000, dtype=np.int16)])
    # 2 s of silence after 1 s of sound: plain RMS drops by 4.8 dB, the gated level by a fraction
    # (only the blocks straddling the edge)
    assert abs(nz.loudness_db(loud) - nz.loudness_db(with_pause)) < 0.5
    out = nz.normalise_loudness(with_pause, -30.0)
    assert abs(nz.loudness_db(out) + 30.0) < 1e-6
    assert nz.loudness_db(np.zeros(16000)) == float("-inf")
    assert np.array_equal(nz.normalise_loudness(np.zeros(100), -20), np.zeros(100))


def test_resample_and_mono():
    rate = 44100
    t = np.arange(int(rate * 1.5)) / rate
    stereo = np.stack([np.sin(2 * np.pi * 1000 * t), np.sin(2 * np.pi * 1000 * t + 0.1)], 1) * 10000
    mono = nz.resample(nz.to_mono(stereo), rate)
    assert len(mono) == 24000
    spectrum = np.abs(np.fft.rfft(mono * np.hanning(len(mono))))
    assert abs(np.argmax(spectrum) * 16000 / len(mono) - 1000) < 2
    assert nz.resample(mono, 16000) is mono


def test_to_int16_rounds_and_never_wraps():
    assert nz.to_int16(np.array([1.4, -1.6, 2.5])).tolist() == [1, -2, 2]
    big = nz.to_int16(np.array([0.0, 50000.0, -25000.0]))
    assert big.tolist() == [0, 32767, -16384]


def test_talker_streams_fill_the_clip_with_distinct_utterances():
    rng = np.random.RandomState(0)
    durations = [16000, 8000, 0, 24000, 12000, 4000, 30000]
    streams = nz.plan_talker_streams(rng, durations, talkers=3, length=20000)
    assert len(streams) == 3
    for stream in streams:
        assert sum(durations[i] for i in stream) >= 20000
        assert sum(durations[i] for i in stream[:-1]) < 20000  # no utterance more than needed
        assert 2 not in stream  # empty utterances are never drawn
    drawn = [i for s in streams for i in s]
    assert len(drawn) == len(set(drawn)) or len(set(drawn)) == 6  # distinct while the pool lasts
    again = nz.plan_talker_streams(np.random.RandomState(0), durations, talkers=3, length=20000)
    assert again == streams


def test_babble_is_the_normalised_sum_of_equally_loud_talkers():
    a, b = speechlike(16000, 1, amplitude=20000), speechlike(16000, 2, amplitude=500)
    streams = [nz.talker_stream([a], 12000, -30.0, offset=100), nz.talker_stream([b, b], 12000, -30.0)]
    assert abs(nz.loudness_db(streams[0]) - nz.loudness_db(streams[1])) < 0.5  # equally loud
    assert np.allclose(streams[0], nz.normalise_loudness(a, -30.0)[100:12100])
    mixed = nz.babble(streams, -25.0)
    assert mixed.dtype == np.int16 and len(mixed) == 12000
    assert abs(nz.loudness_db(mixed) + 25.0) < 0.05


def test_pieces_and_seeded_splits():
    assert nz.cut_pieces(35, 10, 3) == [(0, 10), (10, 20), (20, 30), (30, 35)]
    assert nz.cut_pieces(32, 10, 3) == [(0, 10), (10, 20), (20, 30)]
    assert nz.cut_pieces(2, 10, 3) == []
    assert nz.split_counts(10, 0.1, 0.1) == (8, 1, 1)
    assert nz.split_counts(3, 0.1, 0.1) == (1, 1, 1)  # at least one each from three units
    assert nz.split_counts(2, 0.1, 0.1) == (2, 0, 0)
    assert nz.split_counts(100, 0.1, 0.0) == (90, 10, 0)
    keys = [f"file{i:03d}.wav" for i in range(50)]
    splits = nz.assign_splits(keys, 7, 0.1, 0.1, salt="music")
    counts = {s: sum(v == s for v in splits.values()) for s in ("train", "valid", "test")}
    assert counts == {"train": 40, "valid": 5, "test": 5}
    assert nz.assign_splits(list(reversed(keys)), 7, 0.1, 0.1, salt="music") == splits  # order-free
    assert nz.assign_splits(keys, 8, 0.1, 0.1, salt="music") != splits  # the seed matters
    # a file added later moves at most one other file (quantiles shift by one rank)
    grown = nz.assign_splits(keys + ["new.wav"], 7, 0.1, 0.1, salt="music")
    assert sum(grown[k] != splits[k] for k in keys) <= 2


def _write_wav(path, samples):
    import soundfile as sf

    sf.write(str(path), samples, 16000, subtype="PCM_16")


def test_dataset_noise_draws(tmp_path, monkeypatch):
    """Noise per utterance from a seeded generator (same draw whatever the order), categories
    picked with equal probability, and no clip holding the utterance's own talker."""
    import avhubert.dataset as dataset_module
    from avhubert.dataset import talker_key
    from noise_helpers import noise_task, speech_manifest

    data = speech_manifest(tmp_path / "data")
    noise = tmp_path / "noise"
    (noise / "a").mkdir(parents=True)
    (noise / "b").mkdir()
    rng = np.random.RandomState(0)
    for name in ("a/x.wav", "a/y.wav", "b/z.wav"):
        _write_wav(noise / name, (rng.randn(20000) * 3000).astype(np.int16))
    # x holds the talker of utterance spk0/utt00 (and of others, who may get it)
    (noise / "a" / "valid.tsv").write_text("x.wav\tspk0\tspk7\ny.wav\n")
    (noise / "b" / "valid.tsv").write_text("z.wav\n")
    assert talker_key("test/spk7/00012") == "test/spk7" and talker_key("clip") == "clip"

    task = noise_task(data, noise_wav=str(noise), noise_prob=1.0, noise_snr="(-5, 5)",
                      noise_categories=["a", "b"], noise_seed=3)
    task.load_dataset("valid")
    ds = task.dataset("valid")
    first = [ds[i]["audio_source"] for i in range(len(ds))]
    again = [ds[i]["audio_source"] for i in reversed(range(len(ds)))][::-1]
    assert all(np.array_equal(u, v) for u, v in zip(first, again))
    clean = noise_task(data)
    clean.load_dataset("valid")
    assert not np.allclose(clean.dataset("valid")[0]["audio_source"], first[0])

    read = []
    real_read = dataset_module.feat.read_wav_int16
    monkeypatch.setattr(dataset_module.feat, "read_wav_int16", lambda p: (read.append(p), real_read(p))[1])
    index = next(i for i in range(len(ds)) if ds.names[i][2] == "spk0/utt00")
    for epoch in range(1, 61):
        ds.set_epoch(epoch)
        ds[index]
    picked = {name: sum(p.endswith(f"/{name}.wav") for p in read) for name in "xyz"}
    assert picked["x"] == 0  # it holds the utterance's own talker
    assert 18 <= picked["z"] <= 42 and picked["y"] + picked["z"] == 60  # categories a and b alike


def test_dataset_without_noise_for_a_category(tmp_path):
    from noise_helpers import noise_task, speech_manifest

    data = speech_manifest(tmp_path / "data")
    noise = tmp_path / "noise"
    (noise / "a").mkdir(parents=True)
    (noise / "a" / "valid.tsv").write_text("")
    task = noise_task(data, noise_wav=str(noise), noise_prob=1.0, noise_categories=["a"])
    with pytest.raises(ValueError, match="lists no wav files"):
        task.load_dataset("valid")
    missing = noise_task(data, noise_wav=str(noise), noise_prob=1.0, noise_categories=["nope"])
    with pytest.raises(FileNotFoundError, match="noise_categories"):
        missing.load_dataset("valid")
