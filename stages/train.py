"""train: AV-HuBERT pretraining of one iteration with fairseq, as one multi-task job.

One shard = one submitit job of ``nodes x tasks_per_node`` tasks (cluster config); ``run`` is
called in every task and runs one fairseq rank in-process (``avhubert.train_entry``). Iteration
N's fairseq config is built here from a base config (``avhubert/conf/pretrain/<model_config>.yaml``)
plus the schedule and the work dir; nobody writes per-iteration config files.

Resuming: fairseq restores ``checkpoint_last.pt`` (model, optimizer, update count, data iterator
position), so a requeued or relaunched job continues counting updates. The stage is complete only
when ``checkpoints/checkpoint_final.pt`` exists, an atomic copy of ``checkpoint_last.pt`` made by
rank 0 once the update count has reached ``max_update``. Features of iteration N+1 read exactly
that file.

Logs: fairseq writes TensorBoard events (tensorboardX) under ``tensorboard/``; ``finalize`` turns
them into ``loss.png``.
"""
from __future__ import annotations

import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from omegaconf import ListConfig, OmegaConf

from pipeline.atomic import atomic_path
from pipeline.config import resources_for
from pipeline.errors import ConfigError
from pipeline.fingerprint import classify, file_identity
from pipeline.stage import Shard, Stage, StageContext
from stages import estimates
from stages.fairseq_run import (CHECKPOINT_DIR, FINAL_CHECKPOINT, LAST_CHECKPOINT, RUN_OWNED_KEYS, TENSORBOARD_DIR,
                                DistributedEnv, checkpoint_updates, close_fairseq_tensorboard_writers,
                                discard_previous_training, distributed_env, hydra_value, override_key, resume_point,
                                run_overrides, train_device, update_freq_for)
from stages.noise_use import (NOISE_TASK_KEYS, TrainNoise, inert_noise_settings, task_overrides as noise_overrides,
                              uses_noise_stage, validate_use)
from stages.schedule import label_rate
from stages.tensorboard import plot_loss_curve

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
PRETRAIN_CONFIG_DIR = REPO_ROOT / "avhubert" / "conf" / "pretrain"

LOSS_PNG = "loss.png"

STAGE_OWNED_KEYS = (
    "task.data",
    "task.label_dir",
    "task.labels",
    "task.label_rate",
    "model.label_rate",
    *NOISE_TASK_KEYS,  # from train.noise
    *RUN_OWNED_KEYS,
)


@classify(output=("overrides", "noise", "update_freq"), per_iteration=("model_config", "max_update", "iteration_overrides"),
          ignored={"master_port": "where the ranks meet"})
@dataclass
class Config:
    # Base fairseq config: a name in avhubert/conf/pretrain/ ("base", "large", "tiny") or a path
    # to a .yaml file of the same form; or a list with one per iteration (the paper trains
    # iteration 1 with other masking settings: presets/base.yaml uses [base_iter1, base, ...]).
    model_config: Any = "base"
    # Updates per iteration: None = the base config's optimization.max_update; an int for every
    # iteration; or a list with one entry per iteration (the paper trains iterations differently).
    max_update: Any = None
    # Extra fairseq ``key=value`` overrides (hydra syntax), applied to every iteration.
    overrides: List[str] = field(default_factory=list)
    # Per-iteration extra overrides: entry i applies to iteration i+1 (after ``overrides``).
    iteration_overrides: List[List[str]] = field(default_factory=list)
    # Batches each rank accumulates per update. None = the recipe's batch per update on this job's
    # ranks: ceil(base config's distributed_world_size x update_freq / ranks) (avhubert/effective_batch.py).
    update_freq: Optional[int] = None
    # Rendezvous port of rank 0; None = derived from the job id (stable across requeues).
    master_port: Optional[int] = None
    # Noise mixed into the audio (stages/noise.py: prob, snr, categories, iterations, dir).
    noise: TrainNoise = field(default_factory=TrainNoise)


# ----------------------------------------------------------------------------------------------
# config building


def base_config_path(cfg, iteration: int) -> Path:
    name = cfg.train.model_config
    if isinstance(name, (list, tuple, ListConfig)):
        if not 1 <= iteration <= len(name):
            raise ConfigError(
                f"train.model_config lists {len(name)} configs, but iteration {iteration} needs one"
            )
        name = name[iteration - 1]
    name = str(name)
    if name.endswith((".yaml", ".yml")) or os.sep in name:
        return Path(name).expanduser().resolve()
    return PRETRAIN_CONFIG_DIR / f"{name}.yaml"


