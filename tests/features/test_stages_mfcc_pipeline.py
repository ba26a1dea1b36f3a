"""features (MFCC) -> kmeans -> labels on a tiny generated corpus, through the real Stage objects."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from feat_helpers import make_cfg, write_manifest

# faiss-cpu is an optional extra (pip install 'avhubert-pipeline[faiss]'); scripts/setup.sh installs it
needs_faiss = pytest.mark.skipif(importlib.util.find_spec("faiss") is None,
                                 reason="faiss is not installed (the optional extra avhubert-pipeline[faiss])")

SCHEDULE = [{"features": "mfcc", "layer": None, "n_clusters": 8}]


def _run_stage(stage, ctx):
    stats = {}
    for shard in stage.shards(ctx):
        stats[shard.key] = stage.run(ctx, shard)
        for p in stage.outputs(ctx, shard):
            assert p.is_file(), p
    return stats


def _ctx(work, **sections):
    from pipeline.stage import StageContext

    cfg = make_cfg(SCHEDULE, **sections)
    return StageContext(cfg=cfg, workdir=work, iteration=1)


@needs_faiss
def test_mfcc_kmeans_labels(audio_corpus):
    from speechfeat.mfcc import mfcc39, n_mfcc_frames
    from speechfeat.shards import open_shard, read_tsv
    from stages.features import STAGE as FEATURES
    from stages.kmeans import STAGE as KMEANS
    from stages.labels import STAGE as LABELS
    import soundfile as sf

    work, rows = audio_corpus
    ctx = _ctx(work, features={"nshard": 2, "store": "all"}, kmeans={"percent": -1, "backend": "faiss"})
    for st in (FEATURES, KMEANS, LABELS):
        st.validate(ctx)
    stats = _run_stage(FEATURES, ctx)
    assert sorted(stats) == ["train_0_2", "train_1_2", "valid_0_2", "valid_1_2"]
    # shards hold every utterance's MFCCs in tsv order with frame counts from the tsv
    root, trows = read_tsv(work / "manifest" / "train.tsv")
    feats = [open_shard(work / "iter1/features" / f"train_{r}_2.npy", work / "iter1/features" / f"train_{r}_2.len")
             for r in range(2)]
    lengths = np.concatenate([l for _, l in feats])
    assert lengths.tolist() == [n_mfcc_frames(r.n_audio_samples) for r in trows]
    allf = np.concatenate([np.asarray(f) for f, _ in feats])
    wav, _ = sf.read(str(root / trows[3].audio), dtype="int16")
    off = int(lengths[:3].sum())
    assert np.allclose(allf[off:off + lengths[3]], mfcc39(wav))

    kstats = _run_stage(KMEANS, ctx)
    assert kstats["all"]["frames"] == int(lengths.sum())  # percent -1 = every train frame
    _run_stage(LABELS, ctx)
    report = LABELS.finalize(ctx, {})
    out = work / "iter1/labels"
    for p in LABELS.final_outputs(ctx):
        assert p.is_file(), p
    km_lines = (out / "train.km").read_text().splitlines()
    assert len(km_lines) == len(trows)
    assert [len(l.split()) for l in km_lines] == lengths.tolist()
    assert (out / "dict.km.txt").read_text().splitlines() == [f"{i} 1" for i in range(8)]
    # labels = nearest centroid of each frame
    from speechfeat.kmeans import load_centroids
    c = load_centroids(work / "iter1/kmeans/kmeans.joblib")
    brute = ((allf[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)
    assert np.array_equal(np.array(" ".join(km_lines).split(), dtype=int), brute)
    rep = json.loads((out / "report.json").read_text())
    assert rep == json.loads(json.dumps(report, default=str))
    tr = rep["splits"]["train"]
    assert tr["frames"] == int(lengths.sum()) and 1 < tr["clusters_used"] <= 8
    assert 0 < tr["entropy_bits"] <= 3 and tr["top10_share"] == 1.0
    assert 0 < tr["char_purity"]["cluster_purity"] <= 1 and tr["char_purity"]["n_chars"] > 5
    assert (out / "cluster_usage.png").read_bytes()[:4] == b"\x89PNG"
    # deterministic: a rerun of the whole chain from the same features gives the same labels
    (work / "iter1/kmeans/kmeans.joblib").unlink()
    _run_stage(KMEANS, ctx)
    _run_stage(LABELS, ctx)
    LABELS.finalize(ctx, {})
    assert (out / "train.km").read_text().splitlines() == km_lines


def test_kmeans_sampling_percent_and_seed(audio_corpus):
    from speechfeat.kmeans import sample_frames
    from stages.features import STAGE as FEATURES

    work, _ = audio_corpus
    ctx = _ctx(work, features={"nshard": 1, "splits": ["train"], "store": "all"})
    _run_stage(FEATURES, ctx)
    shard = [(work / "iter1/features/train_0_1.npy", work / "iter1/features/train_0_1.len")]
    lengths = np.loadtxt(shard[0][1], dtype=int)
    full = sample_frames(shard, -1, 0)
    assert len(full) == lengths.sum()
    a, b, c = sample_frames(shard, 0.3, 1), sample_frames(shard, 0.3, 1), sample_frames(shard, 0.3, 2)
    assert np.array_equal(a, b)
    # ceil(0.3 x 7) = 3 whole utterances: the sample length is a sum of 3 utterance lengths
    sums = {int(lengths[list(s)].sum()) for s in __import__("itertools").combinations(range(7), 3)}
    assert len(a) in sums and len(c) in sums
    assert not (len(a) == len(c) and np.array_equal(a, c))


def _mixture_and_reference():
    """Four Gaussian clusters in 3-d and the sklearn backend's (reference settings) model of them."""
    from speechfeat import kmeans as km

    rng = np.random.default_rng(0)
    centres = rng.normal(scale=5, size=(4, 3))
    x = (centres[rng.integers(0, 4, 3000)] + rng.normal(size=(3000, 3))).astype(np.float32)
    return x, km.fit(x, 4, "sklearn", seed=0, params={"n_init": 3, "batch_size": 500})


