"""units_kmeans: the k-means model of the units stage when it is trained here
(``units.n_clusters=K``): one job, layer features of a seeded sample of ``units.kmeans_split``
(``sample_rows``), k-means with the ``kmeans.*`` backend settings, saved with the settings it was
trained with (``units.kmeans_settings``). Settings: the ``units`` section (``stages/units.py``).
"""
from __future__ import annotations

import math
import time

import numpy as np

from pipeline.errors import ConfigError
from pipeline.stage import Shard, Stage, StageContext
from speechfeat import kmeans as km
from speechfeat.shards import read_tsv
from stages.features import layer_features_of_rows
from stages.kmeans import backend_params
from stages.units import (KMEANS_MODEL, Resolved, check_trained_kmeans, fingerprint_settings, is_enabled,
                          kmeans_settings, pretraining_dependencies, resolve, shown_place, units_dir, validate_units)

Config = None  # no section of its own: units.* and the kmeans.* backend settings


class UnitsKmeansStage(Stage):
    """k-means of the units stage (only with ``units.n_clusters``): one job."""

    name = "units_kmeans"
    depends_on = ("manifest", "train")
    after_iterations = True
    config_section = "units"
    libraries = ("numpy", "torch", "fairseq|fairseq-fixed", "scikit-learn", "faiss-cpu|faiss-gpu|faiss")

    def settings(self, ctx: StageContext) -> dict:
        return fingerprint_settings(ctx, resolve(ctx), kmeans_only=True)

    def provenance_dirs(self, ctx: StageContext) -> list:
        return [units_dir(ctx)]

    def output_place(self, ctx: StageContext) -> str:
        return shown_place(units_dir(ctx), ctx.workdir)

    def dependencies(self, ctx: StageContext):
        return ["manifest"] + pretraining_dependencies(ctx, resolve(ctx))

    def enabled(self, ctx: StageContext) -> bool:
        return is_enabled(ctx) and ctx.cfg.units.get("n_clusters") is not None

    def validate(self, ctx: StageContext) -> None:
        r = validate_units(ctx)
        if r.kmeans_source != "trained":
            raise ConfigError("units_kmeans trains the units' k-means only with units.n_clusters=K "
                              f"(the units' k-means is {r.kmeans_source}: {r.kmeans_path})")

    def prepare(self, ctx: StageContext, commit: bool) -> list:
        r = resolve(ctx)
        if r.kmeans_path.is_file() and not ctx.force:  # a complete step would otherwise keep it
            check_trained_kmeans(ctx, r)
        return []

    def shards(self, ctx: StageContext) -> list:
        return [Shard(0, 1, "kmeans")]

    def outputs(self, ctx: StageContext, shard: Shard) -> list:
        return [units_dir(ctx) / KMEANS_MODEL]

    def run(self, ctx: StageContext, shard: Shard) -> dict:
        return train_kmeans(ctx, resolve(ctx))


def sample_rows(rows, percent: float, max_frames: int, seed: int) -> list:
    """Indices (tsv order) of a seeded draw of utterances: ceil(percent x n) of them in a random
    order (all for -1), cut where their frames would pass ``max_frames`` (at least one)."""
    rng = np.random.default_rng(int(seed))
    order = rng.permutation(len(rows))
    if not (percent == -1 or percent >= 1):
        order = order[: int(math.ceil(len(rows) * percent))]
    chosen, total = [], 0
    for i in order.tolist():
        if chosen and total + rows[i].n_video_frames > max_frames:
            break
        chosen.append(i)
        total += rows[i].n_video_frames
    return sorted(chosen)


def train_kmeans(ctx: StageContext, r: Resolved) -> dict:
    """The units_kmeans shard: features of a sample of the split, k-means with K clusters."""
    import torch

    from avhubert.extract import auto_batch_frames, load_layer_model, model_dim

    c = ctx.cfg.units
    t0 = time.time()
    if int(c.torch_threads) > 0:
        torch.set_num_threads(int(c.torch_threads))
    model, task_cfg, device, layer = load_layer_model(r.checkpoint, r.layer, str(c.device))
    root, rows = read_tsv(ctx.with_iteration(None).stage_dir("manifest") / f"{c.kmeans_split}.tsv")
    chosen = [rows[i] for i in sample_rows(rows, float(c.kmeans_percent), int(c.kmeans_max_frames), int(c.kmeans_seed))]
    x = np.empty((sum(row.n_video_frames for row in chosen), model_dim(model)), dtype=np.float32)
    failures: list = []
    pos = 0
    for row, feats in layer_features_of_rows(model, task_cfg, root, chosen, layer, r.modality, int(c.max_frames),
                                             int(c.batch_frames) or auto_batch_frames(device),
                                             lambda i, why: failures.append({"id": i, "reason": why}),
                                             [r.out_dir]):
        if feats is not None:
            x[pos:pos + len(feats)] = feats
            pos += len(feats)
    if len(failures) > float(c.max_failure_fraction) * len(chosen):
        raise RuntimeError(f"units_kmeans: {len(failures)} of the {len(chosen)} sampled utterances failed; first: "
                           f"{failures[0]['id']}: {failures[0]['reason']}")
    extract_seconds = time.time() - t0
    model_dict = km.fit(x[:pos], int(r.n_clusters), str(ctx.cfg.kmeans.backend), int(c.kmeans_seed),
                        backend_params(ctx.cfg.kmeans))
    train_seconds = model_dict.pop("train_seconds")  # timings go to the stats, not into the file
    model_dict.update({"units_settings": kmeans_settings(ctx, r), "layer": layer})
    km.save_model(r.out_dir / KMEANS_MODEL, model_dict)
    return {"layer": layer, "utterances": len(chosen), "frames": pos, "failures": failures,
            "n_clusters": int(r.n_clusters), "inertia": model_dict["inertia"], "device": device,
            "extract_seconds": round(extract_seconds, 2), "train_seconds": round(train_seconds, 2)}


STAGE = UnitsKmeansStage()
