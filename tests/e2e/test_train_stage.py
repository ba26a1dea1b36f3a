"""The train stage's own logic, without training: iteration configs, the completion/resume rule on
real checkpoint files, the loss curve from real TensorBoard event files. (Training itself runs in
the end-to-end tests: test_pipeline_local.py, test_pipeline_slurm.py.)"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from pipeline.errors import ConfigError
from pipeline.stage import StageContext
from stages import fairseq_run, tensorboard, train as train_stage
from stages.schedule import ScheduleConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
from golden_data import golden_file  # noqa: E402


def make_cfg(tmp_path: Path, **train) -> "OmegaConf":
    """The smoke preset's schedule and train section over the typed defaults."""
    smoke = OmegaConf.load(REPO_ROOT / "presets" / "smoke.yaml")
    cfg = OmegaConf.create({
        "workdir": str(tmp_path / "work"),
        "iterations": smoke.iterations,
        "schedule": OmegaConf.merge(OmegaConf.structured(ScheduleConfig), smoke.schedule),
        "train": OmegaConf.merge(OmegaConf.structured(train_stage.Config), smoke.train, train),
    })
    return cfg


def ctx_for(cfg, iteration) -> StageContext:
    return StageContext(cfg=cfg, workdir=Path(cfg.workdir), iteration=iteration)


def as_dict(overrides):
    return dict(o.split("=", 1) for o in overrides)


def test_iteration_configs_follow_schedule(tmp_path):
    cfg = make_cfg(tmp_path, max_update=[7, 9], overrides=["common.log_interval=1"],
                   iteration_overrides=[[], ["model.mask_prob_image=0.3"]])
    work = Path(cfg.workdir)
    it1 = as_dict(train_stage.fairseq_overrides(ctx_for(cfg, 1)))
    it2 = as_dict(train_stage.fairseq_overrides(ctx_for(cfg, 2)))
    # MFCC targets at 100 Hz in iteration 1, layer clusters at 25 Hz later
    assert (it1["task.label_rate"], it1["model.label_rate"]) == ("100", "100")
    assert (it2["task.label_rate"], it2["model.label_rate"]) == ("25", "25")
    assert it1["task.data"] == it2["task.data"] == str(work / "manifest")
    assert it1["task.label_dir"] == str(work / "iter1" / "labels")
    assert it2["task.label_dir"] == str(work / "iter2" / "labels")
    assert it2["checkpoint.save_dir"] == str(work / "iter2" / "train" / "checkpoints")
    assert it2["common.tensorboard_logdir"] == str(work / "iter2" / "train" / "tensorboard")
    assert it1["task.labels"] == "[km]"
    assert (it1["optimization.max_update"], it2["optimization.max_update"]) == ("7", "9")
    assert it1["common.log_interval"] == "1" and "model.mask_prob_image" not in it1
    assert it2["model.mask_prob_image"] == "0.3"
    # a single CPU process: no rendezvous
    assert it1["distributed_training.distributed_world_size"] == "1"
    assert "distributed_training.distributed_init_method" not in it1


def test_distributed_settings_of_a_two_rank_cpu_job(tmp_path):
    cfg = make_cfg(tmp_path, max_update=5)
    env = fairseq_run.DistributedEnv(rank=1, world_size=2, local_rank=1,
                                      master_addr="127.0.0.1", master_port=23456)
    o = as_dict(train_stage.fairseq_overrides(ctx_for(cfg, 1), env, "cpu"))
    assert o["distributed_training.distributed_world_size"] == "2"
    assert o["distributed_training.distributed_rank"] == "1"
    assert o["distributed_training.distributed_init_method"] == "tcp://127.0.0.1:23456"
    assert o["distributed_training.distributed_no_spawn"] == "true"
    assert o["distributed_training.ddp_backend"] == "no_c10d"
    assert o["distributed_training.distributed_backend"] == "gloo"
    assert "distributed_training.device_id" not in o
    g = as_dict(train_stage.fairseq_overrides(ctx_for(cfg, 1), env, "cuda", n_visible_gpus=8))
    assert g["distributed_training.distributed_backend"] == "nccl"
    assert g["distributed_training.device_id"] == "1"
    g1 = as_dict(train_stage.fairseq_overrides(ctx_for(cfg, 1), env, "cuda", n_visible_gpus=1))
    assert g1["distributed_training.device_id"] == "0"  # --gpus-per-task: one visible GPU


