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
import re
import shutil
import socket
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from pipeline.atomic import atomic_path
from pipeline.errors import ConfigError
from pipeline.stage import Shard, Stage, StageContext
from stages.noise import NOISE_TASK_KEYS, TrainNoise

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
PRETRAIN_CONFIG_DIR = REPO_ROOT / "avhubert" / "conf" / "pretrain"

CHECKPOINT_DIR = "checkpoints"
FINAL_CHECKPOINT = "checkpoint_final.pt"  # contract with the features stage of iteration N+1
LAST_CHECKPOINT = "checkpoint_last.pt"
TENSORBOARD_DIR = "tensorboard"
LOSS_PNG = "loss.png"

# Keys the stage fills in from the schedule, the work dir and the job environment. A user
# override of one of them would silently break the chain (or the resume), so it is refused.
# (the run-level keys are shared with the finetune stage, which launches fairseq the same way)
RUN_OWNED_KEYS = (
    "optimization.max_update",
    "optimization.update_freq",  # the recipe's batch on this job's ranks: train.update_freq
    "checkpoint.save_dir",
    "checkpoint.restore_file",
    "common.tensorboard_logdir",
    "distributed_training.distributed_world_size",
    "distributed_training.distributed_rank",
    "distributed_training.distributed_init_method",
    "distributed_training.distributed_no_spawn",
    "distributed_training.distributed_backend",
    "distributed_training.device_id",
)
STAGE_OWNED_KEYS = (
    "task.data",
    "task.label_dir",
    "task.labels",
    "task.label_rate",
    "model.label_rate",
    *NOISE_TASK_KEYS,  # from train.noise
    *RUN_OWNED_KEYS,
)


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
    from omegaconf import ListConfig

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


def update_freq_for(base: Path, ranks: int, override: Any = None):
    """``avhubert.effective_batch.UpdateFreq`` of a run of base fairseq config ``base`` on ``ranks``
    ranks (``override``: the user's train.update_freq / finetune.update_freq, or None). A bad
    value is a ConfigError."""
    from omegaconf import OmegaConf

    from avhubert.effective_batch import derive_update_freq, recipe_of

    try:
        world, freq = recipe_of(OmegaConf.load(base))
        return derive_update_freq(world, freq, ranks, override)
    except ValueError as e:
        raise ConfigError(f"update_freq ({base.name}): {e}") from None


def train_update_freq(ctx: StageContext, ranks: int):
    """The update_freq iteration ``ctx.iteration`` trains with on ``ranks`` ranks."""
    return update_freq_for(base_config_path(ctx.cfg, ctx.iteration), ranks, ctx.cfg.train.get("update_freq"))


def _base_max_update(cfg, iteration: int) -> Optional[int]:
    from omegaconf import OmegaConf

    path = base_config_path(cfg, iteration)
    if not path.is_file():
        return None
    base = OmegaConf.load(path)
    value = OmegaConf.select(base, "optimization.max_update", default=None, throw_on_missing=False)
    return int(value) if isinstance(value, (int, str)) and str(value).isdigit() else None


def max_update_for(cfg, iteration: int) -> int:
    """Number of updates iteration ``iteration`` trains to (absolute count, as fairseq counts)."""
    from omegaconf import ListConfig

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


_PLAIN_VALUE = re.compile(r"^[A-Za-z0-9_./:+\-]*$")


def _hydra_value(value: Any) -> str:
    """A value as hydra's override grammar reads it back unchanged (paths may hold anything)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    text = str(value)
    if _PLAIN_VALUE.match(text) and text not in ("", "null", "true", "false"):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _override_key(override: str) -> str:
    key = override.split("=", 1)[0].strip()
    return key.lstrip("+~")


def user_overrides(cfg, iteration: int) -> List[str]:
    extra = list(cfg.train.overrides or [])
    per_iteration = list(cfg.train.iteration_overrides or [])
    if iteration <= len(per_iteration) and per_iteration[iteration - 1] is not None:
        extra += list(per_iteration[iteration - 1])
    return [str(o) for o in extra]


@dataclass(frozen=True)
class DistributedEnv:
    """Where this task sits in the training job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29671

    @property
    def init_method(self) -> Optional[str]:
        if self.world_size == 1:
            return None
        return f"tcp://{self.master_addr}:{self.master_port}"


