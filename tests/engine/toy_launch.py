"""The real launcher (pipeline/cli.py: lock, signals, --detach, cancel, one-line errors) on the toy
stages of engine_toy_stages, for engine tests. The stages come from env TOY_PIPELINE (JSON,
inherited by a detached driver), e.g. {"toy": 6, "sleep_s": 2, "sum": true}:

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
        stages["toy"] = T.ToyStage(int(spec.get("toy", 4)), sleep_s=float(spec.get("sleep_s", 0)))
    if spec.get("sum", True) and "toy" in stages:
        stages["sum"] = T.SumStage()
    if spec.get("counter"):
        stages["counter"] = T.CounterStage(**spec["counter"])
    return stages


# the engine's launcher on the toy stages: no config sections, no preset, no run report
APP = cli.Application(
    prog="toy_launch.py",
    description="The engine's test stages (stages: {stages}).",
    stage_names=tuple(stages_from_env()),
    get_stage=lambda name: stages_from_env()[name],
    entry=cli.DriverEntry(module="toy_launch", paths=(str(ROOT), str(HERE))),
)


def main(argv=None) -> int:
    return cli.main(APP, argv)


if __name__ == "__main__":
    sys.exit(main())
