"""Run fairseq's hydra training in-process for one rank (one process per rank, started by the
caller, e.g. a submitit task). Equivalent to

    fairseq-hydra-train --config-dir CONFIG_DIR --config-name CONFIG_NAME common.user_dir=<avhubert> ...

with the distributed settings of this rank added: ``distributed_no_spawn`` (no fairseq spawning),
gloo + ``ddp_backend=no_c10d`` on CPU, nccl on GPU. Checkpoint reading (resume from
``checkpoint_last.pt``) runs with the fairseq checkpoint allow-list of
:mod:`avhubert.checkpoint` in force, for this call only.

A preemption (:func:`request_save_and_stop`, safe from a signal handler: it only sets a flag) makes
the running training write ``checkpoint_last.pt`` at its next update boundary, with fairseq's own
``checkpoint_utils.save_checkpoint`` (what a resume reads, mid-epoch position included), stop
through fairseq's ``should_stop``, and raise :class:`pipeline.stage.SavedForPreemption`.
"""
import argparse
import contextlib
import logging
import os
import sys
import threading
import time
from typing import List, Optional

from pipeline.stage import SavedForPreemption

log = logging.getLogger(__name__)

PLUGIN_DIR = os.path.dirname(os.path.abspath(__file__))


def _key(override: str) -> str:
    return override.split("=", 1)[0].strip().lstrip("+~")


def rank_overrides(rank: int, world_size: int, init_method: Optional[str], device: str) -> List[str]:
    """Overrides that make the composed config run as this rank on this device."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if world_size > 1 and not init_method:
        raise ValueError("world_size > 1 needs init_method (e.g. tcp://HOST:PORT)")
    on_cpu = device == "cpu"
    out = [
        f"common.user_dir={PLUGIN_DIR}",
        f"common.cpu={'true' if on_cpu else 'false'}",
        f"distributed_training.distributed_world_size={world_size}",
        f"distributed_training.distributed_rank={rank}",
        "distributed_training.distributed_no_spawn=true",
        f"distributed_training.distributed_backend={'gloo' if on_cpu else 'nccl'}",
        # no fairseq guessing of the rendezvous from Slurm/torchrun variables: we were given it
        "distributed_training.distributed_port=-1",
    ]
    if on_cpu:
        out += ["distributed_training.ddp_backend=no_c10d", "common.fp16=false",
                "common.memory_efficient_fp16=false", "common.bf16=false"]
    out.append(f"distributed_training.distributed_init_method={init_method if world_size > 1 else 'null'}")
    return out


def compose_config(config_dir: str, config_name: str, overrides: List[str]):
    """The training config as fairseq-hydra-train would build it (without hydra's own section)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from fairseq.dataclass.initialize import hydra_init

    config_dir = os.path.abspath(config_dir)
    if not os.path.isfile(os.path.join(config_dir, f"{config_name}.yaml")):
        raise FileNotFoundError(f"{config_dir}/{config_name}.yaml: training config not found")
    hydra_init(config_name)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return compose(config_name=config_name, overrides=list(overrides))


class _StopRequest:
    """The preemption flag between a signal handler (or another thread) and the training loop."""

    def __init__(self):
        self.asked = threading.Event()
        self.asked_at = 0.0
        self.running = threading.Event()  # a training loop of this process looks at ``asked``

    def request(self) -> bool:
        if not self.running.is_set():
            return False
        self.asked_at = time.time()
        self.asked.set()
        return True


_STOP = _StopRequest()


def request_save_and_stop() -> bool:
    """Ask the training running in this process to save ``checkpoint_last.pt`` at its next update
    boundary and stop (``run_fairseq_train`` then raises ``SavedForPreemption``). Only sets a flag:
    callable from a signal handler or any thread. False when no training runs here (nothing to
    save)."""
    return _STOP.request()


def _stop_agreed(asked: bool) -> bool:
    """Whether any rank was asked to stop; every rank calls this at every update boundary (the
    save and the stop are collective: fairseq consolidates the optimizer on all ranks, rank 0
    writes). One one-element all-reduce per update, beside the update's own gradient all-reduce."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return asked
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    flag = torch.tensor([1 if asked else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


@contextlib.contextmanager
def _saving_on_request(outcome: dict):
    """While training: after each update, fairseq's ``validate_and_save`` (its per-update decision
    to validate, save and stop) followed by the preemption check; on a request, fairseq's own
    ``save_checkpoint`` with the trainer and epoch iterator, and ``should_stop``. fairseq has no
    callback between updates, so its module-level function is wrapped (``train`` looks it up at
    each call) for this training only and restored after; fairseq's own code runs unchanged."""
    import fairseq_cli.train as fairseq_train
    from fairseq import checkpoint_utils

    original = fairseq_train.validate_and_save

    def validate_and_save(cfg, trainer, task, epoch_itr, valid_subsets, end_of_epoch):
        valid_losses, should_stop = original(cfg, trainer, task, epoch_itr, valid_subsets, end_of_epoch)
        if not _stop_agreed(_STOP.asked.is_set()) or should_stop:
            return valid_losses, should_stop  # (a stop of fairseq's own has saved already)
        updates = trainer.get_num_updates()
        waited = time.time() - _STOP.asked_at if _STOP.asked.is_set() else None
        log.warning("preemption: saving checkpoint_last.pt at update %d%s, then stopping", updates,
                    f" ({waited:.1f} s after the request)" if waited is not None else " (asked on another rank)")
        checkpoint_utils.save_checkpoint(cfg.checkpoint, trainer, epoch_itr, valid_losses[0])
        outcome["saved_at_update"] = updates
        return valid_losses, True

    fairseq_train.validate_and_save = validate_and_save
    _STOP.running.set()
    try:
        yield
    finally:
        _STOP.running.clear()
        _STOP.asked.clear()
        fairseq_train.validate_and_save = original


