"""The report of a corpus-sized work dir: `launch.py report` over fabricated crop results (one
record per item, with quality figures; a share flagged, a share failed), done markers and
contact sheets, as the crop stage writes them for LRS3 + VoxCeleb2 (1.2M items, ~22k shards).

Prints the time and peak RSS of the first report (every results file parsed), of a second one
(the per-shard cache), and of one after a shard changed, with the page's size.

    .venv/bin/python bench/report_scale.py [--items 1200000] [--per-shard 55] [--dir DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REASONS = ("{v}: no face found in any of its {n} frames", "{v}: no audio track",
           "{v}: {n} frames at 25 fps, shorter than crop.min_frames=12",
           "{v}: cannot be decoded (InvalidDataError: Invalid data found when processing input)")


def _quality(rng: random.Random, flagged: bool, index: int) -> dict:
    q = {"face_share": 1.0, "face_px": rng.uniform(60, 260), "roll_deg": rng.gauss(0, 6),
         "jitter": abs(rng.gauss(0.3, 0.15)), "brightness": rng.uniform(90, 160), "contrast": rng.uniform(20, 60),
         "blank_share": 0.0, "motion": rng.uniform(2, 12), "static_share": 0.0, "dup_share": 0.0, "rotation": 0}
    flags = []
    if flagged:
        kind = rng.choice(("frozen", "blank", "small_face", "few_faces"))
        if kind == "frozen":
            q.update(motion=0.1, static_share=0.95)
            flags = ["no_motion", "frozen"]
        elif kind == "blank":
            q.update(blank_share=0.5, face_share=0.5)
            flags = ["few_faces", "blank"]
        elif kind == "small_face":
            q.update(face_px=30.0)
            flags = ["small_face"]
        else:
            q.update(face_share=0.6)
            flags = ["few_faces"]
    q = {k: round(v, 4) if isinstance(v, float) else v for k, v in q.items()}
    q["flags"] = flags
    q["sheet_index"] = index
    return q


def fabricate(workdir: Path, items: int, per_shard: int, flagged_share: float = 0.02,
              failed_share: float = 0.01, seed: int = 0, text: bool = False) -> dict:
    """A work dir with crop results, done markers and contact sheets for ``items`` items (the
    crop stage's record format). Every shard's sheet is a hard link to one real sheet image (the
    report reads only the sheets of the items it shows). Returns counts."""
    from avprep import quality
    import numpy as np

    rng = random.Random(seed)
    results = workdir / "crop" / "results"
    sheets = workdir / "crop" / "sheets"
    state = workdir / ".pipeline" / "state" / "once" / "crop"
    for d in (results, sheets, state):
        d.mkdir(parents=True, exist_ok=True)
    n_shards = -(-items // per_shard)
    tiles = np.stack([np.full((96, 96), 60 + 40 * j, np.uint8) for j in range(4)])
    proto = sheets / ".proto.png"
    quality.write_sheet(proto, [quality.SheetEntry(f"item{i}", tiles, ["frozen"] if i % 7 == 3 else [])
                                for i in range(per_shard)], 4)
    counts = {"items": 0, "ok": 0, "failed": 0, "flagged": 0, "shards": n_shards}
    for s in range(n_shards):
        key = f"{s:05d}"
        lines, index = [], 0
        for i in range(s * per_shard, min(items, (s + 1) * per_shard)):
            item_id = f"dev/id{i // 900:05d}/{i // 9:07d}/{i % 9:05d}"
            base = {"id": item_id, "split": "train" if i % 50 else "valid", "text": "some words here" if text else None}
            if rng.random() < failed_share:
                reason = rng.choice(REASONS).format(v=f"/corpus/{item_id}.mp4", n=rng.randint(10, 400))
                lines.append(json.dumps({**base, "status": "failed", "reason": reason}))
                counts["failed"] += 1
            else:
                flagged = rng.random() < flagged_share
                n_frames = rng.randint(40, 400)
                lines.append(json.dumps({**base, "status": "ok", "video": f"video/{item_id}.mp4",
                                         "audio": f"audio/{item_id}.wav", "n_frames": n_frames,
                                         "n_samples": n_frames * 640, "quality": _quality(rng, flagged, index)}))
                index += 1
                counts["ok"] += 1
                counts["flagged"] += flagged
            counts["items"] += 1
        (results / f"{key}.jsonl").write_text("\n".join(lines) + "\n")
        os.link(proto, sheets / f"{key}.png")
        (state / f"{key}.done.json").write_text(json.dumps(
            {"stats": {"items": len(lines), "seconds": 100.0 + s % 7}, "time": 1.7e9 + s, "host": "node1", "pid": 1}))
    proto.unlink()
    (state / "_plan.json").write_text(json.dumps({"n_shards": n_shards}))
    return counts


def _report(workdir: Path) -> tuple:
    """(seconds, peak RSS MB, stdout) of `launch.py report` in its own process."""
    t = time.perf_counter()
    p = subprocess.run([sys.executable, str(ROOT / "launch.py"), "report", "--workdir", str(workdir)],
                       capture_output=True, text=True)
    dt = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(p.stdout + p.stderr)
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return dt, rss, p.stdout


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=1_200_000)
    ap.add_argument("--per-shard", type=int, default=55)
    ap.add_argument("--flagged", type=float, default=0.02)
    ap.add_argument("--dir", help="where to fabricate (default: a temporary dir, removed afterwards); "
                                  "a dir fabricated before is reused (its report/ is removed)")
    a = ap.parse_args()
    root = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="bench-report-"))
    work = root / "work"
    try:
        if (work / "crop" / "results").is_dir():
            shutil.rmtree(work / "report", ignore_errors=True)
            print(f"reusing {work}")
        else:
            t = time.perf_counter()
            counts = fabricate(work, a.items, a.per_shard, a.flagged)
            print(f"fabricated {counts['items']:,} items in {counts['shards']:,} shards ({counts['flagged']:,} "
                  f"flagged, {counts['failed']:,} failed) in {time.perf_counter() - t:.1f} s")
        size = sum(p.stat().st_size for p in (work / "crop" / "results").iterdir())
        print(f"crop results: {size / 2**20:.0f} MB")
        dt, rss, _ = _report(work)
        html = work / "report" / "index.html"
        print(f"first report (every results file parsed): {dt:.1f} s, peak RSS {rss:.0f} MB, "
              f"index.html {html.stat().st_size / 2**20:.2f} MB, "
              f"flagged.tsv {sum(1 for _ in open(work / 'report' / 'flagged.tsv')) - 1:,} rows")
        dt, rss2, _ = _report(work)
        print(f"second report (per-shard cache): {dt:.1f} s")
        last = sorted((work / "crop" / "results").iterdir())[-1]
        last.write_text(last.read_text())  # a rewritten shard: new mtime
        dt, _, _ = _report(work)
        print(f"after one shard changed: {dt:.1f} s")
    finally:
        if not a.dir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
