"""The AV-HuBERT model (``av_hubert``): audio + video front ends, fusion, masking, a wav2vec2-style
transformer encoder and cosine-similarity prediction heads over cluster labels.

Config keys and parameter names follow the published AV-HuBERT checkpoints; that is what lets
``fairseq.checkpoint_utils.load_model_ensemble_and_task`` read them without renames.
"""
import copy
import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import II, MISSING, OmegaConf, open_dict
from torch import nn

from fairseq.dataclass import FairseqDataclass
from fairseq.models import BaseFairseqModel, register_model
from fairseq.models.wav2vec.wav2vec2 import TransformerEncoder
from fairseq.modules import GradMultiply, LayerNorm

from .masking import draw_source_starts, draw_span_mask, source_frames
from .resnet import ResEncoder

logger = logging.getLogger(__name__)

# Keys that fairseq's TransformerEncoder reads but which checkpoints written by older fairseq
# versions do not carry; missing ones get these values (what those versions behaved like).
ENCODER_COMPAT_DEFAULTS = {
    "layer_type": "transformer",
    "checkpoint_activations": False,
    "required_seq_len_multiple": 1,
}


@dataclass
class AVHubertConfig(FairseqDataclass):
    label_rate: int = II("task.label_rate")
    input_modality: str = field(default="image", metadata={"help": "kept for checkpoint compatibility"})
    extractor_mode: str = field(default="default", metadata={"help": "unused (wav2vec conv extractor)"})
    encoder_layers: int = field(default=12, metadata={"help": "number of transformer layers"})
    encoder_embed_dim: int = field(default=768, metadata={"help": "embedding dimension"})
    encoder_ffn_embed_dim: int = field(default=3072, metadata={"help": "FFN dimension"})
    encoder_attention_heads: int = field(default=12, metadata={"help": "attention heads"})
    activation_fn: str = field(default="gelu", metadata={"help": "FFN activation"})
    layer_type: str = field(default="transformer", metadata={"help": "fairseq encoder layer type"})
    dropout: float = field(default=0.1, metadata={"help": "dropout in the transformer"})
    attention_dropout: float = field(default=0.1, metadata={"help": "attention dropout"})
    activation_dropout: float = field(default=0.0, metadata={"help": "dropout after the FFN activation"})
    encoder_layerdrop: float = field(default=0.0, metadata={"help": "probability of dropping a layer"})
    dropout_input: float = field(default=0.0, metadata={"help": "dropout on the fused features"})
    dropout_features: float = field(default=0.0, metadata={"help": "dropout on unmasked features"})
    final_dim: int = field(default=0, metadata={"help": "projection dim of the heads (0 = embed dim)"})
    untie_final_proj: bool = field(default=False, metadata={"help": "one projection per label set"})
    layer_norm_first: bool = field(default=False, metadata={"help": "pre-LN transformer"})
    conv_feature_layers: str = field(
        default="[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2",
        metadata={"help": "unused (wav2vec conv extractor), kept for checkpoint compatibility"},
    )
    conv_bias: bool = field(default=False, metadata={"help": "unused, kept for compatibility"})
    logit_temp: float = field(default=0.1, metadata={"help": "temperature of the logits"})
    target_glu: bool = field(default=False, metadata={"help": "GLU on the label embeddings"})
    feature_grad_mult: float = field(default=1.0, metadata={"help": "gradient scale of the front ends"})
    mask_length_audio: int = field(default=10, metadata={"help": "audio mask span length"})
    mask_prob_audio: float = field(default=0.65, metadata={"help": "audio mask probability"})
    mask_length_image: int = field(default=10, metadata={"help": "video mask span length"})
    mask_prob_image: float = field(default=0.65, metadata={"help": "video mask probability"})
    mask_selection: str = field(default="static", metadata={"help": "span length distribution"})
    mask_other: float = field(default=0, metadata={"help": "secondary span length parameter"})
    no_mask_overlap: bool = field(default=False, metadata={"help": "forbid overlapping spans"})
    mask_min_space: int = field(default=1, metadata={"help": "min gap between spans (no_overlap)"})
    mask_channel_length: int = field(default=10, metadata={"help": "channel mask span length"})
    mask_channel_prob: float = field(default=0.0, metadata={"help": "channel mask probability"})
    mask_channel_selection: str = field(default="static", metadata={"help": "channel span distribution"})
    mask_channel_other: float = field(default=0, metadata={"help": "secondary channel span parameter"})
    no_mask_channel_overlap: bool = field(default=False, metadata={"help": "forbid channel overlap"})
    mask_channel_min_space: int = field(default=1, metadata={"help": "min channel gap"})
    conv_pos: int = field(default=128, metadata={"help": "positional conv kernel width"})
    conv_pos_groups: int = field(default=16, metadata={"help": "positional conv groups"})
    latent_temp: Tuple[float, float, float] = field(
        default=(2, 0.5, 0.999995), metadata={"help": "unused, kept for checkpoint compatibility"}
    )
    skip_masked: bool = field(default=False, metadata={"help": "no loss on masked frames"})
    skip_nomask: bool = field(default=False, metadata={"help": "no loss on unmasked frames"})
    checkpoint_activations: bool = field(default=False, metadata={"help": "recompute activations"})
    required_seq_len_multiple: int = field(default=1, metadata={"help": "pad T to a multiple of this"})
    resnet_relu_type: str = field(default="prelu", metadata={"help": "'prelu' or 'relu'"})
    resnet_weights: Optional[str] = field(default=None, metadata={"help": "init ResNet from this file"})
    resnet_layers: List[int] = field(
        default_factory=lambda: [2, 2, 2, 2],
        metadata={"help": "BasicBlocks per ResNet stage; [2,2,2,2] = ResNet-18 (the paper's)"},
    )
    sim_type: str = field(default="cosine", metadata={"help": "'cosine' or 'dot' logits"})
    sub_encoder_layers: int = field(default=0, metadata={"help": "per-modality transformer layers"})
    audio_feat_dim: int = field(default=-1, metadata={"help": "audio input dim (26 x stack order)"})
    modality_dropout: float = field(default=0, metadata={"help": "drop one modality with this prob"})
    audio_dropout: float = field(default=0, metadata={"help": "of those drops, drop audio with this prob"})
    modality_fuse: str = field(default="concat", metadata={"help": "'concat' or 'add'"})
    selection_type: str = field(default="same_other_seq", metadata={"help": "input masking source"})
    same_seq_within_item: bool = field(
        default=False,
        metadata={"help": "same_seq input masking: take the frames that replace a masked video run from "
                          "the item's own frames; false = the reference: from the padded batch length, so "
                          "a short item's run may be filled with padding"})
    masking_type: str = field(default="input", metadata={"help": "'input' or 'feature' masking"})
    # Decoder keys are read by the seq2seq fine-tuning model; published configs carry them.
    decoder_embed_dim: int = 768
    decoder_ffn_embed_dim: int = 3072
    decoder_layers: int = 6
    decoder_layerdrop: float = 0.0
    decoder_attention_heads: int = 4
    decoder_learned_pos: bool = False
    decoder_normalize_before: bool = False
    no_token_positional_embeddings: bool = False
    decoder_dropout: float = 0.1
    decoder_attention_dropout: float = 0.1
    decoder_activation_dropout: float = 0.0
    max_target_positions: int = 2048
    share_decoder_input_output_embed: bool = False
    no_scale_embedding: bool = True