def run_fairseq_train(config_dir: str, config_name: str, overrides: List[str], rank: int = 0,
                      world_size: int = 1, init_method: Optional[str] = None, device: str = "cpu") -> None:
    """Train one rank to completion (max_update / max_epoch), resuming from the save dir's
    ``checkpoint_last.pt`` when present (fairseq's restore_file default). Raises on failure, and
    ``SavedForPreemption`` when :func:`request_save_and_stop` stopped it after a save."""
    from fairseq_cli.hydra_train import _hydra_main

    from .checkpoint import fairseq_checkpoint_loading
    from .extract import ensure_plugin_registered

    ensure_plugin_registered()  # task/model/criterion registered before the config is checked
    ours = rank_overrides(rank, world_size, init_method, device)
    own_keys = {_key(o) for o in ours}
    # the caller's overrides first, ours last; drop the caller's duplicates of keys we own
    merged = [o for o in overrides if _key(o) not in own_keys] + ours
    cfg = compose_config(config_dir, config_name, merged)
    if not logging.getLogger().handlers:  # hydra would have configured logging; do the same
        logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s",
                            level=logging.INFO, stream=sys.stdout)

    import torch.distributed as dist

    was_initialized = dist.is_available() and dist.is_initialized()
    outcome: dict = {}
    try:
        with fairseq_checkpoint_loading(), _saving_on_request(outcome):
            _hydra_main(cfg)
        if "saved_at_update" in outcome:
            raise SavedForPreemption(f"training saved checkpoint_last.pt at update {outcome['saved_at_update']} "
                                     "and stopped for a preemption")
    finally:
        if world_size > 1 and not was_initialized and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def main(argv: Optional[List[str]] = None) -> None:
    """Command line with fairseq-hydra-train's arguments, plus the scoped checkpoint allow-list
    (the plain CLI cannot resume from a checkpoint under torch >= 2.6)::

        python -m avhubert.train_entry --config-dir avhubert/conf/pretrain --config-name base \\
            task.data=... task.label_dir=... model.label_rate=25 checkpoint.save_dir=...
    """
    parser = argparse.ArgumentParser(description="AV-HuBERT pretraining, one rank (fairseq hydra)")
    parser.add_argument("--config-dir", required=True)
    parser.add_argument("--config-name", required=True)
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--world-size", type=int, default=1)
    parser.add_argument("--init-method", default=None, help="tcp://HOST:PORT (world size > 1)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda when available")
    parser.add_argument("overrides", nargs="*", help="hydra key=value overrides")
    args = parser.parse_args(argv)
    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    run_fairseq_train(args.config_dir, args.config_name, args.overrides, rank=args.rank,
                      world_size=args.world_size, init_method=args.init_method, device=device)


if __name__ == "__main__":
    main()
