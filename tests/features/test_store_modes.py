"""features.store=sample (no feature dump: the labels stage featurizes and assigns in one pass)
against features.store=all (the reference's dump), on the sample corpus through a finished smoke
run's manifest and iteration-1 checkpoint: the same labels for float32; for float16 storage, the
rounding and nothing more (labels against fixed centroids move only within the rounding's margin);
and features.keep=false."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from feat_helpers import make_cfg

SCHEDULE = [{"features": "mfcc", "layer": None, "n_clusters": 12},
            {"features": "layer", "layer": 1, "n_clusters": 12}]


def _chain(smoke_run, work, iteration, kmeans_from=None, **features):
    """features -> kmeans -> labels of one iteration, in this process, through the Stage objects;
    with ``kmeans_from`` (a work dir), that run's k-means model instead of training one."""
    from pipeline.stage import StageContext
    from stages.features import STAGE as FEATURES
    from stages.kmeans import STAGE as KMEANS
    from stages.labels import STAGE as LABELS

    if not (work / "manifest").exists():
        shutil.copytree(smoke_run / "manifest", work / "manifest")
        (work / "crop").symlink_to(smoke_run / "crop")  # the tsv root is ../crop, relative to the tsv
    ckpt = smoke_run / "iter1" / "train" / "checkpoints" / "checkpoint_final.pt"
    cfg = make_cfg(SCHEDULE, features={"nshard": 2, "device": "cpu", "torch_threads": 2,
                                       "checkpoint": str(ckpt) if iteration == 2 else None, **features},
                   kmeans={"percent": 0.5, "seed": 3})
    ctx = StageContext(cfg=cfg, workdir=work, iteration=iteration)
    stats = {}
    if kmeans_from is not None:
        shutil.copytree(kmeans_from / f"iter{iteration}" / "kmeans", ctx.stage_dir("kmeans"), dirs_exist_ok=True)
    for stage in (FEATURES, LABELS) if kmeans_from is not None else (FEATURES, KMEANS, LABELS):
        stage.validate(ctx)
        stats[stage.name] = {s.key: stage.run(ctx, s) for s in stage.shards(ctx)}
    LABELS.finalize(ctx, stats["labels"])
    labels = {split: (work / f"iter{iteration}/labels/{split}.km").read_text().splitlines()
              for split in ("train", "valid")}
    return labels, stats


def test_sample_and_dump_modes_give_the_same_labels(smoke_run, tmp_path):
    """Iterations 1 (MFCC) and 2 (layer 1 of the smoke run's iteration-1 model) in both modes;
    the sample-mode run also deletes iteration 1's features once iteration 2's labels exist."""
    for iteration in (1, 2):
        sample, s_stats = _chain(smoke_run, tmp_path / "sample", iteration, store="sample", keep=False)
        dump, d_stats = _chain(smoke_run, tmp_path / "dump", iteration, store="all")
        assert sample == dump, iteration
        assert sum(len(l.split()) for l in sample["train"]) > 500 and any(l for l in sample["valid"])
        # k-means saw the same utterances either way; labels computed features or read the dump
        assert s_stats["kmeans"]["all"]["sample_frames"] == d_stats["kmeans"]["all"]["sample_frames"]
        assert all(s["source"] == "computed" for s in s_stats["labels"].values())
        assert all(s["source"] == "dump" for s in d_stats["labels"].values())
        # the sample mode wrote only the sampled train utterances: ceil(50 %) of each shard's
        dump_bytes = sum(p.stat().st_size for p in (tmp_path / "dump" / f"iter{iteration}/features").glob("*.npy"))
        sample_npy = list((tmp_path / "sample" / f"iter{iteration}/features").glob("*.npy"))
        assert sorted(p.name for p in sample_npy) == [f"train_{r}_2.sample.npy" for r in range(2)]
        assert sum(p.stat().st_size for p in sample_npy) < 0.7 * dump_bytes
    _float16_storage_moves_labels_only_within_its_rounding(smoke_run, tmp_path)
    # features.keep=false: iteration 1's matrices are gone, a note says why, the step stays complete
    from pipeline.stage import StageContext
    from stages.features import STAGE as FEATURES
    from stages.kmeans import STAGE as KMEANS

    feat1 = tmp_path / "sample" / "iter1" / "features"
    assert sorted(p.name for p in feat1.iterdir()) == sorted(
        f"train_{r}_2.sample.{ext}" for r in range(2) for ext in ("len", "rows", "removed.json"))
    ctx1 = StageContext(cfg=make_cfg(SCHEDULE, features={"nshard": 2}, kmeans={"percent": 0.5, "seed": 3}),
                        workdir=tmp_path / "sample", iteration=1)
    assert all(p.exists() for s in FEATURES.shards(ctx1) for p in FEATURES.outputs(ctx1, s))
    with pytest.raises(FileNotFoundError, match="features.keep=false"):
        KMEANS.run(ctx1, KMEANS.shards(ctx1)[0])


def _float16_storage_moves_labels_only_within_its_rounding(smoke_run, tmp_path):
    """What float16 storage guarantees: the stored features are the float32 ones rounded to the
    nearest float16, and labelled against the same (fixed) centroids, a frame changes label only
    where the rounding can move it across a boundary (tests/nearest_margin.py derives the margin).
    A k-means retrained on rounded features is another matter: on another CPU its centroids, and
    so any share of labels, may differ (2.4 % of the labels on one machine, 0 on another)."""
    from nearest_margin import F16_MAX, float16_rounding_bound, unexplained_label_changes
    from speechfeat.kmeans import load_centroids

    dump = tmp_path / "dump"
    _, stats = _chain(smoke_run, tmp_path / "f16", 2, kmeans_from=dump, store="all", dtype="float16")
    assert all(s["dtype"] == "float16" for s in stats["features"].values())
    centroids = load_centroids(dump / "iter2/kmeans/kmeans.joblib")
    frames = changed = 0
    for key in stats["labels"]:
        x = np.load(dump / f"iter2/features/{key}.npy")
        y = np.load(tmp_path / f"f16/iter2/features/{key}.npy")
        assert x.dtype == np.float32 and y.dtype == np.float16 and np.abs(x).max() < F16_MAX
        assert np.array_equal(y, x.astype(np.float16)), key  # the rounding, and nothing else
        e = np.linalg.norm(y.astype(np.float64) - x, axis=1)
        assert (e <= float16_rounding_bound(x)).all(), key
        a, b = (np.array((w / f"iter2/labels/{key}.km").read_text().split(), dtype=np.int64)
                for w in (dump, tmp_path / "f16"))
        assert len(a) == len(b) == len(x), key
        bad = unexplained_label_changes(x, centroids, a, b, float16_rounding_bound(x))
        assert not len(bad), f"{key}: frames {bad[:10].tolist()} changed label beyond float16's rounding"
        frames, changed = frames + len(a), changed + int((a != b).sum())
    assert frames > 500
    print(f"float16 vs float32 storage, fixed centroids: {changed} of {frames} labels differ (all within the rounding)")
