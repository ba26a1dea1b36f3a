"""The corpus at the paper's scale: listing, planning, shard start-up, manifest and status on a
fabricated VoxCeleb2-shaped corpus (1.1M utterances) and an LRS3-shaped one (150k, with word
timings), without cropping a frame.

    .venv/bin/python bench/scale.py [--dir DIR] [--vox2 1100000] [--lrs3 150000] [--clean]

Fabricated once under --dir (default $TMPDIR/avhubert-scale-bench) and reused by later runs:
- ``vox2-N/dev/<spk>/<clip>/<utt>.mp4``: symlinks to a few real sample-corpus clips (VoxCeleb2's
  shape: 24 clips per speaker, 8 utterances per clip);
- ``lrs3-N/{pretrain,trainval,test}/<spk>/<utt>.mp4`` symlinks + ``.txt`` (pretrain with a word
  table; a quarter of them longer than 15 s, so they are segmented);
- for the manifest: a work dir with the vox2 item list frozen by the crop stage and one fabricated
  crop record per item (``crop/results/<shard>.jsonl``), each naming an ROI mp4 / wav hard link
  (2 x 1.1M links to one real pair: no inodes, real sizes), plus a done marker per shard.
``--clean`` removes the directory after the run. Everything is measured in subprocesses (peak RSS
is each one's own, from wait4) and printed against the issue's targets (2-core machine):
listing + plan of 1.1M items <= 60 s at <= 2 GB, per-shard start-up <= 1 s whatever the corpus
size, manifest of 1.1M records <= 10 min, status <= 2 s.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

UTTS_PER_CLIP = 8
CLIPS_PER_SPEAKER = 24
ITEMS_PER_SHARD = 50
LINKS_PER_COPY = 50000


def log(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------------------ fabrication
def real_clips(base: Path) -> list[Path]:
    from tools.sample_corpus import ensure_sample_corpus

    corpus = ensure_sample_corpus()
    out = base / "clips"
    out.mkdir(parents=True, exist_ok=True)
    clips = []
    for k, src in enumerate(sorted(corpus.glob("pexels_langer/0*.mp4"))[:4]):
        dst = out / f"clip{k}.mp4"
        if not dst.exists():
            shutil.copy(src, dst)
        clips.append(dst)
    return clips


def _clip_name(k: int) -> str:  # YouTube-id-like, 11 characters
    return hashlib.md5(str(k).encode()).hexdigest()[:11]


def fabricate_vox2(base: Path, n: int, clips: list[Path]) -> Path:
    root = base / f"vox2-{n}"
    if (root / ".complete").exists():
        return root
    t = time.time()
    k = 0
    spk = 0
    targets = [str(c) for c in clips]
    while k < n:
        for c in range(CLIPS_PER_SPEAKER):
            d = f"{root}/dev/id{spk:05d}/{_clip_name(spk * CLIPS_PER_SPEAKER + c)}"
            os.makedirs(d, exist_ok=True)
            for u in range(UTTS_PER_CLIP):
                if k >= n:
                    break
                os.symlink(targets[k % len(targets)], f"{d}/{u + 1:05d}.mp4")
                k += 1
        spk += 1
    (root / ".complete").touch()
    log(f"fabricated {n} vox2 utterances ({spk} speakers) in {time.time() - t:.0f} s")
    return root


def _lrs3_text(rng: random.Random, with_table: bool) -> str:
    n_words = rng.randint(5, 70)
    words, t = [], rng.uniform(0.05, 0.3)
    for _ in range(n_words):
        w = "".join(rng.choice("ABCDEFGHIKLMNOPRSTUW") for _ in range(rng.randint(2, 8)))
        d = rng.uniform(0.15, 0.5)
        words.append((w, t, t + d))
        t += d + (rng.uniform(0.5, 1.2) if rng.random() < 0.05 else rng.uniform(0.0, 0.15))
    text = "Text:  " + " ".join(w for w, _, _ in words) + "\nConf:  4\n"
    if with_table:
        text += "\nWORD START END ASDSCORE\n" + "".join(f"{w} {s:.2f} {e:.2f} 5.3\n" for w, s, e in words)
    return text


def fabricate_lrs3(base: Path, n: int, clips: list[Path]) -> Path:
    root = base / f"lrs3-{n}"
    if (root / ".complete").exists():
        return root
    t = time.time()
    rng = random.Random(0)
    parts = [("pretrain", int(n * 0.78)), ("trainval", int(n * 0.21))]
    parts.append(("test", n - sum(c for _, c in parts)))
    k = 0
    for part, count in parts:
        for i in range(count):
            d = root / part / _clip_name(10**7 + i // 30)
            if i % 30 == 0:
                d.mkdir(parents=True, exist_ok=True)
            os.symlink(clips[k % len(clips)], d / f"{i % 30:05d}.mp4")
            (d / f"{i % 30:05d}.txt").write_text(_lrs3_text(rng, part == "pretrain"))
            k += 1
    (root / ".complete").touch()
    log(f"fabricated {n} lrs3 utterances in {time.time() - t:.0f} s")
    return root


# ------------------------------------------------------------------------------------ measuring
def measured(code: str, label: str, timeout: float = 3600) -> str:
    """Run ``code`` in a fresh interpreter (it prints its own figures, peak RSS from VmHWM);
    returns its stdout."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{label} failed:\n{proc.stdout}\n{proc.stderr[-3000:]}")
    return proc.stdout


