"""The DAG runner: which (stage, iteration) pairs to run, in what order, and running them.

A *step* is one stage in one scope (once, or iteration N). Steps run one after another in DAG
order; the shards of a step run in parallel as one job array. A step whose prerequisites are
neither complete on disk nor earlier in this launch's plan is refused before anything is submitted.
"""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from pipeline import estimate, executors
from pipeline.config import check_resources, resources_for
from pipeline.errors import ConfigError, PipelineError, PrerequisiteError, StageFailed
from pipeline.stage import Resources, Shard, Stage, StageContext
from pipeline.state import StateStore, scope_name

log = logging.getLogger("pipeline")


def describe(stage: str, iteration: Optional[int]) -> str:
    return stage if iteration is None else f"{stage} (iteration {iteration})"


@dataclass
class Step:
    stage: Stage
    iteration: Optional[int]
    ctx: StageContext
    resources: Resources
    shards: Optional[list] = None  # None: not computable yet (its inputs come from earlier steps)
    todo: Optional[list] = None
    prepared: bool = False  # Stage.prepare ran for this step in this launch

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

    def plan(self, pairs: list[tuple]) -> list[Step]:
        steps = []
        for name, it in pairs:
            stage = self.stages[name]
            ctx = self.context(it)
            res = resources_for(self.cfg, name, multi_task=stage.multi_task)
            check_resources(self.cfg, name, res)
            try:
                stage.validate(ctx)
            except PipelineError:
                raise
            except Exception as e:  # a validation bug still names the stage
                raise ConfigError(f"stage {describe(name, it)}: {e}") from e
            steps.append(Step(stage, it, ctx, res))
        self._check_prerequisites(steps)
        pending: set = set()  # steps of this launch that will (or may) produce new outputs
        for step in steps:
            # a step whose inputs come from earlier steps of this launch is planned when it runs
            if not any(dep in pending for dep in self.prerequisites(step.stage, step.iteration)):
                self._compute_shards(step, quiet=True)
            if step.todo is None or step.todo or not self.step_complete(step.stage, step.iteration):
                pending.add((step.stage.name, step.iteration))
        return steps

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
        """Complete on disk: finalized, final outputs present, every shard's outputs present."""
        if self.store.read_stage_done(stage.name, iteration) is None:
            return False
        ctx = self.context(iteration)
        if not all(Path(p).exists() for p in stage.final_outputs(ctx)):
            return False
        step = Step(stage, iteration, ctx, Resources())
        try:
            shards = stage.shards(ctx)
        except Exception:
            return False
        done = self.store.markers(stage.name, iteration)["done"]
        return all(self.shard_complete(step, s, done) for s in shards)

    def _compute_shards(self, step: Step, quiet: bool = False) -> None:
        if not step.prepared:
            # errors in the inputs (PipelineError) are shown, in a dry run too
            for line in step.stage.prepare(step.ctx, commit=not self.dry_run) or []:
                self.echo(f"[{step.name}] {line}")
            step.prepared = True
        try:
            step.shards = step.stage.shards(step.ctx)
        except PipelineError:
            raise
        except Exception as e:
            if quiet:  # inputs not there yet: known once earlier steps ran
                step.shards = step.todo = None
                return
            raise StageFailed(f"{step.name}: cannot list its shards: {type(e).__name__}: {e}") from e
        keys = [s.key for s in step.shards]
        if len(set(keys)) != len(keys):
            raise StageFailed(f"{step.name}: shard keys are not unique")
        done = self.store.markers(step.stage.name, step.iteration)["done"]
        step.todo = [s for s in step.shards if self.force or not self.shard_complete(step, s, done)]

    # --- running ---------------------------------------------------------------------------------
    def run(self, steps: list[Step]) -> list[StepResult]:
        results = []
        for step in steps:
            results.append(self.run_step(step))
        return results

    def run_step(self, step: Step) -> StepResult:
        start = time.time()
        self._compute_shards(step)
        stage, it = step.stage, step.iteration
        n_total, todo = len(step.shards), step.todo
        finalized = self.store.read_stage_done(stage.name, it) is not None and all(
            Path(p).exists() for p in stage.final_outputs(step.ctx)
        )
        if not todo and finalized and not self.force:
            self.echo(f"[{step.name}] complete ({n_total} shards), nothing to do")
            return StepResult(step, 0, 0.0)
        self.store.clear_stage_done(stage.name, it)
        _write_plan(self.store, stage.name, it, n_total)
        if todo:
            for s in todo:
                self.store.clear_shard(stage.name, it, s.key)
            self.echo(
                f"[{step.name}] submitting {len(todo)}/{n_total} shard(s) with the "
                f"{self.cfg.cluster.executor} executor"
            )
            estimate.check_free_space(step, self.workdir)  # one error line, before anything is submitted
            failures = executors.run_shards(self.cfg.cluster, self.store, step, todo, echo=self.echo)
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
        self.store.mark_stage_done(stage.name, it, {**summary, "seconds": round(seconds, 2)}, n_total)
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
        for step in steps:
            r = step.resources
            out = step.ctx.stage_dir(step.stage.name)
            if step.shards is None:
                shards = "shards: known once its inputs exist"
                jobs = "?"
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
                + (", requeued on preemption" if step.stage.checkpointable else "")
            )
            lines.append(f"{step.name:<28} {shards}; jobs: {jobs}")
            lines.append(f"{'':<28} resources: {res}")
            lines.append(f"{'':<28} outputs: {out}")
        lines += [""] + estimate.plan_lines(steps, self.workdir)
        return "\n".join(lines)


def _after(stage: Stage) -> bool:
    return bool(getattr(stage, "after_iterations", False))


def _write_plan(store: StateStore, stage: str, iteration: Optional[int], n_shards: int) -> None:
    from pipeline import atomic

    atomic.write_json(store.stage_state_dir(stage, iteration) / "_plan.json", {"n_shards": n_shards})


def default_echo(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


__all__ = ["Pipeline", "Step", "StepResult", "describe", "scope_name"]
