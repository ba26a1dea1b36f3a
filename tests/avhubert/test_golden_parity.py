"""Parity with the reference AV-HuBERT code: checkpoint contract and layer features
(../shared/golden, written by facebookresearch/av_hubert)."""
import pickle

import numpy as np
import pytest
import torch

from golden_data import SHARED_GOLDEN as GOLDEN, needs_golden

CKPT = GOLDEN / "ref_tiny_pretrain.pt"
FEATS = GOLDEN / "ref_tiny_features.npz"

pytestmark = needs_golden("ref_tiny_pretrain.pt", "ref_tiny_features.npz")


@pytest.fixture(scope="module")
def golden():
    return dict(np.load(FEATS))


@pytest.fixture(scope="module")
def loaded():
    from avhubert.extract import load_pretrained

    return load_pretrained(str(CKPT))


def test_plain_torch_load_still_refuses_checkpoint_objects():
    # the weights_only allow-list is scoped to our loading code, not installed process-wide
    from avhubert.checkpoint import fairseq_checkpoint_loading

    with pytest.raises(pickle.UnpicklingError):
        torch.load(CKPT, map_location="cpu")
    with fairseq_checkpoint_loading():
        state = torch.load(CKPT, map_location="cpu")
    assert "model" in state and state["task_state"]["dictionaries"][0].__class__.__name__ == "Dictionary"
    with pytest.raises(pickle.UnpicklingError):
        torch.load(CKPT, map_location="cpu")


def test_nested_checkpoint_loading_blocks_keep_the_allow_list():
    # fine-tuning loads the pretraining checkpoint inside fairseq's own (allow-listed) loading
    from avhubert.checkpoint import fairseq_checkpoint_loading

    with fairseq_checkpoint_loading():
        with fairseq_checkpoint_loading():
            torch.load(CKPT, map_location="cpu")
        assert "model" in torch.load(CKPT, map_location="cpu")
    with pytest.raises(pickle.UnpicklingError):
        torch.load(CKPT, map_location="cpu")


def test_load_model_ensemble_and_task_without_renames():
    from fairseq import checkpoint_utils

    from avhubert.checkpoint import fairseq_checkpoint_loading
    from avhubert.extract import ensure_plugin_registered
    from avhubert.model import AVHubertModel

    ensure_plugin_registered()
    with fairseq_checkpoint_loading():
        raw = torch.load(CKPT, map_location="cpu")
        # an "older fairseq" checkpoint: the encoder compat keys are absent from its config
        for key in ("layer_type", "checkpoint_activations", "required_seq_len_multiple"):
            assert key not in raw["cfg"]["model"]
        models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([str(CKPT)], strict=True)
    model = models[0]
    assert isinstance(model, AVHubertModel)
    assert set(model.state_dict()) == set(raw["model"])
    for name, value in raw["model"].items():
        assert torch.equal(model.state_dict()[name], value), name
    assert list(model.cfg.resnet_layers) == [2, 2, 2, 2]  # default = ResNet-18 for checkpoints without the key
    assert task.dictionaries[0].symbols == raw["task_state"]["dictionaries"][0].symbols


def test_inputs_from_roi_and_wav(golden, loaded):
    from avhubert.extract import audio_input, video_input

    _, task_cfg = loaded
    v = video_input(golden["roi_gray"], task_cfg)
    a = audio_input(golden["wav"], len(golden["roi_gray"]), task_cfg)
    assert v.shape == (120, 88, 88) and a.shape == (120, 104)
    assert np.abs(v.numpy() - golden["video_input"]).max() < 1e-5
    assert np.abs(a.numpy() - golden["audio_input"]).max() < 1e-4


@pytest.mark.parametrize("mode", ["av", "audio", "video"])
def test_layer_features(golden, loaded, mode):
    from avhubert.extract import extract_layer

    model, _ = loaded
    video = torch.from_numpy(golden["video_input"])[None, None] if mode != "audio" else None
    audio = torch.from_numpy(golden["audio_input"]).T[None] if mode != "video" else None
    for layer in (0, 1, 2):
        out = extract_layer(model, video, audio, None, layer)
        assert out.shape == (1, 120, 64)
        diff = np.abs(out[0].numpy() - golden[f"feat_{mode}_layer{layer}"]).max()
        assert diff < 1e-4, f"{mode} layer {layer}: max abs diff {diff}"


def test_padded_batch(golden, loaded):
    from avhubert.extract import extract_layer

    model, _ = loaded
    pad = torch.from_numpy(golden["padding_mask"])
    n_valid = int((~pad[1]).sum())
    assert n_valid == 80 and not pad[0].any()
    video = torch.zeros(2, 1, 120, 88, 88)
    audio = torch.zeros(2, 104, 120)
    video[:, 0, :] = torch.from_numpy(golden["video_input"])
    audio[:] = torch.from_numpy(golden["audio_input"]).T
    video[1, :, n_valid:] = 0
    audio[1, :, n_valid:] = 0
    out = extract_layer(model, video, audio, pad, 2).numpy()
    ref = golden["feat_av_layer2_batch_padded"]
    assert np.abs(out[:, :n_valid] - ref[:, :n_valid]).max() < 1e-4
    assert np.abs(out[0] - ref[0]).max() < 1e-4
    # padding must matter: the short item's valid frames differ from the unpadded run
    assert np.abs(out[1, :n_valid] - out[0, :n_valid]).max() > 1e-3
