"""``launch.py units VIDEO... --checkpoint CKPT --layer L (--kmeans KM | --n-clusters K)``: discrete
units of a handful of raw videos, without a work dir: the crop stage's code on each video
(``avhubert.api.crop_video``), layer features (``AVHubert.extract``), the nearest centroid of a
k-means model given or trained on these videos' frames. Prints ``VIDEO<TAB>units`` per video and
writes ``OUT/videos.{tsv,units,rle,jsonl}`` in the units stage's formats (``speechfeat/units.py``).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

import numpy as np

from avprep.crop import CropError
from avprep.media import MediaError
from pipeline import atomic
from pipeline.errors import InfrastructureError, raise_if_infrastructure
from speechfeat import kmeans as km
from speechfeat.units import rle_line, units_line, vocoder_record
from stages.kmeans import Config as KmeansConfig, backend_params
from stages.units import KMEANS_MODEL, SAMPLE_RATE, is_checkpoint

log = logging.getLogger(__name__)


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="launch.py units",
        description="Discrete units of a few raw videos: the crop stage's code on each video, layer features of a "
                    "checkpoint, nearest k-means centroid per 25 Hz frame. Prints one line per video "
                    "(VIDEO<TAB>units) and writes OUT/videos.{tsv,units,rle,jsonl} (formats: README, 'Units').")
    p.add_argument("videos", nargs="+", metavar="VIDEO", help="raw video files (any container/codec ffmpeg reads)")
    p.add_argument("--checkpoint", required=True, help="AV-HuBERT checkpoint (pretraining or fine-tuned, ours or reference)")
    p.add_argument("--layer", type=int, required=True, help="transformer layer (e.g. 9 or 12 for BASE)")
    km = p.add_mutually_exclusive_group(required=True)
    km.add_argument("--kmeans", help="k-means model (a pipeline kmeans.joblib or a reference sklearn model)")
    km.add_argument("--n-clusters", type=int, help="train a k-means of K clusters on these videos' features")
    p.add_argument("--modalities", choices=["av", "audio", "video"], default="av", help="input streams (default av)")
    p.add_argument("--out", default="units_out", help="output directory (default ./units_out)")
    p.add_argument("--jsonl-key", default="hubert", help="key of the unit string in videos.jsonl (default hubert)")
    p.add_argument("--seed", type=int, default=0, help="k-means seed with --n-clusters")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    p.add_argument("--crop-mode", choices=["fast", "reference"], default=None, help="crop stage mode (default fast)")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    return p.parse_args(argv)


def _unique_names(videos) -> list:
    names, seen = [], set()
    for v in videos:
        stem = base = Path(v).stem or "video"
        i = 2
        while stem in seen:
            stem, i = f"{base}_{i}", i + 1
        seen.add(stem)
        names.append(stem)
    return names


def units_command(args) -> int:
    """``launch.py units``; returns the exit status (1 when a video or the request failed)."""
    from avhubert.api import crop_video, kmeans_centroids, load

    def error(msg: str) -> None:
        print(f"error: {msg}", file=sys.stderr, flush=True)

    if not is_checkpoint(args.checkpoint):
        error(f"{args.checkpoint}: no such checkpoint (a file, or a directory of launch.py export)")
        return 1
    if args.kmeans is not None and not Path(args.kmeans).is_file():
        error(f"{args.kmeans}: no such k-means model")
        return 1
    if args.n_clusters is not None and args.n_clusters < 2:
        error(f"--n-clusters {args.n_clusters}: need at least 2 clusters")
        return 1
    try:
        model = load(args.checkpoint, device=args.device)
        layer = model._layer(args.layer)
        centroids = kmeans_centroids(args.kmeans) if args.kmeans is not None else None
    except (ValueError, OSError, RuntimeError) as e:
        error(str(e).splitlines()[0] if str(e) else type(e).__name__)
        return 1
    if centroids is not None and centroids.shape[1] != model.dim:
        error(f"{args.kmeans}: {centroids.shape[1]}-d centroids but layer {layer} of {args.checkpoint} gives "
              f"{model.dim}-d features")
        return 1
    out = Path(args.out)
    crop_dir = out / "crop"
    crop_dir.mkdir(parents=True, exist_ok=True)
    done = []  # (video, name, cropped, features)
    n_failed = 0
    for video, name in zip(args.videos, _unique_names(args.videos)):
        try:
            if not Path(video).is_file():
                raise FileNotFoundError(f"{video}: no such video file")
            cropped = crop_video(video, crop_dir, name=name, mode=args.crop_mode)
            if args.modalities != "video" and cropped.wav is None:
                raise ValueError(f"{video}: no audio track; use --modalities video")
            # audio-only features still follow the video's frame count, as the units stage's
            feats = model.extract(video=cropped.roi, audio=cropped.wav if args.modalities != "video" else None,
                                  layer=layer, modalities=args.modalities)
        except Exception as e:  # this video's problem: one line, the others go on
            raise_if_infrastructure(e, [out])  # a full disk or a signal stops the command
            known = isinstance(e, (CropError, MediaError, ValueError, OSError))
            log.info("%s failed", video, exc_info=not known)
            error(str(e).splitlines()[0] if known and str(e) else f"{video}: {type(e).__name__}: {e}")
            n_failed += 1
            continue
        log.info("%s: %d frames", video, len(feats))
        done.append((video, name, cropped, feats))
    if not done:
        return 1
    if centroids is None:
        x = np.concatenate([f for *_, f in done])
        if len(x) < args.n_clusters:
            error(f"these videos give {len(x)} frames, fewer than --n-clusters {args.n_clusters}")
            return 1
        c = KmeansConfig()
        model_dict = km.fit(x, args.n_clusters, c.backend, args.seed, backend_params(c))
        model_dict.pop("train_seconds")
        model_dict.update({"layer": layer, "modality": args.modalities, "checkpoint": str(args.checkpoint)})
        km.save_model(out / KMEANS_MODEL, model_dict)
        centroids = model_dict["centroids"]
        print(f"no k-means model given: trained K={args.n_clusters} ({c.backend}) on the {len(x)} frames of these "
              f"{len(done)} video(s); saved to {out / KMEANS_MODEL}", file=sys.stderr, flush=True)
    tsv, unit_lines, rle_lines, records = [os.path.abspath(crop_dir)], [], [], []
    for video, name, cropped, feats in done:
        units = km.assign(feats, centroids)
        print(f"{video}\t{units_line(units)}", flush=True)
        n_samples = len(cropped.wav) if cropped.wav is not None else 0
        tsv.append("\t".join([name, cropped.video_path.name, cropped.audio_path.name if cropped.audio_path else "",
                              str(len(cropped.roi)), str(n_samples)]))
        unit_lines.append(units_line(units))
        rle_lines.append(rle_line(units))
        if cropped.audio_path is not None:
            records.append(vocoder_record(name, os.path.abspath(cropped.audio_path), units, n_samples / SAMPLE_RATE,
                                          args.jsonl_key))
    for ext, lines in (("tsv", tsv), ("units", unit_lines), ("rle", rle_lines), ("jsonl", records)):
        atomic.write_text(out / f"videos.{ext}", "".join(line + "\n" for line in lines))
    atomic.write_text(out / "dict.units.txt", "".join(f"{i} 1\n" for i in range(len(centroids))))
    print(f"wrote {out}/videos.{{tsv,units,rle,jsonl}} ({len(done)} video(s), layer {layer}, K={len(centroids)})",
          file=sys.stderr, flush=True)
    return 1 if n_failed else 0


def main(argv: list) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s | %(levelname)s | %(name)s | %(message)s")
    if not args.verbose:  # fairseq logs its model and task on load
        warnings.filterwarnings("ignore", category=FutureWarning)
        for name in ("fairseq", "avhubert", "stages", "avprep"):
            logging.getLogger(name).setLevel(logging.WARNING)
    try:
        return units_command(args)
    except InfrastructureError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