def test_overrides_survive_hydra_parsing_of_odd_paths(tmp_path):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    odd = tmp_path / "my work, v2 (it's=odd)"
    cfg = make_cfg(tmp_path, max_update=3)
    cfg.workdir = str(odd)
    overrides = train_stage.fairseq_overrides(ctx_for(cfg, 2))
    parsed = {o.key_or_group: o.value() for o in OverridesParser.create().parse_overrides(overrides)}
    assert parsed["task.label_dir"] == str(odd / "iter2" / "labels")
    assert parsed["checkpoint.save_dir"] == str(odd / "iter2" / "train" / "checkpoints")
    assert parsed["task.labels"] == ["km"]


def test_validate_rejects_bad_train_settings(tmp_path):
    stage = train_stage.STAGE
    with pytest.raises(ConfigError, match="task.label_dir"):
        stage.validate(ctx_for(make_cfg(tmp_path, overrides=["task.label_dir=/x"]), 1))
    with pytest.raises(ConfigError, match="max_update"):
        stage.validate(ctx_for(make_cfg(tmp_path, iteration_overrides=[
            [], ["optimization.max_update=3"]]), 1))
    with pytest.raises(ConfigError, match="lists 1 values"):
        train_stage.max_update_for(make_cfg(tmp_path, max_update=[4]), 2)
    with pytest.raises(ConfigError, match="not a key=value"):
        stage.validate(ctx_for(make_cfg(tmp_path, overrides=["common.seed"]), 1))
    with pytest.raises(ConfigError, match="does not exist"):
        stage.validate(ctx_for(make_cfg(tmp_path, model_config="no_such_model"), 1))


# --- the recipe's effective batch: update_freq from the recipe's world size ----------------------


@pytest.mark.parametrize("model_config, ranks, update_freq", [
    ("base", 1, 32), ("base", 2, 16), ("base", 3, 11), ("base", 64, 1),
    ("large", 1, 64), ("large", 2, 32), ("large", 3, 22), ("large", 64, 1),
])
def test_update_freq_keeps_the_recipes_batch_on_any_number_of_ranks(tmp_path, model_config, ranks, update_freq):
    """BASE is written for 32 ranks, LARGE for 64 (update_freq [1]): fewer ranks accumulate
    ceil(recipe / ranks) batches per update; the plan, the job's fairseq config and its stats say so."""
    from pipeline.config import ClusterConfig

    cfg = make_cfg(tmp_path, model_config=model_config, max_update=5)
    env = fairseq_run.DistributedEnv(rank=0, world_size=ranks, master_port=23456)
    o = as_dict(train_stage.fairseq_overrides(ctx_for(cfg, 1), env, "cpu"))
    assert o["optimization.update_freq"] == f"[{update_freq}]"
    assert o["distributed_training.distributed_world_size"] == str(ranks)
    batch = train_stage.train_update_freq(ctx_for(cfg, 1), ranks)
    recipe = {"base": 32, "large": 64}[model_config]
    assert (batch.update_freq, batch.recipe_batches, batch.excess) == (update_freq, recipe, ranks * update_freq - recipe)
    # the dry run's plan names it, with the remainder
    cfg.cluster = OmegaConf.structured(ClusterConfig(gpus_per_node=ranks))
    detail = train_stage.STAGE.estimate(ctx_for(cfg, 1)).detail
    assert f"update_freq {update_freq} (ceil({recipe} recipe ranks" in detail
    assert ("exactly" in detail) == (ranks * update_freq == recipe), detail
    if ranks == 3:
        assert f"+ {3 * update_freq - recipe} (+3.1 %)" in detail
    if ranks == 64 and model_config == "base":
        assert "(+100.0 %); more ranks than the recipe: dataset.max_tokens x 32/64" in detail


