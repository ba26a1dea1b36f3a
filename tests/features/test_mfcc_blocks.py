"""speechfeat.mfcc computes long audio in blocks of frames; the blocks must not change a value."""
import numpy as np


def test_blocks_and_input_types_give_the_same_features(monkeypatch):
    import speechfeat.mfcc as mfcc

    rng = np.random.default_rng(1)
    wav = (rng.normal(size=16000 * 3 + 123) * 3000).astype(np.int16)
    whole = mfcc.mfcc39(wav)
    assert whole.shape == (mfcc.n_mfcc_frames(len(wav)), 39)
    monkeypatch.setattr(mfcc, "BLOCK_FRAMES", 7)  # many blocks, the last one partial
    blocked = mfcc.mfcc39(wav)
    # (equal up to float32 rounding: BLAS sums a product in another order for another row count)
    assert np.abs(whole - blocked).max() < 1e-4
    # float input in [-1, 1] is the same audio as int16 / 32768
    assert np.allclose(mfcc.mfcc39(wav.astype(np.float32) / 32768), whole, atol=1e-5)
    # a DC offset is removed per frame: it changes nothing beyond float32 rounding
    assert np.allclose(mfcc.mfcc39(wav.astype(np.float32) / 32768 + 0.01), whole, atol=2e-3)
