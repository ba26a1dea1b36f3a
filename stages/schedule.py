"""The pretraining iteration schedule: which features are clustered, into how many clusters.

Iteration 1 clusters 39-d MFCCs (100 Hz labels); iteration N>1 clusters layer-L features of
iteration N-1's final checkpoint (25 Hz labels). Defaults follow the AV-HuBERT paper
(Shi et al. 2022): 5 iterations, MFCC/100, then layers 9, 12, 12, 12 with 100, 500, 1000, 2000
clusters (see the train stage's notes for the check against the paper)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class IterationSpec:
    features: str = "mfcc"  # "mfcc" (iteration 1) or "layer"
    layer: Optional[int] = None  # transformer layer of the previous iteration's model
    n_clusters: int = 100


def _paper_schedule() -> list:
    return [
        IterationSpec("mfcc", None, 100),
        IterationSpec("layer", 9, 100),
        IterationSpec("layer", 12, 500),
        IterationSpec("layer", 12, 1000),
        IterationSpec("layer", 12, 2000),
    ]


@dataclass
class ScheduleConfig:
    iterations: List[IterationSpec] = field(default_factory=_paper_schedule)


def iteration_spec(cfg, iteration: int) -> IterationSpec:
    its = cfg.schedule.iterations
    if not 1 <= iteration <= len(its):
        raise ValueError(f"iteration {iteration} is outside the schedule (1..{len(its)})")
    return its[iteration - 1]


def label_rate(cfg, iteration: int) -> int:
    """Labels per second of iteration ``iteration``: 100 for MFCC, 25 for layer features."""
    return 100 if iteration_spec(cfg, iteration).features == "mfcc" else 25
