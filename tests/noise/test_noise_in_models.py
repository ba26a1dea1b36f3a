"""Noise reaching the models: a smoke pretraining iteration with train.noise.prob=1.0 (its batches
differ from the clean ones in the audio only, and fairseq trained with the noise lists), the
finetune stage's decoding under noise (WER per modality, category and SNR in results.json), and
``infer --snr --noise`` (the SNR of what the model heard is the requested one)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from noise_helpers import copy_steps, launch, launch_here, noise_args, one_torch_thread


def _train_batch(work: Path, overrides) -> dict:
    """The first collated train batch of iteration 1 as the train stage configures fairseq."""
    from fairseq import tasks

    from avhubert.extract import ensure_plugin_registered
    from avhubert.train_entry import compose_config, rank_overrides
    from pipeline.config import load_config
    from pipeline.stage import StageContext
    from stages import config_sections
    from stages import train as train_stage

    cfg = load_config(config_sections(), "smoke", "debug", list(overrides), {"workdir": str(work)})
    ctx = StageContext(cfg=cfg, workdir=work, iteration=1)
    ensure_plugin_registered()
    base = train_stage.base_config_path(cfg, 1)
    fs = compose_config(str(base.parent), base.stem, train_stage.fairseq_overrides(ctx) + rank_overrides(0, 1, None, "cpu"))
    task = tasks.setup_task(fs.task)
    task.load_dataset("train")
    ds = task.dataset("train")
    np.random.seed(0)  # the video augmentation's draws: the same in both batches
    return ds.collater([ds[i] for i in range(4)]), fs


def test_pretraining_iteration_with_noise(noise_work, smoke_run, sample_corpus, noise_inputs, tmp_path):
    work = copy_steps(smoke_run, tmp_path / "work", "manifest", "iter1/labels")
    shutil.copytree(noise_work / "noise", work / "noise")
    shutil.copytree(noise_work / ".pipeline" / "state" / "once" / "noise", work / ".pipeline" / "state" / "once" / "noise")
    noisy = ["train.noise.prob=1.0", "train.noise.snr=(-5,5)", "train.noise.categories=[babble,music]"]

    clean_batch, _ = _train_batch(work, [])
    noisy_batch, fs = _train_batch(work, noisy)
    assert fs.task.noise_wav == str(work / "noise") and list(fs.task.noise_categories) == ["babble", "music"]
    clean, loud = clean_batch["net_input"]["source"], noisy_batch["net_input"]["source"]
    assert torch.equal(clean["video"], loud["video"])
    assert clean["audio"].shape == loud["audio"].shape
    per_item = (clean["audio"] - loud["audio"]).abs().mean(dim=(1, 2))
    assert bool((per_item > 0.05).all()), per_item  # every utterance got noise

    proc = launch(work, sample_corpus, "--stage", "train", "--iteration", "1", "train.max_update=1",
                  *noisy, *noise_args(noise_inputs))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from avhubert.checkpoint import load_checkpoint_to_cpu

    state = load_checkpoint_to_cpu(str(work / "iter1" / "train" / "checkpoints" / "checkpoint_final.pt"))
    task_cfg = state["cfg"]["task"]
    assert task_cfg["noise_prob"] == 1.0 and task_cfg["noise_snr"] == "(-5, 5)"
    assert task_cfg["noise_wav"] == str(work / "noise") and list(task_cfg["noise_categories"]) == ["babble", "music"]
    assert state["optimizer_history"][-1]["num_updates"] == 1


def test_decoding_under_noise_reports_wer_per_snr(noise_work, smoke_run, sample_corpus, noise_inputs, tmp_path):
    work = copy_steps(smoke_run, tmp_path / "work", "manifest")
    shutil.copytree(noise_work / "noise", work / "noise")
    shutil.copytree(noise_work / ".pipeline" / "state" / "once" / "noise", work / ".pipeline" / "state" / "once" / "noise")
    shutil.copytree(smoke_run / "finetune" / "checkpoints", work / "finetune" / "checkpoints")  # trained: decode only
    pretrained = smoke_run / "iter2" / "train" / "checkpoints" / "checkpoint_final.pt"
    # the smoke model rarely ends a sentence: short hypotheses keep the 17 decodings quick
    args = ["--stage", "finetune", f"finetune.pretrained_checkpoint={pretrained}", "finetune.beam=2",
            "finetune.max_len_a=0", "finetune.max_len_b=8", "finetune.noise.eval_snrs=[-5,0,5]",
            "finetune.noise.eval_modalities=[audio,av,video]", "finetune.noise.eval_categories=[babble,hum]",
            *noise_args(noise_inputs)]
    proc = launch_here(work, sample_corpus, *args)  # decoding only: in this process
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((work / "finetune" / "results.json").read_text())
    noise = results["noise"]
    assert noise["snrs"] == [-5.0, 0.0, 5.0] and noise["categories"] == {"test": ["babble", "hum"]}
    table = noise["wer"]["test"]
    assert sorted(table) == ["audio", "av", "video"]
    for modality in ("audio", "av"):
        assert table[modality]["clean"] is not None
        for category in ("babble", "hum"):
            assert sorted(table[modality][category]) == ["-5", "0", "5"]
            assert all(isinstance(w, float) for w in table[modality][category].values())
    assert list(table["video"]) == ["clean"]  # noise never reaches the video stream
    assert table["av"]["clean"] == results["splits"]["test"]["wer"]  # the fine-tuned streams, clean
    assert len(noise["conditions"]) == 2 * (1 + 2 * 3) + 1
    records = list((work / "finetune" / "noise_eval").glob("done-*.json"))  # the declared output
    assert len(records) == 1 and json.loads(records[0].read_text())["wer"] == noise["wer"]
    # each condition's hypotheses are kept, with what they were decoded from
    saved = json.loads((work / "finetune" / "noise_eval" / "test" / "audio" / "babble_-5.json").read_text())
    assert saved["key"]["snr"] == -5.0 and len(saved["scores"]["hypotheses"]) == results["splits"]["test"]["utterances"]

    # the same condition decoded again, here: the same noisy inputs (seeded per utterance), the
    # same words; a condition is not the clean input
    from avhubert.s2s_decode import Decoder

    decoder = Decoder(work / "finetune" / "checkpoints" / "checkpoint_final.pt", "av", beam=2, max_len_a=0,
                      max_len_b=8, data_dir=work / "manifest")
    condition = {"dir": work / "noise", "category": "babble", "snr": -5.0, "seed": 0}
    with one_torch_thread():
        assert decoder.score("test", "audio", condition)["hypotheses"] == saved["scores"]["hypotheses"]
    from avhubert.s2s_decode import set_inputs

    set_inputs(decoder.task, "audio", condition)
    decoder.task.load_dataset("test")
    noisy_input = decoder.task.dataset("test")[0]["audio_source"]
    set_inputs(decoder.task, "audio", None)
    decoder.task.load_dataset("test")
    assert float((decoder.task.dataset("test")[0]["audio_source"] - noisy_input).abs().mean()) > 0.1


def test_infer_with_noise_at_a_given_snr(smoke_run, sample_corpus, noise_inputs, tmp_path, capsys):
    from avhubert import features as feat
    from speechfeat.noise import load_mono_16k

    video = sample_corpus / "pexels_langer" / "05.mp4"
    checkpoint = smoke_run / "finetune" / "checkpoints" / "checkpoint_final.pt"
    noise_file = noise_inputs["musan"] / "noise" / "rumble.wav"  # 11.025 kHz: resampled for the mix
    from stages import infer

    keep = tmp_path / "crop"
    args = [str(video), "--checkpoint", str(checkpoint), "--modalities", "audio", "--beam", "2", "--max-len-a", "0",
            "--max-len-b", "8", "--snr", "0", "--noise", str(noise_file), "--keep-crop", str(keep)]
    with one_torch_thread():
        assert infer.main(args) == 0
    out = capsys.readouterr()
    assert out.out.count("\n") == 1 and not out.err, out  # one transcript line (the smoke model says little)
    clean, _ = feat.read_wav_int16(str(keep / "05.wav"))
    noisy, _ = feat.read_wav_int16(str(keep / "05.noisy.wav"))
    # the noise the model heard: the recording at 16 kHz read from the offset --noise-seed (0)
    # and the video's name fix; the mix regressed on speech and noise leaves only rounding, and
    # the two coefficients give the SNR
    from speechfeat.noise import seeded_unit

    rumble = load_mono_16k(noise_file)
    speech = clean.astype(np.float64)
    candidate = feat.fit_noise(rumble, len(speech), int(seeded_unit(0, "infer", video.name) * len(rumble)))
    (a, b), residual, *_ = np.linalg.lstsq(np.stack([speech, candidate], 1), noisy.astype(np.float64), rcond=None)
    assert np.sqrt(residual[0] / len(speech)) < 0.6
    snr = 20 * np.log10(a * np.sqrt(np.mean(speech ** 2)) / (b * np.sqrt(np.mean(candidate ** 2))))
    assert abs(snr) < 0.1

    assert infer.main(args[:-6] + ["--snr", "0"]) == 2
    assert "--snr and --noise go together" in capsys.readouterr().err
