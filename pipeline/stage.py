"""The contract between the engine and a stage.

The engine knows nothing about video or speech: it sees named stages that depend on each other,
each cut into shards. A stage module (``stages/<name>.py``) exposes one ``Stage`` object.

For every shard the engine calls ``stage.run(ctx, shard)`` in a worker (in-process, a local
subprocess or a Slurm array task). ``run`` must be a pure per-shard function: it reads its inputs
(from ``ctx``), writes exactly the paths that ``stage.outputs(ctx, shard)`` declares, each under a
temporary name renamed when complete (see ``pipeline.atomic``), and returns a small JSON-able dict
of statistics. The engine then records a completion marker for the shard. A shard is complete only
when its marker exists *and* every declared output exists, so a SIGKILL at any moment leaves
nothing a later stage could mistake for output.

After all shards of a stage are complete the engine calls ``stage.finalize(ctx, shard_stats)``
once, in the launching process (merging per-shard files, summaries, failure-rate checks). It is
idempotent and its outputs (``stage.final_outputs``) are atomic too.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from pipeline.fingerprint import resolve


class SavedForPreemption(BaseException):
    """Raised out of ``run`` (on every rank) by a stage whose ``save_now`` asked it to save at its
    next safe point, once that save is written: the job is requeued now and resumes from it. A
    BaseException, so no per-item ``except Exception`` records it as a bad input item."""


@dataclass(frozen=True)
class Shard:
    """One unit of work of a stage. ``key`` is unique within (iteration, stage) and is used for
    the completion marker and the log file name; ``params`` is stage-specific (e.g. split/rank)."""

    index: int
    count: int
    key: str
    params: dict = field(default_factory=dict, hash=False, compare=False)


@dataclass
class Resources:
    """What one job of a stage asks the scheduler for. Filled from the cluster config
    (``cluster.stages.<name>`` over ``cluster.defaults``)."""

    cpus_per_task: int = 1
    mem_gb: float = 4.0
    gpus_per_task: int = 0
    timeout_min: int = 60
    nodes: int = 1
    tasks_per_node: int = 1
    partition: Optional[str] = None  # Slurm partition (None: the cluster's default)


@dataclass
class StageContext:
    """Everything a shard function may look at. Picklable (sent to Slurm workers).

    ``cfg`` is the whole resolved pipeline config (an omegaconf DictConfig; ``cfg.<stage_name>``
    is the stage's own typed section). ``iteration`` is None for stages that run once (crop,
    manifest) and 1..N for per-iteration stages.
    """

    cfg: Any
    workdir: Path
    iteration: Optional[int] = None
    force: bool = False

    def stage_dir(self, stage_name: str, iteration: Optional[int] = None) -> Path:
        """Output directory of a stage: ``WORKDIR/<stage>`` for once-only stages,
        ``WORKDIR/iter{N}/<stage>`` for per-iteration ones. ``iteration`` defaults to ours."""
        it = self.iteration if iteration is None else iteration
        if it is None:
            return Path(self.workdir) / stage_name
        return Path(self.workdir) / f"iter{it}" / stage_name

    def with_iteration(self, iteration: Optional[int]) -> "StageContext":
        return dataclasses.replace(self, iteration=iteration)


class Stage:
    """Base class of a pipeline stage. Subclasses set the class attributes and implement
    ``shards``, ``outputs`` and ``run``.

    - ``name``: the stage's name on the command line and in the work dir.
    - ``depends_on``: names of stages that must be complete first (same iteration, or the
      once-only stages).
    - ``per_iteration``: True for stages that run once per pretraining iteration.
    - ``depends_on_previous``: stages of iteration N-1 that must be complete before this stage
      runs in iteration N > 1 (features of iteration N read iteration N-1's checkpoint).
    - ``after_iterations``: a once-only stage that runs after the last iteration (fine-tuning);
      its per-iteration prerequisites refer to the last iteration.
    - ``multi_task``: True when one shard is a multi-task job (distributed training): ``run`` is
      called in every task (rank); only rank 0's return value is recorded.
    - ``checkpointable``: True when a killed/preempted job should be requeued and ``run`` called
      again (it must resume from its own checkpoints).
    - ``config_section``: the stage's own config section (default: its name).
    - ``reads``: other config keys its outputs depend on (dotted: ``kmeans.percent``, a section,
      ``schedule.iterations.layer``), part of its fingerprint (``pipeline.fingerprint``).
    - ``libraries``: distributions whose versions can change its numbers (``"dlib|dlib-bin"``:
      the first installed of those), recorded with its fingerprint and in its provenance.
    """

    name: str = ""
    depends_on: Sequence[str] = ()
    per_iteration: bool = False
    depends_on_previous: Sequence[str] = ()
    after_iterations: bool = False
    multi_task: bool = False
    checkpointable: bool = False
    config_section: Optional[str] = None
    reads: Sequence[str] = ()
    libraries: Sequence[str] = ()

    def dependencies(self, ctx: StageContext) -> Sequence[str]:
        """The stages this one needs in this configuration (default ``depends_on``); e.g.
        fine-tuning a given checkpoint does not need this run's pretraining."""
        return self.depends_on

    def enabled(self, ctx: StageContext) -> bool:
        """Whether this stage takes part in this iteration (e.g. finetune only when asked)."""
        return True

    def validate(self, ctx: StageContext) -> None:
        """Raise ``pipeline.errors.ConfigError`` naming the setting/path and the reason, before
        anything is submitted. Inputs produced by earlier stages may not exist yet."""

    def prepare(self, ctx: StageContext, commit: bool) -> list[str]:
        """Called once per launch in the launching process (or the detached driver), before
        ``shards``, once the step's prerequisites are complete. A stage whose shards come from a
        scan of its inputs (the crop stage lists the corpus) does that scan here, once, and freezes
        the result under its own output directory when ``commit`` is True (False in a dry run), in
        ``commit_plan``: ``prepare`` writes nothing, and ``shards`` must answer from the plan in
        this process. Shards already
        frozen never change meaning; new inputs become new shards. Returns lines for the user
        (what changed since the last launch). Raises ``ConfigError`` for errors in the inputs.
        ``shards`` and ``run`` then read the frozen plan: a shard's cost never grows with the
        corpus."""
        return []

    def commit_plan(self, ctx: StageContext) -> None:
        """Write what the last ``prepare(ctx, commit=True)`` of this process planned. The engine
        calls it once the launch's checks that need the shards (the disk estimate) passed, so
        ``prepare`` itself writes nothing in either mode: it keeps its plan in memory, where
        ``shards`` finds it until this writes it. A launch refused by a check changes nothing."""

    def shards(self, ctx: StageContext) -> list[Shard]:
        """The step's shards. A stage whose shards are planned from inputs that may not exist yet
        (an earlier step's outputs, its own frozen plan) raises ``pipeline.errors.InputsMissing``
        naming what is missing: the step is then incomplete, or planned once earlier steps of the
        launch ran. Any other exception is a bug and is reported as one."""
        raise NotImplementedError

    def outputs(self, ctx: StageContext, shard: Shard) -> list[Path]:
        """Files this shard writes. All must exist for the shard to count as complete."""
        raise NotImplementedError

    def run(self, ctx: StageContext, shard: Shard) -> dict:
        raise NotImplementedError

    def estimate(self, ctx: StageContext):
        """What this step (all its shards) will cost, for the dry-run plan and the free-space
        check before submission: a ``pipeline.estimate.Estimate`` (disk written, peak RAM per
        job, jobs, CPU/GPU hours, the basis of the figures) or None. Must be cheap: it runs in
        the launcher, possibly before the step's inputs exist."""
        return None

    def final_outputs(self, ctx: StageContext) -> list[Path]:
        """Files ``finalize`` writes (checked for stage completeness)."""
        return []

    def progress(self, ctx: StageContext, shard: Shard) -> Optional[int]:
        """Optional, for ``checkpointable`` stages: a number that grows while the shard makes
        lasting progress (training: the update count of its last checkpoint); None when nothing
        is saved yet. A job stopped at its time limit is requeued only when this number grew
        since it started; otherwise the shard fails with 'raise ...timeout_min'. Stages that do
        not override it are requeued up to ``cluster.max_requeues`` times."""
        return None

    def save_now(self, ctx: StageContext, shard: Shard) -> bool:
        """Optional, for ``checkpointable`` stages: save the shard's progress for a preemption (a
        signal that comes long before the time limit), so a preemption before the first scheduled
        save loses nothing. Called on rank 0 from the signal's handler, between two statements of
        ``run``. Either it saves there, at once (only state that ``run`` keeps consistent at every
        statement), and returns False: the job is requeued right after; or it only asks ``run`` to
        save at its next safe point (a flag; thread- and signal-safe) and returns True: ``run``
        then saves and raises ``SavedForPreemption`` on every rank, and the job is requeued; the
        engine waits for that at most ``signal_delay_s`` - 30 s (at least 10 s), then says so in
        the log and requeues without the save. Stages without it resume from their last save."""
        return False

    def out_of_date(self, ctx: StageContext, shard: Shard, done: dict) -> Optional[str]:
        """Optional: why a complete shard no longer matches the configuration (``done`` is its
        completion marker, with the stats ``run`` returned), or None. Such a shard runs again
        (e.g. training after ``train.max_update`` was raised continues from its checkpoint), and
        the steps that read its outputs become stale."""
        return None

    def finalize(self, ctx: StageContext, shard_stats: dict[str, dict]) -> dict:
        """Called once after all shards are complete; returns a summary dict (printed, stored)."""
        return {}

    def settings(self, ctx: StageContext) -> dict:
        """``{dotted key: value}`` of the resolved settings that can change this step's outputs:
        the output settings of its section and of ``reads`` (``pipeline.fingerprint.resolve``; a
        per-iteration setting as iteration N's entry, ``key[N]``). A stage resolves values that only
        mean something resolved (a null that stands for a default, a file's content) and drops
        settings its configuration does not use. Compared at every launch with the settings the
        step was made with: a difference is a change (refused until restored or redone). The
        ``inert_settings`` of the configuration are left out."""
        settings = resolve(ctx.cfg, [self.config_section or self.name, *self.reads], ctx.iteration)
        for key in self.inert_settings(ctx):
            settings.pop(key, None)
        return settings

    def inert_settings(self, ctx: StageContext) -> dict[str, str]:
        """``{dotted key: why}``: output settings of this step that do nothing in this
        configuration (``finetune.noise.snr`` while fine-tuning adds no noise). They are no part of
        the step's identity, and one given on the command line is refused with its reason when it
        does nothing in every step of the run that has it (a setting that does nothing is an
        error)."""
        return {}

    def accepts_change(self, ctx: StageContext, key: str, old: Any, new: Any) -> Optional[str]:
        """A changed setting the stage follows by itself (training continues when
        ``train.max_update`` is raised: ``out_of_date`` reruns the shard): a note saying how, or None
        (a change: refused until restored or ``--redo-changed``)."""
        return None

    def output_place(self, ctx: StageContext) -> Optional[str]:
        """Where the step's outputs go when that is a setting (``units.out_dir``), else None. Its
        recorded settings describe the outputs of the place they were recorded for: in another
        place the step is not a change but a new set of outputs (made there; the old are kept)."""
        return None

    def provenance_dirs(self, ctx: StageContext) -> list[Path]:
        """Directories that get the step's ``provenance.json`` (its output directory; training adds
        the final checkpoint's)."""
        return [ctx.stage_dir(self.name)]


StageFactory = Callable[[], Stage]
