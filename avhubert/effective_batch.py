"""The recipe's effective batch on any number of ranks: ``update_freq`` from the recipe's world size.

A fairseq recipe fixes its batch per update as (ranks x ``update_freq``) batches of
``dataset.max_tokens`` frames, and tunes its learning-rate schedule for that batch: the reference
AV-HuBERT pretraining recipes are written for 32 GPUs (BASE) or 64 (LARGE) with ``update_freq``
[1], fine-tuning for its own world size. Run on fewer ranks as written, a recipe silently trains
with a smaller batch under the same schedule (av_hubert#20: 9.28 % WER instead of 5.4 % on 4
GPUs). Accumulating gradients over ``update_freq = ceil(recipe ranks x recipe update_freq / ranks)``
batches per rank restores the recipe's batch (rounded up; what it overshoots is reported).

The recipe's world size is the base config's ``distributed_training.distributed_world_size``, read
before the stage replaces it with the job's rank count.
"""
import numbers
from dataclasses import dataclass
from typing import Any, Optional, Tuple


@dataclass(frozen=True)
class UpdateFreq:
    """The ``update_freq`` a job runs with, and where it comes from."""

    recipe_world_size: int  # ranks the recipe was written for
    recipe_update_freq: int  # the recipe's own update_freq
    ranks: int  # ranks of this job
    update_freq: int  # what this job runs with
    overridden: bool = False  # set by the user (train.update_freq / finetune.update_freq)

    @property
    def recipe_batches(self) -> int:
        """Per-rank batches (of max_tokens frames) per update in the recipe."""
        return self.recipe_world_size * self.recipe_update_freq

    @property
    def batches(self) -> int:
        """Per-rank batches per update in this job."""
        return self.ranks * self.update_freq

    @property
    def excess(self) -> int:
        """Batches per update beyond the recipe's (negative: fewer)."""
        return self.batches - self.recipe_batches

    def describe(self) -> str:
        """One line: the value, how it was reached, and how far the batch is from the recipe's."""
        how = ("set by the user" if self.overridden else
               f"ceil({self.recipe_world_size} recipe ranks x update_freq {self.recipe_update_freq} / "
               f"{self.ranks} rank{'s' if self.ranks != 1 else ''})")
        line = (f"update_freq {self.update_freq} ({how}): {self.ranks} x {self.update_freq} = "
                f"{self.batches} batches per update, the recipe's {self.recipe_batches}")
        if self.excess == 0:
            return line + " exactly"
        pct = 100.0 * self.excess / self.recipe_batches
        line = f"{line} {'+' if self.excess > 0 else '-'} {abs(self.excess)} ({pct:+.1f} %)"
        if self.update_freq == 1 and self.excess > 0 and not self.overridden:
            # one batch per rank is the least: only smaller batches get nearer the recipe's
            line += (f"; more ranks than the recipe: dataset.max_tokens x {self.recipe_batches}/{self.batches} "
                     "keeps its frames per update")
        return line

    def as_dict(self) -> dict:
        return {
            "update_freq": self.update_freq,
            "ranks": self.ranks,
            "recipe_world_size": self.recipe_world_size,
            "recipe_update_freq": self.recipe_update_freq,
            "batches_per_update": self.batches,
            "recipe_batches_per_update": self.recipe_batches,
            "excess_batches": self.excess,
            "overridden": self.overridden,
        }


def _positive_int(value: Any, what: str) -> int:
    ok = isinstance(value, numbers.Integral) or (isinstance(value, str) and value.strip().isdigit())
    if isinstance(value, bool) or not ok or int(value) < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def recipe_of(config) -> Tuple[int, int]:
    """(world size, update_freq) a fairseq config (OmegaConf or nested dicts) was written for.
    Missing keys are fairseq's defaults (1, [1]); an update_freq list must hold one value (fairseq
    also accepts one per epoch, which no recipe here uses and this derivation does not scale)."""
    def select(path: str, default):
        node = config
        for key in path.split("."):
            try:
                node = node[key] if key in node else None
            except TypeError:
                node = None
            if node is None:
                return default
        return node

    world = _positive_int(select("distributed_training.distributed_world_size", 1),
                          "distributed_training.distributed_world_size")
    freq = select("optimization.update_freq", [1])
    if isinstance(freq, (int, str)):
        freq = [freq]
    freq = list(freq)
    if len(freq) != 1:
        raise ValueError(f"optimization.update_freq {freq}: one value per epoch is not supported when "
                         "deriving the effective batch; give a single value")
    return world, _positive_int(freq[0], "optimization.update_freq")


def derive_update_freq(recipe_world_size: int, recipe_update_freq: int, ranks: int,
                       override: Optional[int] = None) -> UpdateFreq:
    """``update_freq`` that gives ``ranks`` ranks at least the recipe's batch per update: the
    smallest integer with ranks x update_freq >= recipe_world_size x recipe_update_freq, or
    ``override`` when given."""
    recipe_world_size = _positive_int(recipe_world_size, "recipe world size")
    recipe_update_freq = _positive_int(recipe_update_freq, "recipe update_freq")
    ranks = _positive_int(ranks, "ranks")
    if override is not None:
        return UpdateFreq(recipe_world_size, recipe_update_freq, ranks,
                          _positive_int(override, "update_freq"), overridden=True)
    needed = recipe_world_size * recipe_update_freq
    return UpdateFreq(recipe_world_size, recipe_update_freq, ranks, -(-needed // ranks))
