"""Layer features from the golden reference-format checkpoint (ResNet-18 trunk, 2 layers, dim 64)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from feat_helpers import golden, make_cfg, write_gray_mp4, write_manifest, write_wav


@pytest.fixture(scope="module")
def golden_model():
    from avhubert.extract import load_pretrained

    torch.manual_seed(0)
    return load_pretrained(str(golden("ref_tiny_pretrain.pt")))


def test_extract_batched_reproduces_reference_features(golden_model):
    from avhubert.extract import extract_batched

    model, _ = golden_model
    ref = np.load(golden("ref_tiny_features.npz"))
    v, a = torch.from_numpy(ref["video_input"]), torch.from_numpy(ref["audio_input"])
    for layer in (1, 2):
        (feats,) = extract_batched(model, [(v, a)], layer, max_frames=2500, batch_frames=0)
        assert feats.shape == (120, 64)
        assert np.abs(feats - ref[f"feat_av_layer{layer}"]).max() < 1e-4
    # one padded batch of the clip and its first 80 frames = the reference's padded batch
    full, short = extract_batched(model, [(v, a), (v[:80], a[:80])], 2, max_frames=2500, batch_frames=240)
    padded = ref["feat_av_layer2_batch_padded"]
    assert np.abs(full - padded[0]).max() < 1e-4
    assert short.shape == (80, 64) and np.abs(short - padded[1, :80]).max() < 1e-4
    (audio_only,) = extract_batched(model, [(None, a)], 1, 2500, 0)
    assert np.abs(audio_only - ref["feat_audio_layer1"]).max() < 1e-4


def test_layer_stage_chunked_and_batched_on_a_tsv_corpus(golden_model, tmp_path):
    """The stage on a tiny corpus of mp4 (lossy) + wav: its chunked/batched output equals
    extract_layer on the same decoded inputs, piece by piece."""
    from avhubert.extract import audio_input, extract_layer, video_input
    from pipeline.stage import StageContext
    from speechfeat.shards import open_shard
    from avhubert.features import media_readers
    from stages.features import STAGE as FEATURES

    read_video_gray, _ = media_readers()  # the decoder the stage uses
    ref = np.load(golden("ref_tiny_features.npz"))
    roi, wav = ref["roi_gray"], ref["wav"]
    crop = tmp_path / "crop"
    clips = {"a": (roi[:50], wav[:50 * 640]), "b": (roi[50:120], wav[50 * 640:120 * 640])}
    rows = []
    for name, (r, w) in clips.items():
        write_gray_mp4(crop / "video" / f"{name}.mp4", r)
        write_wav(crop / "audio" / f"{name}.wav", w)
        rows.append((name, f"video/{name}.mp4", f"audio/{name}.wav", len(r), len(w)))
    work = tmp_path / "work"
    write_manifest(work / "manifest", "train", crop, rows)
    cfg = make_cfg([{"features": "mfcc", "layer": None, "n_clusters": 4},
                    {"features": "layer", "layer": 2, "n_clusters": 4}],
                   features={"splits": ["train"], "checkpoint": str(golden("ref_tiny_pretrain.pt")),
                             "device": "cpu", "max_frames": 40, "batch_frames": 80, "store": "all"})
    ctx = StageContext(cfg=cfg, workdir=work, iteration=2)
    FEATURES.validate(ctx)
    (shard,) = FEATURES.shards(ctx)
    stats = FEATURES.run(ctx, shard)
    assert stats["failures"] == [] and stats["dim"] == 64 and stats["frames"] == 120
    feats, lengths = open_shard(*FEATURES.outputs(ctx, shard))
    assert lengths.tolist() == [50, 70]
    model, task_cfg = golden_model
    off = 0
    for name, (_, w) in clips.items():
        decoded = read_video_gray(str(crop / "video" / f"{name}.mp4"))
        v, a = video_input(decoded, task_cfg), audio_input(w, len(decoded), task_cfg)
        for s in range(0, len(decoded), 40):  # independent 40-frame pieces
            e = min(len(decoded), s + 40)
            want = extract_layer(model, v[None, None, s:e], a[s:e].T[None], None, 2)[0].numpy()
            assert np.abs(feats[off + s:off + e] - want).max() < 1e-4
        off += len(decoded)


def test_layer_features_need_a_checkpoint(tmp_path):
    from pipeline.errors import ConfigError
    from pipeline.stage import StageContext
    from stages.features import STAGE as FEATURES, checkpoint_path

    cfg = make_cfg([{"features": "mfcc", "layer": None, "n_clusters": 4},
                    {"features": "layer", "layer": 2, "n_clusters": 4}])
    ctx = StageContext(cfg=cfg, workdir=tmp_path, iteration=2)
    assert checkpoint_path(ctx) == tmp_path / "iter1/train/checkpoints/checkpoint_final.pt"
    cfg.features.checkpoint = str(tmp_path / "missing.pt")
    with pytest.raises(ConfigError, match="missing.pt"):
        FEATURES.validate(ctx)
