"""AV-HuBERT forward + backward time on CPU, in seconds per 1,000 video frames (25 fps).

    python bench/model.py                       # tiny and base configs
    python bench/model.py --configs tiny --frames 400 --batch 4 --repeats 3

Each step is one training step of the real model and criterion (masking, modality dropout, loss,
backward) on a random batch of ``batch`` clips x ``frames`` frames with random cluster labels.
"""
import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build(config_name: str, n_classes: int):
    from fairseq.data import Dictionary
    from fairseq.dataclass.utils import merge_with_parent
    from omegaconf import OmegaConf, open_dict

    from avhubert.criterion import AVHubertCriterion
    from avhubert.model import AVHubertConfig, AVHubertModel
    from avhubert.task import AVHubertPretrainingConfig
    from avhubert.train_entry import compose_config, rank_overrides

    cfg = compose_config(str(REPO / "avhubert" / "conf" / "pretrain"), config_name,
                         ["task.data=/nonexistent", "task.label_dir=/nonexistent", "model.label_rate=25"]
                         + rank_overrides(0, 1, None, "cpu"))
    task_cfg = merge_with_parent(AVHubertPretrainingConfig(), cfg.task)
    model_cfg = merge_with_parent(AVHubertConfig(), cfg.model)
    dictionary = Dictionary()
    for c in range(n_classes):
        dictionary.add_symbol(str(c))

    class _Task:  # what model and criterion read from the task
        cfg = task_cfg
        dictionaries = [dictionary]

    model = AVHubertModel(model_cfg, task_cfg, [dictionary])
    crit = AVHubertCriterion(_Task, cfg.criterion.pred_masked_weight, cfg.criterion.pred_nomask_weight,
                             list(cfg.criterion.loss_weights) if cfg.criterion.loss_weights else None)
    return model, crit, dictionary


def bench(config_name: str, batch: int, frames: int, repeats: int, n_classes: int = 100):
    import torch

    torch.manual_seed(0)
    model, crit, dictionary = build(config_name, n_classes)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    sample = {
        "id": torch.arange(batch),
        "net_input": {
            "source": {"audio": torch.randn(batch, 104, frames),
                       "video": torch.randn(batch, 1, frames, 88, 88)},
            "padding_mask": torch.zeros(batch, frames, dtype=torch.bool),
        },
        "target_list": [torch.randint(dictionary.nspecial, len(dictionary), (batch, frames))],
    }
    times = []
    for i in range(repeats + 1):  # the first step warms up allocator and kernels
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss, _, _ = crit(model, sample)
        loss.backward()
        if i > 0:
            times.append(time.perf_counter() - t0)
    per_1k = 1000.0 * min(times) / (batch * frames)
    print(f"{config_name:>6}: {n_params / 1e6:7.2f} M params | batch {batch} x {frames} frames | "
          f"fwd+bwd {min(times):7.2f} s/step (median {sorted(times)[len(times) // 2]:.2f}) | "
          f"{per_1k:7.2f} s per 1,000 frames | torch threads {torch.get_num_threads()}")
    return per_1k


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["tiny", "base"])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--frames", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    import logging

    logging.disable(logging.INFO)
    for name in args.configs:
        bench(name, args.batch, args.frames, args.repeats)


if __name__ == "__main__":
    main()