def test_update_freq_set_by_the_user_and_composed_by_fairseq(tmp_path):
    from avhubert.extract import ensure_plugin_registered
    from avhubert.train_entry import compose_config, rank_overrides

    cfg = make_cfg(tmp_path, model_config="base", max_update=5, update_freq=4)
    batch = train_stage.train_update_freq(ctx_for(cfg, 1), 2)
    assert batch.overridden and batch.update_freq == 4 and "set by the user" in batch.describe()
    assert batch.as_dict()["batches_per_update"] == 8 and batch.excess == -24
    ensure_plugin_registered()
    base = train_stage.base_config_path(cfg, 1)
    env = fairseq_run.DistributedEnv(rank=0, world_size=1)
    fs = compose_config(str(base.parent), base.stem,
                        train_stage.fairseq_overrides(ctx_for(cfg, 1), env) + rank_overrides(0, 1, None, "cpu"))
    assert list(fs.optimization.update_freq) == [4]
    # the fairseq key belongs to the stage; a bad value is refused before anything runs
    with pytest.raises(ConfigError, match="train.update_freq"):
        train_stage.STAGE.validate(ctx_for(make_cfg(tmp_path, overrides=["optimization.update_freq=[2]"]), 1))
    with pytest.raises(ConfigError, match="update_freq must be a positive integer"):
        train_stage.STAGE.validate(ctx_for(make_cfg(tmp_path, update_freq=0), 1))


# --- checkpoints: the completion rule and the resume point ---------------------------------------