def distributed_env(master_port: Optional[int] = None) -> DistributedEnv:
    """Rank, world size and rendezvous address from submitit's job environment (Slurm or local
    executor). Outside a submitit job (or in the debug executor) this is a single process."""
    import submitit

    try:
        job_env = submitit.JobEnvironment()
    except RuntimeError:  # not inside a submitit job
        return DistributedEnv()
    world_size = int(job_env.num_tasks)
    if world_size <= 1:
        return DistributedEnv()
    torch_env = submitit.helpers.TorchDistributedEnvironment()
    # on one node the loopback address always works; the node name may not resolve to itself
    addr = "127.0.0.1" if int(job_env.num_nodes) == 1 else str(torch_env.master_addr)
    port = int(master_port) if master_port else int(torch_env.master_port)
    return DistributedEnv(
        rank=int(job_env.global_rank),
        world_size=world_size,
        local_rank=int(job_env.local_rank),
        master_addr=addr,
        master_port=port,
    )


def train_device() -> Tuple[str, Optional[int]]:
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        return "cuda", torch.cuda.device_count()
    return "cpu", None


def fairseq_overrides(
    ctx: StageContext, dist: Optional[DistributedEnv] = None, device: str = "cpu",
    n_visible_gpus: Optional[int] = None,
) -> List[str]:
    """Hydra overrides turning the base config into iteration ``ctx.iteration``'s config."""
    from stages.schedule import label_rate

    cfg, iteration = ctx.cfg, ctx.iteration
    if iteration is None:
        raise ValueError("the train stage runs per iteration; ctx.iteration is None")
    dist = dist or DistributedEnv()
    rate = label_rate(cfg, iteration)
    stage_dir = ctx.stage_dir("train")
    overrides = [
        f"task.data={_hydra_value(ctx.with_iteration(None).stage_dir('manifest'))}",
        f"task.label_dir={_hydra_value(ctx.stage_dir('labels'))}",
        "task.labels=[km]",
        f"task.label_rate={rate}",
        f"model.label_rate={rate}",
    ]
    from stages.noise import task_overrides as noise_overrides

    overrides += noise_overrides(ctx, cfg.train.noise, _hydra_value, iteration)
    overrides += run_overrides(stage_dir, max_update_for(cfg, iteration), dist, device, n_visible_gpus,
                               train_update_freq(ctx, dist.world_size).update_freq)
    return overrides + user_overrides(cfg, iteration)


def run_overrides(stage_dir: Path, max_update: int, dist: "DistributedEnv", device: str,
                  n_visible_gpus: Optional[int] = None, update_freq: int = 1) -> List[str]:
    """The fairseq keys of one run that the pipeline owns (shared with the finetune stage):
    update budget and batches accumulated per update, checkpoint and TensorBoard dirs, and this
    rank's distributed settings."""
    overrides = [
        f"optimization.max_update={max_update}",
        f"optimization.update_freq=[{int(update_freq)}]",
        f"checkpoint.save_dir={_hydra_value(stage_dir / CHECKPOINT_DIR)}",
        # fairseq resumes from <save_dir>/checkpoint_last.pt: this is the requeue/relaunch path
        "checkpoint.restore_file=checkpoint_last.pt",
        f"common.tensorboard_logdir={_hydra_value(stage_dir / TENSORBOARD_DIR)}",
        f"distributed_training.distributed_world_size={dist.world_size}",
        f"distributed_training.distributed_rank={dist.rank}",
        # one process per rank, started by submitit (never fairseq's own spawn)
        "distributed_training.distributed_no_spawn=true",
        # gradients are all-reduced without the c10d reducer: works with gloo on CPU too
        "distributed_training.ddp_backend=no_c10d",
        f"distributed_training.distributed_backend={'nccl' if device == 'cuda' else 'gloo'}",
    ]
    if dist.init_method:
        overrides.append(f"distributed_training.distributed_init_method={_hydra_value(dist.init_method)}")
    if device == "cuda":
        # --gpus-per-task shows each task one GPU; --gpus-per-node shows all of them
        overrides.append(f"distributed_training.device_id={dist.local_rank % (n_visible_gpus or 1)}")
    return overrides


# ----------------------------------------------------------------------------------------------
# checkpoints


def checkpoint_updates(path: Path) -> Optional[int]:
    """The update count stored in a fairseq checkpoint; None when the file is missing or cannot
    be read (fairseq's copy to checkpoint_last.pt is not atomic: a SIGKILL can cut it short)."""
    import torch

    path = Path(path)
    if not path.is_file():
        return None
    state = None
    for kwargs in ({"mmap": True}, {}):  # mmap: read the small header, not the tensors
        try:
            state = torch.load(path, map_location="cpu", weights_only=False, **kwargs)
            break
        except Exception:  # noqa: BLE001 - any unreadable file is "no checkpoint"
            continue
    if not isinstance(state, dict):
        return None
    history = state.get("optimizer_history") or []
    if not history:
        return None
    return int(history[-1].get("num_updates", 0) or 0)


