"""The AV-HuBERT stages. Each module ``stages/<name>.py`` exposes ``STAGE`` (a
``pipeline.stage.Stage``) and ``Config`` (a dataclass: that stage's typed config section,
``cfg.<name>``, defaults = the reference/paper settings; None for a stage that reads another
stage's section)."""
from __future__ import annotations

import importlib

from stages.schedule import ScheduleConfig

# Order of the DAG as a user reads it. crop, manifest and noise run once (noise only when
# something uses it: see stages/noise.py); the rest once per iteration (finetune once, after the
# last iteration). units_kmeans and units (discrete units for downstream use, after the last
# iteration too) run in --stage all only when units are asked for (units.enabled, or a units
# k-means setting: see stages/units.py).
STAGE_ORDER = ["crop", "manifest", "noise", "features", "kmeans", "labels", "train", "finetune", "units_kmeans", "units"]


def get_stage(name: str):
    return importlib.import_module(f"stages.{name}").STAGE


def config_sections() -> dict:
    """``{section name: dataclass}`` of every stage plus the shared ``schedule`` section."""
    sections = {"schedule": ScheduleConfig}
    for name in STAGE_ORDER:
        try:
            mod = importlib.import_module(f"stages.{name}")
        except ModuleNotFoundError as e:  # a stage not written yet
            if e.name == f"stages.{name}":
                continue
            raise
        if getattr(mod, "Config", None) is not None:  # units_kmeans reads the units section
            sections[name] = mod.Config
    return sections