def _with_encoder_defaults(cfg, n_layers: int):
    """A copy of ``cfg`` for fairseq's TransformerEncoder: missing compat keys filled in."""
    if OmegaConf.is_config(cfg):
        sub = copy.deepcopy(cfg)
        with open_dict(sub):
            for key, value in ENCODER_COMPAT_DEFAULTS.items():
                if key not in sub or sub[key] is None:
                    sub[key] = value
            sub.encoder_layers = n_layers
        return sub
    sub = copy.deepcopy(cfg)
    for key, value in ENCODER_COMPAT_DEFAULTS.items():
        if getattr(sub, key, None) is None:
            setattr(sub, key, value)
    sub.encoder_layers = n_layers
    return sub


class FrontEnd(nn.Module):
    """One modality's front end: optional ResNet, then a linear projection to the embed dim.

    Output is (B, D, T). (The per-modality transformer of the reference is kept as an option.)
    """

    def __init__(self, in_dim: int, cfg, resnet: Optional[nn.Module] = None):
        super().__init__()
        self.resnet = resnet
        self.proj = nn.Linear(in_dim, cfg.encoder_embed_dim)
        n_sub = int(getattr(cfg, "sub_encoder_layers", 0) or 0)
        self.encoder = TransformerEncoder(_with_encoder_defaults(cfg, n_sub)) if n_sub > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.resnet is not None:
            x = self.resnet(x)  # (B, C, T)
        x = self.proj(x.transpose(1, 2))  # (B, T, D)
        if self.encoder is not None:
            x = self.encoder(x)[0]
        return x.transpose(1, 2)


