from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from feat_helpers import golden


def test_mfcc39_matches_reference():
    from speechfeat.mfcc import mfcc39

    ref = np.load(golden("ref_mfcc.npz"))
    ours = mfcc39(ref["wav"])
    assert ours.shape == ref["mfcc39"].shape == (570, 39)
    assert ours.dtype == np.float32
    assert np.abs(ours - ref["mfcc39"]).max() < 1e-3


def test_no_torchaudio_imported():
    import speechfeat.mfcc  # noqa: F401
    import stages.features  # noqa: F401

    assert "torchaudio" not in sys.modules


def test_deltas_torchaudio_formula_with_replicate_edges():
    from speechfeat.mfcc import deltas

    x = np.random.default_rng(0).normal(size=(9, 3)).astype(np.float32)
    idx = lambda t: min(max(t, 0), len(x) - 1)  # noqa: E731
    expect = np.stack([sum(k * x[idx(t + k)] for k in (-2, -1, 1, 2)) / 10 for t in range(len(x))])
    assert np.allclose(deltas(x), expect, atol=1e-6)
    assert deltas(np.zeros((0, 3), np.float32)).shape == (0, 3)


def test_mfcc_frame_count_and_short_audio():
    from speechfeat.mfcc import mfcc39, n_mfcc_frames

    assert n_mfcc_frames(399) == 0 and n_mfcc_frames(400) == 1 and n_mfcc_frames(16000) == 98
    assert mfcc39(np.zeros(100, np.int16)).shape == (0, 39)
    assert mfcc39(np.ones(16000, np.int16)).shape == (98, 39)
    with pytest.raises(ValueError, match="16000 Hz"):
        mfcc39(np.zeros(16000, np.int16), sample_rate=8000)


def test_shard_writer_streams_and_renames(tmp_path):
    from speechfeat.shards import ShardWriter, iter_utterances, open_shard, shard_range

    utts = [np.random.default_rng(i).normal(size=(n, 5)).astype(np.float32) for i, n in enumerate([3, 0, 4])]
    with ShardWriter(tmp_path / "s.npy", tmp_path / "s.len", 5) as w:
        for u in utts:
            w.append(u)
        assert not (tmp_path / "s.npy").exists()  # only the temporary exists while writing
    feats, lengths = open_shard(tmp_path / "s.npy", tmp_path / "s.len")
    assert isinstance(feats, np.memmap) and feats.shape == (7, 5)
    assert lengths.tolist() == [3, 0, 4]
    for got, want in zip(iter_utterances(feats, lengths), utts):
        assert np.array_equal(got, want)
    assert np.array_equal(np.load(tmp_path / "s.npy"), np.concatenate(utts))
    # a failure while writing leaves nothing behind
    with pytest.raises(ValueError):
        with ShardWriter(tmp_path / "t.npy", tmp_path / "t.len", 5) as w:
            w.append(np.zeros((2, 5)))
            w.append(np.zeros((2, 4)))
    assert sorted(os.listdir(tmp_path)) == ["s.len", "s.npy"]
    # contiguous shards cover every row once, in order
    ranges = [shard_range(10, r, 3) for r in range(3)]
    assert ranges == [(0, 3), (3, 6), (6, 10)]
