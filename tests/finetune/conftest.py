"""Fixtures of the fine-tuning tests: a freshly initialised tiny AV-HuBERT pretraining checkpoint and
a work dir whose manifest holds a handful of real sample-corpus clips (espeak-ng speech +
transcripts) cropped by the crop stage's code, with their sentencepiece model, as the manifest
stage writes it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune_data import REPO_ROOT, TEST_IDS, TRAIN_IDS, VALID_IDS


def save_fresh_tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    """A pretraining checkpoint (fairseq layout, as our train stage writes it) of a randomly
    initialised tiny av_hubert (avhubert/conf/pretrain/tiny.yaml with the smoke preset's one-block
    ResNet trunk: the video stream costs little on CPU)."""
    import torch
    from fairseq.dataclass.utils import merge_with_parent
    from omegaconf import OmegaConf

    from avhubert.extract import _PLUGIN_DIR, ensure_plugin_registered
    from avhubert.model import AVHubertConfig, AVHubertModel
    from avhubert.train_entry import compose_config

    ensure_plugin_registered()
    composed = compose_config(str(REPO_ROOT / "avhubert" / "conf" / "pretrain"), "tiny", [
        "task.data=/nonexistent", "task.label_dir=/nonexistent", "model.label_rate=100",
        f"common.user_dir={_PLUGIN_DIR}", "model.resnet_layers=[1,0,0,0]",
    ])
    cfg = OmegaConf.create(OmegaConf.to_container(composed, resolve=True, enum_to_str=True))
    torch.manual_seed(seed)
    model = AVHubertModel(merge_with_parent(AVHubertConfig(), cfg.model), cfg.task, dictionaries=[])
    state = {
        "cfg": OmegaConf.to_container(cfg, enum_to_str=True), "args": None, "model": model.state_dict(),
        "criterion": None, "task_state": {}, "extra_state": {}, "last_optimizer_state": None,
        "optimizer_history": [{"criterion_name": "AVHubertCriterion", "optimizer_name": "FairseqAdam",
                               "lr_scheduler_state": {}, "num_updates": 0}],
    }
    torch.save(state, path)
    return path


def _pair_from_clip(clip: Path, crop: Path, item_id: str) -> dict:
    """The crop stage's outputs for one clip (its code: mouth ROI mp4 + 16 kHz wav), as the
    manifest stage reads them from crop/results."""
    from avprep.crop import CropSettings, crop_item

    result = crop_item(clip, crop / "video" / f"{item_id}.mp4", crop / "audio" / f"{item_id}.wav",
                       crop / "landmarks" / f"{item_id}.npz", CropSettings())
    return {"id": item_id, "status": "ok", "video": f"video/{item_id}.mp4", "audio": f"audio/{item_id}.wav",
            "n_frames": result.n_frames, "n_samples": result.n_samples}


@pytest.fixture(scope="session")
def fresh_pretrained(tmp_path_factory) -> Path:
    return save_fresh_tiny_checkpoint(tmp_path_factory.mktemp("pretrained") / "checkpoint_final.pt")


@pytest.fixture(scope="session")
def ft_workdir(tmp_path_factory, sample_corpus) -> Path:
    """WORKDIR with crop/ pairs of a few sample clips and the manifest stage's outputs."""
    from omegaconf import OmegaConf

    from stages.manifest import Config as ManifestConfig
    from stages.manifest import build_manifest

    work = tmp_path_factory.mktemp("ftwork")
    crop = work / "crop"
    records = []
    for split, ids in (("train", TRAIN_IDS), ("valid", VALID_IDS), ("test", TEST_IDS)):
        for item_id in ids:
            rec = _pair_from_clip(sample_corpus / f"{item_id}.mp4", crop, item_id)
            rec.update(split=split, text=(sample_corpus / f"{item_id}.txt").read_text().strip())
            records.append(rec)
    (crop / "results").mkdir(parents=True, exist_ok=True)
    (crop / "results" / "000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    settings = OmegaConf.merge(OmegaConf.structured(ManifestConfig), {"spm_vocab_size": 40})
    summary = build_manifest(crop, work / "manifest", settings, None)
    assert summary["counts"] == {"train": len(TRAIN_IDS), "valid": len(VALID_IDS), "test": len(TEST_IDS)}
    return work
