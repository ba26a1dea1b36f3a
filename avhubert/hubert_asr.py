"""Sequence-to-sequence fine-tuning of AV-HuBERT (model ``av_hubert_seq2seq``).

The encoder is a pretrained ``av_hubert`` model (a checkpoint of our pretraining or one written by
the reference code, e.g. a published one) and the decoder a fairseq transformer decoder over the
sentencepiece pieces of the task's target dictionary (``dict.wrd.txt``). Published AV-HuBERT
weights are distributed under a non-commercial research licence: fine-tuning from them inherits
that licence.

Checkpoint compatibility: the parameter layout is the reference one, so fine-tuned checkpoints
written by the reference code load here (and ours there) without renames:

- ``encoder.w2v_model.*``: the ``av_hubert`` model's parameters (its pretraining heads removed);
- ``decoder.embed_tokens.weight``, ``decoder.layers.{i}.*`` (fairseq decoder layers: self_attn,
  encoder_attn, fc1/fc2 and their layer norms), ``decoder.layer_norm.*`` (with
  ``decoder_normalize_before``), ``decoder.embed_out`` (unless the input/output embeddings are
  shared), ``decoder.embed_positions.weight`` (with ``decoder_learned_pos``).

The model config (``model.*``) uses the reference's key names: ``w2v_path`` (pretraining
checkpoint), ``w2v_args`` (that checkpoint's whole config, filled in when the model is first
built and saved with the fine-tuned checkpoint, so loading it never needs ``w2v_path`` again),
``freeze_finetune_updates`` (the encoder is run without gradients for that many updates),
``layerdrop`` / ``dropout`` / ``attention_dropout`` / ``activation_dropout`` / ``dropout_input``
/ ``feature_grad_mult`` (copied onto the pretrained encoder's config), ``apply_mask`` /
``mask_prob`` / ``mask_length`` / ``mask_channel_*`` (encoder-side masking during fine-tuning;
``mask_prob``/``mask_length`` apply to both the audio and the video stream), ``decoder_*``.

Differences from the reference, all behaviour-preserving for the reference's own configs:
the reference never masks in seq2seq fine-tuning (``apply_mask`` is ignored there); here
``apply_mask: true`` does mask. The reference resets the encoder's ``mask_emb`` to a random
value; here the pretrained one is kept (it only matters with ``apply_mask``). Pretraining-only
parameters a reference checkpoint may still carry (``label_embs_concat``, ``final_proj``) are
dropped on load instead of failing the strict load.
"""

import contextlib
import copy
import logging
import math
import os
from argparse import Namespace
from dataclasses import dataclass, field
from typing import Any, Dict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import II, MISSING, DictConfig, OmegaConf, open_dict

from fairseq import utils
from fairseq.dataclass import FairseqDataclass
from fairseq.dataclass.utils import convert_namespace_to_omegaconf, merge_with_parent
from fairseq.models import (
    FairseqEncoder,
    FairseqEncoderDecoderModel,
    FairseqIncrementalDecoder,
    register_model,
)
from fairseq.models.transformer.transformer_config import TransformerConfig
from fairseq.modules import LayerNorm, PositionalEmbedding
from fairseq.modules.transformer_layer import TransformerDecoderLayerBase

from .model import AVHubertConfig, AVHubertModel

logger = logging.getLogger(__name__)

# encoder-config keys a fine-tuning config overrides on the pretrained model's config
_ENCODER_OVERRIDES = {
    "dropout": "dropout",
    "attention_dropout": "attention_dropout",
    "activation_dropout": "activation_dropout",
    "dropout_input": "dropout_input",
    "layerdrop": "encoder_layerdrop",
    "feature_grad_mult": "feature_grad_mult",
    "mask_channel_length": "mask_channel_length",
    "mask_channel_prob": "mask_channel_prob",
    "mask_channel_selection": "mask_channel_selection",
    "mask_channel_other": "mask_channel_other",
    "no_mask_channel_overlap": "no_mask_channel_overlap",
    "mask_selection": "mask_selection",
    "mask_other": "mask_other",
    "no_mask_overlap": "no_mask_overlap",
}
# hubert's single mask_prob/mask_length apply to both of av_hubert's streams
_MASK_SPAN_OVERRIDES = {
    "mask_prob": ("mask_prob_audio", "mask_prob_image"),
    "mask_length": ("mask_length_audio", "mask_length_image"),
}
# parameters of the pretraining prediction heads; fine-tuning never uses them
_PRETRAINING_ONLY = ("label_embs_concat", "final_proj.", "target_glu.")