def save_checkpoint(path: Path, num_updates: int) -> Path:
    """A checkpoint in fairseq's layout (checkpoint_utils.save_state): what the rule reads."""
    state = {
        "args": None,
        "cfg": {"optimization": {"max_update": 100}},
        "model": {"w": torch.full((64, 64), float(num_updates))},
        "criterion": None,
        "optimizer_history": [{"criterion_name": "AVHubertCriterion", "optimizer_name": "Adam",
                               "lr_scheduler_state": {}, "num_updates": num_updates}],
        "task_state": {},
        "extra_state": {"train_iterator": {"epoch": 1}},
        "last_optimizer_state": None,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def test_checkpoint_updates_reads_the_reference_checkpoint():
    ref = golden_file("ref_tiny_pretrain.pt")
    assert fairseq_run.checkpoint_updates(ref) == 26  # golden/README.md: 26 updates


def test_truncated_checkpoint_last_falls_back_to_the_newest_intact_one(tmp_path):
    ckpt = tmp_path / "checkpoints"
    save_checkpoint(ckpt / "checkpoint_1_2.pt", 2)
    os.utime(ckpt / "checkpoint_1_2.pt", (1, 1))
    save_checkpoint(ckpt / "checkpoint_1_4.pt", 4)
    full = save_checkpoint(tmp_path / "full.pt", 6).read_bytes()
    (ckpt / "checkpoint_last.pt").write_bytes(full[: len(full) // 2])  # copy cut by SIGKILL
    # a non-zero rank only reads: same answer, no file touched
    path, updates = fairseq_run.resume_point(ckpt, repair=False)
    assert (path.name, updates) == ("checkpoint_1_4.pt", 4)
    assert fairseq_run.checkpoint_updates(ckpt / "checkpoint_last.pt") is None
    path, updates = fairseq_run.resume_point(ckpt, repair=True)
    assert updates == 4
    assert fairseq_run.checkpoint_updates(ckpt / "checkpoint_last.pt") == 4
    assert not [p for p in ckpt.iterdir() if p.name.startswith(".tmp")]


def test_nothing_readable_means_from_scratch(tmp_path):
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    (ckpt / "checkpoint_last.pt").write_bytes(b"PK\x03\x04 truncated")
    assert fairseq_run.resume_point(ckpt, repair=False) == (None, 0)
    assert (ckpt / "checkpoint_last.pt").exists()
    assert fairseq_run.resume_point(ckpt, repair=True) == (None, 0)
    assert not (ckpt / "checkpoint_last.pt").exists()


def test_complete_only_with_final_checkpoint_at_max_update(tmp_path):
    """run() on a finished checkpoint_last (job killed between the end of training and the copy)
    writes checkpoint_final.pt without training again; below max_update it would train (that path
    needs fairseq: covered end to end)."""
    cfg = make_cfg(tmp_path, max_update=6)
    ctx = ctx_for(cfg, 1)
    stage = train_stage.STAGE
    shard = stage.shards(ctx)[0]
    (final,) = stage.outputs(ctx, shard)
    assert final == Path(cfg.workdir) / "iter1" / "train" / "checkpoints" / "checkpoint_final.pt"
    save_checkpoint(final.parent / "checkpoint_last.pt", 6)
    stats = stage.run(ctx, shard)
    assert stats["trained"] is False and stats["num_updates"] == 6
    assert fairseq_run.checkpoint_updates(final) == 6
    assert stage.run(ctx, shard)["num_updates"] == 6  # idempotent
    # max_update raised since: the old final checkpoint no longer counts; a checkpoint_last that
    # reached the new count (here: as if trained) becomes the final one
    save_checkpoint(final.parent / "checkpoint_last.pt", 8)
    stats = stage.run(ctx_for(make_cfg(tmp_path, max_update=8), 1), shard)
    assert stats["num_updates"] == 8 and stats["resumed_from_updates"] == 8
    assert fairseq_run.checkpoint_updates(final) == 8


# --- loss curve ----------------------------------------------------------------------------------


def test_loss_png_from_tensorboard_events_across_a_resume(tmp_path):
    from PIL import Image
    from tensorboardX import SummaryWriter

    tb = tmp_path / "tensorboard"
    # first run: updates 1-4, killed (its last record cut in half), resumed from update 2
    w = SummaryWriter(str(tb / "train_inner"), filename_suffix=".a")
    for step in range(1, 5):
        w.add_scalar("loss", 10.0 - step, step)
    w.close()
    first = next((tb / "train_inner").iterdir())
    data = first.read_bytes()
    first.write_bytes(data[:-7])
    w = SummaryWriter(str(tb / "train_inner"), filename_suffix=".b")
    for step in range(3, 9):
        w.add_scalar("loss", 7.5 - 0.5 * step, step)
    w.close()
    v = SummaryWriter(str(tb / "valid"))
    v.add_scalar("loss", 4.25, 8)
    v.close()
    scalars = tensorboard.read_scalars(tb / "train_inner")["loss"]
    steps = [s for s, *_ in scalars]
    assert steps == list(range(1, 9))  # step 4 of the first run was cut; 3 and 4 re-logged
    assert scalars[2][1] == pytest.approx(6.0) and scalars[-1][1] == pytest.approx(3.5)

    png = tmp_path / "loss.png"
    summary = tensorboard.plot_loss_curve(tb, png, "iteration 1")
    assert summary["train_points"] == 8 and summary["valid_points"] == 1
    assert summary["last_valid_loss"] == pytest.approx(4.25)
    assert summary["resumed_at_updates"] == [3]
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] >= 400 and im.size[1] >= 300
        pixels = np.asarray(im.convert("RGB")).reshape(-1, 3)
        assert len(np.unique(pixels, axis=0)) > 8  # something was drawn


def test_loss_png_without_events_fails_clearly(tmp_path):
    with pytest.raises(RuntimeError, match="no loss values"):
        tensorboard.plot_loss_curve(tmp_path / "tensorboard", tmp_path / "loss.png", "x")
    assert not (tmp_path / "loss.png").exists()


@pytest.mark.parametrize("preset", ["base", "large", "smoke"])
def test_presets_compose_a_fairseq_config_for_every_iteration(tmp_path, preset):
    """Each iteration of each preset composes (hydra + fairseq's schema, as training does) with
    the schedule's label rate and the reference per-iteration masking recipe."""
    from avhubert.extract import ensure_plugin_registered
    from avhubert.train_entry import compose_config, rank_overrides

    ensure_plugin_registered()
    spec = OmegaConf.load(REPO_ROOT / "presets" / f"{preset}.yaml")
    cfg = OmegaConf.create({
        "workdir": str(tmp_path / "work"),
        "iterations": spec.iterations,
        "schedule": OmegaConf.merge(OmegaConf.structured(ScheduleConfig), spec.get("schedule", {})),
        "train": OmegaConf.merge(OmegaConf.structured(train_stage.Config), spec.train),
    })
    train_stage.STAGE.validate(ctx_for(cfg, None))
    seen = []
    for it in range(1, int(cfg.iterations) + 1):
        base = train_stage.base_config_path(cfg, it)
        overrides = train_stage.fairseq_overrides(ctx_for(cfg, it)) + rank_overrides(0, 1, None, "cpu")
        fs = compose_config(str(base.parent), base.stem, overrides)
        assert fs.model.label_rate == fs.task.label_rate == (100 if it == 1 else 25)
        assert fs.task.label_dir == str(tmp_path / "work" / f"iter{it}" / "labels")
        assert fs.optimization.max_update == train_stage.max_update_for(cfg, it)
        seen.append((fs.model.masking_type, fs.model.mask_prob_image, fs.model.modality_dropout))
    if preset in ("base", "large"):
        assert int(cfg.iterations) == 5
        # reference base_vox_iter{3,4,5}.yaml / base_lrs3_iter1.yaml
        assert seen[0] == ("feature", 0.8, 0.0)
        assert seen[1:4] == [("feature", 0.8, 0.5)] * 3
        assert seen[4] == ("input", 0.3, 0.5)
        assert train_stage.max_update_for(cfg, 1) >= 400000


def test_validate_wants_a_schedule_entry_per_iteration(tmp_path):
    cfg = make_cfg(tmp_path, max_update=3)
    cfg.iterations = 3  # the smoke schedule lists 2
    with pytest.raises(ConfigError, match="schedule.iterations: iteration 3 is outside"):
        train_stage.STAGE.validate(ctx_for(cfg, None))


def test_force_on_a_complete_iteration_starts_from_scratch(tmp_path):
    cfg = make_cfg(tmp_path, max_update=6)
    stage_dir = Path(cfg.workdir) / "iter1" / "train"
    ckpt = stage_dir / "checkpoints"
    for name, n in (("checkpoint_1_6.pt", 6), ("checkpoint_last.pt", 6), ("checkpoint_final.pt", 6)):
        save_checkpoint(ckpt / name, n)
    (stage_dir / "tensorboard" / "train_inner").mkdir(parents=True)
    (stage_dir / "tensorboard" / "train_inner" / "events.out.tfevents.1.host").write_bytes(b"")
    fairseq_run.discard_previous_training(stage_dir)
    assert ckpt.is_dir() and not any(ckpt.iterdir())
    assert not (stage_dir / "tensorboard").exists()
    assert sorted(p.name for p in stage_dir.iterdir()) == ["checkpoints"]
    # without --force a complete iteration is left alone (idempotent rerun)
    save_checkpoint(ckpt / "checkpoint_final.pt", 6)
    stats = train_stage.STAGE.run(ctx_for(cfg, 1), train_stage.STAGE.shards(ctx_for(cfg, 1))[0])
    assert stats["trained"] is False
    # the shard's stats record the batch per update (tiny: written for 1 rank)
    assert stats["update_freq"] == {"update_freq": 1, "ranks": 1, "recipe_world_size": 1, "recipe_update_freq": 1,
                                    "batches_per_update": 1, "recipe_batches_per_update": 1,
                                    "excess_batches": 0, "overridden": False}
