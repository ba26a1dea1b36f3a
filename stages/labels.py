"""Labels stage: iteration N's k-means applied to every utterance, merged into the files the
training task reads (``task.label_dir`` = ``iter{N}/labels``, ``task.labels=[km]``).

Shards: those of the features stage for every split of ``features.splits``
(``{split}_{rank}_{nshard}``). Per shard, the features of its tsv rows come from
- ``features.store=sample`` (default): computed here (``stages.features.row_features``: MFCC,
  or the previous iteration's model on the job's GPU when it has one, batched) and assigned in
  the same pass: no feature matrix is ever written;
- ``features.store=all``: the features stage's dump, read by row ranges (``FeatureShard``);
then nearest centroid of every frame (``speechfeat.kmeans.assign``: chunked BLAS products on the
CPU, torch on a GPU), one line of space-separated labels per utterance, in
``{split}_{rank}_{nshard}.km``. Utterances are assigned in the same groups (consecutive ones of
up to ``labels.chunk_frames`` frames) whatever the source, so float32 features give the same
labels in both modes. The labels are a pure function of the features and the saved centroids.

``finalize`` (once):
- ``{split}.km``: the shards concatenated in rank order = tsv order, one line per tsv row (an
  utterance that could not be featurized has an empty line; the dataset drops it);
- ``dict.km.txt``: ``"{i} 1"`` for i in 0..K-1, a fairseq Dictionary. The reference README's
  recipe writes 1..K-1 (dropping label 0, which then maps to <unk>); we keep all K labels;
- checks: every non-empty line has exactly the feature frames its tsv row implies (MFCC:
  ``1 + (samples - 400) // 160``, layer: ``n_video_frames``), and its duration at the schedule's
  label rate (100 Hz MFCC, 25 Hz layer) is within ``labels.tolerance_seconds`` of the video's
  (``n_video_frames / 25``), as the training dataset checks (its label_tolerance);
- ``report.json``: per split, clusters used, entropy (bits), share of frames in the 10 largest
  clusters, failed utterances and, where the manifest has ``{split}.wrd`` transcripts, the purity
  of the labels against characters aligned uniformly over each clip (a cheap reference to compare
  iterations: cluster purity = share of frames whose cluster's most frequent character is theirs,
  character purity the converse, and H(char | label) in bits);
- ``cluster_usage.png``: frames per cluster (sorted) for each split;
- with ``features.keep=false``, iteration N-1's feature files are deleted (its training is
  complete, since iteration N's features read its final checkpoint).
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from pipeline import atomic
from pipeline.config import resources_for
from pipeline.errors import ConfigError
from pipeline.fingerprint import classify
from pipeline.stage import Shard, Stage, StageContext
from speechfeat.kmeans import assign, load_centroids
from speechfeat.shards import FeatureShard, read_tsv, shard_range
from stages import crop, estimates, features, kmeans
from stages.features import (Failures, expected_frames, make_featurizer, remove_bulky, row_features, shard_files,
                             split_shards, store_mode)
from stages.kmeans import model_path
from stages.schedule import iteration_spec, label_rate

log = logging.getLogger(__name__)

VIDEO_RATE = 25


@classify(ignored={
    "tolerance_seconds": "a check of each label line's duration (reported in report.json); the labels are the same",
    "max_mismatch_fraction": "a check: the step fails above it, the labels are the same",
    "chunk_frames": "how many frames one distance computation takes", "device": "where it runs",
    "report_splits": "which splits report.json describes (a report key); the labels are the same"})
@dataclass
class Config:
    tolerance_seconds: float = 0.1  # |label duration - video duration| allowed (dataset label_tolerance)
    max_mismatch_fraction: float = 0.01  # of a split's utterances beyond the tolerance before failing
    chunk_frames: int = 32768  # frames per distance computation (utterances are grouped up to this)
    device: str = "auto"  # nearest-centroid search: "auto" (the job's GPU when it has one), "cpu", "cuda"
    report_splits: Optional[List[str]] = None  # None = every featurized split


def split_names(ctx: StageContext) -> list:
    return list(ctx.cfg.features.splits)


class LabelsStage(Stage):
    name = "labels"
    depends_on = ("features", "kmeans")
    per_iteration = True
    reads = ("features.splits",)  # the splits that get labels (features of store=sample: the k-means split only)
    libraries = ("numpy", "torch", "fairseq|fairseq-fixed", "python-speech-features", "av")

    def validate(self, ctx: StageContext) -> None:
        c = ctx.cfg.labels
        if float(c.tolerance_seconds) < 0:
            raise ConfigError(f"labels.tolerance_seconds={c.tolerance_seconds}: must be >= 0")
        if int(c.chunk_frames) < 1:
            raise ConfigError(f"labels.chunk_frames={c.chunk_frames}: must be >= 1")
        if not (c.device in ("auto", "cpu") or str(c.device).startswith("cuda")):
            raise ConfigError(f"labels.device={c.device!r}: auto, cpu or cuda[:N]")

    def shards(self, ctx: StageContext) -> list[Shard]:
        return split_shards(ctx, split_names(ctx))

    def estimate(self, ctx: StageContext):
        previous = None  # features.keep=false: the previous iteration's features are deleted after these labels
        if not bool(ctx.cfg.features.keep) and ctx.iteration and ctx.iteration > 1:
            previous = features.estimate(ctx.with_iteration(ctx.iteration - 1))
        return estimates.labels(ctx, crop.STAGE.corpus_sizes.of(ctx), features.feature_cost(ctx, "labels"),
                                kmeans.n_clusters(ctx), resources_for(ctx.cfg, self.name), previous)

    def outputs(self, ctx: StageContext, shard: Shard) -> list[Path]:
        return [ctx.stage_dir(self.name) / f"{shard.key}.km"]

    def run(self, ctx: StageContext, shard: Shard) -> dict:
        centroids = load_centroids(model_path(ctx))
        km_path = self.outputs(ctx, shard)[0]
        chunk, device = int(ctx.cfg.labels.chunk_frames), str(ctx.cfg.labels.device)
        if store_mode(ctx) == "all":
            f = shard_files(ctx, shard.key, "all")
            if not f["npy"].is_file():
                raise FileNotFoundError(_missing_dump_message(ctx, f))
            return label_dump(centroids, f["npy"], f["len"], km_path, chunk, device)

        tsv = ctx.with_iteration(None).stage_dir("manifest") / f"{shard.params['split']}.tsv"
        return label_rows(make_featurizer(ctx), tsv, int(shard.params["rank"]), int(shard.params["nshard"]),
                          centroids, km_path, chunk, device, float(ctx.cfg.features.max_failure_fraction))

    def final_outputs(self, ctx: StageContext) -> list[Path]:
        d = ctx.stage_dir(self.name)
        return [d / f"{s}.km" for s in split_names(ctx)] + [d / "dict.km.txt", d / "report.json",
                                                            d / "cluster_usage.png"]

    def finalize(self, ctx: StageContext, shard_stats: dict) -> dict:
        out = ctx.stage_dir(self.name)
        k = len(load_centroids(model_path(ctx)))
        rate = label_rate(ctx.cfg, ctx.iteration)
        spec = iteration_spec(ctx.cfg, ctx.iteration)
        nshard = int(ctx.cfg.features.nshard)
        tol = float(ctx.cfg.labels.tolerance_seconds)
        report = {"iteration": ctx.iteration, "n_clusters": k, "label_rate": rate, "features": spec.features,
                  "layer": spec.layer, "splits": {}}
        usage = {}
        wanted = ctx.cfg.labels.get("report_splits")
        for split in split_names(ctx):
            _, rows = read_tsv(ctx.with_iteration(None).stage_dir("manifest") / f"{split}.tsv")
            shard_files = [out / f"{split}_{r}_{nshard}.km" for r in range(nshard)]
            lengths = np.array([expected_frames(spec.features, r.n_video_frames, r.n_audio_samples) for r in rows],
                               dtype=np.int64)
            wrd = ctx.with_iteration(None).stage_dir("manifest") / f"{split}.wrd"
            texts = wrd.read_text(encoding="utf-8").split("\n")[: len(rows)] if wrd.is_file() else None
            stats = merge_split(shard_files, out / f"{split}.km", rows, lengths, k, rate, tol, texts,
                                float(ctx.cfg.labels.max_mismatch_fraction))
            if wanted is None or split in wanted:
                usage[split] = stats.pop("counts")
                report["splits"][split] = stats
        atomic.write_text(out / "dict.km.txt", "".join(f"{i} 1\n" for i in range(k)))
        plot_usage(usage, out / "cluster_usage.png", f"iteration {ctx.iteration}: K={k}")
        atomic.write_json(out / "report.json", report)
        if not bool(ctx.cfg.features.keep) and ctx.iteration > 1:
            removed = remove_bulky(ctx.with_iteration(ctx.iteration - 1),
                                   f"features.keep=false: iteration {ctx.iteration}'s labels are complete")
            if removed:
                log.warning("features.keep=false: removed %d feature file(s) of iteration %d", len(removed),
                            ctx.iteration - 1)
            report["removed_previous_features"] = len(removed)
        return report


STAGE = LabelsStage()


def _missing_dump_message(ctx: StageContext, files: dict) -> str:
    if files["removed"].exists():
        return (f"{files['npy']} was deleted ({json.loads(files['removed'].read_text()).get('reason')}): "
                f"run `--stage features --iteration {ctx.iteration} --force` to make it again")
    return f"{files['npy']}: feature shard missing (run the features stage)"


# ---------------------------------------------------------------------------------------------
class LabelWriter:
    """Labels utterance by utterance into an open text file, one line each. Utterances are
    buffered into groups (consecutive ones while their frames add up to at most ``chunk_frames``;
    at least one) and each group is assigned with one ``assign`` call, so the grouping, and with
    it every floating-point operation, depends only on the utterance lengths."""

    def __init__(self, f, centroids: np.ndarray, chunk_frames: int, device: str = "cpu"):
        self.f, self.centroids, self.chunk, self.device = f, centroids, int(chunk_frames), device
        self.counts = np.zeros(len(centroids), dtype=np.int64)
        self.buffer: list = []
        self.buffered = 0
        self.utterances = self.frames = 0

    def add(self, feats: np.ndarray) -> None:
        if feats.ndim != 2 or (len(feats) and feats.shape[1] != self.centroids.shape[1]):
            raise ValueError(f"{feats.shape[-1]}-d features but {self.centroids.shape[1]}-d centroids "
                             "(features and kmeans of different iterations?)")
        if self.buffer and self.buffered + len(feats) > self.chunk:
            self.flush()
        self.buffer.append(feats)
        self.buffered += len(feats)

    def flush(self) -> None:
        if not self.buffer:
            return
        if self.buffered:
            x = self.buffer[0] if len(self.buffer) == 1 else np.concatenate(self.buffer)
            labels = assign(x, self.centroids, chunk=self.chunk, device=self.device)
            self.counts += np.bincount(labels, minlength=len(self.centroids))
        pos = 0
        for feats in self.buffer:
            n = len(feats)
            self.f.write(" ".join(map(str, labels[pos:pos + n].tolist())) + "\n" if n else "\n")
            pos += n
        self.utterances += len(self.buffer)
        self.frames += self.buffered
        self.buffer, self.buffered = [], 0

    def stats(self) -> dict:
        return {"utterances": self.utterances, "frames": self.frames, "clusters_used": int((self.counts > 0).sum())}


def label_dump(centroids: np.ndarray, npy_path, len_path, km_path, chunk_frames: int = 32768,
               device: str = "cpu") -> dict:
    """Label every utterance of a feature dump shard into ``km_path`` (atomic), reading it by
    row ranges of about ``chunk_frames`` frames."""
    t0 = time.time()
    device = _assign_device(device)
    with FeatureShard(npy_path, len_path) as shard, atomic.atomic_open(km_path, "w") as f:
        writer = LabelWriter(f, centroids, chunk_frames, device)
        for u, v, x in shard.iter_utterance_groups(chunk_frames):
            offsets = shard.offsets[u:v + 1] - shard.offsets[u]
            for j in range(v - u):
                writer.add(x[offsets[j]:offsets[j + 1]])
        writer.flush()
    seconds = time.time() - t0
    return {**writer.stats(), "source": "dump", "assign_device": device, "seconds": round(seconds, 2),
            "frames_per_second": round(writer.frames / max(seconds, 1e-9), 1)}


def label_rows(featurizer, tsv, rank: int, nshard: int, centroids: np.ndarray, km_path, chunk_frames: int = 32768,
               device: str = "cpu", max_failure_fraction: float = 0.01) -> dict:
    """Featurize the rows of shard ``rank`` of ``nshard`` of a manifest tsv with ``featurizer``
    (``stages.features.row_features``) and label them in the same pass into ``km_path`` (atomic);
    nothing else is written."""
    t0 = time.time()
    device = _assign_device(device)
    root, rows = read_tsv(tsv)
    a, b = shard_range(len(rows), rank, nshard)
    failures = Failures(Path(tsv), b - a, max_failure_fraction)
    empty = np.zeros((0, featurizer.dim), dtype=np.float32)
    with atomic.atomic_open(km_path, "w") as f:
        writer = LabelWriter(f, centroids, chunk_frames, device)
        for _, feats in row_features(featurizer, root, rows[a:b], failures.add, [Path(km_path).parent]):
            writer.add(empty if feats is None else feats)  # a failed utterance: an empty line
        writer.flush()
    seconds = time.time() - t0
    return {**writer.stats(), **featurizer.describe(), "source": "computed", "assign_device": device,
            "failures": failures.records, "seconds": round(seconds, 2),
            "frames_per_second": round(writer.frames / max(seconds, 1e-9), 1)}


def _assign_device(device: str) -> str:
    if device == "cpu":
        return "cpu"
    from avhubert.extract import resolve_device

    return resolve_device(device)


def merge_split(shard_files, merged_path, rows, lengths, k: int, label_rate: int, tolerance_seconds: float,
                texts: Optional[List[str]] = None, max_mismatch_fraction: float = 0.0) -> dict:
    """Concatenate a split's shard label files in order into ``merged_path`` while checking them
    against the tsv rows and the feature frames each row implies (``lengths``); returns the
    split's statistics (with ``counts``).

    An empty line is a failed utterance. A non-empty line whose label count differs from its
    feature frames, or labels outside 0..K-1, is an error. A duration off the video's by more than ``tolerance_seconds`` (the manifest allows a
    little A/V drift; the dataset drops such an utterance) is reported, and an error only for more
    than ``max_mismatch_fraction`` of the utterances."""
    counts = np.zeros(k, dtype=np.int64)
    n_lines = 0
    failed = []
    mismatched = []
    char_vocab: Dict[str, int] = {}
    joint: Dict[tuple, int] = {}
    with atomic.atomic_open(merged_path, "w") as out:
        for path in shard_files:
            with open(path, encoding="utf-8") as f:
                for line in f:
                    line = line.rstrip("\n")
                    i = n_lines
                    n_lines += 1
                    if i >= len(rows):
                        raise ValueError(f"{path}: more label lines than the {len(rows)} rows of the tsv")
                    labels = np.array(line.split(), dtype=np.int64)
                    row = rows[i]
                    if len(labels) and len(labels) != lengths[i]:  # empty: the utterance failed
                        raise ValueError(f"{path}: utterance {row.id} has {len(labels)} labels but "
                                         f"{lengths[i]} feature frames")
                    if len(labels) and (labels.min() < 0 or labels.max() >= k):
                        raise ValueError(f"{path}: utterance {row.id} has labels outside 0..{k - 1}")
                    if len(labels) == 0:
                        failed.append(row.id)
                    else:
                        gap = abs(len(labels) / label_rate - row.n_video_frames / VIDEO_RATE)
                        if gap > tolerance_seconds:
                            mismatched.append(
                                f"{path}: utterance {row.id}: {len(labels)} labels at {label_rate} Hz last "
                                f"{len(labels) / label_rate:.3f}s but the video lasts "
                                f"{row.n_video_frames / VIDEO_RATE:.3f}s (labels.tolerance_seconds={tolerance_seconds})")
                            log.warning("%s", mismatched[-1])
                        counts += np.bincount(labels, minlength=k)
                        if texts is not None and i < len(texts):
                            _add_char_alignment(labels, texts[i], char_vocab, joint)
                    out.write(line + "\n")
        # inside the block: a failed check leaves no merged file behind
        if n_lines != len(rows):
            raise ValueError(f"{merged_path}: {n_lines} label lines for {len(rows)} tsv rows")
        if len(mismatched) > max_mismatch_fraction * len(rows):
            raise ValueError(f"{len(mismatched)} of {len(rows)} utterances have label durations off their "
                             f"video's (labels.max_mismatch_fraction={max_mismatch_fraction}); first: {mismatched[0]}")
    stats = usage_stats(counts)
    stats.update({"utterances": len(rows), "failed_utterances": len(failed), "failed_ids": failed[:20],
                  "duration_mismatches": len(mismatched), "duration_mismatch_examples": mismatched[:5]})
    if texts is not None:
        stats["char_purity"] = purity_stats(joint, k, len(char_vocab))
    stats["counts"] = counts.tolist()
    return stats


def usage_stats(counts: np.ndarray) -> dict:
    total = int(counts.sum())
    p = counts[counts > 0] / max(total, 1)
    top10 = np.sort(counts)[::-1][:10].sum() / max(total, 1)
    return {"frames": total, "clusters_used": int((counts > 0).sum()), "n_clusters": int(len(counts)),
            "entropy_bits": float(-(p * np.log2(p)).sum()) if total else 0.0,
            "max_entropy_bits": float(math.log2(len(counts))), "top10_share": float(top10)}


def _add_char_alignment(labels: np.ndarray, text: str, vocab: Dict[str, int], joint: Dict[tuple, int]) -> None:
    # characters of the transcript (spaces as "|"), spread uniformly over the clip's label frames
    chars = ["|" if ch.isspace() else ch for ch in " ".join(text.split())]
    if not chars:
        return
    n = len(labels)
    char_of_frame = (np.arange(n) * len(chars)) // n
    ids = np.array([vocab.setdefault(ch, len(vocab)) for ch in chars])[char_of_frame]
    pairs, c = np.unique(np.stack([labels, ids], 1), axis=0, return_counts=True)
    for (lab, ch), m in zip(pairs.tolist(), c.tolist()):
        joint[(lab, ch)] = joint.get((lab, ch), 0) + m


def purity_stats(joint: Dict[tuple, int], k: int, n_chars: int) -> dict:
    if not joint:
        return {"frames": 0}
    m = np.zeros((k, n_chars), dtype=np.float64)
    for (lab, ch), c in joint.items():
        m[lab, ch] += c
    total = m.sum()
    p_joint = m / total
    p_lab = p_joint.sum(1, keepdims=True)
    nz = p_joint > 0
    h_char_given_label = float(-(p_joint[nz] * np.log2((p_joint / np.maximum(p_lab, 1e-300))[nz])).sum())
    p_char = p_joint.sum(0)
    h_char = float(-(p_char[p_char > 0] * np.log2(p_char[p_char > 0])).sum())
    return {"frames": int(total), "n_chars": int(n_chars), "cluster_purity": float(m.max(1).sum() / total),
            "char_purity": float(m.max(0).sum() / total), "majority_char_share": float(p_char.max()),
            "h_char_bits": h_char, "h_char_given_label_bits": h_char_given_label,
            "mutual_information_bits": h_char - h_char_given_label}


def plot_usage(usage: Dict[str, list], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # its font search floods a DEBUG log
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(usage) or 1, 1, figsize=(8, 2.6 * max(len(usage), 1)), squeeze=False)
    for ax, (split, counts) in zip(axes[:, 0], usage.items()):
        c = np.sort(np.asarray(counts))[::-1]
        total = max(int(c.sum()), 1)
        ax.bar(np.arange(len(c)), c / total, width=1.0)
        ax.set_ylabel("share of frames")
        ax.set_title(f"{split}: {int((c > 0).sum())}/{len(c)} clusters used", fontsize=9)
    axes[-1, 0].set_xlabel("cluster rank (most frequent first)")
    fig.suptitle(title)
    fig.tight_layout()
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
