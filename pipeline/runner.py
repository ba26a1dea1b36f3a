"""The DAG runner: which (stage, iteration) pairs to run, in what order, and running them.

A *step* is one stage in one scope (once, or iteration N). Steps run one after another in DAG
order; the shards of a step run in parallel as one job array. A step whose prerequisites are
neither complete on disk nor earlier in this launch's plan is refused before anything is submitted.

Generations: each time a step's outputs are made anew, its ``_stage.done.json`` gets a new
generation, and every step records the generations of its prerequisites when it runs
(``_inputs.json``). A step whose inputs were redone since (a prerequisite's generation changed)
is *stale*: all its shards run again, and so on down the DAG. A stage can also declare single
complete shards out of date (``Stage.out_of_date``: training after ``train.max_update`` was raised).
"""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

from pipeline import changes, estimate, executors, progress, provenance
from pipeline.config import check_resources, resources_for
from pipeline.errors import ConfigError, InputsMissing, PipelineError, PrerequisiteError, StageFailed
from pipeline.stage import Resources, Shard, Stage, StageContext
from pipeline.state import StateStore, describe, new_generation, scope_name

log = logging.getLogger("pipeline")


@dataclass
class Step:
    stage: Stage
    iteration: Optional[int]
    ctx: StageContext
    resources: Resources
    shards: Optional[list] = None  # None: not computable yet (its inputs come from earlier steps)
    todo: Optional[list] = None
    prepared: bool = False  # Stage.prepare ran for this step in this launch
    # what Stage.prepare planned is written (Stage.commit_plan) once the launch's checks passed;
    # its lines for the user are shown then (in a dry run: at once, nothing is written)
    plan_lines: Optional[list] = None
    stale: Optional[str] = None  # why every shard runs again (its inputs were redone since)
    out_of_date: dict = field(default_factory=dict)  # shard key -> why that complete shard runs again
    rerun_after: list = field(default_factory=list)  # prerequisites that run again in this launch
    redo: Optional[changes.StepChange] = None  # made with other settings: redone (--redo-changed, --force)

    @property
    def name(self) -> str:
        return describe(self.stage.name, self.iteration)


@dataclass
class StepResult:
    step: Step
    submitted: int
    seconds: float
    summary: dict = field(default_factory=dict)


