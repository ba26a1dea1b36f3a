"""The GPU check (issue 14, target 4): what this project does on a GPU, timed, one figure a line.

    bash bench/gpu_check.sh             # on a machine with a CUDA GPU, from the repo root (< 8 min)
    bash bench/gpu_check.sh --cpu-dry   # every step tiny on CPU: checks the script itself here

Steps, each in its own process (a crash or hang of one is reported and the next runs):
  env       torch, CUDA and the device
  nccl      torch.distributed initialises with NCCL (gloo with --cpu-dry) and all-reduces
  kmeans    the torch k-means backend on CUDA, 1M x 768, K=500 (synthetic Gaussian mixture data,
            as bench/kmeans.py makes it)
  pretrain  a one-GPU BASE pretraining run (avhubert/conf/pretrain/base.yaml, fp16) of 200 updates
            on generated audio-visual clips with learnable labels: updates/s, peak GPU memory
  features  layer features of that checkpoint on CUDA (bench/features.py: frames/s, one clip per
            forward vs padded batches)
  finetune  the finetune stage (avhubert/conf/finetune/base.yaml) from that checkpoint, 50 updates,
            on the same clips with generated transcripts: updates/s, peak GPU memory, then its
            beam-search decoding of valid/test
Nothing is downloaded: all inputs are generated (no sample corpus, no espeak-ng needed). Never part
of the test suite. Output lines are ``step: figure``; a failed step prints ``step: FAILED ...``
and the script exits 1 at the end.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# per step: (GPU settings, --cpu-dry settings), and a time limit (s)
SETTINGS = {
    "kmeans": ({"frames": 1_000_000, "dims": 768, "k": 500}, {"frames": 20_000, "dims": 64, "k": 10}, 240),
    "pretrain": ({"config": "base", "updates": 200, "clips": 96, "fp16": True},
                 {"config": "tiny", "updates": 3, "clips": 6, "fp16": False}, 240),
    "features": ({"layer": 12, "clips": 16, "frames": 250, "batch_frames": 2000},
                 {"layer": 1, "clips": 2, "frames": 40, "batch_frames": 80}, 120),
    "finetune": ({"config": "base", "updates": 50}, {"config": "tiny", "updates": 2}, 240),
    "nccl": ({}, {}, 90),
    "env": ({}, {}, 60),
}
STEPS = ["env", "nccl", "kmeans", "pretrain", "features", "finetune"]


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _device(dry: bool) -> str:
    import torch

    if dry:
        return "cpu"
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device visible to torch (use --cpu-dry to check the script on CPU)")
    return "cuda"


def _peak_gpu_mb() -> str:
    import torch

    return f"{torch.cuda.max_memory_allocated() / 2**20:.0f} MB" if torch.cuda.is_available() else "n/a (CPU)"


# ------------------------------------------------------------------------------------------ steps
def step_env(dry: bool, work: Path, s: dict) -> None:
    import torch

    print(f"env: torch {torch.__version__}, CUDA {torch.version.cuda}, cuda available {torch.cuda.is_available()}")
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print(f"env: {torch.cuda.device_count()} x {p.name}, {p.total_memory / 2**30:.0f} GiB, "
              f"capability {p.major}.{p.minor}")
    elif not dry:
        raise RuntimeError("no CUDA device visible to torch")


def step_nccl(dry: bool, work: Path, s: dict) -> None:
    import torch
    import torch.distributed as dist

    backend = "gloo" if dry else "nccl"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    t0 = time.time()
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    x = torch.ones(4, device=_device(dry))
    dist.all_reduce(x)
    if not torch.equal(x.cpu(), torch.ones(4)):
        raise RuntimeError(f"all_reduce gave {x}")
    version = ".".join(map(str, torch.cuda.nccl.version())) if not dry else "-"
    dist.destroy_process_group()
    print(f"nccl: {backend} initialised and all-reduced in {time.time() - t0:.2f} s (NCCL {version})")


def step_kmeans(dry: bool, work: Path, s: dict) -> None:
    import numpy as np

    from speechfeat.kmeans import fit

    make_data = _load(REPO / "bench" / "kmeans.py", "bench_kmeans").make_data
    data = work / "kmeans.npy"
    t0 = time.time()
    make_data(data, s["frames"], s["dims"], s["k"])
    x = np.load(data)
    print(f"kmeans: data {s['frames']} x {s['dims']} made in {time.time() - t0:.1f} s")
    device = _device(dry)
    t0 = time.time()
    model = fit(x, s["k"], "torch", 0, params={"device": device})
    print(f"kmeans: torch backend on {device}, {s['frames']} x {s['dims']}, K={s['k']}: "
          f"{model['train_seconds']:.1f} s training ({time.time() - t0:.1f} s with inertia), inertia {model['inertia']:.4e}")


def _corpus(work: Path, clips: int) -> Path:
    """Generated clips with learnable 25 Hz labels (tests/avhubert/conftest.py's generator)."""
    root = work / "corpus"
    if not (root / "train.tsv").is_file():
        gen = _load(REPO / "tests" / "avhubert" / "conftest.py", "avhubert_test_data")
        gen.make_av_corpus(root, n_train=clips, n_valid=max(2, clips // 8), label_rate=25, lengths=(100, 150))
    return root


def _train_updates(log_text: str) -> list:
    return [float(m) for m in re.findall(r'"ups": "?([0-9.]+)', log_text)]


def step_pretrain(dry: bool, work: Path, s: dict) -> None:
    from avhubert.train_entry import run_fairseq_train

    device = _device(dry)
    corpus = _corpus(work, s["clips"])
    save = work / "pretrain"
    overrides = [f"task.data={corpus}", f"task.label_dir={corpus}", "model.label_rate=25",
                 f"optimization.max_update={s['updates']}", f"checkpoint.save_dir={save}",
                 "checkpoint.save_interval_updates=0", "common.log_interval=25", "common.log_format=json",
                 f"common.fp16={'true' if s['fp16'] else 'false'}", "dataset.num_workers=4",
                 "dataset.validate_interval=1000", "checkpoint.no_epoch_checkpoints=true"]
    if dry:
        overrides += ["model.resnet_layers=[1,0,0,0]", "dataset.max_tokens=200", "dataset.num_workers=0"]
    t0 = time.time()
    run_fairseq_train(str(REPO / "avhubert" / "conf" / "pretrain"), s["config"], overrides, device=device)
    dt = time.time() - t0
    if not (save / "checkpoint_last.pt").is_file():
        raise RuntimeError(f"no checkpoint_last.pt in {save}")
    print(f"pretrain: {s['config']} on {device}, fp16 {s['fp16']}: {s['updates']} updates in {dt:.1f} s "
          f"(incl. start-up) = {s['updates'] / dt:.2f} updates/s; peak GPU memory {_peak_gpu_mb()}")


def step_features(dry: bool, work: Path, s: dict) -> None:
    ckpt = work / "pretrain" / "checkpoint_last.pt"
    if not ckpt.is_file():
        raise RuntimeError(f"{ckpt} is missing (the pretrain step failed)")
    bench = _load(REPO / "bench" / "features.py", "bench_features")
    bench.bench_layer(str(ckpt), s["clips"], s["frames"], s["layer"], _device(dry), s["batch_frames"])


def _finetune_workdir(work: Path, clips: int) -> Path:
    """WORKDIR with the generated clips as crop outputs with transcripts (one word per 10-frame
    segment, naming its class) and the manifest stage's outputs."""
    from omegaconf import OmegaConf

    from stages.manifest import Config as ManifestConfig
    from stages.manifest import build_manifest

    corpus = _corpus(work, clips)
    ft = work / "ftwork"
    words = ["zero", "one", "two", "three", "four", "five"]
    records = []
    for split in ("train", "valid"):
        rows = (corpus / f"{split}.tsv").read_text().splitlines()[1:]
        labels = (corpus / f"{split}.km").read_text().splitlines()
        for i, (row, lab) in enumerate(zip(rows, labels)):
            uid, video, audio, n_frames, n_samples = row.split("\t")
            classes = lab.split()[::10]  # 25 Hz labels: one class per 10-frame segment
            records.append({"id": uid, "status": "ok", "video": video, "audio": audio, "n_frames": int(n_frames),
                            "n_samples": int(n_samples),
                            "split": split if split == "train" or i % 2 == 0 else "test",
                            "text": " ".join(words[int(c)] for c in classes)})
    (corpus / "results").mkdir(exist_ok=True)
    (corpus / "results" / "000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    settings = OmegaConf.merge(OmegaConf.structured(ManifestConfig), {"spm_vocab_size": 30})
    build_manifest(corpus, ft / "manifest", settings, None)
    return ft


def step_finetune(dry: bool, work: Path, s: dict) -> None:
    from omegaconf import OmegaConf

    from pipeline.stage import StageContext
    from stages import finetune
    from stages.manifest import Config as ManifestConfig

    ckpt = work / "pretrain" / "checkpoint_last.pt"
    if not ckpt.is_file():
        raise RuntimeError(f"{ckpt} is missing (the pretrain step failed)")
    _device(dry)
    ft = _finetune_workdir(work, SETTINGS["pretrain"][1 if dry else 0]["clips"])
    section = {"model_config": s["config"], "pretrained_checkpoint": str(ckpt), "max_update": s["updates"]}
    cfg = OmegaConf.create({"workdir": str(ft), "iterations": 1, "manifest": OmegaConf.structured(ManifestConfig),
                            "finetune": OmegaConf.merge(OmegaConf.structured(finetune.Config), section)})
    ctx = StageContext(cfg=cfg, workdir=ft)
    stage = finetune.STAGE
    stage.validate(ctx)
    t0 = time.time()
    stats = stage.run(ctx, stage.shards(ctx)[0])
    dt = time.time() - t0
    results = json.loads((ft / "finetune" / "results.json").read_text())
    wer = {k: v.get("wer") for k, v in results.get("splits", {}).items()}
    print(f"finetune: {s['config']} from the pretrain checkpoint, {stats.get('num_updates')} updates + decoding "
          f"in {dt:.1f} s; peak GPU memory {_peak_gpu_mb()}; WER {wer}")


# ------------------------------------------------------------------------------------------- main
def run_step(name: str, dry: bool, work: Path) -> None:
    gpu, cpu, _ = SETTINGS[name]
    globals()[f"step_{name}"](dry, work, cpu if dry else gpu)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-dry", action="store_true", help="every step tiny on CPU (checks the script)")
    ap.add_argument("--steps", default=",".join(STEPS), help="comma-separated subset of " + ",".join(STEPS))
    ap.add_argument("--work", help="work dir (default: a new temporary dir, removed at the end)")
    ap.add_argument("--step", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.step:
        import logging

        logging.basicConfig(level=logging.INFO, stream=sys.stderr)
        run_step(a.step, a.cpu_dry, Path(a.work))
        return 0
    steps = a.steps.split(",")
    unknown = sorted(set(steps) - set(STEPS))
    if unknown:
        print(f"error: unknown step(s) {', '.join(unknown)}; steps: {', '.join(STEPS)}")
        return 2
    tmp = None
    if a.work:
        work = Path(a.work)
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="gpu-check-")
        work = Path(tmp.name)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    failed = []
    t_all = time.time()
    for name in steps:
        limit = SETTINGS[name][2]
        cmd = [sys.executable, __file__, "--step", name, "--work", str(work)] + (["--cpu-dry"] if a.cpu_dry else [])
        t0 = time.time()
        log = work / f"{name}.log"
        try:
            with open(log, "w") as err:
                proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env, timeout=limit,
                                      cwd=str(REPO))
            out, rc = proc.stdout, proc.returncode
        except subprocess.TimeoutExpired as e:
            out, rc = (e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout) or "", f"timeout after {limit} s"
        sys.stdout.write(out)
        if name == "pretrain" and log.is_file():
            ups = _train_updates(log.read_text())
            if ups:
                print(f"pretrain: fairseq's logged updates/s (train_inner, after warm-up): {ups[-1]:.2f}")
        if rc != 0:
            lines = log.read_text().strip().splitlines() if log.is_file() else []
            print(f"{name}: FAILED ({rc}): {lines[-1] if lines else ''} [log: {log}]")
            failed.append(name)
        print(f"{name}: step wall time {time.time() - t0:.1f} s", flush=True)
    print(f"total: {time.time() - t_all:.1f} s, {len(steps) - len(failed)}/{len(steps)} steps ok"
          + (f", failed: {', '.join(failed)}" if failed else ""))
    if tmp is not None and not failed:
        tmp.cleanup()
    elif tmp is not None:
        print(f"logs kept in {work}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
