"""The Python API (avhubert.load / extract / units): the golden reference-format checkpoint's
features, the features stage's features of the smoke run, a fine-tuned checkpoint's encoder."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from golden_data import SHARED_GOLDEN as GOLDEN, needs_golden as _needs

needs_golden = _needs("ref_tiny_pretrain.pt", "ref_tiny_features.npz", "speech16k.wav")


@pytest.fixture(scope="module")
def golden_model():
    import avhubert

    return avhubert.load(GOLDEN / "ref_tiny_pretrain.pt", device="cpu")


@needs_golden
def test_api_reproduces_reference_features(golden_model):
    """Arrays in (ROI frames, 16 kHz samples), the reference code's features out; the streams
    given are the modalities used. (tests/avhubert/test_golden_parity.py covers every layer of
    the model itself; here every modality goes through the API once, the video front-end being
    the slow part on a CPU.)"""
    ref = np.load(GOLDEN / "ref_tiny_features.npz")
    assert golden_model.n_layers == 2 and golden_model.dim == 64
    cases = [("av", 2, {"video": ref["roi_gray"], "audio": ref["wav"]}), ("video", 1, {"video": ref["roi_gray"]})]
    cases += [("audio", layer, {"audio": ref["wav"]}) for layer in (0, 1, 2)]
    for modalities, layer, streams in cases:
        feats = golden_model.extract(layer=layer, **streams)
        assert feats.dtype == np.float32 and feats.shape == (120, 64)
        diff = np.abs(feats - ref[f"feat_{modalities}_layer{layer}"]).max()
        assert diff < 1e-4, f"{modalities} layer {layer}: max abs diff {diff}"
    # units = the nearest of the given centroids, frame by frame: of the reference's features, up
    # to what the features' difference (< 1e-4 per value, above) can move across a boundary
    from nearest_margin import unexplained_label_changes

    feats = ref["feat_audio_layer2"]
    centroids = feats[::10]
    units = golden_model.units(audio=ref["wav"], layer=2, kmeans=centroids)
    d = ((feats[:, None, :].astype(np.float64) - centroids[None]) ** 2).sum(-1)
    assert units.dtype == np.int64 and units.shape == (120,)
    bad = unexplained_label_changes(feats, centroids, d.argmin(1), units, 1e-4 * np.sqrt(feats.shape[1]))
    assert not len(bad), f"frames {bad.tolist()}: units beyond the features' difference"
    assert units[::10].tolist() == list(range(12))  # each centroid is its own frame's nearest
    # an audio file is read as 16 kHz mono int16 (the golden wav is ref["wav"] and more)
    from avhubert.api import read_audio

    assert np.array_equal(read_audio(GOLDEN / "speech16k.wav")[: len(ref["wav"])], ref["wav"])


@needs_golden
def test_api_input_errors(golden_model):
    ref = np.load(GOLDEN / "ref_tiny_features.npz")
    with pytest.raises(ValueError, match="needs audio"):
        golden_model.extract(video=ref["roi_gray"], modalities="av")
    with pytest.raises(ValueError, match="uint8"):
        golden_model.extract(video=ref["video_input"])
    with pytest.raises(ValueError, match="layers 0..2"):
        golden_model.extract(video=ref["roi_gray"], layer=3)
    with pytest.raises(ValueError, match="centroids are 16-d"):
        golden_model.units(video=ref["roi_gray"], layer=1, kmeans=np.zeros((4, 16), np.float32))


def test_api_features_equal_the_features_stage(smoke_run, tmp_path):
    """Iteration 2's features (layer 1 of iteration 1's final checkpoint, audio-visual) of two
    train rows as the features stage computes them, and from the API: from the decoded crop
    files, and from the raw source video through the crop code."""
    import avhubert
    from speechfeat.shards import open_shard, read_tsv
    from avhubert.features import media_readers
    from stages.features import featurize_layer

    checkpoint = smoke_run / "iter1/train/checkpoints/checkpoint_final.pt"
    root, rows = read_tsv(smoke_run / "manifest/train.tsv")
    rows = [rows[0], rows[5]]
    tsv = tmp_path / "train.tsv"
    tsv.write_text("\n".join([str(root)] + ["\t".join(map(str, [r.id, r.video, r.audio, r.n_video_frames,
                                                                r.n_audio_samples])) for r in rows]) + "\n")
    featurize_layer(tsv, 0, 1, tmp_path / "f.npy", tmp_path / "f.len", checkpoint, 1, device="cpu")
    feats, lengths = open_shard(tmp_path / "f.npy", tmp_path / "f.len")
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    model = avhubert.load(checkpoint, device="cpu")
    read_video, read_wav = media_readers()
    for i, row in enumerate(rows):
        stage = feats[offsets[i]:offsets[i + 1]]
        roi, (wav, _) = read_video(str(root / row.video)), read_wav(str(root / row.audio))
        api = model.extract(video=roi, audio=wav, layer=1)
        assert api.shape == stage.shape == (row.n_video_frames, 64) and np.abs(api - stage).max() < 1e-5
    # a raw video: cropped by the crop stage's code as the corpus was (same ROI, same features)
    from tools.sample_corpus import ensure_sample_corpus

    raw = ensure_sample_corpus() / f"{rows[0].id}.mp4"
    api = model.extract(video=str(raw), layer=1, crop_dir=tmp_path / "crop")
    assert (tmp_path / "crop" / f"{raw.stem}.mp4").is_file() and (tmp_path / "crop" / f"{raw.stem}.wav").is_file()
    assert np.abs(api - feats[offsets[0]:offsets[1]]).max() < 1e-5


def test_api_loads_a_fine_tuned_checkpoint(smoke_run):
    """A fine-tuned (av_hubert_seq2seq) checkpoint gives its encoder: no decoder, no dictionary."""
    import avhubert
    from avhubert.checkpoint import load_checkpoint_to_cpu

    path = smoke_run / "finetune/checkpoints/checkpoint_final.pt"
    model = avhubert.load(path, device="cpu")
    state = load_checkpoint_to_cpu(str(path))["model"]
    own = model.model.state_dict()
    prefix = "encoder.w2v_model."
    enc = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    assert set(enc) == set(own) and all(torch.equal(own[k], v) for k, v in enc.items())
    feats = model.extract(audio=np.zeros(16000, dtype=np.int16), layer=None)  # 1 s of silence, last layer
    assert feats.shape == (25, model.dim) and np.isfinite(feats).all()