class Pipeline:
    def __init__(
        self,
        cfg,
        stages: dict[str, Stage],
        order: Sequence[str],
        workdir: Path,
        force: bool = False,
        echo: Callable[[str], None] = print,
        dry_run: bool = False,
        redo_changed: bool = False,
        command: Optional[Sequence[str]] = None,
        overrides: Sequence[str] = (),
    ):
        self.cfg = cfg
        self.stages = stages
        self.order = list(order)
        self.workdir = Path(workdir).resolve()
        self.force = force
        self.echo = echo
        # a dry run writes nothing: Stage.prepare is asked not to commit what it plans
        self.dry_run = dry_run
        self.store = StateStore(self.workdir)
        self.n_iterations = int(cfg.get("iterations", 1) or 1)
        self._checker = None
        # --redo-changed: steps made with other settings are redone, then everything after them
        self.redo_changed = redo_changed
        self.command = list(sys.argv if command is None else command)  # recorded in provenance.json
        self.overrides = list(overrides)  # key=value settings of the command line (checked: do they do anything)
        self.comparison = changes.Comparison()  # recorded settings vs this launch's (plan)
        self._targets: list = []  # (stage, iteration) of the planned steps
        self.after_step: Optional[Callable[[Step], None]] = None
        # called at every look while a step's jobs run (the application's view refreshed when due)
        self.while_waiting: Optional[Callable[[], None]] = None

    # --- what to run -----------------------------------------------------------------------------
    def context(self, iteration: Optional[int]) -> StageContext:
        return StageContext(cfg=self.cfg, workdir=self.workdir, iteration=iteration, force=self.force)

    def _scope_of(self, stage: Stage, iteration: Optional[int]) -> Optional[int]:
        return iteration if stage.per_iteration else None

    def targets(self, stage_names: Sequence[str] | str, iterations: Optional[Sequence[int]] = None) -> list[tuple]:
        """(stage, iteration) pairs for ``--stage``: 'all' is every stage in DAG order, once-only
        stages first, then per-iteration stages for each iteration, then stages that run after the
        last iteration."""
        names = self.order if stage_names == "all" else list(stage_names)
        for n in names:
            if n not in self.stages:
                raise ConfigError(f"unknown stage {n!r} (stages: {', '.join(self.order)})")
        its = list(iterations) if iterations else list(range(1, self.n_iterations + 1))
        for it in its:
            if it < 1:
                raise ConfigError(f"iteration {it}: iterations are numbered from 1")
        ordered = [n for n in self.order if n in names]
        once = [(n, None) for n in ordered if not self.stages[n].per_iteration and not _after(self.stages[n])]
        per = [(n, it) for it in its for n in ordered if self.stages[n].per_iteration]
        after = [(n, None) for n in ordered if _after(self.stages[n])]
        pairs = once + per + after
        pairs = [(n, it) for n, it in pairs if self.stages[n].enabled(self.context(it)) or stage_names != "all"]
        return pairs

    def request_checker(self):
        """Checks Slurm requests against the cluster before anything is submitted (None for the
        other executors, or with cluster.check_requests=false)."""
        if self.cfg.cluster.executor != "slurm" or not self.cfg.cluster.check_requests:
            return None
        if self._checker is None:
            from pipeline.scheduler import RequestChecker

            self._checker = RequestChecker()
        return self._checker

    def _check_request(self, name: str, res: Resources) -> None:
        from pipeline.scheduler import SchedulerError

        try:
            check_resources(self.cfg, name, res, checker=self.request_checker())
        except SchedulerError as e:
            if not self.dry_run:
                raise ConfigError(f"cannot check the {name} request against the cluster: {e}") from None
            self.echo(f"note: requests not checked against the cluster ({e})")
            self.cfg.cluster.check_requests = False

    def plan(self, pairs: list[tuple], compute_shards: bool = True) -> list[Step]:
        """Steps for ``pairs`` with their requests, configuration and prerequisites checked (all
        read-only) and, with ``compute_shards``, their shards (``plan_shards``). A launch checks
        first and computes the shards once it holds the work dir lock (Stage.prepare may write);
        a launch that only validates (``--detach``) never computes them."""
        steps = []
        for name, it in pairs:
            stage = self.stages[name]
            ctx = self.context(it)
            res = resources_for(self.cfg, name, multi_task=stage.multi_task)
            self._check_request(name, res)
            try:
                stage.validate(ctx)
            except PipelineError:
                raise
            except Exception as e:  # a validation bug still names the stage
                raise ConfigError(f"stage {describe(name, it)}: {e}") from e
            steps.append(Step(stage, it, ctx, res))
        changes.check_unused(self, pairs)
        self._check_prerequisites(steps)
        self._targets = [(s.stage.name, s.iteration) for s in steps]
        self.comparison = changes.compare(self, self._targets)
        changes.check(self, steps, self.comparison)
        if compute_shards:
            self.plan_shards(steps)
        return steps

    def plan_shards(self, steps: list[Step]) -> None:
        """The shards to run of every step whose inputs exist (Stage.prepare runs for them and,
        outside a dry run, commits what it plans); the others are planned when they run."""
        pending: set = set()  # steps of this launch that will (or may) produce new outputs
        for step in steps:
            # a step whose inputs come from earlier steps of this launch is planned when it runs
            step.rerun_after = [dep for dep in self.prerequisites(step.stage, step.iteration) if dep in pending]
            if not step.rerun_after:
                self._compute_shards(step, quiet=True)
            if step.todo is None or step.todo or not self.step_complete(step.stage, step.iteration):
                pending.add((step.stage.name, step.iteration))

    def commit_plans(self, steps: list[Step]) -> None:
        """Write what ``plan_shards`` planned (``Stage.commit_plan``), once the launch's checks that
        need the shards (the disk estimate) passed: a launch refused by them wrote nothing."""
        for step in steps:
            self.commit_plan(step)

    def commit_plan(self, step: Step) -> None:
        if step.plan_lines is None:  # not prepared, already written, or a dry run
            return
        step.stage.commit_plan(step.ctx)
        lines, step.plan_lines = step.plan_lines, None
        self._echo_plan(step, lines)

    def _echo_plan(self, step: Step, lines: list) -> None:
        for line in lines:
            self.echo(f"[{step.name}] {line}")

    def prerequisites(self, stage: Stage, iteration: Optional[int]) -> list[tuple]:
        deps = []
        for d in stage.dependencies(self.context(iteration)):
            dep = self.stages.get(d)
            if dep is None:
                raise ConfigError(f"stage {stage.name} depends on unknown stage {d!r}")
            if dep.per_iteration:
                dep_it = iteration if stage.per_iteration else self.n_iterations
                deps.append((d, dep_it))
            else:
                deps.append((d, None))
        if stage.per_iteration and iteration and iteration > 1:
            deps += [(d, iteration - 1) for d in stage.depends_on_previous]
        return [(d, it) for d, it in deps if self.stages[d].enabled(self.context(it))]

    def _check_prerequisites(self, steps: list[Step]) -> None:
        planned = set()
        for step in steps:
            for dep, it in self.prerequisites(step.stage, step.iteration):
                if (dep, it) in planned:
                    continue
                if not self.step_complete(self.stages[dep], it):
                    hint = f"--stage {dep}" + (f" --iteration {it}" if it else "")
                    raise PrerequisiteError(
                        f"cannot run {step.name}: it needs {describe(dep, it)}, which is incomplete in "
                        f"{self.workdir} (run `python launch.py {hint}` first, or --stage all)"
                    )
            planned.add((step.stage.name, step.iteration))

    # --- completeness ----------------------------------------------------------------------------
    def shard_complete(self, step: Step, shard: Shard, done_keys: set) -> bool:
        if shard.key not in done_keys:
            return False
        return all(Path(p).exists() for p in step.stage.outputs(step.ctx, shard))

    def step_complete(self, stage: Stage, iteration: Optional[int]) -> bool:
        """Complete on disk: finalized, final outputs present, every shard's outputs present,
        and not stale (its inputs were not redone since it ran)."""
        if self.store.read_stage_done(stage.name, iteration) is None:
            return False
        if self.store.stale_reason(stage.name, iteration):
            return False
        ctx = self.context(iteration)
        if not all(Path(p).exists() for p in stage.final_outputs(ctx)):
            return False
        step = Step(stage, iteration, ctx, Resources())
        try:
            shards = stage.shards(ctx)
        except InputsMissing:  # the one way a stage says "not computable yet"; anything else is a bug
            return False
        done = self.store.markers(stage.name, iteration)["done"]
        return all(self.shard_complete(step, s, done) for s in shards)

    def _compute_shards(self, step: Step, quiet: bool = False) -> None:
        if not step.prepared:
            if not step.ctx.force and (step.redo or self.store.stale_reason(step.stage.name, step.iteration)):
                # a stale step's outputs are made anew from its redone inputs: its stage sees it as
                # forced (training starts over instead of keeping a model of the old labels, a
                # plan frozen from the old inputs is rebuilt)
                step.ctx = replace(step.ctx, force=True)
            # errors in the inputs (PipelineError) are shown, in a dry run too
            lines = list(step.stage.prepare(step.ctx, commit=not self.dry_run) or [])
            step.prepared = True
            if self.dry_run:
                self._echo_plan(step, lines)
            else:
                step.plan_lines = lines
        try:
            step.shards = step.stage.shards(step.ctx)
        except InputsMissing as e:
            if quiet:  # inputs not there yet: known once earlier steps ran
                step.shards = step.todo = None
                return
            raise StageFailed(f"{step.name}: cannot list its shards: {e}") from e
        keys = [s.key for s in step.shards]
        if len(set(keys)) != len(keys):
            raise StageFailed(f"{step.name}: shard keys are not unique")
        done = self.store.markers(step.stage.name, step.iteration)["done"]
        step.stale = self.store.stale_reason(step.stage.name, step.iteration)
        rerun_all = self.force or bool(step.stale) or step.redo is not None
        step.todo = [s for s in step.shards if rerun_all or not self.shard_complete(step, s, done)]
        step.out_of_date = {}
        if not rerun_all and type(step.stage).out_of_date is not Stage.out_of_date:
            todo_keys = {s.key for s in step.todo}
            for s in step.shards:
                if s.key in todo_keys:
                    continue
                why = step.stage.out_of_date(step.ctx, s, self.store.read_done(step.stage.name, step.iteration, s.key) or {})
                if why:
                    step.out_of_date[s.key] = why
                    step.todo.append(s)

    # --- running ---------------------------------------------------------------------------------
    def run(self, steps: list[Step]) -> list[StepResult]:
        """Run ``steps`` in order; ``after_step(step)`` (when set) is called after each one that
        ran and completed (it must return at once: the launcher starts the application's refresh of its
        view of the run in the background, ``pipeline.refresh``; a failed step ends the launch,
        whose end-of-launch hook says it)."""
        for line in changes.adopt(self, self.comparison):  # work dirs made before fingerprints
            self.echo(line)
        for line in self.comparison.launch_lines():
            self.echo(line)
        progress.write_run_plan(self.store, steps, self.cfg.cluster)
        results = []
        try:
            for step in steps:
                result = self.run_step(step)
                results.append(result)
                # a step found complete changed nothing (StepResult(step, 0, 0.0)): no refresh for it
                if self.after_step is not None and (result.submitted or result.seconds):
                    self.after_step(step)
        finally:
            changes.save(self, self._targets)
        return results

    def input_generations(self, stage: Stage, iteration: Optional[int]) -> dict:
        """'stage@scope' -> generation of each prerequisite, as they are now."""
        return {f"{dep}@{scope_name(it)}": self.store.generation(dep, it)
                for dep, it in self.prerequisites(stage, iteration)}

    def run_step(self, step: Step) -> StepResult:
        stage, it = step.stage, step.iteration
        try:
            return self._run_step(step)
        except PipelineError as e:
            # status shows a failed step with its reason, whole (a failed finalize and the first
            # items it names, an unschedulable job)
            try:
                self.store.mark_stage_failed(stage.name, it, str(e))
            except OSError:  # a full disk: the launcher still prints the error
                pass
            raise

    def _run_step(self, step: Step) -> StepResult:
        start = time.time()
        self._compute_shards(step)
        stage, it = step.stage, step.iteration
        n_total, todo = len(step.shards), step.todo
        if todo:
            # refused before anything of the step is written, its plan included (one error line)
            estimate.check_free_space(step, self.workdir)
        self.commit_plan(step)
        previous = self.store.read_stage_done(stage.name, it)
        finalized = previous is not None and all(Path(p).exists() for p in stage.final_outputs(step.ctx))
        if not todo and finalized and not self.force and step.redo is None:
            changes.accept(self, step, self.comparison)
            self.echo(f"[{step.name}] complete ({n_total} shards), nothing to do")
            return StepResult(step, 0, 0.0)
        inputs = self.input_generations(stage, it)
        digest = _digest(s.key for s in step.shards)
        # outputs made anew (forced, stale, out of date, new shards) get a new generation, which
        # makes the steps reading them stale; a repair (a lost or failed shard run again, a lost
        # summary written again) keeps the old one: its outputs mean the same
        last = self.store.read_inputs_record(stage.name, it)
        prev_gen = (previous or {}).get("generation") or last.get("carry_generation")
        prev_digest = (previous or {}).get("shards") or last.get("shards")
        renew = (self.force or bool(step.stale) or bool(step.out_of_date) or step.redo is not None or not prev_gen
                 or prev_digest != digest)
        carry = None if renew else prev_gen
        if renew:
            provenance.clear(self, stage, it)
        self.store.clear_stage_failed(stage.name, it)
        self.store.write_inputs(stage.name, it, inputs, carry, digest)
        self.store.clear_stage_done(stage.name, it)
        if step.redo is not None:  # no shard of the old settings may count as done from here on
            for s in step.shards:
                self.store.clear_shard(stage.name, it, s.key)
        record = changes.record_start(self, step)  # what the outputs are made with, from now on
        progress.write_step_plan(self.store, step, self.cfg.cluster)
        if todo:
            if step.redo is not None:
                self.echo(f"[{step.name}] changed {step.redo.keys_text()}; every shard runs again")
            if step.stale:
                self.echo(f"[{step.name}] stale: {step.stale}; every shard runs again")
            for key, why in sorted(step.out_of_date.items()):
                self.echo(f"[{step.name}] shard {key} is out of date: {why}")
            failures = executors.run_shards(self.cfg.cluster, self.store, step, todo, echo=self.echo,
                                            while_waiting=self.while_waiting)
            if failures:
                lines = [f"  {key}: {err}\n    log: {logp}" for key, logp, err in failures]
                raise StageFailed(
                    f"{step.name}: {len(failures)} of {len(todo)} shard(s) failed; dependent stages were not "
                    f"started. Fix the cause and rerun (complete shards are kept):\n" + "\n".join(lines)
                )
        stats = {}
        for s in step.shards:
            marker = self.store.read_done(stage.name, it, s.key)
            stats[s.key] = (marker or {}).get("stats", {})
        try:
            summary = stage.finalize(step.ctx, stats) or {}
        except PipelineError:
            raise
        except Exception as e:
            raise StageFailed(f"{step.name}: finalize failed: {type(e).__name__}: {e}") from e
        missing = [str(p) for p in stage.final_outputs(step.ctx) if not Path(p).exists()]
        if missing:
            raise StageFailed(f"{step.name}: finalize did not write {', '.join(missing)}")
        seconds = time.time() - start
        generation = carry or new_generation()
        # before the step counts as complete: a launch that cannot write it (disk full) leaves the
        # step to finish again, never complete without its provenance
        provenance.write(self, stage, it, record, finished=time.time(), shards={"total": n_total, "run": len(todo)},
                         generation=generation)
        self.store.mark_stage_done(stage.name, it, {**summary, "seconds": round(seconds, 2)}, n_total,
                                   generation=generation, inputs=inputs, shards=digest)
        self.echo(f"[{step.name}] complete: {n_total} shard(s), {len(todo)} run now, {seconds:.1f}s")
        return StepResult(step, len(todo), seconds, summary)

    # --- dry run ---------------------------------------------------------------------------------
    def describe_plan(self, steps: list[Step]) -> str:
        cl = self.cfg.cluster
        lines = [
            f"work dir: {self.workdir}",
            f"cluster: {cl.name} (executor {cl.executor}"
            + (f", partition {cl.partition}" if cl.partition else "")
            + f", array parallelism {cl.array_parallelism}, max array size {cl.max_array_size})",
            f"iterations: {self.n_iterations}",
            "",
        ]
        settings = self.comparison.lines()
        if settings:
            lines += ["settings and versions since the steps ran:"] + [f"  {line}" for line in settings] + [""]
        for step in steps:
            r = step.resources
            out = step.ctx.stage_dir(step.stage.name)
            if step.shards is None:
                shards = "shards: known once its inputs exist"
                jobs = "?"
                if step.rerun_after and self.store.read_stage_done(step.stage.name, step.iteration):
                    deps = ", ".join(describe(d, i) for d, i in step.rerun_after)
                    shards = f"complete, but reruns after {deps} (its inputs change in this launch)"
            else:
                shards = f"shards: {len(step.todo)} to run / {len(step.shards)}"
                n = len(step.todo)
                if step.stage.multi_task:
                    jobs = f"{min(n, 1)} job of {r.nodes} node(s) x {r.tasks_per_node} task(s)" if n else "none"
                else:
                    arrays = -(-n // cl.max_array_size) if n else 0
                    jobs = f"{arrays} array(s) of {n} task(s)" if n else "none"
            res = (
                f"{r.cpus_per_task} cpu, {r.mem_gb:g} GB, {r.gpus_per_task} gpu per task, {r.timeout_min} min"
                + (f", partition {r.partition}" if r.partition and r.partition != cl.partition else "")
                + (", requeued at its time limit when it made progress" if step.stage.checkpointable else "")
            )
            lines.append(f"{step.name:<28} {shards}; jobs: {jobs}")
            if step.redo is not None:
                lines.append(f"{'':<28} changed: {step.redo.keys_text()} (every shard runs again)")
            if step.stale:
                lines.append(f"{'':<28} stale: {step.stale} (every shard runs again)")
            elif step.rerun_after and step.shards is not None and not step.todo:
                deps = ", ".join(describe(d, i) for d, i in step.rerun_after)
                lines.append(f"{'':<28} reruns after {deps} (its inputs change in this launch)")
            for key, why in sorted(step.out_of_date.items())[:5]:
                lines.append(f"{'':<28} out of date: {key}: {why}")
            lines.append(f"{'':<28} resources: {res}")
            lines.append(f"{'':<28} outputs: {out}")
        lines += [""] + estimate.plan_lines(steps, self.workdir)
        if self.comparison.refusal:
            lines += ["", f"a launch without --redo-changed refuses: {self.comparison.refusal}"]
        return "\n".join(lines)


def _after(stage: Stage) -> bool:
    return bool(getattr(stage, "after_iterations", False))


def _digest(keys) -> str:
    import hashlib

    h = hashlib.sha1()
    for k in sorted(keys):
        h.update(k.encode() + b"\0")
    return h.hexdigest()[:16]


def default_echo(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


__all__ = ["Pipeline", "Step", "StepResult", "describe", "scope_name"]