@dataclass
class AVHubertAsrConfig(FairseqDataclass):
    w2v_path: str = field(default=MISSING, metadata={"help": "pretrained av_hubert checkpoint"})
    no_pretrained_weights: bool = field(default=False, metadata={"help": "random encoder init"})
    dropout_input: float = field(default=0.0, metadata={"help": "dropout on the fused features"})
    final_dropout: float = field(default=0.0, metadata={"help": "dropout on the encoder output"})
    dropout: float = field(default=0.0, metadata={"help": "dropout in the encoder transformer"})
    attention_dropout: float = field(default=0.0, metadata={"help": "encoder attention dropout"})
    activation_dropout: float = field(default=0.0, metadata={"help": "encoder FFN activation dropout"})
    apply_mask: bool = field(default=False, metadata={"help": "mask encoder inputs while training"})
    mask_length: int = field(default=10, metadata={"help": "mask span length (audio and video)"})
    mask_prob: float = field(default=0.5, metadata={"help": "mask probability (audio and video)"})
    mask_selection: str = field(default="static", metadata={"help": "span length distribution"})
    mask_other: float = field(default=0, metadata={"help": "secondary span length parameter"})
    no_mask_overlap: bool = field(default=False, metadata={"help": "forbid overlapping spans"})
    mask_channel_length: int = field(default=10, metadata={"help": "channel mask span length"})
    mask_channel_prob: float = field(default=0.0, metadata={"help": "channel mask probability"})
    mask_channel_selection: str = field(default="static", metadata={"help": "channel span distribution"})
    mask_channel_other: float = field(default=0, metadata={"help": "secondary channel span parameter"})
    no_mask_channel_overlap: bool = field(default=False, metadata={"help": "forbid channel overlap"})
    freeze_finetune_updates: int = field(default=0, metadata={"help": "encoder frozen for N updates"})
    feature_grad_mult: float = field(default=0.0, metadata={"help": "front-end gradient scale"})
    layerdrop: float = field(default=0.0, metadata={"help": "encoder layer drop probability"})
    normalize: bool = II("task.normalize")
    data: str = II("task.data")
    # the pretrained checkpoint's whole config, filled in when the model is first built
    w2v_args: Any = None


@dataclass
class AVHubertSeq2SeqConfig(AVHubertAsrConfig):
    decoder_embed_dim: int = field(default=768, metadata={"help": "decoder embedding dim"})
    decoder_ffn_embed_dim: int = field(default=3072, metadata={"help": "decoder FFN dim"})
    decoder_layers: int = field(default=6, metadata={"help": "decoder layers"})
    decoder_layerdrop: float = field(default=0.0, metadata={"help": "decoder layer drop probability"})
    decoder_attention_heads: int = field(default=4, metadata={"help": "decoder attention heads"})
    decoder_learned_pos: bool = field(default=False, metadata={"help": "learned positions"})
    decoder_normalize_before: bool = field(default=False, metadata={"help": "pre-LN decoder"})
    no_token_positional_embeddings: bool = field(default=False, metadata={"help": "no positions"})
    decoder_dropout: float = field(default=0.0, metadata={"help": "decoder dropout"})
    decoder_attention_dropout: float = field(default=0.0, metadata={"help": "decoder attention dropout"})
    decoder_activation_dropout: float = field(default=0.0, metadata={"help": "decoder FFN dropout"})
    max_target_positions: int = field(default=2048, metadata={"help": "longest target"})
    share_decoder_input_output_embed: bool = field(default=False, metadata={"help": "tie embeddings"})
    no_scale_embedding: bool = field(default=True, metadata={"help": "no sqrt(dim) embedding scale"})


# ------------------------------------------------------------------------------------- encoder


def _as_omegaconf(args) -> DictConfig:
    if isinstance(args, Namespace):
        return convert_namespace_to_omegaconf(args)
    if isinstance(args, dict):
        return OmegaConf.create(args)
    return args


def _load_checkpoint_to_cpu(path: str) -> Dict[str, Any]:
    """fairseq's checkpoint reader with the fairseq allow-list of ``avhubert.checkpoint``. When the
    model is built during training (``run_fairseq_train``), the allow-list is already in force, and
    entering it again would remove it on exit (torch's safe_globals contexts do not nest): the
    trainer's own checkpoint reads that follow would then fail."""
    from fairseq import checkpoint_utils
    from fairseq.data.dictionary import Dictionary

    from .checkpoint import load_checkpoint_to_cpu

    allowed = getattr(torch.serialization, "get_safe_globals", None)
    if allowed is not None and Dictionary in allowed():
        return checkpoint_utils.load_checkpoint_to_cpu(path)
    return load_checkpoint_to_cpu(path)