PRELUDE = """
import json, os, sys, time
sys.path.insert(0, {root!r})
from omegaconf import OmegaConf
from pipeline.config import load_config
from pipeline.stage import StageContext
from stages import config_sections

def ctx_for(corpus, layout, work):
    cfg = load_config(config_sections(), "base", "local", [
        f"corpus={{corpus}}", f"layout={{layout}}", f"workdir={{work}}", "crop.items_per_shard={ips}"], {{}})
    return StageContext(cfg=cfg, workdir=work)

def peak_gb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20

def cpu_s():
    import resource
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
"""


def prelude() -> str:
    return PRELUDE.format(root=str(ROOT), ips=ITEMS_PER_SHARD)


def bench_listing(corpus: Path, layout: str, pool: Optional[bool] = None) -> dict:
    """``pool``: force transcripts into a process pool (True) or one process (False); None = the
    code's own choice."""
    code = prelude() + f"""
import stages.corpus
from stages.corpus import scan_corpus
if {pool} is True:
    stages.corpus.PARALLEL_MIN_CPUS = 2
if {pool} is False:
    stages.corpus.PARALLEL_MIN_TRANSCRIPTS = 10**12
ctx = ctx_for({str(corpus)!r}, {layout!r}, "/nonexistent")
c = cpu_s(); t = time.time(); listing = scan_corpus(ctx.cfg); dt = time.time() - t
print(json.dumps({{"items": len(listing.items), "seconds": dt, "cpu_s": cpu_s() - c, "peak_gb": peak_gb()}}))
"""
    out = measured(code, f"listing {layout}")
    return json.loads(out.splitlines()[-1])


def bench_plan(corpus: Path, layout: str, work: Path, commit: bool) -> dict:
    code = prelude() + f"""
from stages.crop import CropStage
ctx = ctx_for({str(corpus)!r}, {layout!r}, {str(work)!r})
stage = CropStage()
c = cpu_s(); t = time.time(); lines = stage.prepare(ctx, commit={commit}); shards = stage.shards(ctx)
dt = time.time() - t
print(json.dumps({{"lines": lines, "shards": len(shards), "seconds": dt, "cpu_s": cpu_s() - c, "peak_gb": peak_gb()}}))
"""
    out = measured(code, f"plan {layout}")
    return json.loads(out.splitlines()[-1])


