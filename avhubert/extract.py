"""Loading a pretrained AV-HuBERT checkpoint and computing its layer features.

Used by the features stage (iteration N+1 labels from iteration N's checkpoint), the units stage
and the Python API (``avhubert.load``, ``avhubert/api.py``).

    model, task_cfg = load_pretrained("checkpoint_last.pt")
    video = video_input(roi_gray, task_cfg)                  # (T, 88, 88)
    audio = audio_input(wav_int16, len(roi_gray), task_cfg)  # (T, 104)
    feats = extract_layer(model, video[None, None], audio.T[None], None, layer=9)  # (1, T, D)
"""
import os
import sys
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from . import export
from . import features as feat
from .checkpoint import fairseq_checkpoint_loading

_PLUGIN_DIR = os.path.dirname(os.path.abspath(__file__))


def ensure_plugin_registered() -> None:
    """Register the plugin with fairseq exactly as ``--user-dir <this dir>`` would (once)."""
    from fairseq import utils as fairseq_utils
    from argparse import Namespace

    fairseq_utils.import_user_module(Namespace(user_dir=_PLUGIN_DIR))


def load_pretrained(path: str, device: str = "cpu"):
    """Load the av_hubert model of a checkpoint (ours or the reference code's, also from older
    fairseq versions) in eval mode: a pretraining checkpoint as it is, a fine-tuned one
    (``av_hubert_seq2seq`` / ``av_hubert_ctc``) as its encoder (``encoder.w2v_model.*``, built from
    the pretraining config the checkpoint carries in ``model.w2v_args``; no decoder, no
    dictionary files); or the encoder of a directory written by ``launch.py export``
    (avhubert/export.py). Returns (model, task_cfg)."""
    if export.is_export(path):  # a directory written by ``launch.py export``
        return export.load_encoder(path, device)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: checkpoint not found")
    ensure_plugin_registered()
    from fairseq import checkpoint_utils

    with fairseq_checkpoint_loading():
        state = checkpoint_utils.load_checkpoint_to_cpu(path)
    # the checkpoint's user_dir is where it was trained, not here: our plugin is already registered
    cfg = state.get("cfg")
    if cfg is not None and "common" in cfg and cfg.common is not None:
        from omegaconf import open_dict
        with open_dict(cfg):
            cfg.common.user_dir = _PLUGIN_DIR
    name = cfg.model.get("_name") if cfg is not None and cfg.get("model") is not None else None
    if name in FINETUNED_MODELS:
        model = _finetuned_encoder(path, state)
        return model.to(device).eval(), cfg.task
    if name != "av_hubert":
        raise ValueError(f"{path}: model {name!r} is neither an av_hubert pretraining checkpoint nor a "
                         f"fine-tuned one ({', '.join(FINETUNED_MODELS)})")
    models, saved_cfg, task = checkpoint_utils.load_model_ensemble_and_task([path], state=state)
    model = models[0].to(device).eval()
    return model, saved_cfg.task


FINETUNED_MODELS = ("av_hubert_seq2seq", "av_hubert_ctc")


def _finetuned_encoder(path: str, state):
    model, _, _ = export.encoder_from_state(state, path)
    return model


def _cfg_get(cfg, key, default):
    value = getattr(cfg, key, None) if not isinstance(cfg, dict) else cfg.get(key)
    return default if value is None else value


def video_input(roi_gray_uint8: np.ndarray, task_cfg) -> torch.Tensor:
    """(T, H, W) uint8 mouth ROIs -> (T, crop, crop) float: /255, centre crop, (x - mean) / std."""
    if roi_gray_uint8.ndim != 3:
        raise ValueError(f"roi frames must be (T, H, W) gray, got shape {roi_gray_uint8.shape}")
    x = feat.image_transform(
        np.asarray(roi_gray_uint8), int(_cfg_get(task_cfg, "image_crop_size", 88)),
        float(_cfg_get(task_cfg, "image_mean", 0.421)), float(_cfg_get(task_cfg, "image_std", 0.165)),
        train_aug=False,
    )
    return torch.from_numpy(x)


def audio_input(wav_int16: np.ndarray, n_video_frames: int, task_cfg) -> torch.Tensor:
    """16 kHz int16 mono -> (n_video_frames, 26 * stack_order): log filterbanks stacked to 25 Hz,
    cut/zero-padded to the video length, layer-normed per frame (when task.normalize)."""
    stack = int(_cfg_get(task_cfg, "stack_order_audio", 4))
    x = feat.match_length(feat.audio_features(np.asarray(wav_int16), stack), n_video_frames)
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    if bool(_cfg_get(task_cfg, "normalize", True)):
        with torch.no_grad():
            t = F.layer_norm(t, t.shape[1:])
    return t


@torch.no_grad()
def extract_layer(model, video: Optional[torch.Tensor], audio: Optional[torch.Tensor],
                  padding_mask: Optional[torch.Tensor], layer: int) -> torch.Tensor:
    """(B, T, D) features of ``layer``, computed as the reference feature dumps do.

    video: (B, 1, T, 88, 88) or None; audio: (B, 26*stack, T) or None; padding_mask: (B, T), True at
    padded frames, or None. Layer N >= 1 is the output of transformer layer N (no final layer norm);
    a missing modality is replaced by zero front-end features (reference ``extract_finetune``).
    Layer 0 with both modalities is the projected fused front-end features
    (``extract_features(ret_conv=True)``). Layer 0 with a single modality follows the reference
    ``extract_finetune(ret_conv=True)``, which ignores ret_conv: the last layer's output after the
    final layer norm.
    """
    if video is None and audio is None:
        raise ValueError("extract_layer needs video, audio or both")
    n_layers = len(model.encoder.layers)
    if not 0 <= layer <= n_layers:
        raise ValueError(f"layer {layer} out of range 0..{n_layers}")
    device = next(model.parameters()).device
    source = {"video": None if video is None else video.to(device),
              "audio": None if audio is None else audio.to(device)}
    if padding_mask is not None:
        padding_mask = padding_mask.to(device)
    if layer == 0 and video is not None and audio is not None:
        out, _ = model.extract_features(source, padding_mask=padding_mask, mask=False, ret_conv=True)
    elif layer == 0:
        out, _ = model.extract_finetune(source, padding_mask=padding_mask, mask=False, ret_conv=True)
    else:
        out, _ = model.extract_finetune(source, padding_mask=padding_mask, mask=False, output_layer=layer)
    return out