_CKPT_UPDATES = re.compile(r"^checkpoint_(\d+)_(\d+)\.pt$")
_CKPT_EPOCH = re.compile(r"^checkpoint(\d+)\.pt$")


def _fallback_candidates(ckpt_dir: Path) -> List[Path]:
    """Other checkpoints fairseq wrote (each written atomically), newest first."""
    found = []
    for p in ckpt_dir.glob("checkpoint*.pt"):
        if p.name in (LAST_CHECKPOINT, FINAL_CHECKPOINT) or p.name.startswith(".tmp"):
            continue
        if _CKPT_UPDATES.match(p.name) or _CKPT_EPOCH.match(p.name) or p.name == "checkpoint_best.pt":
            found.append(p)
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def resume_point(ckpt_dir: Path, repair: bool = False) -> Tuple[Optional[Path], int]:
    """The checkpoint training resumes from and its update count (None, 0 = from scratch).

    ``checkpoint_last.pt`` when readable; otherwise the newest readable other checkpoint, which
    (with ``repair``, on rank 0 only) is copied atomically over ``checkpoint_last.pt`` so fairseq
    resumes from it instead of failing on a truncated file. Every rank computes the same answer
    from the same files, so all ranks agree on whether there is anything left to train."""
    ckpt_dir = Path(ckpt_dir)
    last = ckpt_dir / LAST_CHECKPOINT
    updates = checkpoint_updates(last)
    if updates is not None:
        return last, updates
    for candidate in _fallback_candidates(ckpt_dir):
        updates = checkpoint_updates(candidate)
        if updates is None:
            continue
        if repair:
            log.warning("%s is unreadable; resuming from %s (%d updates)", last, candidate, updates)
            with atomic_path(last) as tmp:
                shutil.copyfile(candidate, tmp)
        return candidate, updates
    if repair and last.exists():
        log.warning("%s is unreadable and no other checkpoint exists: training from scratch", last)
        last.unlink()
    return None, 0


def discard_previous_training(stage_dir: Path) -> None:
    """Remove an earlier run's checkpoints and logs. Each directory is first renamed away in one
    step, so another rank looking at the same time sees either the complete old state (with its
    final checkpoint: "start fresh") or nothing (also "start fresh"), never a part of it."""
    for name in (CHECKPOINT_DIR, TENSORBOARD_DIR):
        path = Path(stage_dir) / name
        if not path.exists():
            continue
        trash = path.with_name(f".discarded-{os.getpid()}-{name}")
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
    (Path(stage_dir) / CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)


# ----------------------------------------------------------------------------------------------
# tensorboard events -> loss curve


def _read_event_records(path: Path):
    """Yield serialized Event protos of one tfevents file (TFRecord framing); a record cut short
    by a killed writer ends the file, a record failing its CRC is skipped."""
    try:
        from tensorboardX.crc32c import masked_crc32c
    except ImportError:  # pragma: no cover - tensorboardX always ships it
        masked_crc32c = None
    with open(path, "rb") as f:
        while True:
            header = f.read(12)
            if len(header) < 12:
                return
            (length,) = struct.unpack("<Q", header[:8])
            data = f.read(length)
            footer = f.read(4)
            if len(data) < length or len(footer) < 4:
                return
            if masked_crc32c is not None and struct.unpack("<I", footer)[0] != masked_crc32c(data):
                continue
            yield data


def read_scalars_file(path: Path) -> Dict[str, List[Tuple[int, float, float]]]:
    """``{tag: [(step, value, wall_time), ...]}`` of one events file, in file order."""
    from tensorboardX.proto import event_pb2

    out: Dict[str, List[Tuple[int, float, float]]] = {}
    for data in _read_event_records(Path(path)):
        event = event_pb2.Event()
        event.ParseFromString(data)
        if not event.HasField("summary"):
            continue
        for value in event.summary.value:
            if value.HasField("simple_value"):
                out.setdefault(value.tag, []).append(
                    (int(event.step), float(value.simple_value), float(event.wall_time)))
    return out


def events_files(logdir: Path) -> List[Path]:
    """tfevents files of a log dir in creation order (their names start with the unix time)."""

    def created(path: Path):  # events.out.tfevents.<unix time>.<host>...
        stamp = path.name.split(".")[3] if path.name.count(".") >= 3 else ""
        return (int(stamp) if stamp.isdigit() else int(path.stat().st_mtime), path.name)

    return sorted(Path(logdir).glob("events.out.tfevents.*"), key=created)


