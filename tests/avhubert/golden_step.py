"""The golden pretraining step (../shared/golden, ref_tiny_loss*.npz) done with this project's task,
model and criterion: the reference checkpoint with the README's overrides, the README's batch and
labels, then one criterion call and backward, in float32 or float64.

``masks="replay"`` draws the masks from the seed the way the golden step did
(``np.random.seed(0); torch.manual_seed(0)`` right before the criterion call); ``masks="recorded"``
injects the recorded masks (and video sources) instead, so that the objective is checked
independently of the draws. Either way the masks and front-end inputs the model used are recorded.
"""
from typing import Dict, Optional

import numpy as np
import torch

from golden_data import SHARED_GOLDEN as GOLDEN, missing_reason as golden_missing

CKPT = GOLDEN / "ref_tiny_pretrain.pt"
NPZ = {"feature": GOLDEN / "ref_tiny_loss.npz", "input": GOLDEN / "ref_tiny_loss_input_mask.npz"}

ZERO_DROPOUT = dict(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, encoder_layerdrop=0.0,
                    dropout_input=0.0, dropout_features=0.0, modality_dropout=0.0, audio_dropout=0.0)
INPUT_MASKING = dict(masking_type="input", mask_prob_image=0.3, mask_length_image=5, mask_prob_audio=0.8,
                     mask_length_audio=10, selection_type="same_seq")
LOSS_WEIGHTS = [10.0]


def missing_reason(masking: str) -> Optional[str]:
    """Why the golden step of ``masking`` cannot run here (None: its files are present)."""
    return golden_missing(CKPT.name, NPZ[masking].name)


def load_golden(masking: str) -> Dict[str, np.ndarray]:
    return dict(np.load(NPZ[masking]))


def build(masking: str, golden: Dict[str, np.ndarray], model_overrides: Optional[dict] = None):
    """(model, task, criterion) from the reference checkpoint, train mode, float32."""
    from fairseq import checkpoint_utils
    from omegaconf import open_dict

    from avhubert.checkpoint import fairseq_checkpoint_loading
    from avhubert.criterion import AVHubertCriterion
    from avhubert.extract import _PLUGIN_DIR, ensure_plugin_registered

    ensure_plugin_registered()
    with fairseq_checkpoint_loading():
        state = checkpoint_utils.load_checkpoint_to_cpu(str(CKPT))
    cfg = state["cfg"]
    overrides = dict(ZERO_DROPOUT, **(INPUT_MASKING if masking == "input" else {}), **(model_overrides or {}))
    with open_dict(cfg):
        cfg.common.user_dir = _PLUGIN_DIR
        for key, value in overrides.items():
            cfg.model[key] = value
    if masking == "input":
        # the README: the checkpoint's 64-d feature mask_emb is replaced by a 104-d audio-input one
        state["model"]["mask_emb"] = torch.from_numpy(golden["mask_emb_audio"])
    with fairseq_checkpoint_loading():
        models, _, task = checkpoint_utils.load_model_ensemble_and_task([str(CKPT)], state=state)
    model = models[0].train()
    criterion = AVHubertCriterion(task, pred_masked_weight=1.0, pred_nomask_weight=0.0,
                                  loss_weights=LOSS_WEIGHTS)
    return model, task, criterion


def batch(golden: Dict[str, np.ndarray], dtype=torch.float32) -> dict:
    """The README's 2-item batch in the collater's layouts: video (B, 1, T, H, W), audio a (B, F, T)
    transposed view of a (B, T, F) tensor (as avhubert.dataset collates it)."""
    lengths = [int(n) for n in golden["lengths"]]
    T = max(lengths)
    video_in = torch.from_numpy(golden["video_input"]).to(dtype)
    audio_in = torch.from_numpy(golden["audio_input"]).to(dtype)
    video = torch.zeros(len(lengths), 1, T, *video_in.shape[1:], dtype=dtype)
    audio = torch.zeros(len(lengths), T, audio_in.shape[1], dtype=dtype)
    for i, n in enumerate(lengths):
        video[i, 0, :n] = video_in[:n]
        audio[i, :n] = audio_in[:n]
    return {
        "id": torch.arange(len(lengths)),
        "net_input": {"source": {"audio": audio.transpose(1, 2), "video": video},
                      "padding_mask": torch.from_numpy(golden["padding_mask"])},
        "target_list": [torch.from_numpy(golden["targets_labelrate"])],
    }


def recorded_span_masks(golden: Dict[str, np.ndarray], masking: str):
    """The SpanMasks of the golden step, in the order the model asks for them."""
    from avhubert.masking import SpanMask

    def spans(tag):
        return SpanMask(golden[f"mask_indices{tag}"], golden[f"mask_span{tag}_batch"],
                        golden[f"mask_span{tag}_start"], golden[f"mask_span{tag}_end"])

    return [spans("")] if masking == "feature" else [spans("_video"), spans("_audio")]


def step(masking: str, golden: Dict[str, np.ndarray], dtype=torch.float32, masks: str = "recorded",
         model_overrides: Optional[dict] = None, backward: bool = True, monkeypatch=None):
    """One golden training step. Returns a dict: loss, sample_size, log, grads (name -> tensor),
    span_masks (what the model drew / was given), frontend_inputs (video, audio as received),
    encoder_input, logits (masked / unmasked rows) and the batch after the step."""
    import avhubert.model as model_module

    model, task, criterion = build(masking, golden, model_overrides)
    model = model.to(dtype)
    sample = batch(golden, dtype)
    out = {"span_masks": [], "frontend_inputs": {}}

    real_span_mask = model._span_mask
    recorded = recorded_span_masks(golden, masking)

    def span_mask(*args, **kwargs):
        drawn = real_span_mask(*args, **kwargs) if masks == "replay" else recorded[len(out["span_masks"])]
        out["span_masks"].append(drawn)
        return drawn

    model._span_mask = span_mask
    restore = None
    if masks == "recorded" and masking == "input":
        restore = model_module.draw_source_starts
        model_module.draw_source_starts = lambda *a, **k: golden["video_subst_start"].copy()
    elif masks != "replay" and masks != "recorded":
        raise ValueError(masks)

    def record(name):
        def hook(_module, args):
            out["frontend_inputs"][name] = args[0].detach().clone()
        return hook

    def record_encoder_input(_module, args, kwargs):
        out["encoder_input"] = args[0].detach().clone()

    hooks = [model.feature_extractor_video.register_forward_pre_hook(record("video")),
             model.feature_extractor_audio.register_forward_pre_hook(record("audio")),
             model.encoder.register_forward_pre_hook(record_encoder_input, with_kwargs=True)]
    real_logits = model.compute_logits
    model.compute_logits = lambda feats, emb: out.setdefault("logits", real_logits(feats, emb))
    try:
        np.random.seed(0)
        torch.manual_seed(0)
        with torch.set_grad_enabled(backward):
            loss, sample_size, log = criterion(model, sample)
        if backward:
            loss.backward()
    finally:
        for h in hooks:
            h.remove()
        if restore is not None:
            model_module.draw_source_starts = restore
    out.update(loss=loss.detach(), sample_size=sample_size, log=log, sample=sample, model=model)
    out["grads"] = {n: p.grad.detach().clone() for n, p in model.named_parameters()
                    if backward and p.grad is not None}
    return out
