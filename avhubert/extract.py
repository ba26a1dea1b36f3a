"""Loading a pretrained AV-HuBERT checkpoint and computing its layer features.

Used by the features stage (iteration N+1 labels from iteration N's checkpoint), the units stage
and the Python API (``avhubert.load``, ``avhubert/api.py``); ``extract_batched`` is the batched,
piecewise model call all three run.

    model, task_cfg = load_pretrained("checkpoint_last.pt")
    video = video_input(roi_gray, task_cfg)                  # (T, 88, 88)
    audio = audio_input(wav_int16, len(roi_gray), task_cfg)  # (T, 104)
    feats = extract_layer(model, video[None, None], audio.T[None], None, layer=9)  # (1, T, D)
"""
import os
from argparse import Namespace
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
from omegaconf import open_dict
import torch
import torch.nn.functional as F

from . import export
from . import features as feat
from .checkpoint import fairseq_checkpoint_loading

_PLUGIN_DIR = os.path.dirname(os.path.abspath(__file__))


def ensure_plugin_registered() -> None:
    """Register the plugin with fairseq exactly as ``--user-dir <this dir>`` would (once)."""
    from fairseq import utils as fairseq_utils

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


def resolve_device(device: str) -> str:
    """``auto``: cuda when torch sees a GPU, else cpu; a cuda device without a GPU is an error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"features.device={device} but torch sees no GPU")
    return device


def _pieces(n_frames: int, max_frames: int) -> List[Tuple[int, int]]:
    return [(s, min(n_frames, s + max_frames)) for s in range(0, max(n_frames, 1), max_frames)]


def extract_batched(model, inputs: Sequence[Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]],
                    layer: int, max_frames: int, batch_frames: int) -> List[np.ndarray]:
    """Layer features of several utterances. ``inputs``: per utterance (video (T, 88, 88) | None,
    audio (T, F) | None), as ``avhubert.extract.video_input`` / ``audio_input`` make them.
    Each utterance is cut into independent pieces of at most ``max_frames``; pieces are grouped
    in order into padded batches of at most ``batch_frames`` padded frames (<= max_frames: one
    piece per forward). Returns float32 (T, D) per utterance."""
    pieces = []  # (utt index, start, end)
    for i, (v, au) in enumerate(inputs):
        t = len(v) if v is not None else len(au)
        if v is not None and au is not None and len(au) != len(v):
            raise ValueError(f"utterance {i}: {len(v)} video frames but {len(au)} audio frames")
        pieces += [(i, s, e) for s, e in _pieces(t, max_frames)]
    outs: List[List[np.ndarray]] = [[] for _ in inputs]
    budget = max(batch_frames, max_frames)
    j = 0
    while j < len(pieces):
        batch = [pieces[j]]
        while j + len(batch) < len(pieces):
            nxt = pieces[j + len(batch)]
            longest = max(e - s for _, s, e in batch + [nxt])
            if longest * (len(batch) + 1) > budget:
                break
            batch.append(nxt)
        j += len(batch)
        t_max = max(e - s for _, s, e in batch)
        has_v, has_a = inputs[batch[0][0]][0] is not None, inputs[batch[0][0]][1] is not None
        video = audio = mask = None
        if has_v:
            v0 = inputs[batch[0][0]][0]
            video = v0.new_zeros((len(batch), 1, t_max) + tuple(v0.shape[1:]))
        if has_a:
            a0 = inputs[batch[0][0]][1]
            audio = a0.new_zeros((len(batch), a0.shape[1], t_max))
        if len(batch) > 1:
            mask = torch.zeros((len(batch), t_max), dtype=torch.bool)
        for b, (i, s, e) in enumerate(batch):
            v, au = inputs[i]
            if has_v:
                video[b, 0, : e - s] = v[s:e]
            if has_a:
                audio[b, :, : e - s] = au[s:e].T
            if mask is not None:
                mask[b, e - s:] = True
        feats = extract_layer(model, video, audio, mask, layer).float().cpu().numpy()
        for b, (i, s, e) in enumerate(batch):
            outs[i].append(feats[b, : e - s])
    result = []
    for i, parts in enumerate(outs):
        result.append(np.ascontiguousarray(np.concatenate(parts, axis=0), dtype=np.float32))
    return result


def auto_batch_frames(device: str) -> int:
    """``batch_frames=0`` (auto): batched on a GPU; on a CPU padding only costs time."""
    return 8000 if device.startswith("cuda") else 0


def load_layer_model(checkpoint, layer: Optional[int], device: str = "auto"):
    """(model, task_cfg, device, layer) for layer features of ``checkpoint`` (any ours/reference
    pretraining or fine-tuning checkpoint); ``layer`` None = its last transformer layer."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"{checkpoint}: checkpoint for layer features not found")
    device = resolve_device(device)
    model, task_cfg = load_pretrained(str(checkpoint), device=device)
    n_layers = len(model.encoder.layers)
    layer = n_layers if layer is None else int(layer)
    if not 0 <= layer <= n_layers:
        raise ValueError(f"layer {layer} asked but {checkpoint} has {n_layers} transformer layers")
    return model, task_cfg, device, layer


def model_dim(model) -> int:
    return int(getattr(model, "encoder_embed_dim", None) or model.encoder.layers[0].fc2.out_features)
