"""launch.py export: a run's model as safetensors + JSON + k-means + MODEL_CARD.md, loaded back
(avhubert.load, launch.py units / infer) feature for feature, transcript for transcript."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT.parent / "shared" / "golden"


def _export(workdir: Path, out: Path, *extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "launch.py"), "export", str(workdir), "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)


@pytest.mark.skipif(not (GOLDEN / "ref_tiny_pretrain.pt").is_file(), reason=f"golden data not found at {GOLDEN}")
def test_reference_checkpoint_exports_to_the_same_features(tmp_path):
    """A reference-format checkpoint (the layout of Meta's published ones) exported and loaded
    back without fairseq's pickle gives the reference code's features."""
    import avhubert
    from avhubert import export
    from avhubert.checkpoint import load_checkpoint_to_cpu
    from avhubert.extract import ensure_plugin_registered

    ensure_plugin_registered()
    state = load_checkpoint_to_cpu(str(GOLDEN / "ref_tiny_pretrain.pt"))
    export.export_encoder(state, "ref_tiny_pretrain.pt", tmp_path / "exp")
    config = json.loads((tmp_path / "exp" / "encoder.json").read_text())
    assert config["layers"] == 2 and config["dim"] == 64 and config["task"]["image_crop_size"] == 88
    model = avhubert.load(tmp_path / "exp", device="cpu")
    ref = np.load(GOLDEN / "ref_tiny_features.npz")
    feats = model.extract(audio=ref["wav"], layer=2)
    assert np.abs(feats - ref["feat_audio_layer2"]).max() < 1e-4
    feats = model.extract(video=ref["roi_gray"][:30], audio=ref["wav"][:30 * 640], layer=1)
    direct = avhubert.load(GOLDEN / "ref_tiny_pretrain.pt", device="cpu").extract(
        video=ref["roi_gray"][:30], audio=ref["wav"][:30 * 640], layer=1)
    np.testing.assert_array_equal(feats, direct)


def test_export_of_a_run(smoke_run, tmp_path, sample_corpus):
    import avhubert
    from avhubert.api import kmeans_centroids

    proc = _export(smoke_run, tmp_path / "exp")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "fine-tuned model" in proc.stdout and "MODEL_CARD.md" in proc.stdout
    exp = tmp_path / "exp"
    for name in ("encoder.safetensors", "encoder.json", "seq2seq.safetensors", "seq2seq.json", "dict.wrd.txt",
                 "spm.model", "MODEL_CARD.md", "provenance.json", "iterations/iter1/kmeans.npy",
                 "iterations/iter1/dict.km.txt", "iterations/iter2/kmeans.npy"):
        assert (exp / name).is_file(), name
    # nothing in it points at this machine, nothing in it is a pickle
    for p in exp.rglob("*.json"):
        assert str(smoke_run) not in p.read_text() and str(Path.home()) not in p.read_text(), p
    prov = json.loads((exp / "provenance.json").read_text())
    assert [r["iteration"] for r in prov["iterations"]] == [1, 2]
    assert prov["iterations"][0]["features"] == "mfcc" and prov["iterations"][1]["layer"] == 1
    assert all(r["n_clusters"] == 20 and r["updates"] > 0 for r in prov["iterations"])
    assert prov["sources"]["encoder.safetensors"]["from"] == "iter2/train/checkpoints/checkpoint_final.pt"
    card = (exp / "MODEL_CARD.md").read_text()
    assert "| 2 | layer | 1 | 20 |" in card and "| test |" in card and "non-commercial research" in card
    assert f"settings digest `{prov['settings_digest']}`" in card

    # the encoder: the same features as the checkpoint it came from; the same units as the run's k-means
    ckpt = smoke_run / "iter2" / "train" / "checkpoints" / "checkpoint_final.pt"
    video = sorted(smoke_run.glob("crop/video/**/*.mp4"))[0]
    from avprep import media

    roi = media.read_gray_video(video)
    a, b = avhubert.load(exp, device="cpu"), avhubert.load(ckpt, device="cpu")
    np.testing.assert_array_equal(a.extract(video=roi, layer=1), b.extract(video=roi, layer=1))
    np.testing.assert_array_equal(np.load(exp / "iterations/iter2/kmeans.npy"),
                                  kmeans_centroids(smoke_run / "iter2" / "kmeans" / "kmeans.joblib"))
    np.testing.assert_array_equal(a.units(video=roi, layer=1, kmeans=np.load(exp / "iterations/iter2/kmeans.npy")),
                                  b.units(video=roi, layer=1, kmeans=smoke_run / "iter2" / "kmeans" / "kmeans.joblib"))

    # the fine-tuned model: launch.py infer gives the same transcript from the export as from the checkpoint
    clip = sorted(sample_corpus.glob("*/*.mp4"))[0]
    # the model the finetune stage kept (the averaged one when it decoded valid better): the export's
    ft = smoke_run / "finetune" / "checkpoints" / Path(json.loads(
        (smoke_run / "finetune" / "results.json").read_text())["checkpoint"]).name
    said = []
    for checkpoint in (ft, exp):
        p = subprocess.run([sys.executable, str(ROOT / "launch.py"), "infer", str(clip), "--checkpoint", str(checkpoint),
                            "--beam", "2"], capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert p.returncode == 0, p.stdout + p.stderr
        said.append(p.stdout.strip().splitlines()[-1])
    assert said[0] == said[1]

    # the smoke preset tunes decoding on valid and averages: results.json, the report and the card show it
    results = json.loads((smoke_run / "finetune" / "results.json").read_text())
    assert len(results["decode_grid"]) == 2 and results["averaging"]["kept"] in ("final", "averaged")
    page = (smoke_run / "report" / "index.html").read_text()
    assert "Decoding tuned on valid" in page and "chosen: test decoded with it" in page
    assert "checkpoint averaging: the last 2 asked" in page and "the lowest valid WER of 2 settings" in card
    assert (exp / "decoding.json").is_file()

    # the same run exports to the same bytes; a non-empty target is refused
    again = _export(smoke_run, tmp_path / "again")
    assert again.returncode == 0, again.stderr
    for p in exp.rglob("*"):
        if p.is_file():
            assert p.read_bytes() == (tmp_path / "again" / p.relative_to(exp)).read_bytes(), p
    refused = _export(smoke_run, exp)
    assert refused.returncode == 1 and "not empty" in refused.stderr


def test_export_refuses_a_run_without_a_finished_iteration(tmp_path):
    work = tmp_path / "work"
    (work / ".pipeline").mkdir(parents=True)
    (work / ".pipeline" / "config.yaml").write_text("iterations: 1\n")
    proc = _export(work, tmp_path / "exp")
    assert proc.returncode == 1 and "no pretraining iteration has finished" in proc.stderr
