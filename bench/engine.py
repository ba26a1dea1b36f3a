"""Wall time of one 16-shard stage (trivial shards: what is measured is the engine and the
scheduler) on the local executor and on local Slurm.

    .venv/bin/python bench/engine.py [--shards 16] [--parallelism 2] [--executors local,slurm_local]
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "engine")]

import cloudpickle  # noqa: E402

import engine_toy_stages  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.runner import Pipeline  # noqa: E402

cloudpickle.register_pickle_by_value(engine_toy_stages)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--parallelism", type=int, default=2)
    ap.add_argument("--executors", default="local,slurm_local")
    a = ap.parse_args()
    print(f"{a.shards}-shard stage, array parallelism {a.parallelism}")
    for cluster in a.executors.split(","):
        with tempfile.TemporaryDirectory() as d:
            cfg = load_config({}, preset=None, cluster=cluster,
                              overrides=[f"workdir={d}", f"cluster.array_parallelism={a.parallelism}"])
            pipe = Pipeline(cfg, {"toy": engine_toy_stages.ToyStage(a.shards)}, ["toy"], Path(d), echo=lambda m: None)
            steps = pipe.plan(pipe.targets("all"))
            t = time.perf_counter()
            pipe.run(steps)
            dt = time.perf_counter() - t
            print(f"  {cluster:<12} {dt:6.1f} s wall  ({dt / a.shards:.2f} s per shard)")


if __name__ == "__main__":
    main()