def bench_dry_run(corpus: Path, layout: str, work: Path) -> tuple[float, float, float]:
    """The whole `launch.py --dry-run` in a child, its peak RSS from wait4."""
    cmd = [sys.executable, str(ROOT / "launch.py"), "--stage", "crop", "--dry-run", "--preset", "base",
           "--corpus", str(corpus), "--layout", layout, "--workdir", str(work),
           f"crop.items_per_shard={ITEMS_PER_SHARD}"]
    t = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.time() - t
    if status != 0:
        raise RuntimeError(f"dry run failed:\n{out[-3000:]}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 2**20


def bench_shard_startup(corpus: Path, layout: str, work: Path, which: str) -> dict:
    """In a fresh worker process (the Shard arrives pickled, as from submitit): the time from
    ``run(ctx, shard)`` to its items in hand (what grows with the corpus if anything does) and to
    its first item's crop (adds the detector's model loading, a constant). The crop itself is
    stopped there."""
    code = prelude() + f"""
import pickle
import stages.crop as crop_module
from stages.crop import CropStage
ctx = ctx_for({str(corpus)!r}, {layout!r}, {str(work)!r})
shards = CropStage().shards(ctx)
shard = pickle.loads(pickle.dumps(shards[0] if {which!r} == "first" else shards[-1]))
class FirstItem(BaseException):
    pass
marks = {{}}
real_items = CropStage.shard_items
def timed_items(self, ctx, shard):
    items = real_items(self, ctx, shard)
    marks["items"] = time.time()
    return items
def first_item(*a, **k):
    raise FirstItem(time.time())
CropStage.shard_items = timed_items
crop_module.crop_item = first_item
t = time.time()
try:
    CropStage().run(ctx, shard)
except FirstItem as e:
    dt = e.args[0] - t
print(json.dumps({{"key": shard.key, "items_s": marks["items"] - t, "first_item_s": dt}}))
"""
    out = measured(code, f"shard start-up {which}")
    return json.loads(out.splitlines()[-1])


def fabricate_crop_outputs(base: Path, work: Path, clips: list[Path]) -> int:
    """One ok crop record per frozen item, shard by shard, with hard-linked ROI/wav files; done
    markers as the engine writes them. Cached (the work dir keeps a stamp)."""
    from avprep import media
    from pipeline.state import StateStore
    from stages import item_list as il

    stamp = work / ".bench-crop-outputs"
    index = il.read_index(work / "crop" / "items")
    if stamp.exists():
        return index.n_items
    t = time.time()
    pair = base / "pair"
    pair.mkdir(exist_ok=True)
    roi, wav = pair / "roi.mp4", pair / "roi.wav"
    if not roi.exists():
        from avprep.crop import crop_one_video

        r = crop_one_video(clips[0], pair, name="roi")
        assert r.audio == wav
    n_frames = media.header_frame_count(roi)
    n_samples = media.count_wav_samples(wav)
    vbytes, abytes = roi.stat().st_size, wav.stat().st_size
    # ext4 allows 65000 links per inode: one copy of the pair per LINKS_PER_COPY items
    copies = []
    for c in range(index.n_items // LINKS_PER_COPY + 1):
        pc = pair / f"copy{c}"
        pc.mkdir(exist_ok=True)
        for src in (roi, wav):
            if not (pc / src.name).exists():
                shutil.copy(src, pc / src.name)
        copies.append((str(pc / roi.name), str(pc / wav.name)))
    crop = work / "crop"
    store = StateStore(work)
    state = store.stage_state_dir("crop", None)
    state.mkdir(parents=True, exist_ok=True)
    made_dirs = set()
    n = 0
    for k, batch, offset, length, count in index.slices():
        key = f"{k:05d}"
        items = il.read_slice(crop / "items", batch.file, offset, length, count, Path(index.corpus))
        lines = []
        for item in items:
            roi_copy, wav_copy = copies[n // LINKS_PER_COPY]
            n += 1
            for kind, src, ext in (("video", roi_copy, ".mp4"), ("audio", wav_copy, ".wav")):
                dst = f"{crop}/{kind}/{item.id}{ext}"
                parent = os.path.dirname(dst)
                if parent not in made_dirs:
                    os.makedirs(parent, exist_ok=True)
                    made_dirs.add(parent)
                if not os.path.exists(dst):
                    os.link(src, dst)
            lines.append(json.dumps({"id": item.id, "split": item.split, "text": item.text, "status": "ok",
                                     "video": f"video/{item.id}.mp4", "audio": f"audio/{item.id}.wav",
                                     "n_frames": n_frames, "n_samples": n_samples, "video_bytes": vbytes,
                                     "audio_bytes": abytes}))
        (crop / "results").mkdir(exist_ok=True)
        (crop / "results" / f"{key}.jsonl").write_text("\n".join(lines) + "\n")
        # a done marker as the engine writes it (without the fsync: fabrication speed)
        (state / f"{key}.done.json").write_text(json.dumps({"stats": {"items": count, "ok": count}, "host": "bench",
                                                            "pid": 0, "time": 0}))
    (state / "_plan.json").write_text(json.dumps({"n_shards": index.n_shards}))
    stamp.touch()
    log(f"fabricated {index.n_items} crop records ({index.n_shards} shards) in {time.time() - t:.0f} s")
    return index.n_items


def bench_manifest(corpus: Path, layout: str, work: Path) -> dict:
    code = prelude() + f"""
from stages.crop import CropStage
from stages.manifest import STAGE
ctx = ctx_for({str(corpus)!r}, {layout!r}, {str(work)!r})
c = cpu_s(); t = time.time(); crop_summary = CropStage().finalize(ctx, {{}}); t_crop = time.time() - t
c_crop = cpu_s() - c
c = cpu_s(); t = time.time(); summary = STAGE.run(ctx, STAGE.shards(ctx)[0]); dt = time.time() - t
print(json.dumps({{"crop_finalize_s": t_crop, "crop_finalize_cpu_s": c_crop, "seconds": dt, "cpu_s": cpu_s() - c, "counts": summary["counts"],
                  "failures": summary["failures"], "peak_gb": peak_gb()}}))
"""
    out = measured(code, "manifest")
    return json.loads(out.splitlines()[-1])


def bench_status(work: Path) -> float:
    t = time.time()
    proc = subprocess.run([sys.executable, str(ROOT / "launch.py"), "status", "--workdir", str(work)],
                          capture_output=True, text=True, cwd=ROOT)
    dt = time.time() - t
    if proc.returncode not in (0, 1):
        raise RuntimeError(proc.stdout + proc.stderr)
    return dt


def add_new_videos(vox2: Path, clips: list[Path], n: int) -> None:
    d = vox2 / "dev" / "id99999"
    for k in range(n):
        clip_dir = d / _clip_name(10**8 + k // UTTS_PER_CLIP)
        clip_dir.mkdir(parents=True, exist_ok=True)
        os.symlink(clips[k % len(clips)], clip_dir / f"{k % UTTS_PER_CLIP + 1:05d}.mp4")


def bench_vox2(base: Path, n_items: int, clips: list, row, timed) -> None:
    vox2 = fabricate_vox2(base, n_items, clips)
    shutil.rmtree(vox2 / "dev" / "id99999", ignore_errors=True)  # extra videos left by a killed run
    log(f"\n== VoxCeleb2-shaped, {n_items} items")
    listing = bench_listing(vox2, "vox2")
    row("vox2 listing (scan_corpus)", timed(listing), "-")
    wall, cpu, rss = bench_dry_run(vox2, "vox2", base / "work-dry")
    row("vox2 `launch.py --stage crop --dry-run` (whole process)", f"{wall:.1f} s ({cpu:.1f} s CPU), {rss:.2f} GB",
        "<= 60 s, <= 2 GB", wall, cpu, 60, rss <= 2)
    plan = bench_plan(vox2, "vox2", base / "work-plan", True)
    row(f"vox2 first plan (list + freeze {plan['shards']} shards)", timed(plan), "<= 60 s, <= 2 GB",
        plan["seconds"], plan["cpu_s"], 60, plan["peak_gb"] <= 2)
    shutil.rmtree(base / "work-plan")
    work = base / f"work-vox2-{n_items}"
    if not (work / "crop" / "items" / "index.json").exists():
        bench_plan(vox2, "vox2", work, True)
    index_kb = (work / "crop" / "items" / "index.json").stat().st_size / 1024
    row("vox2 shard index size", f"{index_kb:.0f} KB", "-")
    for which in ("first", "last"):
        r = bench_shard_startup(vox2, "vox2", work, which)
        row(f"vox2 shard start-up, {which} shard ({r['key']}): its items in hand", f"{r['items_s'] * 1000:.1f} ms",
            "<= 1 s", r["items_s"], None, 1)
        row(f"vox2 shard start-up, {which} shard ({r['key']}): to its first crop (+ dlib models)",
            f"{r['first_item_s'] * 1000:.0f} ms", "-")
    n = fabricate_crop_outputs(base, work, clips)
    m = bench_manifest(vox2, "vox2", work)
    row(f"crop finalize over {n} records", f"{m['crop_finalize_s']:.1f} s ({m['crop_finalize_cpu_s']:.1f} s CPU)",
        "-")
    row(f"manifest of {n} records ({m['counts']['train']} train, {m['counts']['valid']} valid)", timed(m),
        "<= 600 s", m["seconds"], m["cpu_s"], 600)
    dt = bench_status(work)
    n_shards = json.loads((work / ".pipeline/state/once/crop/_plan.json").read_text())["n_shards"]
    row(f"`launch.py status` ({n_shards} crop shards recorded)", f"{dt:.2f} s", "<= 2 s", dt, None, 2)
    # a later launch: 1% new videos; listing + comparison with the frozen list
    extra = max(1, n_items // 100)
    add_new_videos(vox2, clips, extra)
    try:
        again = bench_plan(vox2, "vox2", work, False)
    finally:  # the extra videos are not part of the cached tree
        shutil.rmtree(vox2 / "dev" / "id99999", ignore_errors=True)
    row(f"vox2 later launch, +{extra} new videos (list + compare, {again['shards']} shards)", timed(again),
        "<= 60 s, <= 2 GB", again["seconds"], again["cpu_s"], 60, again["peak_gb"] <= 2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "avhubert-scale-bench")
    ap.add_argument("--vox2", type=int, default=1_100_000, help="VoxCeleb2-shaped items")
    ap.add_argument("--lrs3", type=int, default=150_000, help="LRS3-shaped utterances (0: skip)")
    ap.add_argument("--clean", action="store_true", help="remove --dir at the end")
    a = ap.parse_args()
    base = a.dir.resolve()
    base.mkdir(parents=True, exist_ok=True)
    log(f"machine: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; fabricated data in {base}")
    log("wall times depend on the machine's load: each figure also gives the CPU seconds (user + sys, "
        "threads and worker processes included); 'ok (CPU)' = the CPU time is within the target, the wall "
        "time is not (the machine was busy)")
    rows = []

    def row(what, value, target, wall=None, cpu=None, limit=None, mem_ok=True):
        if limit is None:
            verdict = "-"
        elif wall <= limit and mem_ok:
            verdict = "ok"
        elif cpu is not None and cpu <= limit and mem_ok:
            verdict = "ok (CPU)"
        else:
            verdict = "MISSED"
        rows.append((what, value, target, verdict))
        log(f"  {what}: {value} (target {target}) {verdict}")

    def timed(r):
        return f"{r['seconds']:.1f} s ({r['cpu_s']:.1f} s CPU), {r['peak_gb']:.2f} GB"

    try:
        clips = real_clips(base)
        if a.vox2:
            bench_vox2(base, a.vox2, clips, row, timed)

        if a.lrs3:
            lrs3 = fabricate_lrs3(base, a.lrs3, clips)
            log(f"\n== LRS3-shaped, {a.lrs3} utterances")
            wall, cpu, rss = bench_dry_run(lrs3, "lrs3", base / "work-dry-lrs3")  # also warms the page cache
            row("lrs3 `launch.py --stage crop --dry-run` (whole process)", f"{wall:.1f} s ({cpu:.1f} s CPU), "
                f"{rss:.2f} GB", "<= 60 s, <= 2 GB", wall, cpu, 60, rss <= 2)
            for pool, how in ((False, "in one process"), (True, f"in a pool of {min(8, os.cpu_count())}")):
                lst = bench_listing(lrs3, "lrs3", pool=pool)
                row(f"lrs3 listing ({lst['items']} items after segmentation), transcripts {how}", timed(lst), "-")

        log("\n== summary (load avg now %.1f)" % os.getloadavg()[0])
        width = max(len(r[0]) for r in rows)
        for what, value, target, verdict in rows:
            log(f"{what:<{width}}  {value:<34} {target:<17} {verdict}")
    finally:
        for scratch in ("work-dry", "work-dry-lrs3", "work-plan"):
            shutil.rmtree(base / scratch, ignore_errors=True)
        if a.clean:
            shutil.rmtree(base, ignore_errors=True)
            log(f"removed {base}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
