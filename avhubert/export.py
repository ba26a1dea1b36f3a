"""A model as a self-contained directory: safetensors weights and JSON configs, no fairseq pickle.

Written by ``launch.py export`` (report/export.py adds the run's k-means models, dictionaries and
model card); read by :func:`load_encoder` (``avhubert.load(DIR)``, the features and units stages:
anything that takes a checkpoint path takes the directory) and :func:`load_finetuned_state`
(``launch.py infer --checkpoint DIR``).

    DIR/encoder.safetensors   the av_hubert encoder (pretraining heads removed), float32
    DIR/encoder.json          {"format", "format_version", "model": its config, "task": what the
                              inputs are built with (crop size, mean/std, audio stacking, ...)}
    DIR/seq2seq.safetensors   a fine-tuned model's whole weights (encoder + decoder), when exported
    DIR/seq2seq.json          its fairseq config, paths made relative to DIR
    DIR/dict.wrd.txt, spm.model   its target dictionary and sentencepiece model

Loading reads tensors only (safetensors) and plain JSON: nothing in the directory can run code,
and torch's ``weights_only`` rules never come into it. Writing is deterministic: the same
checkpoint gives the same bytes.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Optional

from omegaconf import Container, OmegaConf

FORMAT = "avhubert-pipeline.export"
FORMAT_VERSION = 1
ENCODER_WEIGHTS, ENCODER_CONFIG = "encoder.safetensors", "encoder.json"
SEQ2SEQ_WEIGHTS, SEQ2SEQ_CONFIG = "seq2seq.safetensors", "seq2seq.json"
TARGET_DICT, SPM_MODEL = "dict.wrd.txt", "spm.model"
# the task keys that decide how a clip becomes model inputs (avhubert/extract.py)
INPUT_KEYS = ("image_crop_size", "image_mean", "image_std", "stack_order_audio", "normalize", "modalities",
              "sample_rate", "label_rate", "pad_audio", "input_modality")


class ExportError(ValueError):
    pass


def is_export(path) -> bool:
    return Path(path).is_dir() and (Path(path) / ENCODER_CONFIG).is_file()


def is_checkpoint(path) -> bool:
    """A checkpoint file, or a directory written by ``launch.py export``."""
    return Path(path).is_file() or is_export(path)


def _container(cfg):
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, Container) else copy.deepcopy(cfg)


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")


def _save_weights(path: Path, state: dict, metadata: dict) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in sorted(state.items())}
    # one metadata entry: safetensors writes the metadata map in hash order, and several
    # entries would make two exports of one model differ in bytes
    save_file(tensors, str(path), metadata={"format": "/".join(str(v) for _, v in sorted(metadata.items()))})


def pretraining_config(state: dict, path: str):
    """(model cfg, task cfg) of the av_hubert encoder a checkpoint state holds: its own for a
    pretraining checkpoint, the ``w2v_args`` a fine-tuned one carries."""
    from .hubert_asr import _as_omegaconf

    cfg = state.get("cfg")
    name = cfg.model.get("_name") if cfg is not None and cfg.get("model") is not None else None
    if name == "av_hubert":
        return cfg.model, cfg.task
    w2v = cfg.model.get("w2v_args") if name is not None else None
    if w2v is None:
        raise ExportError(f"{path}: model {name!r} is neither an av_hubert pretraining checkpoint nor a fine-tuned "
                          "one with its encoder's config (model.w2v_args)")
    w2v = _as_omegaconf(w2v)
    return w2v.model, w2v.task


ENCODER_PREFIX = "encoder.w2v_model."  # a fine-tuned model's encoder weights


def encoder_from_state(state: dict, path: str):
    """The av_hubert encoder (no pretraining heads) of a checkpoint state, pretraining or
    fine-tuned, with its weights; and its (model cfg, task cfg)."""
    from .hubert_asr import _PRETRAINING_ONLY, build_encoder_model

    model_cfg, task_cfg = pretraining_config(state, path)
    model = build_encoder_model(_config(model_cfg, task_cfg))
    weights = state["model"]
    if state["cfg"].model.get("_name") != "av_hubert":
        weights = {k[len(ENCODER_PREFIX):]: v for k, v in weights.items() if k.startswith(ENCODER_PREFIX)}
    weights = {k: v for k, v in weights.items() if not k.startswith(_PRETRAINING_ONLY)}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ExportError(f"{path}: encoder weights do not fit the av_hubert model "
                          f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    return model, model_cfg, task_cfg


def _config(model_cfg, task_cfg):
    return OmegaConf.create({"model": _container(model_cfg), "task": _container(task_cfg)})


def export_encoder(state: dict, checkpoint: str, out_dir: Path) -> dict:
    """Write ``encoder.safetensors`` + ``encoder.json`` of an AV-HuBERT checkpoint's state (ours
    or the reference's, pretraining or fine-tuned; read with ``checkpoint.load_checkpoint_to_cpu``
    after the plugin is registered); returns the encoder config written."""
    model, model_cfg, task_cfg = encoder_from_state(state, checkpoint)
    model_json = _container(model_cfg)
    if not isinstance(model_json.get("label_rate"), (int, float)):
        model_json["label_rate"] = int(task_cfg.get("label_rate", -1))
    task = {k: _container(task_cfg.get(k)) for k in INPUT_KEYS if task_cfg.get(k) is not None}
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": model_json, "task": task,
              "layers": len(model.encoder.layers), "dim": int(model.encoder.layers[0].fc2.out_features)}
    out_dir.mkdir(parents=True, exist_ok=True)
    _save_weights(out_dir / ENCODER_WEIGHTS, model.state_dict(), {"format": FORMAT, "part": "encoder"})
    _write_json(out_dir / ENCODER_CONFIG, config)
    return config


def read_config(path: Path, name: str) -> dict:
    try:
        config = json.loads((Path(path) / name).read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"{Path(path) / name}: cannot be read ({e})") from None
    if config.get("format") != FORMAT or int(config.get("format_version", 0)) > FORMAT_VERSION:
        raise ExportError(f"{Path(path) / name}: not an export of this pipeline (format {config.get('format')!r} "
                          f"version {config.get('format_version')!r}; this code reads version <= {FORMAT_VERSION})")
    return config


def load_encoder(path, device: str = "cpu"):
    """(model in eval mode, task cfg) of an exported directory: the same encoder, weights for
    weights, as the checkpoint it was exported from."""
    from safetensors.torch import load_file

    from .hubert_asr import build_encoder_model

    config = read_config(path, ENCODER_CONFIG)
    task = OmegaConf.create(config["task"])
    model = build_encoder_model(OmegaConf.create({"model": config["model"], "task": config["task"]}))
    weights = load_file(str(Path(path) / ENCODER_WEIGHTS), device="cpu")
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ExportError(f"{path}: encoder weights do not fit its encoder.json (missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]})")
    return model.to(device).eval(), task


# ------------------------------------------------------------------------------ fine-tuned
def _without_paths(value):
    """The config with every absolute path (data and label dirs, save dirs, the pretraining
    checkpoint, the user dir, at any depth: also in the encoder's ``w2v_args``) cut to its last
    part: typed string fields stay strings, and nothing names the machine or its users."""
    if isinstance(value, dict):
        return {k: _without_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_paths(v) for v in value]
    return os.path.basename(value.rstrip("/")) if isinstance(value, str) and os.path.isabs(value) else value


def export_seq2seq(state: dict, checkpoint: str, out_dir: Path, target_dict: Path, spm_model: Optional[Path]) -> dict:
    """Write a fine-tuned ``av_hubert_seq2seq`` model's whole weights and config (paths in it made
    relative to ``out_dir``), its target dictionary and sentencepiece model."""
    cfg = _container(state["cfg"])
    if cfg.get("model", {}).get("_name") != "av_hubert_seq2seq":
        raise ExportError(f"{checkpoint}: not an av_hubert_seq2seq (fine-tuned) checkpoint")
    if cfg["model"].get("w2v_args") is None:
        raise ExportError(f"{checkpoint}: no model.w2v_args: the encoder could not be rebuilt without its "
                          "pretraining checkpoint")
    cfg = _without_paths(cfg)  # nothing in the export points at the machine it was made on
    cfg["task"]["data"] = cfg["task"]["label_dir"] = cfg["model"]["data"] = "."
    if spm_model is not None:
        cfg["task"]["tokenizer_bpe_model"] = SPM_MODEL
    out_dir.mkdir(parents=True, exist_ok=True)
    _save_weights(out_dir / SEQ2SEQ_WEIGHTS, state["model"], {"format": FORMAT, "part": "seq2seq"})
    _write_json(out_dir / SEQ2SEQ_CONFIG, {"format": FORMAT, "format_version": FORMAT_VERSION, "cfg": cfg})
    shutil.copyfile(target_dict, out_dir / TARGET_DICT)
    if spm_model is not None:
        shutil.copyfile(spm_model, out_dir / SPM_MODEL)
    return cfg


def has_seq2seq(path) -> bool:
    return Path(path).is_dir() and (Path(path) / SEQ2SEQ_CONFIG).is_file()


def load_finetuned_state(path) -> dict:
    """A fairseq checkpoint state (``cfg`` as DictConfig, ``model`` weights) of an exported
    fine-tuned model, its relative paths resolved against ``path``: what
    ``checkpoint_utils.load_model_ensemble_and_task(..., state=)`` takes."""
    from safetensors.torch import load_file

    path = Path(path).resolve()
    cfg = read_config(path, SEQ2SEQ_CONFIG)["cfg"]
    cfg["task"]["data"] = cfg["task"]["label_dir"] = cfg["model"]["data"] = str(path)
    if cfg["task"].get("tokenizer_bpe_model"):
        cfg["task"]["tokenizer_bpe_model"] = str(path / cfg["task"]["tokenizer_bpe_model"])
    return {"cfg": OmegaConf.create(cfg), "model": load_file(str(path / SEQ2SEQ_WEIGHTS), device="cpu"),
            "args": None, "extra_state": {}, "optimizer_history": [], "task_state": {}}


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weights_digest(path) -> str:
    """sha256 of the exported encoder weights (the model card and provenance name it)."""
    return file_digest(Path(path) / ENCODER_WEIGHTS)