def test_sklearn_backend_and_reference_defaults(tmp_path):
    from speechfeat import kmeans as km

    x, model = _mixture_and_reference()
    sk = model["sklearn_model"]
    assert (sk.init, sk.max_iter, sk.tol, sk.max_no_improvement, sk.reassignment_ratio) == ("k-means++", 100, 0.0, 100, 0.0)
    assert km.SKLEARN_DEFAULTS["n_init"] == 20 and km.SKLEARN_DEFAULTS["batch_size"] == 10000
    km.save_model(tmp_path / "m.joblib", model)
    import joblib
    joblib.dump(sk, tmp_path / "bare.joblib")  # a reference-made model loads too
    for p in ("m.joblib", "bare.joblib"):
        assert np.allclose(km.load_centroids(tmp_path / p), sk.cluster_centers_)
    assert np.array_equal(km.assign(x, model["centroids"], chunk=700), sk.predict(x))


def test_labels_check_rejects_wrong_lengths(audio_corpus):
    from stages.features import STAGE as FEATURES
    from stages.kmeans import STAGE as KMEANS
    from stages.labels import STAGE as LABELS

    work, rows = audio_corpus
    ctx = _ctx(work, features={"splits": ["train"]}, kmeans={"percent": -1})
    _run_stage(FEATURES, ctx)
    _run_stage(KMEANS, ctx)
    _run_stage(LABELS, ctx)
    # a manifest claiming a much longer video than the features/labels cover must be refused
    bad = list(rows["train"])
    bad[2] = bad[2][:3] + (bad[2][3] + 10, bad[2][4])
    write_manifest(work / "manifest", "train", work.parent / "crop", bad)
    with pytest.raises(ValueError, match="u2.*video lasts"):
        LABELS.finalize(ctx, {})
    assert not (work / "iter1/labels/train.km").exists()


def test_broken_wav_is_a_failure_record_not_a_crash(audio_corpus):
    from stages.features import STAGE as FEATURES

    work, rows = audio_corpus
    (work.parent / "crop/audio/u1.wav").write_bytes(b"not a wav")
    ctx = _ctx(work, features={"splits": ["train"], "max_failure_fraction": 0.2, "store": "all"})
    stats = _run_stage(FEATURES, ctx)["train_0_1"]
    assert [f["id"] for f in stats["failures"]] == ["u1"]
    assert np.loadtxt(work / "iter1/features/train_0_1.len", dtype=int)[1] == 0
    ctx = _ctx(work, features={"splits": ["train"], "max_failure_fraction": 0.0, "store": "all"})
    with pytest.raises(RuntimeError, match="u1"):
        _run_stage(FEATURES, ctx)


