"""Test-only stages for the engine: no video, no speech, just files.

- ``ToyStage``: shard i writes ``out_<i>.txt`` containing the shard key; it can be told (through
  files in the work dir, so a rerun can change its mind) to raise, or to sleep, for a shard;
  ``sleep_s`` makes every shard take that long; ``estimate_s`` is its plan's estimate of a shard. Each run appends ``S``/``E`` lines (shard, time,
  job id, pid) to ``spans.log`` at its start and end, so tests can check that no two runs of one
  shard ever overlapped.
- ``SumStage``: depends on the toy stage; its one shard sums what the toy shards wrote.
- ``ItemLoopStage``: like the crop stage, a loop over items that records an item whose processing
  raises an ``Exception`` as a failed item and goes on; one item per ``item_s`` seconds.
- ``CounterStage``: multi-task + checkpointable; counts to ``target`` one step per ``step_s``
  seconds, persisting progress every ``save_every`` steps (and on ``save_now``, a preemption), so
  a requeued/killed job resumes; its ``progress`` is the saved count. ``save_at_next_step`` makes
  ``save_now`` only ask for the save, as training does: "next" saves after the next step and
  raises ``SavedForPreemption``; "never" never comes to it (the engine's bound).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from pipeline import atomic
from pipeline.errors import InputsMissing, StageFailed
from pipeline.stage import SavedForPreemption, Shard, Stage, StageContext


def control(ctx: StageContext, name: str) -> Path:
    return Path(ctx.workdir) / "control" / name


def span(ctx: StageContext, what: str, key: str) -> None:
    from pipeline.worker import job_id

    with open(Path(ctx.workdir) / "spans.log", "a") as f:
        f.write(f"{what} {key} {time.time():.3f} {job_id()} {os.getpid()}\n")


def overlaps(workdir) -> list:
    """Pairs of runs of one shard that overlapped in time, from ``spans.log`` (a run without an
    end line counts as still running)."""
    runs: dict = {}
    path = Path(workdir) / "spans.log"
    for line in (path.read_text().splitlines() if path.exists() else []):
        what, key, t, job, pid = line.split()
        if what == "S":
            runs.setdefault(key, []).append([float(t), float("inf"), job, pid])
        else:
            for r in runs.get(key, []):
                if r[3] == pid and r[1] == float("inf"):
                    r[1] = float(t)
    bad = []
    for key, rs in runs.items():
        rs.sort()
        for a, b in zip(rs, rs[1:]):
            if b[0] < a[1]:
                bad.append((key, a, b))
    return bad


class ToyStage(Stage):
    name = "toy"

    def __init__(self, n_shards: int = 4, per_iteration: bool = False, sleep_s: float = 0.0,
                 estimate_s: float = 0.0):
        self.n_shards = n_shards
        self.per_iteration = per_iteration
        self.sleep_s = sleep_s
        self.estimate_s = estimate_s  # the plan's estimate of one shard's time (0: no estimate)

    def estimate(self, ctx):
        if not self.estimate_s:
            return None
        from pipeline.estimate import Estimate

        return Estimate(jobs=self.n_shards, cpu_hours=self.n_shards * self.estimate_s / 3600, cpus=1)

    def shards(self, ctx):
        return [Shard(i, self.n_shards, f"part{i:03d}") for i in range(self.n_shards)]

    def outputs(self, ctx, shard):
        return [ctx.stage_dir(self.name) / f"out_{shard.index}.txt"]

    def run(self, ctx, shard):
        span(ctx, "S", shard.key)
        fail = control(ctx, f"fail_{shard.key}")
        if fail.exists():
            raise ValueError(f"asked to fail shard {shard.key}")
        if control(ctx, f"enospc_{shard.key}").exists():  # what a full disk raises while writing an output
            import errno

            target = self.outputs(ctx, shard)[0]
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))
        sleep = control(ctx, f"sleep_{shard.key}")
        out = self.outputs(ctx, shard)[0]
        with atomic.atomic_open(out) as f:
            f.write(f"{shard.index}\n")
            f.flush()
            if sleep.exists():  # killed in here: only the temporary file exists
                time.sleep(float(sleep.read_text()))
            time.sleep(self.sleep_s)
        # every run leaves a trace, so tests can count which shards actually ran
        with open(Path(ctx.workdir) / "runs.log", "a") as f:
            f.write(f"{self.name} {ctx.iteration} {shard.key}\n")
        span(ctx, "E", shard.key)
        return {"value": shard.index}

    def final_outputs(self, ctx):
        return [ctx.stage_dir(self.name) / "summary.json"]

    def finalize(self, ctx, shard_stats):
        if control(ctx, "fail_finalize").exists():
            raise RuntimeError("asked to fail finalize")
        if control(ctx, "fail_finalize_items").exists():  # as the crop stage's failure-rate check
            raise StageFailed(f"{self.name}: 3 of {self.n_shards} items failed; first reasons:\n"
                              "  a: truncated video\n  b: no face found in 70% of frames\n  c: no audio stream\n"
                              f"all failures are in {ctx.stage_dir(self.name)}")
        total = sum(s.get("value", 0) for s in shard_stats.values())
        atomic.write_json(ctx.stage_dir(self.name) / "summary.json", {"total": total})
        return {"total": total}


class SumStage(Stage):
    name = "sum"
    depends_on = ("toy",)

    def __init__(self, per_iteration: bool = False, depends_on_previous=()):
        self.per_iteration = per_iteration
        self.depends_on_previous = tuple(depends_on_previous)

    def shards(self, ctx):
        # listing shards needs the toy stage's output: only possible once it ran
        path = ctx.stage_dir("toy") / "summary.json"
        if not path.exists():
            raise InputsMissing(f"{path}: the toy stage has not run")
        if control(ctx, "bug_in_shards").exists():
            raise KeyError("total")  # what a bug in a stage's shards() raises
        summary = json.loads(path.read_text())
        return [Shard(0, 1, f"sum{summary['total']}")]

    def outputs(self, ctx, shard):
        return [ctx.stage_dir(self.name) / "sum.txt"]

    def run(self, ctx, shard):
        values = sorted(int(p.read_text()) for p in ctx.stage_dir("toy").glob("out_*.txt"))
        atomic.write_text(self.outputs(ctx, shard)[0], f"{sum(values)}\n")
        with open(Path(ctx.workdir) / "runs.log", "a") as f:
            f.write(f"{self.name} {ctx.iteration} {shard.key}{' forced' if ctx.force else ''}\n")
        return {"sum": sum(values)}


class CounterStage(Stage):
    name = "counter"
    multi_task = True
    checkpointable = True

    def __init__(self, target: int = 20, step_s: float = 0.5, save_every: int = 1, save_at_next_step: str = ""):
        self.target, self.step_s, self.save_every = target, step_s, save_every
        self.save_at_next_step = save_at_next_step
        self._save_asked = False

    def progress(self, ctx, shard):
        progress = ctx.stage_dir(self.name) / "progress.json"
        return json.loads(progress.read_text())["count"] if progress.exists() else None

    def shards(self, ctx):
        return [Shard(0, 1, "count")]

    def outputs(self, ctx, shard):
        return [ctx.stage_dir(self.name) / "final.json"]

    def run(self, ctx, shard):
        import submitit

        env = submitit.JobEnvironment()
        d = ctx.stage_dir(self.name)
        d.mkdir(parents=True, exist_ok=True)
        rank_file = d / f"rank{env.global_rank}.json"
        atomic.write_json(rank_file, {"rank": env.global_rank, "ntasks": env.num_tasks})
        progress = d / "progress.json"
        count = json.loads(progress.read_text())["count"] if progress.exists() else 0
        starts = d / "starts.log"
        if env.global_rank == 0:
            with open(starts, "a") as f:
                f.write(f"{count} {os.environ.get('SLURM_RESTART_COUNT', '0')}\n")
        self._count = count
        self._save_asked = False  # (a requeued job runs a pickled copy of the stage)
        while count < self.target:
            time.sleep(self.step_s)
            count += 1
            self._count = count
            if env.global_rank == 0 and (count % self.save_every == 0 or count == self.target):
                atomic.write_json(progress, {"count": count})
            if self._save_asked and self.save_at_next_step == "next":
                atomic.write_json(progress, {"count": count})
                raise SavedForPreemption(f"saved at count {count}")
        if env.global_rank == 0:
            atomic.write_json(self.outputs(ctx, shard)[0], {"count": count})
        return {"count": count, "ntasks": env.num_tasks}


    def save_now(self, ctx, shard):
        if self.save_at_next_step:
            self._save_asked = True
            return True
        count = getattr(self, "_count", None)
        if count is not None:
            atomic.write_json(ctx.stage_dir(self.name) / "progress.json", {"count": count})


class ItemLoopStage(Stage):
    name = "items"

    def __init__(self, n_items: int = 100, item_s: float = 0.5):
        self.n_items, self.item_s = n_items, item_s

    def shards(self, ctx):
        return [Shard(0, 1, "all")]

    def outputs(self, ctx, shard):
        return [ctx.stage_dir(self.name) / "results.jsonl"]

    def run(self, ctx, shard):
        records = []
        for i in range(self.n_items):
            try:
                time.sleep(self.item_s)
                records.append({"item": i, "status": "ok"})
            except Exception as e:  # an item's own error: recorded, the loop goes on
                records.append({"item": i, "status": "failed", "reason": f"{type(e).__name__}: {e}"})
                with open(ctx.stage_dir(self.name).parent / "item_failures.log", "a") as f:
                    f.write(f"{i} {type(e).__name__}: {e}\n")
        with atomic.atomic_open(self.outputs(ctx, shard)[0]) as f:
            f.write("".join(json.dumps(r) + "\n" for r in records))
        return {"items": len(records)}
