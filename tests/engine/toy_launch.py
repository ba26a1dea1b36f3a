"""The real launcher (launch.py: lock, signals, --detach, cancel, one-line errors) on the toy
stages of engine_toy_stages, for engine tests. The stages come from env TOY_PIPELINE (JSON,
inherited by a detached driver), e.g. {"toy": 6, "sleep_s": 2, "sum": true}:

    TOY_PIPELINE='{"toy": 6}' python tests/engine/toy_launch.py --workdir W --cluster local [--detach]
    python tests/engine/toy_launch.py status|cancel --workdir W
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
import launch  # noqa: E402

# workers cannot import tests/engine: the toy stages travel by value
cloudpickle.register_pickle_by_value(T)
ENTRY = {"module": "toy_launch", "script": str(Path(__file__).resolve()), "paths": [str(ROOT), str(HERE)]}


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


def build(args, dry_run: bool, compute_shards: bool = True):
    from pipeline.config import load_config
    from pipeline.runner import Pipeline

    workdir = Path(args.workdir or "./work").resolve()
    cfg = load_config({}, preset=None, cluster=args.cluster, overrides=[f"workdir={workdir}", *args.overrides])
    stages = stages_from_env()
    pipe = Pipeline(cfg, stages, list(stages), workdir, force=args.force, echo=launch._echo, dry_run=dry_run)
    names = "all" if args.stage == "all" else [args.stage]
    return cfg, pipe, pipe.plan(pipe.targets(names), compute_shards=compute_shards)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("status", "cancel"):
        return launch.main(argv)
    return launch.cmd_run(argv, build_fn=build, entry=ENTRY, at_end=None)  # no run report for toy stages


if __name__ == "__main__":
    sys.exit(main())