def test_a_little_av_drift_is_reported_not_fatal(audio_corpus):
    from stages.features import STAGE as FEATURES
    from stages.kmeans import STAGE as KMEANS
    from stages.labels import STAGE as LABELS

    work, rows = audio_corpus
    ctx = _ctx(work, features={"splits": ["train"]}, kmeans={"percent": -1},
               labels={"max_mismatch_fraction": 0.2})
    for st in (FEATURES, KMEANS, LABELS):
        _run_stage(st, ctx)
    bad = list(rows["train"])
    bad[2] = bad[2][:3] + (bad[2][3] + 10, bad[2][4])
    write_manifest(work / "manifest", "train", work.parent / "crop", bad)
    report = LABELS.finalize(ctx, {})
    assert report["splits"]["train"]["duration_mismatches"] == 1
    assert "u2" in report["splits"]["train"]["duration_mismatch_examples"][0]
    assert len((work / "iter1/labels/train.km").read_text().splitlines()) == 7


def test_kmeans_plusplus_seeds_as_well_as_sklearns():
    """Our k-means++ (the faiss and torch backends' seeding) picks distinct rows of the data, is
    deterministic for a seed, and seeds as well as sklearn's on a 40-cluster mixture (mean seeding
    inertia over 5 seeds within 5%; uniform random seeding is far worse, so the check can fail)."""
    from sklearn.cluster import kmeans_plusplus as sk_kpp

    from speechfeat import kmeans as km

    rng = np.random.default_rng(3)
    centres = rng.normal(scale=4, size=(40, 16))
    x = (centres[rng.integers(0, 40, 8000)] + rng.normal(size=(8000, 16))).astype(np.float32)
    ours, theirs, rand = [], [], []
    for seed in range(5):
        c = km.kmeans_plusplus(x, 40, np.random.default_rng(seed))
        rows = {tuple(r) for r in x}
        assert len({tuple(r) for r in c}) == 40 and all(tuple(r) in rows for r in c)
        ours.append(km.assign(x, c, return_inertia=True)[1])
        theirs.append(km.assign(x, sk_kpp(x, 40, random_state=seed)[0], return_inertia=True)[1])
        rand.append(km.assign(x, x[np.random.default_rng(seed).choice(len(x), 40, replace=False)],
                              return_inertia=True)[1])
    np.testing.assert_array_equal(km.kmeans_plusplus(x, 40, np.random.default_rng(0)),
                                  km.kmeans_plusplus(x, 40, np.random.default_rng(0)))
    assert np.mean(ours) <= 1.05 * np.mean(theirs), (np.mean(ours), np.mean(theirs))
    assert np.mean(rand) > 1.2 * np.mean(theirs)


@pytest.mark.parametrize("backend", ["numpy", pytest.param("faiss", marks=needs_faiss), "torch"])
def test_fast_backends_reach_the_reference_inertia(backend):
    from speechfeat import kmeans as km

    x, model = _mixture_and_reference()
    fast = km.fit(x, 4, backend, seed=0)
    assert fast["centroids"].shape == (4, 3) and fast["backend"] == backend
    assert fast["inertia"] <= model["inertia"] * 1.01, backend


def test_without_faiss_the_faiss_backend_is_one_error_line_naming_the_extra(tmp_path, monkeypatch):
    """faiss is an optional extra: where it is not importable, asking for its backend is refused
    before anything runs (the plan's validation: one ``error:`` line), and ``fit`` says the same."""
    from speechfeat import kmeans as km

    monkeypatch.setitem(sys.modules, "faiss", None)  # what an install without the extra sees: no faiss
    assert km.backend_problem("faiss") == km.FAISS_MISSING and "avhubert-pipeline[faiss]" in km.FAISS_MISSING
    assert km.backend_problem("numpy") is None
    with pytest.raises(ValueError, match=r"avhubert-pipeline\[faiss\]"):
        km.fit(np.zeros((8, 2), np.float32), 2, "faiss")
    code = ("import sys; sys.modules['faiss'] = None\n"
            "import launch; sys.exit(launch.main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, "--dry-run", "--workdir", str(tmp_path / "work"),
                           "kmeans.backend=faiss"], capture_output=True, text=True, timeout=120,
                          cwd=str(Path(km.__file__).resolve().parents[1]))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip() == f"error: {km.FAISS_MISSING}", proc.stderr
    assert not (tmp_path / "work").exists()
