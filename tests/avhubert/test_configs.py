"""The shipped pretraining configs compose the way fairseq-hydra-train composes them and validate
against the plugin's dataclasses."""
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "avhubert" / "conf" / "pretrain"
FILL = ["task.data=/data", "task.label_dir=/labels", "model.label_rate=25"]


def _composed(name):
    from fairseq.dataclass.utils import merge_with_parent

    from avhubert.criterion import AVHubertCriterionConfig
    from avhubert.model import AVHubertConfig
    from avhubert.task import AVHubertPretrainingConfig
    from avhubert.train_entry import compose_config, rank_overrides

    cfg = compose_config(str(CONF), name, FILL + rank_overrides(0, 1, None, "cpu"))
    return (cfg, merge_with_parent(AVHubertConfig(), cfg.model),
            merge_with_parent(AVHubertPretrainingConfig(), cfg.task),
            merge_with_parent(AVHubertCriterionConfig(), cfg.criterion))


@pytest.mark.parametrize("name,layers,dim,ffn,heads", [
    ("base", 12, 768, 3072, 12), ("base_iter1", 12, 768, 3072, 12), ("large", 24, 1024, 4096, 16),
    ("tiny", 2, 64, 128, 4),
])
def test_config_composes_and_validates(name, layers, dim, ffn, heads):
    cfg, model, task, crit = _composed(name)
    assert (model.encoder_layers, model.encoder_embed_dim, model.encoder_ffn_embed_dim,
            model.encoder_attention_heads) == (layers, dim, ffn, heads)
    assert task.label_rate == 25 and task.data == "/data" and task.label_dir == "/labels"
    assert cfg.common.user_dir == str(REPO / "avhubert")
    assert cfg.distributed_training.ddp_backend == "no_c10d" and cfg.common.fp16 is False
    assert list(crit.loss_weights) == [10.0]
    if name != "tiny":
        assert list(model.resnet_layers) == [2, 2, 2, 2] and model.final_dim == 256
    else:
        assert model.final_dim == 32 and cfg.dataset.num_workers == 0


def test_tiny_builds_with_configurable_trunk():
    from fairseq.data import Dictionary

    from avhubert.model import AVHubertModel

    _, model_cfg, task_cfg, _ = _composed("tiny")
    d = Dictionary()
    for c in range(10):
        d.add_symbol(str(c))
    model = AVHubertModel(model_cfg, task_cfg, [d])
    resnet = model.feature_extractor_video.resnet
    assert [len(getattr(resnet.trunk, f"layer{i}")) for i in range(1, 5)] == list(model_cfg.resnet_layers)
    assert model.label_embs_concat.shape == (len(d), 32)
    model_cfg.resnet_layers = [1, 1, 0, 0]
    small = AVHubertModel(model_cfg, task_cfg, [d])
    assert small.feature_extractor_video.resnet.backend_out == 128
    assert small.feature_extractor_video.proj.in_features == 128
