"""The real launcher (pipeline/cli.py: lock, signals, --detach, cancel, one-line errors) on the toy
stages of engine_toy_stages, for engine tests. The stages come from env TOY_PIPELINE (JSON,
inherited by a detached driver), e.g. {"toy": 6, "sleep_s": 2, "sum": true, "per_iteration": false,
"estimate_s": 0, "refresh": {"sleep_s": 0, "fail": false}}:

    TOY_PIPELINE='{"toy": 6}' python tests/engine/toy_launch.py --workdir W --cluster local [--detach]
    python tests/engine/toy_launch.py status|cancel --workdir W

It reaches the launcher the way an application does: an ``Application`` passed to
``pipeline.cli.main``.
"""
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
for p in (str(HERE), str(ROOT)):
    if p not in sys.path:
        sys.path.insert(0, p)

import cloudpickle  # noqa: E402

import engine_toy_stages as T  # noqa: E402
from pipeline import cli  # noqa: E402

# workers cannot import tests/engine: the toy stages travel by value
cloudpickle.register_pickle_by_value(T)


def stages_from_env() -> dict:
    spec = json.loads(os.environ.get("TOY_PIPELINE", "{}"))
    stages = {}
    if spec.get("toy", 4):
        stages["toy"] = T.ToyStage(int(spec.get("toy", 4)), sleep_s=float(spec.get("sleep_s", 0)),
                                   per_iteration=bool(spec.get("per_iteration")),
                                   estimate_s=float(spec.get("estimate_s", 0)))
    if spec.get("sum", True) and "toy" in stages:
        stages["sum"] = T.SumStage(per_iteration=bool(spec.get("per_iteration")))
    if spec.get("counter"):
        stages["counter"] = T.CounterStage(**spec["counter"])
    return stages


def refresh_main(argv) -> int:
    """The toy application's view of a run (what launch.py's report is to AV-HuBERT): appends
    the engine's progress (pipeline.progress, as the report reads it) as one JSON line to
    WORKDIR/refreshes.jsonl. TOY_PIPELINE's "refresh": {"sleep_s": S, "fail": true} makes it
    slow or fail."""
    import argparse
    import time

    from pipeline.progress import run_progress
    from pipeline.status import collect

    spec = json.loads(os.environ.get("TOY_PIPELINE", "{}")).get("refresh") or {}
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", required=True)
    workdir = Path(p.parse_args(argv).workdir)
    started = time.time()
    oom = Path("/proc/self/oom_score_adj").read_text().strip()
    with open(workdir / "refresh-starts.txt", "a") as f:  # pid, niceness, OOM score adjustment
        f.write(f"{os.getpid()} {os.nice(0)} {oom}\n")
    time.sleep(float(spec.get("sleep_s", 0)))
    if spec.get("fail"):
        print("toy refresh: asked to fail", file=sys.stderr)
        return 1
    prog = run_progress(workdir, collect(workdir))
    rec = {"started": started, "pid": os.getpid(), "eta_s": prog.eta_s, "basis": prog.basis,
           "steps": [{"stage": s.stage, "iteration": s.iteration, "state": s.state, "done": s.done,
                      "total": s.total, "failed": s.failed, "running": s.running, "pending": s.pending,
                      "eta_s": s.eta_s, "basis": s.basis} for s in prog.steps]}
    with open(workdir / "refreshes.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")
    return 0


# the engine's launcher on the toy stages: no config sections, no preset, no run report; with
# TOY_PIPELINE's "refresh", a view refreshed after every step (refresh_main)
APP = cli.Application(
    prog="toy_launch.py",
    description="The engine's test stages (stages: {stages}).",
    stage_names=tuple(stages_from_env()),
    get_stage=lambda name: stages_from_env()[name],
    entry=cli.DriverEntry(module="toy_launch", paths=(str(ROOT), str(HERE))),
    commands={"refresh": "toy_launch:refresh_main"},
    refresh_command=("refresh",) if "refresh" in json.loads(os.environ.get("TOY_PIPELINE", "{}")) else (),
)


def main(argv=None) -> int:
    return cli.main(APP, argv)


if __name__ == "__main__":
    sys.exit(main())
