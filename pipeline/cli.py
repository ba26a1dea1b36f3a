"""The generic launcher: what a pipeline's command line does that is not about its stages.

An application (``launch.py`` for AV-HuBERT; ``tests/engine/toy_launch.py`` for the engine's
test stages) describes itself with an ``Application`` and hands its arguments over::

    APP = Application(prog="launch.py", description="...", stage_names=STAGE_ORDER,
                      get_stage=get_stage, entry=DriverEntry("launch", (ROOT,)), ...)

    def main(argv=None) -> int:
        return pipeline.cli.main(APP, argv)

This module then gives it: the launch (``--stage``, ``--iteration(s)``, ``--dry-run``,
``--force``, ``--redo-changed``, ``key=value`` overrides), the work dir lock taken before anything of the work dir is
written, ``--detach`` (a driver that does not depend on the terminal; the driver runs
``APP.entry`` again), SIGHUP/SIGTERM/SIGINT ending a launch with one line, every error as one
``error:`` line (an unexpected one with its traceback in a file), ``status`` and ``cancel``, the
application's own subcommands (``Application.commands``) and its end-of-launch hook
(``Application.at_end``: the run report). It imports nothing of the application: stages,
config sections, presets and hooks all come through the ``Application``.

Order of a launch (nothing of the work dir is written by a launch that is refused):
configuration -> the lock is free -> every step checked (settings, requests against the cluster,
prerequisites) -> the lock taken -> shards computed (``Stage.prepare`` plans in memory) -> the
first step's disk estimate checked -> the plans written (``Stage.commit_plan``) -> the steps run (after each one that completed, the
application's ``refresh_command`` in the background) -> the end-of-launch hook.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Mapping, Optional, Sequence

from pipeline.changes import compare
from pipeline.config import load_config
from pipeline.disk import free_line
from pipeline.driver import (
    DriverEntry,
    Interrupted,
    cancel,
    detached_message,
    interrupted_message,
    interrupts_raise,
    replace_driver,
    run_locked,
    start_driver,
    update_record,
    workdir_lock,
)
from pipeline.errors import ConfigError, PipelineError, infrastructure_cause
from pipeline.estimate import check_plan_disk
from pipeline.refresh import BackgroundRefresh
from pipeline.runner import Pipeline
from pipeline.stage import Stage
from pipeline.state import StateStore
from pipeline.status import report

# (workdir, argv, start time, exit status, error line or None) -> lines to print
AtEnd = Callable[[Path, List[str], float, int, Optional[str]], List[str]]


@dataclass(frozen=True)
class Application:
    """What the generic launcher needs to know of an application.

    ``prog``: how users call it (usage lines). ``description``: the help text; ``{stages}`` is
    replaced by the stage names. ``stage_names``: the stage registry in DAG order, ``get_stage``
    the ``Stage`` of a name. ``entry``: how a detached driver runs this launcher again.
    ``config_sections``: ``{section: dataclass}`` of the stages' typed settings (called when a
    launch is configured). ``preset_dir``/``cluster_dir``: where ``--preset NAME`` and
    ``--cluster NAME`` are read from (None: the repository's ``presets/`` and
    ``cluster_configs/``). ``layouts``: the choices of ``--layout`` (empty: any). ``default_corpus``:
    the corpus directory when ``--corpus`` is not given (called with ``dry_run``: a dry run must
    not build anything). ``commands``: the application's own subcommands, ``{name:
    "module:function"}``, each called with the remaining arguments (imported when used).
    ``at_end``: called after every launch that ran (failed ones too), its lines are printed.
    ``status_lines``: the application's own lines after the engine's ``status`` (called with the
    work dir; e.g. what its inputs' listing left out). ``refresh_command``: one of its
    subcommands with arguments (``("report",)``) that rewrites its view of the work dir; run with
    ``--workdir`` in the background after every step that completed (``pipeline.refresh``)."""

    prog: str
    description: str
    stage_names: Sequence[str]
    get_stage: Callable[[str], Stage]
    entry: DriverEntry
    config_sections: Callable[[], Mapping[str, type]] = dict
    preset_dir: Optional[Path] = None
    cluster_dir: Optional[Path] = None
    default_preset: Optional[str] = None
    default_cluster: str = "local"
    layouts: Sequence[str] = ()
    default_corpus: Optional[Callable[[bool], os.PathLike]] = None
    corpus_help: str = "corpus directory"
    commands: Mapping[str, str] = field(default_factory=dict)
    epilog: str = ""
    at_end: Optional[AtEnd] = None
    status_lines: Optional[Callable[[Path], List[str]]] = None
    refresh_command: Sequence[str] = ()


# --- arguments and planning ----------------------------------------------------------------------
def parse_args(app: Application, argv: Sequence[str]) -> argparse.Namespace:
    names = list(app.stage_names)
    p = argparse.ArgumentParser(prog=app.prog, description=app.description.format(stages=", ".join(names)),
                                epilog=app.epilog or None)
    p.add_argument("--stage", default="all", help="all (default) or one of: " + ", ".join(names))
    g = p.add_mutually_exclusive_group()
    g.add_argument("--iterations", type=int, help="number of pretraining iterations (default: the preset's)")
    g.add_argument("--iteration", type=int, help="run the stage(s) of this iteration only")
    p.add_argument("--corpus", help=app.corpus_help)
    p.add_argument("--layout", choices=list(app.layouts) or None, help="corpus layout (default: plain)")
    p.add_argument("--workdir", help="where outputs and state go (default: ./work)")
    p.add_argument("--cluster", default=app.default_cluster,
                   help=f"{_dir_name(app.cluster_dir, 'cluster_configs')}/NAME.yaml (default: {app.default_cluster})")
    p.add_argument("--preset", default=app.default_preset,
                   help=f"{_dir_name(app.preset_dir, 'presets')}/NAME.yaml (default: {app.default_preset or 'none'})")
    p.add_argument("--force", action="store_true", help="redo complete shards of the selected stages")
    p.add_argument("--redo-changed", action="store_true",
                   help="redo the steps made with other settings than this launch's (--dry-run lists them) and "
                   "everything after them; without it such a launch refuses")
    p.add_argument("--dry-run", action="store_true", help="print the plan and submit nothing")
    p.add_argument("--detach", action="store_true",
                   help="hand the run to a driver that does not depend on this terminal (a Slurm job, "
                   "cluster.driver, or a background process) and return; prints how to follow and stop it")
    p.add_argument("--driver", action="store_true", help=argparse.SUPPRESS)  # set in the detached driver
    # the guardian job of a Slurm driver: replace driver job JOB, which ended without finishing the run
    p.add_argument("--replace-driver", metavar="JOB", help=argparse.SUPPRESS)
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(list(argv))
    args.command = [app.prog, *argv]  # recorded in each step's provenance.json
    return args


def _dir_name(path: Optional[Path], default: str) -> str:
    return Path(path).name if path is not None else default


def configure(app: Application, args: argparse.Namespace, dry_run: bool):
    """The launch's configuration tree (reads files, writes nothing); raises ConfigError."""
    engine_values = {"workdir": args.workdir, "corpus": args.corpus, "layout": args.layout,
                     "iterations": args.iterations}
    cfg = load_config(dict(app.config_sections()), args.preset, args.cluster, args.overrides, engine_values,
                      preset_dir=app.preset_dir, cluster_dir=app.cluster_dir)
    if args.iteration is not None and args.iteration > cfg.iterations:
        cfg.iterations = args.iteration
    if not cfg.corpus and app.default_corpus is not None:
        cfg.corpus = str(app.default_corpus(dry_run))
    if cfg.corpus:
        cfg.corpus = str(Path(os.path.expanduser(cfg.corpus)).resolve())
        if not Path(cfg.corpus).is_dir() and not dry_run:
            raise ConfigError(f"corpus {cfg.corpus}: no such directory (--corpus)")
    cfg.workdir = str(Path(os.path.expanduser(cfg.workdir)).resolve())
    return cfg


def plan(app: Application, args: argparse.Namespace, dry_run: bool, compute_shards: bool = True, cfg=None):
    """(cfg, Pipeline, steps) for the parsed arguments (and ``cfg``, when already configured),
    every step checked; with ``compute_shards`` its shards too (a dry run: ``Stage.prepare``
    commits nothing). Raises PipelineError subclasses."""
    cfg = configure(app, args, dry_run) if cfg is None else cfg
    stages = {name: app.get_stage(name) for name in app.stage_names}
    pipe = Pipeline(cfg, stages, list(app.stage_names), Path(cfg.workdir), force=args.force, echo=echo,
                    dry_run=dry_run, redo_changed=args.redo_changed, command=args.command, overrides=args.overrides)
    names = "all" if args.stage == "all" else [args.stage]
    iterations = [args.iteration] if args.iteration is not None else None
    steps = pipe.plan(pipe.targets(names, iterations), compute_shards=compute_shards)
    return cfg, pipe, steps


# --- printing and errors -----------------------------------------------------------------------------
def echo(msg: str) -> None:
    print(msg, flush=True)


def say(msg: str, err: bool = False) -> None:
    """Print, even when the terminal is gone (SIGHUP): a lost message must not become a traceback."""
    try:
        print(msg, file=sys.stderr if err else sys.stdout, flush=True)
    except OSError:
        pass


def fail(msg: str) -> int:
    say(f"error: {msg}", err=True)
    return 2


def internal_error(e: BaseException, workdir: Optional[Path]) -> int:
    """An unexpected exception: one line for the user, the traceback in a file for a report
    (under the work dir's .pipeline when it can be written, else the temporary directory)."""
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
    say(f"error: internal error: {type(e).__name__}: {e}" + (f" (traceback in {where})" if where else ""), err=True)
    return 3


def guarded(run: Callable[[], int], workdir_of: Callable[[], tuple], driver_store: Optional[StateStore] = None,
            outcome: Optional[dict] = None) -> int:
    """Run ``run()`` turning every way it can fail into one line and an exit code: 2 for an error
    the user can act on, 3 for a bug, 128 + N for signal N (the error is kept in
    ``outcome['error']`` for the end-of-launch hook). ``workdir_of()`` -> (cfg or None, work dir
    or None) as far as the launch got."""
    outcome = {} if outcome is None else outcome
    try:
        rc = run()
        if driver_store is not None:
            update_record(driver_store, state="done", since=time.time())
        return rc
    except Interrupted as e:
        cfg, workdir = workdir_of()
        outcome["error"] = f"interrupted by {e.name}"
        say(interrupted_message(e, cfg, workdir), err=True)
        if driver_store is not None:
            update_record(driver_store, state=f"stopped ({e.name})", since=time.time())
        return 128 + e.signum
    except PipelineError as e:
        outcome["error"] = str(e)
        if driver_store is not None:
            update_record(driver_store, state="failed", error=str(e).splitlines()[0], since=time.time())
        return fail(str(e))
    except OSError as e:
        workdir = workdir_of()[1]
        cause = infrastructure_cause(e, [workdir] if workdir else [])
        if cause and not e.filename and workdir:  # a failed write() names no file: name the disk
            cause = f"{cause} in {workdir} ({free_line(Path(workdir))})"
        outcome["error"] = cause or str(e)
        if driver_store is not None:
            update_record(driver_store, state="failed", error=cause or str(e), since=time.time())
        if cause:
            return fail(f"{cause}: free space (or fix the file system) and rerun the same command")
        return fail(f"{e.strerror or e}{f': {e.filename}' if e.filename else ''}")
    except Exception as e:  # a bug: one line, the traceback in a file
        outcome["error"] = f"internal error: {type(e).__name__}: {e}"
        return internal_error(e, workdir_of()[1])


# --- the commands ----------------------------------------------------------------------------------
def cmd_run(app: Application, argv: List[str]) -> int:
    """A launch: plan and run (or --dry-run, or --detach); ``app.at_end`` after every launch that
    started running steps (failed ones too), never after one that was refused."""
    start = time.time()
    args = parse_args(app, argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("submitit").propagate = False  # it has its own handler: one line, not two
    built: dict = {}
    driver_store = StateStore(Path(args.workdir).resolve()) if args.driver and args.workdir else None

    def workdir_of():
        cfg = built.get("cfg")
        if cfg is not None:
            return cfg, Path(cfg.workdir)
        return None, (Path(args.workdir).resolve() if args.workdir else None)

    def run() -> int:
        with interrupts_raise():
            if args.replace_driver:
                return cmd_replace_driver(app, args, argv, built)
            if args.detach and not args.dry_run:
                return cmd_detach(app, args, argv, built)
            if args.dry_run:
                cfg, pipe, steps = plan(app, args, dry_run=True)
                built["cfg"] = cfg
                print(pipe.describe_plan(steps))
                check_plan_disk(steps, Path(cfg.workdir))  # what a launch would refuse, refused here too
                print("\n(dry run: nothing submitted)")
                return 0
            cfg = configure(app, args, dry_run=False)
            built["cfg"] = cfg
            role = "driver" if args.driver else "launch"
            workdir_lock(cfg, role).check_free()  # a launch refused by the lock says so first
            cfg, pipe, steps = plan(app, args, dry_run=False, compute_shards=False, cfg=cfg)
            if app.refresh_command:
                built["refresh"] = BackgroundRefresh(
                    app.entry.command([*app.refresh_command, "--workdir", cfg.workdir]), Path(cfg.workdir), say,
                    every_s=float(cfg.cluster.get("view_refresh_s", 0) or 0))
                pipe.after_step = built["refresh"].trigger
                pipe.while_waiting = built["refresh"].refresh_if_due
            results = run_locked(cfg, pipe, steps, role=role, echo=echo, on_started=lambda: built.update(ran=True))
        ran = sum(r.submitted for r in results)
        print(f"done: {len(results)} step(s), {ran} shard(s) run" + ("" if ran else " (everything was already complete)"))
        return 0

    outcome: dict = {}
    rc = guarded(run, workdir_of, driver_store, outcome)
    if built.get("refresh") is not None:
        built["refresh"].close()  # the end-of-launch hook writes the last view; no older one after it
    if built.get("ran") and app.at_end is not None:
        for line in app.at_end(Path(built["cfg"].workdir), argv, start, rc, outcome.get("error")):
            say(line)
    return rc


def _driver_argv(argv: List[str], cfg) -> List[str]:
    """The driver runs the same command; paths made absolute (later flags win in argparse)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--replace-driver":
            skip = True
        elif a != "--detach" and not a.startswith("--replace-driver="):
            out.append(a)
    out += ["--workdir", cfg.workdir]
    if cfg.get("corpus"):
        out += ["--corpus", cfg.corpus]
    return out


def cmd_detach(app: Application, args: argparse.Namespace, argv: List[str], built: dict) -> int:
    cfg, _pipe, _steps = plan(app, args, dry_run=False, compute_shards=False)
    built["cfg"] = cfg
    store = StateStore(Path(cfg.workdir))
    rec = start_driver(cfg, store, _driver_argv(argv, cfg), app.entry)
    print(detached_message(rec, cfg, Path(cfg.workdir)))
    return 0


def cmd_replace_driver(app: Application, args: argparse.Namespace, argv: List[str], built: dict) -> int:
    """The guardian job: the driver job ``args.replace_driver`` ended in a failed state (killed,
    node failure, out of memory); start a new driver unless the run ended or was cancelled."""
    cfg = configure(app, args, dry_run=False)
    built["cfg"] = cfg
    return replace_driver(cfg, StateStore(Path(cfg.workdir)), str(args.replace_driver), _driver_argv(argv, cfg),
                          app.entry, echo=echo)


def _workdir_arg(app: Application, name: str, argv: List[str], description: Optional[str] = None) -> Path:
    p = argparse.ArgumentParser(prog=f"{app.prog} {name}", description=description)
    p.add_argument("--workdir", default="./work")
    return Path(p.parse_args(argv).workdir).resolve()


def settings_lines(app: Application, workdir: Path, preset: Optional[str], cluster: Optional[str],
                   overrides: List[str]) -> List[str]:
    """What ``status`` says of settings and versions: each step's recorded settings compared with
    the last launch's (``.pipeline/config.yaml``; ``--preset``/``--cluster`` start from those files
    instead), with ``key=value`` on top: changed steps (old -> new, what a redo makes again), notes."""
    saved = workdir / ".pipeline" / "config.yaml"
    fresh = bool(preset or cluster) or not saved.is_file()
    if fresh and not (preset or app.default_preset):
        return []
    against = ("the last launch's settings" if not fresh
               else f"preset {preset or app.default_preset}, cluster {cluster or app.default_cluster}")
    against += "".join(f", {o}" for o in overrides)
    try:
        cfg = load_config(dict(app.config_sections()), (preset or app.default_preset) if fresh else None,
                          (cluster or app.default_cluster) if fresh else None, overrides, {"workdir": str(workdir)},
                          preset_dir=app.preset_dir, cluster_dir=app.cluster_dir, saved=None if fresh else saved)
        stages = {name: app.get_stage(name) for name in app.stage_names}
        pipe = Pipeline(cfg, stages, list(app.stage_names), workdir, echo=lambda _m: None, dry_run=True)
        lines = compare(pipe, list(pipe.targets("all"))).lines()
    except (PipelineError, OSError) as e:
        return [f"settings: not compared ({e})"]
    if not lines:
        return [f"settings: every step as recorded (compared with {against})"]
    return [f"settings compared with {against}:"] + [f"  {line}" for line in lines]


def cmd_status(app: Application, argv: List[str]) -> int:
    p = argparse.ArgumentParser(prog=f"{app.prog} status")
    p.add_argument("--workdir", default="./work")
    p.add_argument("--preset", help="compare the steps' settings with this preset's (default: the last launch's)")
    p.add_argument("--cluster", help="... with this cluster config (default: the last launch's)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="compare with these settings")
    a = p.parse_args(argv)
    workdir = Path(a.workdir).resolve()

    def run() -> int:
        text, rc = report(workdir, list(app.stage_names))
        extra = app.status_lines(workdir) if app.status_lines is not None else []
        print("\n".join([text, *extra, *settings_lines(app, workdir, a.preset, a.cluster, a.overrides)]))
        return rc

    return guarded(run, lambda: (None, workdir))


def cmd_cancel(app: Application, argv: List[str]) -> int:
    workdir = _workdir_arg(app, "cancel", argv,
                           "Stop the driver (or a launch of this host) and cancel every job of the work dir.")
    return guarded(lambda: cancel(workdir, echo=echo), lambda: (None, workdir))


def main(app: Application, argv: Optional[Sequence[str]] = None) -> int:
    """The launcher's command line: ``status``, ``cancel``, one of ``app.commands``, or a launch."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "status":
        return cmd_status(app, argv[1:])
    if argv and argv[0] == "cancel":
        return cmd_cancel(app, argv[1:])
    if argv and argv[0] in app.commands:
        module, _, func = app.commands[argv[0]].partition(":")
        return int(getattr(importlib.import_module(module), func or "main")(argv[1:]) or 0)
    return cmd_run(app, argv)


__all__ = ["Application", "DriverEntry", "main", "parse_args", "configure", "plan"]
