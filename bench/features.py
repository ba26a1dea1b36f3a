"""Throughput of the features stage's two extractors.

    python bench/features.py --mfcc-seconds 600
    python bench/features.py --checkpoint ../shared/golden/ref_tiny_pretrain.pt --clips 8 --frames 150

MFCC: seconds of 16 kHz audio featurized per second of wall time (speechfeat.mfcc.mfcc39).
Layer: frames per second of ``avhubert.extract.extract_batched`` on random ROI/audio inputs of
``--clips`` clips x ``--frames`` frames, one piece per forward versus padded batches
(``--batch-frames``), on ``--device``. Prints the figures; asserts nothing.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def bench_mfcc(seconds: float) -> None:
    from speechfeat.mfcc import mfcc39

    wav = (np.random.default_rng(0).normal(size=int(seconds * 16000)) * 3000).astype(np.int16)
    t0 = time.time()
    feats = mfcc39(wav)
    dt = time.time() - t0
    print(f"mfcc: {seconds:.0f}s of audio -> {feats.shape} in {dt:.2f}s = {seconds / dt:.0f}x real time")


def bench_layer(checkpoint: str, clips: int, frames: int, layer: int, device: str, batch_frames: int) -> None:
    import torch

    from avhubert.extract import audio_input, load_pretrained, video_input
    from avhubert.extract import extract_batched, resolve_device

    device = resolve_device(device)
    model, task_cfg = load_pretrained(checkpoint, device=device)
    rng = np.random.default_rng(0)
    inputs = []
    for i in range(clips):
        n = frames - (i * 7) % max(frames // 4, 1)  # a spread of lengths, as a real shard
        roi = rng.integers(0, 256, size=(n, 96, 96), dtype=np.uint8)
        wav = (rng.normal(size=n * 640) * 3000).astype(np.int16)
        inputs.append((video_input(roi, task_cfg), audio_input(wav, n, task_cfg)))
    total = sum(len(v) for v, _ in inputs)
    for bf in (0, batch_frames):
        extract_batched(model, inputs[:1], layer, 2500, bf)  # warm-up
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.time()
        extract_batched(model, inputs, layer, 2500, bf)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        dt = time.time() - t0
        print(f"layer {layer} on {device}, batch_frames={bf}: {total} frames in {dt:.2f}s = {total / dt:.0f} frames/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mfcc-seconds", type=float, default=300)
    ap.add_argument("--checkpoint", help="run the layer-feature benchmark with this checkpoint")
    ap.add_argument("--clips", type=int, default=8)
    ap.add_argument("--frames", type=int, default=150)
    ap.add_argument("--layer", type=int, default=1)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-frames", type=int, default=1200)
    args = ap.parse_args()
    bench_mfcc(args.mfcc_seconds)
    if args.checkpoint:
        bench_layer(args.checkpoint, args.clips, args.frames, args.layer, args.device, args.batch_frames)


if __name__ == "__main__":
    main()