def train_update_freq(ctx: StageContext, ranks: int):
    """The update_freq iteration ``ctx.iteration`` trains with on ``ranks`` ranks."""
    return update_freq_for(base_config_path(ctx.cfg, ctx.iteration), ranks, ctx.cfg.train.get("update_freq"))


def _base_max_update(cfg, iteration: int) -> Optional[int]:
    path = base_config_path(cfg, iteration)
    if not path.is_file():
        return None
    base = OmegaConf.load(path)
    value = OmegaConf.select(base, "optimization.max_update", default=None, throw_on_missing=False)
    return int(value) if isinstance(value, (int, str)) and str(value).isdigit() else None


def max_update_for(cfg, iteration: int) -> int:
    """Number of updates iteration ``iteration`` trains to (absolute count, as fairseq counts)."""
    value = cfg.train.max_update
    if isinstance(value, (list, tuple, ListConfig)):
        if not 1 <= iteration <= len(value):
            raise ConfigError(
                f"train.max_update lists {len(value)} values, but iteration {iteration} needs one"
            )
        value = value[iteration - 1]
    if value is None:
        value = _base_max_update(cfg, iteration)
        if value is None:
            raise ConfigError(
                f"train.max_update is not set and {base_config_path(cfg, iteration)} has no "
                "optimization.max_update"
            )
    try:
        value = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"train.max_update: {value!r} is not an integer") from None
    if value <= 0:
        raise ConfigError(f"train.max_update must be positive, got {value}")
    return value


def user_overrides(cfg, iteration: int) -> List[str]:
    extra = list(cfg.train.overrides or [])
    per_iteration = list(cfg.train.iteration_overrides or [])
    if iteration <= len(per_iteration) and per_iteration[iteration - 1] is not None:
        extra += list(per_iteration[iteration - 1])
    return [str(o) for o in extra]


def fairseq_overrides(
    ctx: StageContext, dist: Optional[DistributedEnv] = None, device: str = "cpu",
    n_visible_gpus: Optional[int] = None,
) -> List[str]:
    """Hydra overrides turning the base config into iteration ``ctx.iteration``'s config."""
    cfg, iteration = ctx.cfg, ctx.iteration
    if iteration is None:
        raise ValueError("the train stage runs per iteration; ctx.iteration is None")
    dist = dist or DistributedEnv()
    rate = label_rate(cfg, iteration)
    stage_dir = ctx.stage_dir("train")
    overrides = [
        f"task.data={hydra_value(ctx.with_iteration(None).stage_dir('manifest'))}",
        f"task.label_dir={hydra_value(ctx.stage_dir('labels'))}",
        "task.labels=[km]",
        f"task.label_rate={rate}",
        f"model.label_rate={rate}",
    ]
    overrides += noise_overrides(ctx, cfg.train.noise, hydra_value, iteration)
    overrides += run_overrides(stage_dir, max_update_for(cfg, iteration), dist, device, n_visible_gpus,
                               train_update_freq(ctx, dist.world_size).update_freq)
    return overrides + user_overrides(cfg, iteration)


# ----------------------------------------------------------------------------------------------
# the stage


def pretraining_settings(ctx: StageContext, s: dict) -> dict:
    """Iteration N's settings resolved: the base config (its content when it is a file of the
    user's), the update count it trains to, its overrides, and its noise only when it has noise."""
    it = ctx.iteration
    name = s.get(f"train.model_config[{it}]")
    if name is not None and (str(name).endswith((".yaml", ".yml")) or os.sep in str(name)):
        s[f"train.model_config[{it}]"] = file_identity(base_config_path(ctx.cfg, it))
    s[f"train.max_update[{it}]"] = max_update_for(ctx.cfg, it)
    s[f"train.iteration_overrides[{it}]"] = s.get(f"train.iteration_overrides[{it}]") or []
    noise = {k: s.pop(k) for k in list(s) if k.startswith("train.noise.")}
    use = ctx.cfg.train.noise
    if float(use.prob or 0) > 0 and (not list(use.iterations or []) or it in use.iterations):
        s.update({k: v for k, v in noise.items() if k != "train.noise.iterations"})
    else:
        s[f"train.noise[{it}]"] = "off"
    return s