def load_pretraining_state(path: str) -> Dict[str, Any]:
    """A pretraining checkpoint (ours or the reference's) read to CPU, its config as omegaconf."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: pretrained AV-HuBERT checkpoint not found (model.w2v_path)")
    state = _load_checkpoint_to_cpu(path)
    w2v_args = state.get("cfg")
    if w2v_args is None:
        if state.get("args") is None:
            raise ValueError(f"{path}: no 'cfg' or 'args' in the checkpoint: not a fairseq checkpoint")
        w2v_args = convert_namespace_to_omegaconf(state["args"])
    state["cfg"] = _as_omegaconf(w2v_args)
    model_name = state["cfg"].model.get("_name")
    if model_name != "av_hubert":
        raise ValueError(f"{path}: model {model_name!r} is not a pretrained av_hubert checkpoint")
    return state


def apply_finetune_overrides(w2v_args: DictConfig, cfg) -> None:
    """Copy the fine-tuning settings that concern the encoder onto the pretrained model config."""
    with open_dict(w2v_args):
        for ours, theirs in _ENCODER_OVERRIDES.items():
            if ours in cfg and cfg[ours] is not None:
                w2v_args.model[theirs] = cfg[ours]
        for ours, keys in _MASK_SPAN_OVERRIDES.items():
            if ours in cfg and cfg[ours] is not None:
                for key in keys:
                    w2v_args.model[key] = cfg[ours]


def build_encoder_model(w2v_args: DictConfig) -> AVHubertModel:
    """An av_hubert model without prediction heads from a pretraining config (ours or the
    reference's: keys it does not know are dropped, keys it lacks get our defaults)."""
    model_cfg = copy.deepcopy(w2v_args.model)
    if _is_interp(model_cfg, "label_rate"):  # saved unresolved: the pretraining task's value
        with open_dict(model_cfg):
            model_cfg.label_rate = int(w2v_args.task.get("label_rate", -1))
    model_cfg = merge_with_parent(AVHubertConfig(), model_cfg, remove_missing=True)
    model = AVHubertModel(model_cfg, w2v_args.task, dictionaries=[])
    model.remove_pretraining_modules()
    return model


def _is_interp(cfg, key) -> bool:
    try:
        return OmegaConf.is_interpolation(cfg, key)
    except Exception:  # noqa: BLE001
        return False


def _store_in_parent_config(cfg, w2v_args) -> None:
    """fairseq builds the model from a merged copy of ``cfg.model``; the trainer saves the
    original. The pretrained config must reach the saved checkpoint (loading it must not need
    ``w2v_path``), so it is written into the original ``model`` node too."""
    parent = cfg._get_parent() if OmegaConf.is_config(cfg) else None
    node = parent.get("model") if parent is not None and OmegaConf.is_config(parent) else None
    if node is not None and node is not cfg and node.get("_name") == "av_hubert_seq2seq":
        with open_dict(node):
            node.w2v_args = w2v_args


class AVHubertSeq2SeqEncoder(FairseqEncoder):
    """The pretrained av_hubert model as a fairseq encoder: (B, T, C) -> {'encoder_out': (T, B, C)}.
    A modality missing from ``source`` (None) is replaced by zero features, as in pretraining's
    modality dropout (``AVHubertModel.extract_finetune``)."""

    def __init__(self, w2v_model: AVHubertModel, apply_mask: bool = False, final_dropout: float = 0.0):
        super().__init__(None)
        self.w2v_model = w2v_model
        self.apply_mask = apply_mask
        self.final_dropout = nn.Dropout(final_dropout)

    @property
    def embedding_dim(self) -> int:
        return int(self.w2v_model.encoder_embed_dim)

    def forward(self, source, padding_mask=None, **kwargs):
        x, padding_mask = self.w2v_model.extract_finetune(
            source=source, padding_mask=padding_mask, mask=self.apply_mask and self.training
        )
        x = self.final_dropout(x.transpose(0, 1))  # B x T x C -> T x B x C
        return {"encoder_out": x, "encoder_padding_mask": padding_mask, "padding_mask": padding_mask}

    def reorder_encoder_out(self, encoder_out, new_order):
        out = dict(encoder_out)
        if out.get("encoder_out") is not None:
            out["encoder_out"] = out["encoder_out"].index_select(1, new_order)
        for key in ("encoder_padding_mask", "padding_mask"):
            if out.get(key) is not None:
                out[key] = out[key].index_select(0, new_order)
        return out

    def max_positions(self):
        return None


# ------------------------------------------------------------------------------------- decoder


def _embedding(num: int, dim: int, padding_idx: int) -> nn.Embedding:
    emb = nn.Embedding(num, dim, padding_idx=padding_idx)
    nn.init.normal_(emb.weight, mean=0, std=dim ** -0.5)
    nn.init.constant_(emb.weight[padding_idx], 0)
    return emb


class AVHubertSeq2SeqDecoder(FairseqIncrementalDecoder):
    """Transformer decoder over the target dictionary, attending to the encoder output.

    Parameter names follow the reference fine-tuned checkpoints (see the module docstring).
    The layers are fairseq's ``TransformerDecoderLayerBase`` (ReLU FFN, as the reference)."""

    def __init__(self, cfg, dictionary, embed_tokens: nn.Embedding, encoder_embed_dim: int):
        super().__init__(dictionary)
        self.dropout = float(cfg.decoder_dropout)
        self.share_input_output_embed = bool(cfg.share_decoder_input_output_embed)
        self.layerdrop = float(cfg.decoder_layerdrop)
        self.max_target_positions = int(cfg.max_target_positions)
        embed_dim = int(cfg.decoder_embed_dim)
        input_dim = embed_tokens.embedding_dim
        self.output_embed_dim = embed_dim
        self.embed_tokens = embed_tokens
        self.embed_scale = 1.0 if cfg.no_scale_embedding else math.sqrt(embed_dim)
        self.project_in_dim = nn.Linear(input_dim, embed_dim, bias=False) if input_dim != embed_dim else None
        self.embed_positions = None
        if not cfg.no_token_positional_embeddings:
            self.embed_positions = PositionalEmbedding(
                self.max_target_positions, embed_dim, embed_tokens.padding_idx,
                learned=bool(cfg.decoder_learned_pos),
            )
        layer_cfg = TransformerConfig.from_namespace(Namespace(
            dropout=float(cfg.decoder_dropout),
            attention_dropout=float(cfg.decoder_attention_dropout),
            activation_dropout=float(cfg.decoder_activation_dropout),
            activation_fn="relu",
            decoder_embed_dim=embed_dim,
            decoder_ffn_embed_dim=int(cfg.decoder_ffn_embed_dim),
            decoder_attention_heads=int(cfg.decoder_attention_heads),
            decoder_normalize_before=bool(cfg.decoder_normalize_before),
            # cross-attention keys/values come straight from the encoder (no projection)
            encoder_embed_dim=int(encoder_embed_dim),
        ))
        self.layers = nn.ModuleList(
            [TransformerDecoderLayerBase(layer_cfg, no_encoder_attn=False) for _ in range(int(cfg.decoder_layers))]
        )
        if not self.share_input_output_embed:
            self.embed_out = nn.Parameter(torch.empty(len(dictionary), self.output_embed_dim))
            nn.init.normal_(self.embed_out, mean=0, std=self.output_embed_dim ** -0.5)
        self.layer_norm = LayerNorm(embed_dim) if cfg.decoder_normalize_before else None
        self._future_mask = torch.empty(0)

    def forward(self, prev_output_tokens, encoder_out=None, incremental_state=None, **unused):
        x, extra = self.extract_features(prev_output_tokens, encoder_out, incremental_state)
        return self.output_layer(x), extra

    def extract_features(self, prev_output_tokens, encoder_out=None, incremental_state=None, **unused):
        prev_output_tokens = prev_output_tokens.long()
        positions = None
        if self.embed_positions is not None:
            positions = self.embed_positions(prev_output_tokens, incremental_state=incremental_state)
        if incremental_state is not None:  # one step of beam search: only the newest token
            prev_output_tokens = prev_output_tokens[:, -1:]
            if positions is not None:
                positions = positions[:, -1:]
        x = self.embed_scale * self.embed_tokens(prev_output_tokens)
        if self.project_in_dim is not None:
            x = self.project_in_dim(x)
        if positions is not None:
            x = x + positions
        x = F.dropout(x, p=self.dropout, training=self.training).transpose(0, 1)  # T x B x C
        enc = encoder_out["encoder_out"] if encoder_out is not None else None
        enc_pad = encoder_out["padding_mask"] if encoder_out is not None else None
        attn = None
        inner_states = [x]
        for layer in self.layers:
            if self.training and self.layerdrop > 0 and np.random.random() < self.layerdrop:
                continue
            x, attn, _ = layer(
                x, enc, enc_pad, incremental_state,
                self_attn_mask=self.buffered_future_mask(x) if incremental_state is None else None,
            )
            inner_states.append(x)
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        return x.transpose(0, 1), {"attn": attn, "inner_states": inner_states}

    def output_layer(self, features, **kwargs):
        weight = self.embed_tokens.weight if self.share_input_output_embed else self.embed_out
        return torch.matmul(features, weight.transpose(0, 1))

    def max_positions(self):
        if self.embed_positions is None:
            return self.max_target_positions
        return min(self.max_target_positions, self.embed_positions.max_positions)

    def buffered_future_mask(self, tensor):
        dim = tensor.size(0)
        if self._future_mask.size(0) < dim or self._future_mask.device != tensor.device:
            self._future_mask = torch.triu(utils.fill_with_neg_inf(torch.zeros(dim, dim)), 1).to(tensor)
        return self._future_mask[:dim, :dim]

    def upgrade_state_dict_named(self, state_dict, name):
        return state_dict


# ------------------------------------------------------------------------------------- model


@register_model("av_hubert_seq2seq", dataclass=AVHubertSeq2SeqConfig)
class AVHubertSeq2Seq(FairseqEncoderDecoderModel):
    def __init__(self, encoder: AVHubertSeq2SeqEncoder, decoder: AVHubertSeq2SeqDecoder, cfg):
        super().__init__(encoder, decoder)
        self.cfg = cfg
        self.freeze_finetune_updates = int(cfg.freeze_finetune_updates)
        self.num_updates = 0

    @classmethod
    def build_model(cls, cfg: AVHubertSeq2SeqConfig, task):
        state = None
        if cfg.w2v_args is None:  # first build: read the pretrained checkpoint
            state = load_pretraining_state(cfg.w2v_path)
            w2v_args = state["cfg"]
            apply_finetune_overrides(w2v_args, cfg)
            with open_dict(cfg):
                cfg.w2v_args = w2v_args
            _store_in_parent_config(cfg, w2v_args)
        else:  # a fine-tuned checkpoint carries the encoder config
            w2v_args = _as_omegaconf(cfg.w2v_args)
            with open_dict(cfg):
                cfg.w2v_args = w2v_args
        pre_norm = bool(w2v_args.task.get("normalize", False))
        if bool(cfg.normalize) != pre_norm:
            raise ValueError(
                f"task.normalize={cfg.normalize} but the pretrained model was trained with "
                f"task.normalize={pre_norm}: audio features must be normalised the same way"
            )
        w2v_model = build_encoder_model(w2v_args)
        if state is not None and not cfg.no_pretrained_weights:
            weights = {k: v for k, v in state["model"].items() if not k.startswith(_PRETRAINING_ONLY)}
            missing, unexpected = w2v_model.load_state_dict(weights, strict=False)
            if unexpected or missing:
                raise ValueError(
                    f"{cfg.w2v_path}: pretrained weights do not fit the av_hubert model "
                    f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
                )
            logger.info("encoder initialised from %s", cfg.w2v_path)
        encoder = AVHubertSeq2SeqEncoder(w2v_model, apply_mask=bool(cfg.apply_mask),
                                         final_dropout=float(cfg.final_dropout))

        tgt_dict = task.target_dictionary
        if tgt_dict is None:
            raise ValueError("av_hubert_seq2seq needs a target dictionary: task.fine_tuning=true, "
                             "task.labels=[wrd] with dict.wrd.txt in task.label_dir")
        embed_tokens = _embedding(len(tgt_dict), int(cfg.decoder_embed_dim), tgt_dict.pad())
        decoder = AVHubertSeq2SeqDecoder(cfg, tgt_dict, embed_tokens, encoder.embedding_dim)
        return cls(encoder, decoder, cfg)

    def forward(self, **kwargs):
        train_encoder = self.freeze_finetune_updates <= self.num_updates
        with torch.no_grad() if not train_encoder else contextlib.ExitStack():
            encoder_out = self.encoder(**kwargs)
        return self.decoder(prev_output_tokens=kwargs["prev_output_tokens"], encoder_out=encoder_out)

    def set_num_updates(self, num_updates):
        super().set_num_updates(num_updates)
        self.num_updates = num_updates

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        own = set(self.state_dict().keys())
        prefix = "encoder.w2v_model."
        dropped = [k for k in state_dict if k.startswith(prefix) and k[len(prefix):].startswith(_PRETRAINING_ONLY)
                   and k not in own]
        if dropped:
            state_dict = {k: v for k, v in state_dict.items() if k not in dropped}
            logger.info("dropped pretraining-only parameters: %s", dropped)
        return super().load_state_dict(state_dict, strict=strict, model_cfg=model_cfg, args=args)

    def upgrade_state_dict_named(self, state_dict, name):
        return state_dict