@register_model("av_hubert", dataclass=AVHubertConfig)
class AVHubertModel(BaseFairseqModel):
    def __init__(self, cfg: AVHubertConfig, task_cfg, dictionaries: List, **kwargs) -> None:
        super().__init__()
        self.cfg = cfg
        # video frames per second = task sample_rate; labels per second = label_rate
        self.feat2tar_ratio = cfg.label_rate / task_cfg.sample_rate

        resnet = ResEncoder(
            relu_type=cfg.resnet_relu_type,
            blocks_per_stage=list(getattr(cfg, "resnet_layers", None) or [2, 2, 2, 2]),
            weights=cfg.resnet_weights,
        )
        self.feature_extractor_audio = FrontEnd(cfg.audio_feat_dim, cfg)
        self.feature_extractor_video = FrontEnd(resnet.backend_out, cfg, resnet=resnet)

        self.modality_dropout, self.audio_dropout = cfg.modality_dropout, cfg.audio_dropout
        self.modality_fuse = cfg.modality_fuse
        if self.modality_fuse not in ("concat", "add"):
            raise ValueError(f"modality_fuse must be 'concat' or 'add', got {self.modality_fuse!r}")
        self.encoder_embed_dim = cfg.encoder_embed_dim
        self.embed = cfg.encoder_embed_dim * (2 if self.modality_fuse == "concat" else 1)
        self.post_extract_proj = (
            nn.Linear(self.embed, cfg.encoder_embed_dim) if self.embed != cfg.encoder_embed_dim else None
        )

        self.mask_prob_image, self.mask_prob_audio = cfg.mask_prob_image, cfg.mask_prob_audio
        self.mask_length_image, self.mask_length_audio = cfg.mask_length_image, cfg.mask_length_audio
        self.mask_selection, self.mask_other = cfg.mask_selection, cfg.mask_other
        self.no_mask_overlap, self.mask_min_space = cfg.no_mask_overlap, cfg.mask_min_space
        self.mask_channel_prob, self.mask_channel_length = cfg.mask_channel_prob, cfg.mask_channel_length
        self.mask_channel_selection = cfg.mask_channel_selection
        self.mask_channel_other = cfg.mask_channel_other
        self.no_mask_channel_overlap = cfg.no_mask_channel_overlap
        self.mask_channel_min_space = cfg.mask_channel_min_space
        self.masking_type, self.selection_type = cfg.masking_type, cfg.selection_type
        if self.masking_type not in ("input", "feature"):
            raise ValueError(f"masking_type must be 'input' or 'feature', got {self.masking_type!r}")
        self.same_seq_within_item = bool(getattr(cfg, "same_seq_within_item", False))
        if self.same_seq_within_item and (self.masking_type, self.selection_type) != ("input", "same_seq"):
            raise ValueError("same_seq_within_item only applies to masking_type 'input' with selection_type "
                             f"'same_seq' (got {self.masking_type!r}, {self.selection_type!r})")
        # Generator of the mask and modality-dropout draws (legacy numpy, the reference's calls in
        # the reference's order); None = the process-wide np.random, as in the reference. The task
        # sets one per training / validation step (masking.step_rng), so that a run's masks are a
        # function of its seed, also across a resume.
        self.mask_rng = None

        self.dropout_input = nn.Dropout(cfg.dropout_input)
        self.dropout_features = nn.Dropout(cfg.dropout_features)
        self.feature_grad_mult = cfg.feature_grad_mult
        self.logit_temp = cfg.logit_temp
        self.skip_masked, self.skip_nomask = cfg.skip_masked, cfg.skip_nomask
        self.sim_type = cfg.sim_type
        if self.sim_type not in ("cosine", "dot"):
            raise ValueError(f"sim_type must be 'cosine' or 'dot', got {self.sim_type!r}")

        final_dim = cfg.final_dim if cfg.final_dim > 0 else cfg.encoder_embed_dim
        mask_dim = cfg.audio_feat_dim if self.masking_type == "input" else cfg.encoder_embed_dim
        self.mask_emb = nn.Parameter(torch.FloatTensor(mask_dim).uniform_())

        self.encoder = TransformerEncoder(_with_encoder_defaults(cfg, cfg.encoder_layers))
        self.layer_norm = LayerNorm(self.embed)

        self.target_glu = None
        if cfg.target_glu:
            self.target_glu = nn.Sequential(nn.Linear(final_dim, final_dim * 2), nn.GLU())

        self.untie_final_proj = cfg.untie_final_proj
        n_label_sets = max(1, len(dictionaries))
        self.final_proj = nn.Linear(
            cfg.encoder_embed_dim, final_dim * (n_label_sets if self.untie_final_proj else 1)
        )

        if len(dictionaries) == 0 or any(d is None for d in dictionaries):
            # fine-tuning wrappers build the encoder without the pretraining label dictionaries
            logger.info("no label dictionaries: building av_hubert without prediction heads")
            self.num_classes = []
        else:
            self.num_classes = [len(d) for d in dictionaries]
            self.label_embs_concat = nn.Parameter(torch.FloatTensor(sum(self.num_classes), final_dim))
            nn.init.uniform_(self.label_embs_concat)

    @classmethod
    def build_model(cls, cfg: AVHubertConfig, task):
        return cls(cfg, task.cfg, task.dictionaries)

    def upgrade_state_dict_named(self, state_dict, name):
        super().upgrade_state_dict_named(state_dict, name)
        return state_dict

    # ---------------------------------------------------------------- front ends and fusion
    def forward_features(self, source: torch.Tensor, modality: str) -> torch.Tensor:
        extractor = {"audio": self.feature_extractor_audio, "video": self.feature_extractor_video}[modality]
        if self.feature_grad_mult > 0:
            features = extractor(source)
            if self.feature_grad_mult != 1.0:
                features = GradMultiply.apply(features, self.feature_grad_mult)
        else:
            with torch.no_grad():
                features = extractor(source)
        return features

    def _rng(self):
        return self.mask_rng if self.mask_rng is not None else np.random

    def _front_ends(self, src_audio, src_video, modality_dropout: bool):
        """(B, D, T) per modality; a missing one becomes zeros (as for single-modality use).

        ``modality_dropout``: the pretraining forward's two draws (drop a modality? which one?). As in
        the reference they are drawn on every such pass, in eval mode and at probability 0 too (the
        masks drawn after them depend on it), and applied only in training."""
        if src_audio is None and src_video is None:
            raise ValueError("av_hubert needs at least one of source['audio'], source['video']")
        feat_audio = self.forward_features(src_audio, "audio") if src_audio is not None else None
        feat_video = self.forward_features(src_video, "video") if src_video is not None else None
        if feat_audio is None:
            feat_audio = feat_video.new_zeros(feat_video.size(0), self.encoder_embed_dim, feat_video.size(-1))
        if feat_video is None:
            feat_video = feat_audio.new_zeros(feat_audio.size(0), self.encoder_embed_dim, feat_audio.size(-1))
        if modality_dropout:
            rng = self._rng()
            drop_one, drop_audio = rng.random(), rng.random()
            if self.training and drop_one < self.modality_dropout:
                if drop_audio < self.audio_dropout:
                    feat_audio = 0 * feat_audio
                else:
                    feat_video = 0 * feat_video
        if self.modality_fuse == "concat":
            return torch.cat([feat_audio, feat_video], dim=1)
        return feat_audio + feat_video

    def forward_targets(self, features, mask_indices, target_list):
        """Trim features so that every frame has a label, then pick the label of each frame."""
        feat_tsz = features.size(2)
        targ_tsz = min(t.size(1) for t in target_list)
        if self.feat2tar_ratio * feat_tsz > targ_tsz:
            feat_tsz = int(targ_tsz / self.feat2tar_ratio)
            features = features[..., :feat_tsz]
            if mask_indices is not None:
                mask_indices = mask_indices[..., :feat_tsz]
        target_inds = (torch.arange(feat_tsz).float() * self.feat2tar_ratio).long()
        target_list = [t[:, target_inds] for t in target_list]
        return features, mask_indices, target_list

    def forward_padding_mask(self, features: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        extra = padding_mask.size(1) % features.size(1)
        if extra > 0:
            padding_mask = padding_mask[:, :-extra]
        padding_mask = padding_mask.view(padding_mask.size(0), features.size(1), -1)
        return padding_mask.all(-1)

    # ---------------------------------------------------------------- masking
    def _span_mask(self, shape, padding_mask, prob, length, selection, other, no_overlap, min_space,
                   min_masks):
        return draw_span_mask(shape, padding_mask, prob, length, self._rng(), selection, other,
                              min_masks=min_masks, no_overlap=no_overlap, min_space=min_space)

    def apply_feature_mask(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor]):
        B, T, C = x.shape
        if self.mask_prob_audio != self.mask_prob_image or self.mask_length_audio != self.mask_length_image:
            raise ValueError("feature masking needs the same mask prob/length for audio and image")
        mask_indices = None
        if self.mask_prob_audio > 0:
            spans = self._span_mask(
                (B, T), padding_mask, self.mask_prob_audio, self.mask_length_audio, self.mask_selection,
                self.mask_other, self.no_mask_overlap, self.mask_min_space, min_masks=2,
            )
            mask_indices = torch.from_numpy(spans.mask).to(x.device)
            x = x.clone()
            x[mask_indices] = self.mask_emb.to(x.dtype)
        if self.mask_channel_prob > 0:
            channel = self._span_mask(
                (B, C), None, self.mask_channel_prob, self.mask_channel_length, self.mask_channel_selection,
                self.mask_channel_other, self.no_mask_channel_overlap, self.mask_channel_min_space,
                min_masks=0,
            )
            channel_mask = torch.from_numpy(channel.mask).to(x.device)
            x = x.masked_fill(channel_mask.unsqueeze(1).expand(-1, T, -1), 0)
        return x, mask_indices

    def apply_input_mask(self, x: torch.Tensor, padding_mask, modality: str):
        """Input-level masking (the paper's setting), on audio (B, F, T) or video (B, C, T, H, W).
        Audio: masked frames become the learned mask embedding. Video: each masked run is
        overwritten with as many consecutive frames from elsewhere in the same item ('same_seq') or
        the same positions of another item of the batch ('same_other_seq', items rotated by a shift
        from the torch RNG). A batch of one item gets zeros in both modalities.

        As in the reference, the masked values are written into ``x``'s own storage when its
        (B, T, ...) transpose is contiguous, which is the case for collated batches: the batch's
        input tensors are changed in place."""
        is_audio = modality == "audio"
        prob = self.mask_prob_audio if is_audio else self.mask_prob_image
        length = self.mask_length_audio if is_audio else self.mask_length_image
        B, T = x.size(0), x.size(2)
        if prob <= 0:
            return x, None
        spans = self._span_mask((B, T), padding_mask, prob, length, self.mask_selection, self.mask_other,
                                self.no_mask_overlap, self.mask_min_space, min_masks=2)
        mask = torch.from_numpy(spans.mask).to(x.device)
        frames = x.transpose(1, 2).contiguous()  # (B, T, ...)
        if B == 1:
            frames[mask] = 0
        elif is_audio:
            frames[mask] = self.mask_emb.to(frames.dtype)
        elif self.selection_type == "same_other_seq":
            perm = (torch.arange(B) + torch.randint(low=1, high=B, size=(1,))) % B
            frames[mask] = frames[perm][mask]
        else:
            lengths = None
            if self.same_seq_within_item:
                lengths = [T] * B if padding_mask is None else (T - padding_mask.long().sum(1)).tolist()
            starts = draw_source_starts(spans, T, self._rng(), lengths)
            src_item, src_frame = source_frames(spans, starts, T, lengths)
            frames[mask] = frames[torch.from_numpy(src_item).to(x.device), torch.from_numpy(src_frame).to(x.device)]
        return frames.transpose(1, 2).contiguous(), mask

    # ---------------------------------------------------------------- forward
    def _encode(self, source, padding_mask, mask: bool, target_list, output_layer, pretraining: bool):
        """``pretraining``: the pretraining forward (modality-dropout draws) rather than the
        fine-tuning / extraction path of ``extract_finetune``."""
        src_audio, src_video = source.get("audio"), source.get("video")
        mask_indices = None
        if mask and self.masking_type == "input":
            masks = []  # video first, then audio: the reference's order of draws
            if src_video is not None:
                src_video, m = self.apply_input_mask(src_video, padding_mask, "video")
                masks.append(m)
            if src_audio is not None:
                src_audio, m = self.apply_input_mask(src_audio, padding_mask, "audio")
                masks.append(m)
            masks = [m for m in masks if m is not None]
            mask_indices = masks[0] if masks else None
            for m in masks[1:]:
                mask_indices = torch.logical_or(mask_indices, m)

        features = self._front_ends(src_audio, src_video, modality_dropout=pretraining)  # (B, D, T)
        if target_list is not None:
            features, mask_indices, target_list = self.forward_targets(features, mask_indices, target_list)
        features_pen = features.float().pow(2).mean()

        features = self.layer_norm(features.transpose(1, 2))
        if padding_mask is not None:
            padding_mask = self.forward_padding_mask(features, padding_mask)
        if self.post_extract_proj is not None:
            features = self.post_extract_proj(features)
        features = self.dropout_input(features)

        if mask and self.masking_type == "feature":
            x, mask_indices = self.apply_feature_mask(features, padding_mask)
        else:
            x = features
        x, _ = self.encoder(x, padding_mask=padding_mask,
                            layer=None if output_layer is None else output_layer - 1)
        return {"x": x, "features": features, "padding_mask": padding_mask, "mask_indices": mask_indices,
                "target_list": target_list, "features_pen": features_pen}

    def forward(self, source: Dict[str, Optional[torch.Tensor]], target_list=None, padding_mask=None,
                mask: bool = True, features_only: bool = False, output_layer: Optional[int] = None):
        """source: {'audio': (B, F, T) or None, 'video': (B, 1, T, H, W) or None};
        padding_mask: (B, T) True at padded frames; target_list: [(B, T_label)] per label set."""
        res = self._encode(source, padding_mask, mask, target_list, output_layer, pretraining=True)
        if features_only:
            return {"x": res["x"], "padding_mask": res["padding_mask"], "features": res["features"]}

        x, padding_mask, mask_indices = res["x"], res["padding_mask"], res["mask_indices"]
        target_list = res["target_list"]
        if padding_mask is None:
            padding_mask = x.new_zeros(x.shape[:2], dtype=torch.bool)
        if mask_indices is None:
            mask_indices = torch.zeros_like(padding_mask)

        proj_x = self.final_proj(x)
        if self.untie_final_proj:
            proj_x_list = proj_x.chunk(len(self.num_classes), dim=-1)
        else:
            proj_x_list = [proj_x for _ in self.num_classes]
        label_embs_list = self.label_embs_concat.split(self.num_classes, 0)
        if self.target_glu is not None:
            label_embs_list = [self.target_glu(e) for e in label_embs_list]
        logit_list = [
            self.compute_logits(p, e).view(-1, n)
            for p, e, n in zip(proj_x_list, label_embs_list, self.num_classes)
        ]
        masked = torch.logical_and(mask_indices, ~padding_mask).view(-1)
        unmasked = torch.logical_and(~mask_indices, ~padding_mask).view(-1)
        return {
            "logit_m_list": [logit[masked] for logit in logit_list],
            "logit_u_list": [logit[unmasked] for logit in logit_list],
            "target_m_list": [t.reshape(-1)[masked].long() for t in target_list],
            "target_u_list": [t.reshape(-1)[unmasked].long() for t in target_list],
            "padding_mask": padding_mask,
            "features_pen": res["features_pen"],
        }

    def compute_logits(self, feats: torch.Tensor, emb_mat: torch.Tensor) -> torch.Tensor:
        """feats (B, T, F), emb_mat (V, F) -> (B, T, V) similarities / logit_temp."""
        if self.sim_type == "dot":
            logits = torch.matmul(feats, emb_mat.transpose(0, 1))
        else:
            flat = feats.reshape(-1, feats.size(-1))
            dots = flat @ emb_mat.t()
            norms = flat.norm(dim=-1, keepdim=True) * emb_mat.norm(dim=-1).unsqueeze(0)
            logits = (dots / norms.clamp(min=1e-6)).view(feats.size(0), feats.size(1), -1)
        return logits / self.logit_temp

    def extract_features(self, source, padding_mask=None, mask=False, ret_conv=False, output_layer=None):
        """Both streams as given (eval: no modality dropout). Returns (B, T, D) and the frame mask;
        ret_conv=True gives the projected fused front-end features instead of a layer's output."""
        res = self.forward(source, padding_mask=padding_mask, mask=mask, features_only=True,
                           output_layer=output_layer)
        return (res["features"] if ret_conv else res["x"]), res["padding_mask"]

    def extract_finetune(self, source, padding_mask=None, mask=False, ret_conv=False, output_layer=None):
        """Like extract_features, but a missing stream (None) is replaced by zero features and no
        modality dropout is applied: the entry point of fine-tuning wrappers.

        ``ret_conv`` is accepted and ignored, as in the reference implementation: the result is always
        the encoder output (of ``output_layer``, or of the last layer with the final layer norm when
        None). Checkpoint-compatible feature dumps depend on that behaviour."""
        res = self._encode(source, padding_mask, mask, None, output_layer, pretraining=False)
        return res["x"], res["padding_mask"]

    # ---------------------------------------------------------------- criterion helpers
    def get_extra_losses(self, net_output):
        losses, names = [], []
        if "features_pen" in net_output:
            losses.append(net_output["features_pen"])
            names.append("features_pen")
        return losses, names

    def get_logits(self, net_output, is_masked=True):
        return net_output["logit_m_list" if is_masked else "logit_u_list"]

    def get_targets(self, net_output, is_masked=True):
        return net_output["target_m_list" if is_masked else "target_u_list"]

    def remove_pretraining_modules(self):
        self.target_glu = None
        self.final_proj = None
