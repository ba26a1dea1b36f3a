"""What the training stages read of the noise: the ``train.noise`` / ``finetune.noise`` blocks
(``NoiseUse``), their checks, the fairseq task keys they set, and where the noise stage's
categories and lists are (``noise.dirs`` entries, ``noise/<category>/{split}.tsv``).

The noise stage (``stages/noise.py``) makes the noise; train and fine-tuning import this module,
not the stage, so neither depends on the other.
"""
from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from pipeline.errors import ConfigError
from pipeline.fingerprint import classify
from pipeline.stage import StageContext

SPLITS = ("train", "valid", "test")
MUSAN_CATEGORIES = ("music", "noise", "speech")
CATEGORY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

# the fairseq task keys the consumers set from their noise block (refused in their overrides)
NOISE_TASK_KEYS = ("task.noise_wav", "task.noise_prob", "task.noise_snr", "task.noise_num",
                   "task.noise_categories", "task.noise_seed")


@classify(output=("prob", "snr", "categories", "num", "dir"))
@dataclass
class NoiseUse:
    """How a training stage mixes noise into the audio of its utterances (``train.noise``,
    ``finetune.noise``); the values of the reference's noise-augmented recipes are in
    presets/base_noise.yaml."""

    prob: float = 0.0  # share of utterances that get noise; 0 = clean training
    snr: str = "0"  # dB: a number, or "(low, high)" drawn per utterance (integers)
    categories: List[str] = field(default_factory=list)  # each drawn with equal probability; [] = all
    num: int = 1  # noise clips averaged per mixture (the task's noise_num)
    # a noise dir made elsewhere ({split}.tsv and/or <category>/{split}.tsv, e.g. the reference's
    # musan tsv/all); null = this work dir's noise stage
    dir: Optional[str] = None


@classify(output=("iterations",))
@dataclass
class TrainNoise(NoiseUse):
    iterations: List[int] = field(default_factory=list)  # iterations trained with noise; [] = all


@classify(output=("eval_snrs", "eval_categories", "eval_modalities", "eval_splits", "eval_seed"))
@dataclass
class FinetuneNoise(NoiseUse):
    # Decoding under noise after fine-tuning: every split x modality x category x SNR (+ clean).
    eval_snrs: List[float] = field(default_factory=list)  # e.g. [-10, -5, 0, 5, 10]; [] = no noise eval
    eval_categories: List[str] = field(default_factory=list)  # [] = every category with noise for the split
    eval_modalities: List[str] = field(default_factory=list)  # audio | av | video; [] = finetune.modalities
    eval_splits: List[str] = field(default_factory=lambda: ["test"])
    eval_seed: int = 0  # seeds the per-utterance noise clip and offset


def inert_noise_settings(section: str, use, iteration: Optional[int] = None) -> Dict[str, str]:
    """``Stage.inert_settings`` of a ``<section>.noise`` block (``use``): what does nothing while it
    adds no noise to training (in ``iteration``, for train) and, for fine-tuning, decodes nothing
    under noise. ``prob`` and ``eval_snrs``, the switches, always count."""
    inert = {}
    prob = float(use.get("prob", 0) or 0)
    trains, why = prob > 0, f"{section}.noise.prob is 0 (no noise in training)"
    if trains and iteration is not None and list(use.get("iterations") or []) and iteration not in use.iterations:
        trains, why = False, f"iteration {iteration} is not in {section}.noise.iterations"
    evaluates = bool(list(use.get("eval_snrs") or []))
    if not trains:
        for key in ("snr", "categories", "num"):
            inert[f"{section}.noise.{key}"] = why
        if not evaluates:  # decoding under noise reads the dir too
            inert[f"{section}.noise.dir"] = why + (f" and {section}.noise.eval_snrs is empty" if "eval_snrs" in use else "")
        if prob == 0 and "iterations" in use:
            inert[f"{section}.noise.iterations"] = why
    if "eval_snrs" in use and not evaluates:
        for key in ("eval_categories", "eval_modalities", "eval_splits", "eval_seed"):
            inert[f"{section}.noise.{key}"] = f"{section}.noise.eval_snrs is empty (nothing is decoded under noise)"
    return inert


def noise_dir(ctx: StageContext) -> Path:
    return ctx.with_iteration(None).stage_dir("noise")


def uses_noise_stage(use, iteration: Optional[int] = None) -> bool:
    """Whether a noise block reads this work dir's noise stage (in ``iteration`` for train)."""
    if use is None or use.get("dir"):
        return False
    if iteration is not None and list(use.get("iterations") or []) and iteration not in use.iterations:
        return False
    return float(use.get("prob", 0) or 0) > 0 or bool(list(use.get("eval_snrs") or []))


def snr_setting(value) -> str:
    """A noise block's ``snr`` as the task's ``noise_snr`` reads it: ``"5.0"``, or ``"(-5, 5)"`` for
    a range of whole dB drawn per utterance. ValueError otherwise."""
    try:
        parsed = ast.literal_eval(str(value).strip())
    except (ValueError, SyntaxError):
        parsed = None
    if isinstance(parsed, (int, float)) and not isinstance(parsed, bool):
        return repr(float(parsed))
    if (isinstance(parsed, (tuple, list)) and len(parsed) == 2
            and all(isinstance(v, (int, float)) and float(v).is_integer() for v in parsed) and parsed[0] <= parsed[1]):
        return f"({int(parsed[0])}, {int(parsed[1])})"
    raise ValueError(f"{value!r}: a number of dB, or '(low, high)' whole dB with low <= high")


