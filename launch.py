#!/usr/bin/env python
"""AV-HuBERT pretraining pipeline: crop -> manifest -> (features -> kmeans -> labels -> train) x N
-> finetune.

    python launch.py                                # whole pipeline, sample corpus, local, smoke preset
    python launch.py --stage all --cluster mycluster --preset base --corpus /data/lrs3 --layout lrs3
    python launch.py --stage kmeans --iteration 2 kmeans.percent=0.2
    python launch.py --dry-run                       # the plan; submits nothing
    python launch.py --cluster mycluster ... --detach  # a driver runs the DAG; returns at once
    python launch.py status [--workdir DIR] [key=value ...]   # + changed settings, against the last launch's
    python launch.py cancel [--workdir DIR]          # stops the driver and every job of DIR
    python launch.py report [--workdir DIR]          # WORKDIR/report/index.html (also after every step)
    python launch.py crop-video VIDEO --out DIR [--mode reference|fast]
    python launch.py infer VIDEO --checkpoint FT.pt [--modalities video|audio|av]
    python launch.py units VIDEO... --checkpoint CKPT --layer L (--kmeans KM | --n-clusters K) [--out DIR]
    python launch.py export WORKDIR --out DIR [--finetuned | --no-finetuned]

This file is the application's description (its stages, settings, presets, subcommands, the run
report at the end of a launch); the launcher itself (lock, detach, signals, one-line errors,
status, cancel) is ``pipeline/cli.py``. ``main(argv)`` is the entry point, as a script
(``python launch.py``) and as an installed module (``launch:main``).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

from pipeline.cli import Application, DriverEntry
from pipeline.cli import main as launcher_main
from stages import STAGE_ORDER, config_sections, get_stage

# the directory of this file: a checkout's root, or site-packages when installed (the presets and
# cluster configs are read from beside it; a detached driver imports this module from it)
ROOT = Path(__file__).resolve().parent


def _sample_corpus(dry_run: bool) -> Path:
    from tools.sample_corpus import default_corpus_dir, ensure_sample_corpus

    return default_corpus_dir() if dry_run else ensure_sample_corpus()


def _run_report(workdir: Path, argv: List[str], start: float, rc: int, error: Optional[str]) -> List[str]:
    """The run report after every launch that ran (report/ imports the stages: loaded only here)."""
    from report import at_end_of_launch

    return at_end_of_launch(workdir, argv, start, rc, error)


def _status_lines(workdir: Path) -> List[str]:
    """``status``'s lines on the last corpus listing (items, paths that are not items)."""
    from stages.crop import status_lines

    return status_lines(workdir)


APP = Application(
    prog="launch.py",
    description="Run the AV-HuBERT pretraining pipeline (stages: {stages}).",
    epilog="Subcommands: `status [--workdir DIR]`, `cancel [--workdir DIR]`, `report [--workdir DIR]`, "
    "`crop-video VIDEO --out DIR`, `infer VIDEO --checkpoint FT.pt`, "
    "`units VIDEO... --checkpoint CKPT --layer L (--kmeans KM | --n-clusters K)`, `export WORKDIR --out DIR`. "
    "Any setting can be overridden as key=value (e.g. kmeans.percent=0.1 cluster.array_parallelism=8).",
    stage_names=tuple(STAGE_ORDER),
    get_stage=get_stage,
    config_sections=config_sections,
    preset_dir=ROOT / "presets",
    cluster_dir=ROOT / "cluster_configs",
    default_preset="smoke",
    default_cluster="local",
    layouts=("plain", "lrs3", "vox2"),
    default_corpus=_sample_corpus,
    corpus_help="corpus directory (default: the bundled sample corpus, built on first use)",
    commands={"crop-video": "stages.crop:crop_video_main", "infer": "stages.infer:main",
              "report": "report:main", "units": "stages.units_command:main", "export": "report.export:main"},
    entry=DriverEntry(module="launch", paths=(str(ROOT),)),
    at_end=_run_report,
    status_lines=_status_lines,
    # the run report rewritten in the background after every step that completed, so a run of
    # weeks shows its progress and ETA (pipeline/refresh.py)
    refresh_command=("report",),
)


def main(argv: Optional[List[str]] = None) -> int:
    return launcher_main(APP, argv)


if __name__ == "__main__":
    sys.exit(main())
