"""Time of `launch.py status` over many recorded shards (markers written as the engine writes them).

    .venv/bin/python bench/status.py [--shards 10000] [--failed 50]
"""
import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.state import StateStore  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=10000)
    ap.add_argument("--failed", type=int, default=50)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        store = StateStore(Path(d))
        # spread like a real run: a big crop stage and per-iteration stages
        layout = [("crop", None, a.shards // 2), ("features", 1, a.shards // 4), ("labels", 1, a.shards - a.shards // 2 - a.shards // 4)]
        t = time.perf_counter()
        from pipeline import atomic

        for stage, it, n in layout:
            atomic.write_json(store.stage_state_dir(stage, it) / "_plan.json", {"n_shards": n})
            for i in range(n):
                key = f"shard{i:06d}"
                if stage == "crop" and i < a.failed:
                    store.mark_failed(stage, it, key, "ValueError: broken video", store.log_path(stage, it, key))
                else:
                    store.mark_done(stage, it, key, {"items": 10, "seconds": 30.0 + i % 7})
        print(f"recorded {a.shards} shards ({a.failed} failed) in {time.perf_counter() - t:.1f} s")
        t = time.perf_counter()
        out = subprocess.run([sys.executable, str(ROOT / "launch.py"), "status", "--workdir", d], capture_output=True, text=True)
        dt = time.perf_counter() - t
        print(out.stdout.splitlines()[1] if out.stdout else out.stderr)
        for line in out.stdout.splitlines()[2:5]:
            print(line)
        print(f"`launch.py status` over {a.shards} shards: {dt:.2f} s wall (including Python start-up)")
        from pipeline.status import collect

        t = time.perf_counter()
        statuses = collect(Path(d))
        print(f"status collection alone (in-process): {time.perf_counter() - t:.3f} s")
        from pipeline.progress import run_progress

        t = time.perf_counter()
        run_progress(Path(d), statuses)
        print(f"progress and ETA (pipeline.progress, what status and the report add): {time.perf_counter() - t:.3f} s")


if __name__ == "__main__":
    main()
