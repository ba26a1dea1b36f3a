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
    python launch.py report [--workdir DIR]          # WORKDIR/report/index.html (also after every launch)
    python launch.py crop-video VIDEO --out DIR [--mode reference|fast]
    python launch.py infer VIDEO --checkpoint FT.pt [--modalities video|audio|av]
    python launch.py units VIDEO... --checkpoint CKPT --layer L (--kmeans KM | --n-clusters K) [--out DIR]
"""
from __future__ import annotations

import argparse
import logging
import time
import os
import sys
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FORWARDED = {"crop-video": ("stages.crop", "crop_video_main"), "infer": ("stages.infer", "main"),
             "report": ("report", "main"), "units": ("stages.units", "main")}
# how a detached driver runs this launcher again (a module with main(argv), importable from paths)
ENTRY = {"module": "launch", "script": str(ROOT / "launch.py"), "paths": [str(ROOT)]}


def parse_args(argv):
    from stages import STAGE_ORDER

    p = argparse.ArgumentParser(
        prog="launch.py",
        description="Run the AV-HuBERT pretraining pipeline (stages: " + ", ".join(STAGE_ORDER) + ").",
        epilog="Subcommands: `status [--workdir DIR]`, `cancel [--workdir DIR]`, `report [--workdir DIR]`, "
        "`crop-video VIDEO --out DIR`, `infer VIDEO --checkpoint FT.pt`, "
        "`units VIDEO... --checkpoint CKPT --layer L (--kmeans KM | --n-clusters K)`. "
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
    p.add_argument("--redo-changed", action="store_true",
                   help="redo the steps made with other settings than this launch's (--dry-run lists them) and "
                   "everything after them; without it such a launch refuses")
    p.add_argument("--dry-run", action="store_true", help="print the plan and submit nothing")
    p.add_argument("--detach", action="store_true",
                   help="hand the run to a driver that does not depend on this terminal (a Slurm job, "
                   "cluster.driver, or a background process) and return; prints how to follow and stop it")
    p.add_argument("--driver", action="store_true", help=argparse.SUPPRESS)  # set in the detached driver
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    args.argv = list(argv)  # recorded in each step's provenance.json
    return args


def build(args, dry_run: bool, compute_shards: bool = True):
    """(cfg, Pipeline, steps) for the parsed arguments; raises PipelineError subclasses.
    ``compute_shards`` False only validates (a launch that detaches: the driver plans)."""
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
    pipe = Pipeline(cfg, stages, STAGE_ORDER, Path(cfg.workdir), force=args.force, echo=_echo, dry_run=dry_run,
                    redo_changed=args.redo_changed, command=["launch.py", *args.argv], overrides=args.overrides)
    names = "all" if args.stage == "all" else [args.stage]
    iterations = [args.iteration] if args.iteration is not None else None
    steps = pipe.plan(pipe.targets(names, iterations), compute_shards=compute_shards)
    return cfg, pipe, steps


def _echo(msg: str) -> None:
    print(msg, flush=True)


def _say(msg: str, err: bool = False) -> None:
    """Print, even when the terminal is gone (SIGHUP): a lost message must not become a traceback."""
    try:
        print(msg, file=sys.stderr if err else sys.stdout, flush=True)
    except OSError:
        pass


def _fail(msg: str, workdir) -> int:
    _say(f"error: {msg}", err=True)
    return 2


def _internal_error(e: BaseException, workdir) -> int:
    """An unexpected exception: one line for the user, the traceback in a file for a report."""
    import tempfile
    import traceback

    text = traceback.format_exc()
    where = None
    for d in ([Path(workdir) / ".pipeline"] if workdir else []) + [Path(tempfile.gettempdir())]:
        try:
            d.mkdir(parents=True, exist_ok=True)
            where = d / f"launch-error-{os.getpid()}.txt"
            where.write_text(text)
            break
        except OSError:
            where = None
    _say(f"error: internal error: {type(e).__name__}: {e}" + (f" (traceback in {where})" if where else ""), err=True)
    return 3


def _guarded(run, workdir_of, driver_store=None, outcome: Optional[dict] = None) -> int:
    """Run ``run()`` turning every way it can fail into one line and an exit code (the error is
    kept in ``outcome['error']`` for the run report)."""
    from pipeline.driver import Interrupted, interrupted_message, update_record
    from pipeline.errors import PipelineError, infrastructure_cause

    outcome = {} if outcome is None else outcome
    try:
        rc = run()
        if driver_store is not None:
            update_record(driver_store, state="done", since=time.time())
        return rc
    except Interrupted as e:
        cfg, workdir = workdir_of()
        outcome["error"] = f"interrupted by {e.name}"
        _say(interrupted_message(e, cfg, workdir), err=True)
        if driver_store is not None:
            update_record(driver_store, state=f"stopped ({e.name})", since=time.time())
        return 128 + e.signum
    except PipelineError as e:
        outcome["error"] = str(e)
        if driver_store is not None:
            update_record(driver_store, state="failed", error=str(e).splitlines()[0], since=time.time())
        return _fail(str(e), workdir_of()[1])
    except OSError as e:
        workdir = workdir_of()[1]
        cause = infrastructure_cause(e, [workdir] if workdir else [])
        if cause and not e.filename and workdir:  # a failed write() names no file: name the disk
            from pipeline.disk import free_line

            cause = f"{cause} in {workdir} ({free_line(Path(workdir))})"
        outcome["error"] = cause or str(e)
        if driver_store is not None:
            update_record(driver_store, state="failed", error=cause or str(e), since=time.time())
        if cause:
            return _fail(f"{cause}: free space (or fix the file system) and rerun the same command", workdir)
        return _fail(f"{e.strerror or e}{f': {e.filename}' if e.filename else ''}", workdir)
    except Exception as e:  # a bug: one line, the traceback in a file
        outcome["error"] = f"internal error: {type(e).__name__}: {e}"
        return _internal_error(e, workdir_of()[1])


def _report_at_end(workdir, argv, start, rc, error) -> list:
    from report import at_end_of_launch

    return at_end_of_launch(workdir, argv, start, rc, error)


def cmd_run(argv, build_fn=None, entry=None, at_end=_report_at_end) -> int:
    """A launch: plan and run (or --dry-run, or --detach). ``build_fn`` and ``entry`` are the
    planning function and the driver's entry point (tests run the same launcher on toy stages);
    ``at_end`` writes the run report after every launch that ran (failed ones too)."""
    build_fn, entry = build_fn or build, entry or ENTRY
    start = time.time()
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("submitit").propagate = False  # it has its own handler: one line, not two
    built: dict = {}
    driver_store = None
    if args.driver and args.workdir:
        from pipeline.state import StateStore

        driver_store = StateStore(Path(args.workdir).resolve())

    def workdir_of():
        cfg = built.get("cfg")
        return cfg, (Path(cfg.workdir) if cfg is not None else (Path(args.workdir).resolve() if args.workdir else None))

    def run() -> int:
        from pipeline.driver import interrupts_raise, run_locked

        with interrupts_raise():
            if args.detach and not args.dry_run:
                return cmd_detach(args, argv, built, build_fn, entry)
            cfg, pipe, steps = build_fn(args, args.dry_run)
            built["cfg"] = cfg
            if args.dry_run:
                print(pipe.describe_plan(steps))
                from pipeline.estimate import check_plan_disk

                check_plan_disk(steps, Path(cfg.workdir))  # what a launch would refuse, refused here too
                print("\n(dry run: nothing submitted)")
                return 0
            results = run_locked(cfg, pipe, steps, role="driver" if args.driver else "launch", echo=_echo,
                                 on_locked=lambda: built.update(ran=True))
        ran = sum(r.submitted for r in results)
        print(f"done: {len(results)} step(s), {ran} shard(s) run" + ("" if ran else " (everything was already complete)"))
        return 0

    outcome: dict = {}
    rc = _guarded(run, workdir_of, driver_store, outcome)
    if built.get("ran") and at_end is not None:  # the report after every launch that ran, failed ones too
        for line in at_end(Path(built["cfg"].workdir), argv, start, rc, outcome.get("error")):
            _say(line)
    return rc


def cmd_detach(args, argv, built: dict, build_fn, entry: dict) -> int:
    from pipeline.driver import check_can_detach, detach_local, detach_slurm, detached_message
    from pipeline.state import StateStore

    cfg, _pipe, _steps = build_fn(args, dry_run=False, compute_shards=False)
    built["cfg"] = cfg
    store = StateStore(Path(cfg.workdir))
    check_can_detach(cfg, store)
    # the driver runs the same command; paths made absolute (later flags win in argparse)
    driver_argv = [a for a in argv if a != "--detach"] + ["--workdir", cfg.workdir]
    if cfg.get("corpus"):
        driver_argv += ["--corpus", cfg.corpus]
    if cfg.cluster.executor == "slurm":
        rec = detach_slurm(cfg, driver_argv, store, entry)
    else:
        rec = detach_local([sys.executable, entry["script"], *driver_argv, "--driver"], store)
    print(detached_message(rec, cfg, Path(cfg.workdir)))
    return 0


def settings_lines(workdir: Path, preset: Optional[str], cluster: Optional[str], overrides: list) -> list[str]:
    """What ``status`` says of settings and versions: each step's recorded settings compared with
    the last launch's (``.pipeline/config.yaml``; ``--preset``/``--cluster`` start from those files
    instead), with ``key=value`` on top: changed steps (old -> new, what a redo makes again), notes."""
    from pipeline.changes import compare
    from pipeline.config import load_config
    from pipeline.errors import PipelineError
    from pipeline.runner import Pipeline
    from stages import STAGE_ORDER, config_sections, get_stage

    saved = workdir / ".pipeline" / "config.yaml"
    if not saved.is_file() and not preset:
        return []
    against = ("the last launch's settings" if saved.is_file() and not (preset or cluster)
               else f"preset {preset or 'smoke'}, cluster {cluster or 'local'}")
    against += "".join(f", {o}" for o in overrides)
    try:
        cfg = load_config(config_sections(), preset, cluster, overrides, {"workdir": str(workdir)},
                          saved=None if (preset or cluster) else saved)
        pipe = Pipeline(cfg, {n: get_stage(n) for n in STAGE_ORDER}, STAGE_ORDER, workdir, echo=lambda _m: None,
                        dry_run=True)
        lines = compare(pipe, list(pipe.targets("all"))).lines()
    except (PipelineError, OSError) as e:
        return [f"settings: not compared ({e})"]
    if not lines:
        return [f"settings: every step as recorded (compared with {against})"]
    return [f"settings compared with {against}:"] + [f"  {line}" for line in lines]


def cmd_status(argv) -> int:
    from pipeline.status import report
    from stages import STAGE_ORDER

    p = argparse.ArgumentParser(prog="launch.py status")
    p.add_argument("--workdir", default="./work")
    p.add_argument("--preset", help="compare the steps' settings with this preset's (default: the last launch's)")
    p.add_argument("--cluster", help="... with this cluster config (default: the last launch's)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="compare with these settings")
    a = p.parse_args(argv)
    workdir = Path(a.workdir).resolve()

    def run() -> int:
        text, rc = report(workdir, STAGE_ORDER)
        print(text)
        for line in settings_lines(workdir, a.preset, a.cluster, a.overrides):
            print(line)
        return rc

    return _guarded(run, lambda: (None, workdir))


def cmd_cancel(argv) -> int:
    from pipeline.driver import cancel

    p = argparse.ArgumentParser(prog="launch.py cancel",
                                description="Stop the driver (or a launch of this host) and cancel every job of the work dir.")
    p.add_argument("--workdir", default="./work")
    a = p.parse_args(argv)
    workdir = Path(a.workdir).resolve()
    return _guarded(lambda: cancel(workdir, echo=_echo), lambda: (None, workdir))


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "status":
        return cmd_status(argv[1:])
    if argv and argv[0] == "cancel":
        return cmd_cancel(argv[1:])
    if argv and argv[0] in FORWARDED:
        import importlib

        module, func = FORWARDED[argv[0]]
        return int(getattr(importlib.import_module(module), func)(argv[1:]) or 0)
    return cmd_run(argv)


if __name__ == "__main__":
    sys.exit(main())