def validate_use(ctx: StageContext, section: str) -> None:
    """ConfigError for an impossible ``<section>.noise`` block (before anything is submitted)."""
    use = ctx.cfg[section].noise
    if not 0 <= float(use.prob) <= 1:
        raise ConfigError(f"{section}.noise.prob={use.prob}: a probability between 0 and 1")
    try:
        snr_setting(use.snr)
    except ValueError as e:
        raise ConfigError(f"{section}.noise.snr: {e}") from None
    if int(use.num) < 1:
        raise ConfigError(f"{section}.noise.num={use.num}: at least 1")
    for name in list(use.categories) + list(use.get("eval_categories") or []):
        if not CATEGORY_NAME.match(str(name)):
            raise ConfigError(f"{section}.noise: category {name!r} is not a category name")
    if use.dir and not Path(str(use.dir)).expanduser().is_dir():
        raise ConfigError(f"{section}.noise.dir={use.dir}: no such directory")
    n_iterations = int(ctx.cfg.get("iterations", 0) or 0)
    bad = [i for i in (use.get("iterations") or []) if not 1 <= int(i) <= max(n_iterations, 1)]
    if bad:
        raise ConfigError(f"{section}.noise.iterations: {bad} outside 1..{n_iterations}")
    if uses_noise_stage(use) and ctx.cfg.noise.enabled is False:
        raise ConfigError(f"{section}.noise needs the noise stage, but noise.enabled=false "
                          f"(set {section}.noise.dir to noise made elsewhere, or enable the stage)")
    if uses_noise_stage(use):
        made = planned_categories(ctx.cfg.noise)
        unknown = sorted({str(c) for c in list(use.categories) + list(use.get("eval_categories") or [])} - made)
        if unknown:
            raise ConfigError(f"{section}.noise: categories {unknown} are not made by the noise stage "
                              f"(it makes {sorted(made) or 'none'}: noise.corpus_categories and noise.dirs)")


def planned_categories(c) -> set:
    """The categories the noise stage makes with settings ``c`` (``cfg.noise``)."""
    return set(corpus_categories(c)) | {category for category, _, _ in noise_sources(c.dirs)}


def corpus_categories(c) -> Dict[str, int]:
    """``{category: talkers}`` of the corpus noise made (categories with talkers > 0)."""
    return {str(k): int(v) for k, v in (c.corpus_categories or {}).items() if int(v) > 0}


def noise_categories_made(directory: Path) -> Optional[List[str]]:
    """The categories of a noise dir: those of this stage's summary, else sub-folders holding
    split lists, else None (the dir's own ``{split}.tsv`` lists, e.g. the reference's tsv/all)."""
    summary = Path(directory) / "summary.json"
    if summary.is_file():
        return sorted(json.loads(summary.read_text())["categories"])
    if not Path(directory).is_dir():  # not made yet (a dry run, a config check)
        return None
    found = sorted(p.name for p in Path(directory).iterdir()
                   if p.is_dir() and any((p / f"{s}.tsv").is_file() for s in SPLITS))
    return found or None


def use_dir(ctx: StageContext, use) -> Path:
    return Path(str(use.dir)).expanduser().resolve() if use.get("dir") else noise_dir(ctx)


def task_overrides(ctx: StageContext, use, hydra_value, iteration: Optional[int] = None) -> List[str]:
    """The fairseq task keys of a noise block (nothing when its probability is 0, or for an
    iteration its ``iterations`` leave out)."""
    if float(use.prob) <= 0:
        return []
    if iteration is not None and list(use.get("iterations") or []) and iteration not in use.iterations:
        return []
    directory = use_dir(ctx, use)
    categories = [str(c) for c in use.categories] or noise_categories_made(directory)
    if use.categories:
        made = noise_categories_made(directory) or []
        missing = [c for c in categories if c not in made]
        if missing:
            raise ConfigError(f"noise categories {missing} are not in {directory} (it has {made or 'none'})")
    listed = "null" if not categories else "[" + ",".join(categories) + "]"
    # "++": set whether or not the base config has the key (ours have none; the reference's
    # noise configs have some)
    return [f"++task.noise_wav={hydra_value(directory)}", f"++task.noise_prob={float(use.prob)}",
            f"++task.noise_snr='{snr_setting(use.snr)}'",  # quoted: a string, as the task's field f"++task.noise_num={int(use.num)}",
            f"++task.noise_categories={listed}"]


def parse_dir_entry(entry: str) -> tuple:
    """``"CATEGORY=PATH"`` or ``"PATH"`` -> (category or None, absolute path)."""
    entry = str(entry)
    name, sep, rest = entry.partition("=")
    if sep and CATEGORY_NAME.match(name) and "/" not in name:
        return name, Path(rest).expanduser().resolve()
    return None, Path(entry).expanduser().resolve()


def noise_sources(entries) -> List[tuple]:
    """(category, folder, label) of every configured folder: a MUSAN root gives one per
    sub-folder; label = the folder name (made unique within a category) for output paths."""
    sources = []
    for entry in entries:
        category, path = parse_dir_entry(entry)
        if category is None and all((path / c).is_dir() for c in MUSAN_CATEGORIES):
            sources += [(c, path / c) for c in MUSAN_CATEGORIES]
        else:
            sources.append((category or path.name, path))
    labelled, seen = [], set()
    for category, path in sources:
        label, k = path.name, 2
        while (category, label) in seen:
            label, k = f"{path.name}-{k}", k + 1
        seen.add((category, label))
        labelled.append((category, path, label))
    return labelled
