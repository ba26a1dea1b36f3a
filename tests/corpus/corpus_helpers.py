"""Helpers of the corpus tests: trees of files, a stage context, counting directory reads."""
from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

from pipeline.stage import StageContext


def touch(path, data: bytes = b"") -> Path:
    """Create ``path`` (str, bytes or Path; bytes for names that are not valid UTF-8)."""
    path = Path(os.fsdecode(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def stage_ctx(corpus: Path, workdir: Path, layout: str = "plain", manifest=None, **crop) -> StageContext:
    """A context for the crop/manifest stages; everything is train unless ``manifest`` says."""
    from stages import crop as crop_stage
    from stages import manifest as manifest_stage

    cfg = OmegaConf.create({
        "corpus": str(corpus), "layout": layout, "workdir": str(workdir),
        "crop": OmegaConf.structured(crop_stage.Config(**crop)),
        "manifest": OmegaConf.merge(OmegaConf.structured(manifest_stage.Config),
                                    {"valid_fraction": 0.0, "test_fraction": 0.0, **(manifest or {})}),
    })
    return StageContext(cfg=cfg, workdir=workdir)


class ScandirCounter:
    """Counts ``os.scandir`` calls (the corpus walk, pathlib's glob and os.walk all go through it)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        real = os.scandir

        def counting(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(os, "scandir", counting)




def launch_here(argv: list, capsys) -> tuple:
    """``launch.py ARGV`` in this process (a fresh interpreter per launch costs seconds on a busy
    machine; jobs still run as the executor runs them): (exit status, stdout + stderr)."""
    import launch as launcher

    capsys.readouterr()
    rc = launcher.main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out + out.err


def freeze_listing(stage, ctx: StageContext) -> list:
    """What a launch does with the crop stage's listing: plan it (prepare), then write it
    (commit_plan, once the launch's checks passed). Returns prepare's lines."""
    lines = stage.prepare(ctx, commit=True)
    stage.commit_plan(ctx)
    return lines
