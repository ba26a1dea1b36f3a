#!/usr/bin/env python
"""AV-HuBERT pretraining pipeline: crop -> manifest -> (features -> kmeans -> labels -> train) x N
-> finetune.

    python launch.py                                # whole pipeline, sample corpus, local, smoke preset
    python launch.py --stage all --cluster mycluster --preset base --corpus /data/lrs3 --layout lrs3
    python launch.py --stage kmeans --iteration 2 kmeans.percent=0.2
    python launch.py --dry-run                       # the plan; submits nothing
    python launch.py status [--workdir DIR]
    python launch.py report [--workdir DIR]          # WORKDIR/report/index.html (also after every launch)
    python launch.py crop-video VIDEO --out DIR [--mode reference|fast]
    python launch.py infer VIDEO --checkpoint FT.pt [--modalities video|audio|av]
    python launch.py units VIDEO... --checkpoint CKPT --layer L (--kmeans KM | --n-clusters K) [--out DIR]
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FORWARDED = {"crop-video": ("stages.crop", "crop_video_main"), "infer": ("stages.infer", "main"),
             "report": ("report", "main"), "units": ("stages.units", "main")}


def parse_args(argv):
    from stages import STAGE_ORDER

    p = argparse.ArgumentParser(
        prog="launch.py",
        description="Run the AV-HuBERT pretraining pipeline (stages: " + ", ".join(STAGE_ORDER) + ").",
        epilog="Subcommands: `status [--workdir DIR]`, `report [--workdir DIR]`, `crop-video VIDEO --out DIR`, "
        "`infer VIDEO --checkpoint FT.pt`, `units VIDEO... --checkpoint CKPT --layer L (--kmeans KM | --n-clusters K)`. "
        "Any setting can be overridden as key=value (e.g. kmeans.percent=0.1 cluster.array_parallelism=8).",
    )
    p.add_argument("--stage", default="all", help="all (default) or one of: " + ", ".join(STAGE_ORDER))
    g = p.add_mutually_exclusive_group()
    g.add_argument("--iterations", type=int, help="number of pretraining iterations (default: the preset's)")
    g.add_argument("--iteration", type=int, help="run the stage(s) of this iteration only")
    p.add_argument("--corpus", help="corpus directory (default: the bundled sample corpus, built on first use)")
    p.add_argument("--layout", choices=["plain", "lrs3", "vox2"], help="corpus layout (default: plain)")
    p.add_argument("--workdir", help="where outputs and state go (default: ./work)")
    p.add_argument("--cluster", default="local", help="cluster_configs/NAME.yaml (default: local)")
    p.add_argument("--preset", default="smoke", help="presets/NAME.yaml (default: smoke)")
    p.add_argument("--force", action="store_true", help="redo complete shards of the selected stages")
    p.add_argument("--dry-run", action="store_true", help="print the plan and submit nothing")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p.parse_args(argv)


def build(args, dry_run: bool):
    """(cfg, Pipeline, steps) for the parsed arguments; raises PipelineError subclasses."""
    from pipeline.config import load_config
    from pipeline.errors import ConfigError
    from pipeline.runner import Pipeline
    from stages import STAGE_ORDER, config_sections, get_stage

    engine_values = {
        "workdir": args.workdir,
        "corpus": args.corpus,
        "layout": args.layout,
        "iterations": args.iterations,
    }
    cfg = load_config(config_sections(), args.preset, args.cluster, args.overrides, engine_values)
    if args.iteration is not None and args.iteration > cfg.iterations:
        cfg.iterations = args.iteration
    if not cfg.corpus:
        from tools.sample_corpus import default_corpus_dir, ensure_sample_corpus

        cfg.corpus = str(default_corpus_dir() if dry_run else ensure_sample_corpus())
    cfg.corpus = str(Path(os.path.expanduser(cfg.corpus)).resolve())
    if not Path(cfg.corpus).is_dir() and not dry_run:
        raise ConfigError(f"corpus {cfg.corpus}: no such directory (--corpus)")
    cfg.workdir = str(Path(os.path.expanduser(cfg.workdir)).resolve())
    stages = {name: get_stage(name) for name in STAGE_ORDER}
    pipe = Pipeline(cfg, stages, STAGE_ORDER, Path(cfg.workdir), force=args.force, echo=_echo, dry_run=dry_run)
    names = "all" if args.stage == "all" else [args.stage]
    iterations = [args.iteration] if args.iteration is not None else None
    steps = pipe.plan(pipe.targets(names, iterations))
    return cfg, pipe, steps


def _echo(msg: str) -> None:
    print(msg, flush=True)


def cmd_run(argv) -> int:
    launch = {"start": time.time()}  # filled in as the launch goes (work dir once locked, error)
    rc = _launch(argv, launch)
    if launch.get("workdir"):  # it ran: the report is written at the end of every launch, failed ones too
        from report import at_end_of_launch

        print("\n".join(at_end_of_launch(launch["workdir"], argv, launch["start"], rc, launch.get("error"))), flush=True)
    return rc


def _launch(argv, launch: dict) -> int:
    from pipeline.config import to_yaml
    from pipeline.lock import WorkdirLock
    from pipeline.errors import PipelineError

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg, pipe, steps = build(args, args.dry_run)
        if args.dry_run:
            print(pipe.describe_plan(steps))
            from pipeline.estimate import check_plan_disk

            check_plan_disk(steps, Path(cfg.workdir))  # what a launch would refuse, refused here too
            print("\n(dry run: nothing submitted)")
            return 0
        with WorkdirLock(Path(cfg.workdir)) as lock:
            launch["workdir"] = Path(cfg.workdir)
            if lock.cleared_stale:
                print(f"cleared a stale lock left by pid {lock.cleared_stale.get('pid')} on {lock.cleared_stale.get('host')}")
            from pipeline import atomic

            atomic.write_text(Path(cfg.workdir) / ".pipeline" / "config.yaml", to_yaml(cfg))
            results = pipe.run(steps)
        ran = sum(r.submitted for r in results)
        print(f"done: {len(results)} step(s), {ran} shard(s) run" + ("" if ran else " (everything was already complete)"))
        return 0
    except PipelineError as e:
        launch["error"] = str(e)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        launch["error"] = "interrupted"
        print("interrupted: running jobs keep running on a cluster; rerun the same command to resume", file=sys.stderr)
        return 130


def cmd_status(argv) -> int:
    from pipeline.status import collect, render
    from stages import STAGE_ORDER

    p = argparse.ArgumentParser(prog="launch.py status")
    p.add_argument("--workdir", default="./work")
    a = p.parse_args(argv)
    workdir = Path(a.workdir).resolve()
    statuses = collect(workdir, STAGE_ORDER)
    print(render(statuses, workdir))
    return 1 if any(s.failed for s in statuses) else 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "status":
        return cmd_status(argv[1:])
    if argv and argv[0] in FORWARDED:
        import importlib

        module, func = FORWARDED[argv[0]]
        return int(getattr(importlib.import_module(module), func)(argv[1:]) or 0)
    return cmd_run(argv)


if __name__ == "__main__":
    sys.exit(main())