def read_scalars(logdir: Path) -> Dict[str, List[Tuple[int, float, float, int]]]:
    """``{tag: [(step, value, wall_time, file_index), ...]}`` from every events file under
    ``logdir`` (files in creation order). A step logged twice (work redone after a resume from
    an earlier checkpoint) keeps its latest value."""
    latest: Dict[str, Dict[int, Tuple[float, float, int]]] = {}
    for index, path in enumerate(events_files(logdir)):
        for tag, points in read_scalars_file(path).items():
            seen = latest.setdefault(tag, {})
            for step, value, wall_time in points:
                prev = seen.get(step)
                if prev is None or wall_time >= prev[1]:
                    seen[step] = (value, wall_time, index)
    return {
        tag: [(step, v, t, i) for step, (v, t, i) in sorted(steps.items())]
        for tag, steps in latest.items()
    }


def plot_loss_curve(tensorboard_dir: Path, png: Path, title: str) -> dict:
    """Write ``png``: training loss per update (fairseq's ``train_inner`` log) and validation loss,
    with a dashed line where a resumed run took over. Returns a small summary."""
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # font search spam at DEBUG
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tensorboard_dir = Path(tensorboard_dir)
    train = read_scalars(tensorboard_dir / "train_inner").get("loss", [])
    if not train:  # log_interval larger than the run: fall back to the per-epoch averages
        train = read_scalars(tensorboard_dir / "train").get("loss", [])
    valid = read_scalars(tensorboard_dir / "valid").get("loss", [])
    if not train and not valid:
        raise RuntimeError(
            f"no loss values in the TensorBoard logs under {tensorboard_dir}: did fairseq run with "
            "common.tensorboard_logdir and a log_interval within max_update?"
        )
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    if train:
        ax.plot([s for s, *_ in train], [v for _, v, *_ in train], "-o", ms=3, label="train")
    if valid:
        ax.plot([s for s, *_ in valid], [v for _, v, *_ in valid], "s--", ms=4, label="valid")
    first_step_of_file: Dict[int, int] = {}
    for step, _, _, index in train:
        first_step_of_file[index] = min(step, first_step_of_file.get(index, step))
    resumes = sorted(step for index, step in first_step_of_file.items() if index > 0)
    for step in resumes:
        ax.axvline(step - 0.5, color="gray", ls=":", lw=1)
    ax.set_xlabel("update")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return {
        "loss_png": str(png),
        "train_points": len(train),
        "valid_points": len(valid),
        "first_train_loss": train[0][1] if train else None,
        "last_train_loss": train[-1][1] if train else None,
        "last_valid_loss": valid[-1][1] if valid else None,
        "resumed_at_updates": resumes,
    }


def _close_fairseq_tensorboard_writers() -> None:
    """fairseq keeps one SummaryWriter per log tag ("train_inner", "valid", ...) in a module-level
    dict, keyed by tag only, flushed at interpreter exit. In-process (debug executor) the next
    iteration would write into this iteration's log dir and finalize would read unflushed files:
    close and forget them around each training run."""
    try:
        from fairseq.logging import progress_bar
    except ImportError:  # pragma: no cover
        return
    writers = getattr(progress_bar, "_tensorboard_writers", None)
    if not writers:
        return
    for writer in list(writers.values()):
        try:
            writer.close()
        except Exception:  # noqa: BLE001 - a writer that cannot flush must not fail training
            log.warning("could not close a TensorBoard writer", exc_info=True)
    writers.clear()


# ----------------------------------------------------------------------------------------------
# the stage


class TrainStage(Stage):
    name = "train"
    depends_on = ("labels",)
    per_iteration = True
    multi_task = True
    checkpointable = True

    def dependencies(self, ctx: StageContext):
        from stages.noise import uses_noise_stage

        # noise-augmented iterations read the noise stage's lists
        return (*self.depends_on, "noise") if uses_noise_stage(ctx.cfg.train.noise, ctx.iteration) else self.depends_on

    def validate(self, ctx: StageContext) -> None:
        from stages.noise import validate_use
        from stages.schedule import label_rate

        cfg = ctx.cfg
        validate_use(ctx, "train")
        for override in list(cfg.train.overrides or []) + [
            o for per in (cfg.train.iteration_overrides or []) for o in (per or [])
        ]:
            if "=" not in str(override) and not str(override).startswith("~"):
                raise ConfigError(f"train.overrides: {override!r} is not a key=value override")
            key = _override_key(str(override))
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

    def shards(self, ctx: StageContext) -> list[Shard]:
        return [Shard(index=0, count=1, key="train")]

    def estimate(self, ctx: StageContext):
        from stages import estimates

        return estimates.train(ctx)

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
            _close_fairseq_tensorboard_writers()
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
                _close_fairseq_tensorboard_writers()
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