class TrainStage(Stage):
    name = "train"
    depends_on = ("labels",)
    per_iteration = True
    multi_task = True
    checkpointable = True
    libraries = ("torch", "fairseq|fairseq-fixed", "numpy")

    def dependencies(self, ctx: StageContext):
        # noise-augmented iterations read the noise stage's lists
        return (*self.depends_on, "noise") if uses_noise_stage(ctx.cfg.train.noise, ctx.iteration) else self.depends_on

    def validate(self, ctx: StageContext) -> None:
        cfg = ctx.cfg
        validate_use(ctx, "train")
        for override in list(cfg.train.overrides or []) + [
            o for per in (cfg.train.iteration_overrides or []) for o in (per or [])
        ]:
            if "=" not in str(override) and not str(override).startswith("~"):
                raise ConfigError(f"train.overrides: {override!r} is not a key=value override")
            key = override_key(str(override))
            if key in STAGE_OWNED_KEYS:
                raise ConfigError(
                    f"train.overrides: {key} is set by the train stage from the schedule and the "
                    "work dir; use train.max_update / train.update_freq / schedule.* instead of overriding it"
                )
        n_iterations = int(cfg.get("iterations", 0) or 0)
        iterations = [ctx.iteration] if ctx.iteration else range(1, max(n_iterations, 1) + 1)
        for it in iterations:
            try:
                label_rate(cfg, it)
            except ValueError as e:
                raise ConfigError(f"schedule.iterations: {e}") from None
            path = base_config_path(cfg, it)
            if not path.is_file():
                raise ConfigError(
                    f"train.model_config: base fairseq config {path} (iteration {it}) does not "
                    f"exist (names available: "
                    f"{sorted(p.stem for p in PRETRAIN_CONFIG_DIR.glob('*.yaml'))})"
                )
            max_update_for(cfg, it)
            train_update_freq(ctx.with_iteration(it), 1)  # a bad train.update_freq fails here

    def settings(self, ctx: StageContext) -> dict:
        return pretraining_settings(ctx, super().settings(ctx))

    def inert_settings(self, ctx: StageContext) -> dict:
        return inert_noise_settings("train", ctx.cfg.train.noise, ctx.iteration)

    def accepts_change(self, ctx: StageContext, key: str, old, new) -> Optional[str]:
        if key == f"train.max_update[{ctx.iteration}]" and old is not None and new is not None and new > old:
            return f"train.max_update raised from {old} to {new}: training continues from its last checkpoint"
        return None

    def provenance_dirs(self, ctx: StageContext) -> list[Path]:
        return [ctx.stage_dir("train"), ctx.stage_dir("train") / CHECKPOINT_DIR]

    def shards(self, ctx: StageContext) -> list[Shard]:
        return [Shard(index=0, count=1, key="train")]

    def estimate(self, ctx: StageContext):
        res = resources_for(ctx.cfg, self.name, multi_task=self.multi_task)
        return estimates.train(ctx, base_config_path(ctx.cfg, ctx.iteration), max_update_for(ctx.cfg, ctx.iteration),
                               res, train_update_freq(ctx, res.nodes * res.tasks_per_node))

    def outputs(self, ctx: StageContext, shard: Shard) -> list[Path]:
        return [ctx.stage_dir("train") / CHECKPOINT_DIR / FINAL_CHECKPOINT]

    def run(self, ctx: StageContext, shard: Shard) -> dict:
        start = time.time()
        cfg, iteration = ctx.cfg, ctx.iteration
        max_update = max_update_for(cfg, iteration)
        dist = distributed_env(cfg.train.get("master_port", None))
        device, n_gpus = train_device()
        ckpt_dir = ctx.stage_dir("train") / CHECKPOINT_DIR
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        final = ckpt_dir / FINAL_CHECKPOINT
        last = ckpt_dir / LAST_CHECKPOINT

        fresh = False
        if ctx.force and final.exists():
            # --force on a complete iteration: train a new model from scratch. A requeue of that
            # run finds no final checkpoint (it is written last) and resumes instead.
            fresh = True
            if dist.rank == 0:
                discard_previous_training(ctx.stage_dir("train"))
        final_updates = None if fresh else checkpoint_updates(final)
        done_before = final_updates is not None and final_updates >= max_update
        resumed_from, start_updates = (None, 0)
        if not done_before and not fresh:
            resumed_from, start_updates = resume_point(ckpt_dir, repair=dist.rank == 0)
        log.info(
            "train iteration %s rank %d/%d on %s: %s", iteration, dist.rank, dist.world_size,
            device, f"resuming at {start_updates} updates from {resumed_from}" if resumed_from
            else "from scratch",
        )
        batch = train_update_freq(ctx, dist.world_size)
        log.log(logging.WARNING if batch.excess else logging.INFO, "train iteration %s: %s", iteration,
                batch.describe())

        trained = False
        if not done_before and start_updates < max_update:
            from avhubert.train_entry import run_fairseq_train

            base = base_config_path(cfg, iteration)
            close_fairseq_tensorboard_writers()
            try:
                run_fairseq_train(
                    str(base.parent),
                    base.stem,
                    fairseq_overrides(ctx, dist, device, n_gpus),
                    rank=dist.rank,
                    world_size=dist.world_size,
                    init_method=dist.init_method,
                    device=device,
                )
            finally:
                close_fairseq_tensorboard_writers()
            trained = True

        if dist.rank != 0:
            return {"rank": dist.rank}

        if done_before:
            end_updates = final_updates
        else:
            end_updates = checkpoint_updates(last)
            if end_updates is None or end_updates < max_update:
                raise RuntimeError(
                    f"training of iteration {iteration} stopped at {end_updates or 0} updates, "
                    f"before max_update={max_update} ({last}); see the job log. (An epoch or lr "
                    "limit in the fairseq config ends training early: raise "
                    "optimization.max_epoch or lower train.max_update.)"
                )
            with atomic_path(final) as tmp:
                shutil.copyfile(last, tmp)
        return {
            "num_updates": int(end_updates),
            "max_update": max_update,
            "resumed_from_updates": int(start_updates),
            "trained": trained,
            "world_size": dist.world_size,
            "update_freq": batch.as_dict(),
            "backend": "nccl" if device == "cuda" else "gloo",
            "host": socket.gethostname(),
            "wall_s": round(time.time() - start, 1),
        }

    def progress(self, ctx: StageContext, shard: Shard) -> Optional[int]:
        """The update count training would resume from (None before the first checkpoint): a job
        stopped at its time limit is requeued only when this grew since it started."""
        ckpt_dir = ctx.stage_dir("train") / CHECKPOINT_DIR
        if ctx.force and (ckpt_dir / FINAL_CHECKPOINT).exists():
            return None  # --force on a complete iteration: run() starts over from nothing
        path, updates = resume_point(ckpt_dir)
        return updates if path is not None else None

    def save_now(self, ctx: StageContext, shard: Shard) -> bool:
        """A preemption: the running fairseq training saves ``checkpoint_last.pt`` at its next
        update and stops (``avhubert.train_entry.request_save_and_stop``, a flag); False when no
        training runs in this job (nothing to save)."""
        from avhubert.train_entry import request_save_and_stop

        return request_save_and_stop()

    def out_of_date(self, ctx: StageContext, shard: Shard, done: dict) -> Optional[str]:
        """A complete iteration trained to fewer updates than ``train.max_update`` asks now runs
        again: it continues from its last checkpoint (and the next iteration becomes stale)."""
        stats = done.get("stats") or {}
        trained = stats.get("num_updates", stats.get("max_update"))
        wanted = max_update_for(ctx.cfg, ctx.iteration)
        if trained is not None and int(trained) < wanted:
            return (f"train.max_update raised from {int(trained)} to {wanted}: training continues from "
                    f"its last checkpoint")
        return None

    def final_outputs(self, ctx: StageContext) -> list[Path]:
        return [ctx.stage_dir("train") / LOSS_PNG]

    def finalize(self, ctx: StageContext, shard_stats: dict[str, dict]) -> dict:
        stage_dir = ctx.stage_dir("train")
        summary = plot_loss_curve(
            stage_dir / TENSORBOARD_DIR, stage_dir / LOSS_PNG,
            f"AV-HuBERT pretraining, iteration {ctx.iteration}",
        )
        stats = shard_stats.get("train") or next(iter(shard_stats.values()), {}) or {}
        summary.update({k: stats[k] for k in ("num_updates", "world_size", "wall_s") if k in stats})
        return summary


STAGE = TrainStage()
