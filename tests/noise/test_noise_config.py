"""Noise settings: the base_noise preset composes the reference's noise-augmented fairseq configs,
the noise stage runs when something uses it, impossible settings are one ConfigError."""
from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.runner import Pipeline
from pipeline.stage import StageContext
from stages import STAGE_ORDER, config_sections, get_stage

REPO_ROOT = Path(__file__).resolve().parents[2]


def config(tmp_path: Path, preset: str = "smoke", *overrides: str):
    return load_config(config_sections(), preset, "local", list(overrides),
                       {"workdir": str(tmp_path / "work"), "corpus": str(tmp_path)})


def ctx(cfg, iteration=None) -> StageContext:
    return StageContext(cfg=cfg, workdir=Path(cfg.workdir), iteration=iteration)


def planned(cfg) -> list:
    stages = {name: get_stage(name) for name in STAGE_ORDER}
    pipe = Pipeline(cfg, stages, STAGE_ORDER, Path(cfg.workdir), echo=lambda m: None, dry_run=True)
    return [(n, it) for n, it in pipe.targets("all")]


def noise_keys(overrides) -> dict:
    pairs = (o.split("=", 1) for o in overrides)
    return {k.lstrip("+"): v for k, v in pairs if "noise" in k}


def test_base_noise_preset_composes_the_reference_recipe(tmp_path):
    from avhubert.extract import ensure_plugin_registered
    from avhubert.s2s_decode import register
    from avhubert.train_entry import compose_config, rank_overrides
    from stages import finetune, train

    ensure_plugin_registered()
    register()
    cfg = config(tmp_path, "base_noise")
    for stage in ("noise", "train", "finetune"):
        get_stage(stage).validate(ctx(cfg, 5 if stage == "train" else None))
    # noise_base_vox_iter5.yaml: the last iteration only, noise_prob 0.25 at 0 dB
    for it in range(1, 6):
        overrides = train.fairseq_overrides(ctx(cfg, it)) + rank_overrides(0, 1, None, "cpu")
        base = train.base_config_path(cfg, it)
        fs = compose_config(str(base.parent), base.stem, overrides)
        if it < 5:
            assert not noise_keys(overrides) and fs.task.get("noise_prob", 0) == 0
        else:
            assert fs.task.noise_prob == 0.25 and fs.task.noise_snr == "0.0"
            assert fs.task.noise_wav == str(Path(cfg.workdir) / "noise")
    # base_noise_pt_noise_ft_433h.yaml
    pretrained = tmp_path / "pretrained.pt"
    pretrained.write_bytes(b"")
    cfg.finetune.pretrained_checkpoint = str(pretrained)
    manifest = Path(cfg.workdir) / "manifest"
    (manifest / "spm").mkdir(parents=True)
    (manifest / "spm" / "spm_unigram8.model").write_bytes(b"")
    (manifest / "summary.json").write_text('{"spm_model": "spm/spm_unigram8.model"}')
    fs = compose_config(str(finetune.FINETUNE_CONFIG_DIR), "base",
                        finetune.fairseq_overrides(ctx(cfg)) + rank_overrides(0, 1, None, "cpu"))
    assert fs.task.noise_prob == 0.25 and fs.task.noise_snr == "0.0" and sorted(fs.task.modalities) == ["audio", "video"]
    assert fs.optimization.max_update == 60000 and fs.model.freeze_finetune_updates == 48000
    assert (fs.lr_scheduler.warmup_steps, fs.lr_scheduler.decay_steps) == (20000, 40000)
    assert list(cfg.finetune.noise.eval_snrs) == [-10, -5, 0, 5, 10]


def test_noise_stage_runs_when_something_uses_it(tmp_path):
    assert ("noise", None) not in planned(config(tmp_path))  # smoke: clean
    for overrides in (["train.noise.prob=0.5"], ["finetune.noise.eval_snrs=[0]"], ["noise.enabled=true"]):
        steps = planned(config(tmp_path, "smoke", *overrides))
        assert steps[:3] == [("crop", None), ("manifest", None), ("noise", None)], overrides
    # noise made elsewhere: no stage, and no dependency
    elsewhere = config(tmp_path, "smoke", "train.noise.prob=0.5", f"train.noise.dir={tmp_path}")
    assert ("noise", None) not in planned(elsewhere)
    assert "noise" not in get_stage("train").dependencies(ctx(elsewhere, 1))
    assert "noise" in get_stage("train").dependencies(ctx(config(tmp_path, "smoke", "train.noise.prob=0.5"), 1))
    only_two = config(tmp_path, "smoke", "train.noise.prob=0.5", "train.noise.iterations=[2]")
    assert "noise" not in get_stage("train").dependencies(ctx(only_two, 1))
    assert "noise" in get_stage("train").dependencies(ctx(only_two, 2))
    assert "noise" in get_stage("finetune").dependencies(ctx(config(tmp_path, "smoke", "finetune.noise.prob=0.1")))


