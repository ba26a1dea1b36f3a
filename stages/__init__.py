"""The AV-HuBERT stages. Each module ``stages/<name>.py`` exposes ``STAGE`` (a
``pipeline.stage.Stage``) and ``Config`` (a dataclass: that stage's typed config section,
``cfg.<name>``, defaults = the reference/paper settings)."""
from __future__ import annotations

import importlib

# Order of the DAG as a user reads it. crop, manifest and noise run once (noise only when
# something uses it); the rest once per iteration (finetune once, after the last iteration).
STAGE_ORDER = ["crop", "manifest", "noise", "features", "kmeans", "labels", "train", "finetune"]


def get_stage(name: str):
    return importlib.import_module(f"stages.{name}").STAGE


def config_sections() -> dict:
    """``{section name: dataclass}`` of every stage plus the shared ``schedule`` section."""
    from stages.schedule import ScheduleConfig

    sections = {"schedule": ScheduleConfig}
    for name in STAGE_ORDER:
        try:
            mod = importlib.import_module(f"stages.{name}")
        except ModuleNotFoundError as e:  # a stage not written yet
            if e.name == f"stages.{name}":
                continue
            raise
        sections[name] = mod.Config
    return sections
