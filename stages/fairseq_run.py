"""What the train and finetune stages share about a fairseq training run: the keys the pipeline
owns and the overrides that set them (update budget, checkpoint and TensorBoard dirs, this rank's
distributed settings), the rank's place in the job, and the checkpoints it resumes from.

Both stages launch fairseq the same way (``avhubert.train_entry.run_fairseq_train``) under this
layout of their stage dir: ``checkpoints/`` (``checkpoint_last.pt``, fairseq's interval
checkpoints, ``checkpoint_final.pt`` once the run is complete) and ``tensorboard/``.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Tuple

from omegaconf import OmegaConf

from pipeline.atomic import atomic_path
from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
FINAL_CHECKPOINT = "checkpoint_final.pt"  # train: the contract with the features stage of iteration N+1
LAST_CHECKPOINT = "checkpoint_last.pt"
TENSORBOARD_DIR = "tensorboard"

# Keys a stage fills in for every run from the work dir and the job environment (each stage adds
# its own): a user override of one of them would silently break the chain or the resume, so it is
# refused.
RUN_OWNED_KEYS = (
    "optimization.max_update",
    "optimization.update_freq",  # the recipe's batch on this job's ranks: train.update_freq / finetune.update_freq
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

_PLAIN_VALUE = re.compile(r"^[A-Za-z0-9_./:+\-]*$")


def hydra_value(value: Any) -> str:
    """A value as hydra's override grammar reads it back unchanged (paths may hold anything)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    text = str(value)
    if _PLAIN_VALUE.match(text) and text not in ("", "null", "true", "false"):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def override_key(override: str) -> str:
    """The config key a hydra override sets (``++task.x=1`` -> ``task.x``)."""
    key = override.split("=", 1)[0].strip()
    return key.lstrip("+~")


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


def run_overrides(stage_dir: Path, max_update: int, dist: "DistributedEnv", device: str,
                  n_visible_gpus: Optional[int] = None, update_freq: int = 1) -> List[str]:
    """The fairseq keys of one run that the pipeline owns (``RUN_OWNED_KEYS`` and the DDP backend):
    update budget and batches accumulated per update, checkpoint and TensorBoard dirs, and this
    rank's distributed settings."""
    overrides = [
        f"optimization.max_update={max_update}",
        f"optimization.update_freq=[{int(update_freq)}]",
        f"checkpoint.save_dir={hydra_value(stage_dir / CHECKPOINT_DIR)}",
        # fairseq resumes from <save_dir>/checkpoint_last.pt: this is the requeue/relaunch path
        "checkpoint.restore_file=checkpoint_last.pt",
        f"common.tensorboard_logdir={hydra_value(stage_dir / TENSORBOARD_DIR)}",
        f"distributed_training.distributed_world_size={dist.world_size}",
        f"distributed_training.distributed_rank={dist.rank}",
        # one process per rank, started by submitit (never fairseq's own spawn)
        "distributed_training.distributed_no_spawn=true",
        # gradients are all-reduced without the c10d reducer: works with gloo on CPU too
        "distributed_training.ddp_backend=no_c10d",
        f"distributed_training.distributed_backend={'nccl' if device == 'cuda' else 'gloo'}",
    ]
    if dist.init_method:
        overrides.append(f"distributed_training.distributed_init_method={hydra_value(dist.init_method)}")
    if device == "cuda":
        # --gpus-per-task shows each task one GPU; --gpus-per-node shows all of them
        overrides.append(f"distributed_training.device_id={dist.local_rank % (n_visible_gpus or 1)}")
    return overrides


# ----------------------------------------------------------------------------------------------
# checkpoints


def update_freq_for(base: Path, ranks: int, override: Any = None):
    """``avhubert.effective_batch.UpdateFreq`` of a run of base fairseq config ``base`` on ``ranks``
    ranks (``override``: the user's train.update_freq / finetune.update_freq, or None). A bad
    value is a ConfigError."""
    from avhubert.effective_batch import derive_update_freq, recipe_of

    try:
        world, freq = recipe_of(OmegaConf.load(base))
        return derive_update_freq(world, freq, ranks, override)
    except ValueError as e:
        raise ConfigError(f"update_freq ({base.name}): {e}") from None


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



def close_fairseq_tensorboard_writers() -> None:
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