def test_another_evaluation_under_noise_is_another_output(tmp_path):
    from pipeline.stage import Shard

    stage, shard = get_stage("finetune"), Shard(0, 1, "finetune")
    clean = stage.outputs(ctx(config(tmp_path)), shard)
    first = stage.outputs(ctx(config(tmp_path, "smoke", "finetune.noise.eval_snrs=[0,5]")), shard)
    again = stage.outputs(ctx(config(tmp_path, "smoke", "finetune.noise.eval_snrs=[0,5]")), shard)
    other = stage.outputs(ctx(config(tmp_path, "smoke", "finetune.noise.eval_snrs=[-5,0,5]")), shard)
    assert first[:2] == clean and len(first) == 3 and first == again
    assert other[2] != first[2] and other[2].parent == first[2].parent


@pytest.mark.parametrize("overrides, message", [
    (["train.noise.prob=1.5"], "train.noise.prob"),
    (["train.noise.prob=0.5", "train.noise.snr=(5,-5)"], "train.noise.snr"),
    (["train.noise.prob=0.5", "train.noise.snr=loud"], "train.noise.snr"),
    (["train.noise.prob=0.5", "noise.enabled=false"], "noise.enabled=false"),
    (["train.noise.prob=0.5", "train.noise.iterations=[3]"], "train.noise.iterations"),
    (["train.noise.prob=0.5", "train.noise.dir=/nonexistent/noise"], "no such directory"),
    (["train.overrides=[task.noise_prob=0.5]"], "task.noise_prob"),
    (["finetune.overrides=[++task.noise_wav=/x]"], "task.noise_wav"),
    (["finetune.noise.eval_snrs=[0]", "finetune.noise.eval_modalities=[lips]"], "eval_modalities"),
    (["finetune.noise.eval_snrs=[0]", "finetune.noise.eval_splits=[dev]"], "eval_splits"),
    (["noise.dirs=[/nonexistent/musan]"], "noise.dirs"),
    (["noise.corpus_categories={bab/ble: 3}"], "noise.corpus_categories"),
    (["noise.corpus_clips={train: 4, dev: 1}"], "noise.corpus_clips"),
    (["noise.min_piece_seconds=12"], "noise.min_piece_seconds"),
    (["noise.corpus_categories=null"], "nothing to make"),
    (["noise.corpus_categories.babble=0", "noise.corpus_categories.speech=0"], "nothing to make"),
    (["noise.corpus_clips={train: 0, valid: 0, test: 0}"], "nothing to make"),
    (["train.noise.prob=0.5", "train.noise.categories=[music]"], "are not made by the noise stage"),
    (["finetune.noise.eval_snrs=[0]", "finetune.noise.eval_categories=[babble,cafe]"], "are not made"),
])
def test_impossible_settings_are_config_errors(tmp_path, overrides, message):
    cfg = config(tmp_path, "smoke", *overrides, f"finetune.pretrained_checkpoint={REPO_ROOT / 'launch.py'}")
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("+", r"\+")):
        for stage in ("noise", "train", "finetune"):
            get_stage(stage).validate(ctx(cfg, None))


def test_snr_settings_reach_the_task_as_it_parses_them():
    from avhubert.dataset import parse_snr
    from stages.noise_use import snr_setting

    assert snr_setting("0") == "0.0" and parse_snr(snr_setting(-7.5)) == -7.5
    assert snr_setting("(-5, 5)") == "(-5, 5)" and parse_snr(snr_setting("[-5,5]")) == (-5, 5)
    for bad in ("(5, -5)", "(0.5, 2)", "x", "(1, 2, 3)", "true"):
        with pytest.raises(ValueError):
            snr_setting(bad)
