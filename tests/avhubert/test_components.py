"""Dataset, inputs, masking, model and criterion on generated clips (no training)."""
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch

from avhubert import features as feat


def _task(corpus: Path, label_rate=25, **over):
    from omegaconf import OmegaConf

    from avhubert.task import AVHubertPretrainingConfig, AVHubertPretrainingTask

    cfg = OmegaConf.structured(AVHubertPretrainingConfig)
    base = dict(data=str(corpus), label_dir=str(corpus), labels=["km"], label_rate=label_rate, sample_rate=25,
                normalize=True, stack_order_audio=4, pad_audio=True, random_crop=False,
                max_sample_size=500, min_sample_size=5, max_trim_sample_size=500, image_aug=False)
    base.update(over)
    for k, v in base.items():
        cfg[k] = v
    return AVHubertPretrainingTask(cfg)


def _tiny_model(task, **over):
    from omegaconf import OmegaConf

    from avhubert.model import AVHubertConfig, AVHubertModel

    cfg = OmegaConf.structured(AVHubertConfig)
    vals = dict(label_rate=task.cfg.label_rate, encoder_layers=2, encoder_embed_dim=32, encoder_ffn_embed_dim=64,
                encoder_attention_heads=4, final_dim=16, conv_pos=8, conv_pos_groups=4, resnet_layers=[1, 0, 0, 0],
                audio_feat_dim=104, untie_final_proj=True, layer_norm_first=True, masking_type="feature",
                mask_prob_audio=0.5, mask_prob_image=0.5, mask_length_audio=5, mask_length_image=5,
                feature_grad_mult=0.1)
    vals.update(over)
    for k, v in vals.items():
        cfg[k] = v
    return AVHubertModel(cfg, task.cfg, task.dictionaries)


def test_dataset_items_and_padded_batch(av_corpus_25hz):
    task = _task(av_corpus_25hz)
    task.load_dataset("valid")
    ds = task.dataset("valid")
    assert len(ds) == 2
    item = ds[0]
    n = int(ds.sizes[0])
    assert item["video_source"].shape == (n, 88, 88, 1)
    assert item["audio_source"].shape == (n, 104)
    a = item["audio_source"]
    assert torch.allclose(a.mean(-1), torch.zeros(n), atol=1e-4)  # layer-normed per frame
    # eval path = centre crop of the decoded frames, normalised
    frames = feat.read_video_gray(str(av_corpus_25hz / "video" / "valid00.mp4"))
    expect = feat.image_transform(frames, 88, 0.421, 0.165)
    assert np.abs(item["video_source"][..., 0].numpy() - expect).max() < 1e-6

    batch = ds.collater([ds[0], ds[1]])
    sizes = [int(s) for s in ds.sizes]
    T = max(sizes)
    assert batch["net_input"]["source"]["video"].shape == (2, 1, T, 88, 88)
    assert batch["net_input"]["source"]["audio"].shape == (2, 104, T)
    pad = batch["net_input"]["padding_mask"]
    assert pad.sum(1).tolist() == [T - s for s in sizes]
    assert batch["target_list"][0].shape == (2, T)
    short = int(np.argmin(sizes))
    assert (batch["target_list"][0][short, sizes[short]:] == task.dictionaries[0].pad()).all()


def test_crop_keeps_modalities_and_labels_aligned(av_corpus_100hz):
    task = _task(av_corpus_100hz, label_rate=100, pad_audio=False, random_crop=True, max_trim_sample_size=20)
    task.load_dataset("train")
    ds = task.dataset("train")
    samples = [ds[i] for i in range(3)]
    np.random.seed(3)
    batch = ds.collater(samples)
    video, audio = batch["net_input"]["source"]["video"], batch["net_input"]["source"]["audio"]
    assert video.shape[2] == audio.shape[2] == 20
    assert not batch["net_input"]["padding_mask"].any()
    labels = batch["target_list"][0]
    assert labels.shape == (3, 80)  # 4 labels per frame at 100 Hz
    for i, s in enumerate(samples):
        # find the crop start from the video and check audio and labels were cut at the same frame
        full_v = s["video_source"][..., 0]
        starts = [t for t in range(len(full_v) - 19) if torch.equal(full_v[t:t + 20], video[i, 0])]
        assert len(starts) == 1
        t0 = starts[0]
        assert torch.equal(s["audio_source"][t0:t0 + 20].T, audio[i])
        assert torch.equal(s["label_list"][0][4 * t0:4 * t0 + 80], labels[i])


def test_random_crops_are_a_function_of_seed_epoch_and_utterance(av_corpus_100hz):
    """fairseq's epoch iterator reseeds and restores the global numpy RNG on the main thread while
    its prefetch thread collates: crops drawn from it depended on thread timing (two same-seed
    runs trained apart at the first update of epoch 2). Each item's crop now comes from its own
    generator: the global RNG's state changes nothing, the epoch and the seed do."""
    task = _task(av_corpus_100hz, label_rate=100, pad_audio=False, random_crop=True, max_trim_sample_size=20)
    task.load_dataset("train")
    ds = task.dataset("train")
    samples = [ds[i] for i in range(3)]

    def crop():
        return ds.collater(samples)["net_input"]["source"]["video"]

    np.random.seed(1)
    first = crop()
    np.random.seed(2)
    assert torch.equal(crop(), first)
    picks = {ds.augment_rng("crop", s["fid"]).randint(1000) for s in samples}
    ds.set_epoch(2)
    assert {ds.augment_rng("crop", s["fid"]).randint(1000) for s in samples} != picks
    ds.set_epoch(1)
    ds.augment_seed += 1
    assert {ds.augment_rng("crop", s["fid"]).randint(1000) for s in samples} != picks


def test_label_alignment_filter_and_clear_errors(av_corpus_25hz, tmp_path):
    import shutil

    corpus = tmp_path / "c"
    shutil.copytree(av_corpus_25hz, corpus)
    lines = (corpus / "valid.km").read_text().splitlines()
    lines[1] = " ".join(lines[1].split()[:-10])  # 0.4 s short: beyond the 0.1 s tolerance
    (corpus / "valid.km").write_text("\n".join(lines) + "\n")
    task = _task(corpus)
    task.load_dataset("valid")
    assert len(task.dataset("valid")) == 1
    (corpus / "valid.km").write_text("\n".join(lines[:1]) + "\n")
    with pytest.raises(ValueError, match="valid.km"):
        task.load_dataset("valid")
    with pytest.raises(FileNotFoundError, match="test.tsv"):
        task.load_dataset("test")


def test_train_augmentation_random_crop_and_flip():
    rng = np.random.RandomState(0)
    frames = rng.randint(0, 255, size=(3, 96, 96)).astype(np.uint8)
    outs = [feat.image_transform(frames, 88, 0.421, 0.165, train_aug=True, rng=rng) for _ in range(20)]
    full = (frames.astype(np.float64) / 255 - 0.421) / 0.165
    n_flipped = 0
    for out in outs:
        assert out.shape == (3, 88, 88)
        found = False
        for flip in (False, True):
            src = full[:, :, ::-1] if flip else full
            for top in range(9):
                for left in range(9):
                    if np.allclose(src[:, top:top + 88, left:left + 88], out, atol=1e-5):
                        found, n_flipped = True, n_flipped + flip
                        break
                if found:
                    break
            if found:
                break
        assert found
    assert 0 < n_flipped < 20
    assert len({o.tobytes() for o in outs}) > 5


def test_noise_mixing_snr_and_dataset_noise(av_corpus_25hz, tmp_path):
    import soundfile as sf

    rng = np.random.RandomState(1)
    clean = (np.sin(np.arange(16000) * 0.05) * 5000).astype(np.int16)
    noise = (rng.randn(7000) * 3000).astype(np.int16)
    mixed = feat.mix_noise(clean, noise, snr_db=10.0)
    added = mixed.astype(np.float64) - clean
    snr = 10 * np.log10(np.mean(clean.astype(np.float64) ** 2) / np.mean(added ** 2))
    assert abs(snr - 10.0) < 0.2

    noise_dir = tmp_path / "noise"
    noise_dir.mkdir()
    sf.write(str(noise_dir / "n.wav"), noise, 16000, subtype="PCM_16")
    (noise_dir / "valid.tsv").write_text("n.wav\n")
    clean_task = _task(av_corpus_25hz)
    clean_task.load_dataset("valid")
    noisy_task = _task(av_corpus_25hz, noise_wav=str(noise_dir), noise_prob=1.0, noise_snr="(0, 5)")
    noisy_task.load_dataset("valid")
    a_clean = clean_task.dataset("valid")[0]["audio_source"]
    a_noisy = noisy_task.dataset("valid")[0]["audio_source"]
    assert a_clean.shape == a_noisy.shape and (a_clean - a_noisy).abs().mean() > 0.05


@pytest.mark.parametrize("masking", [dict(masking_type="feature"),
                                     dict(masking_type="input", selection_type="same_seq"),
                                     dict(masking_type="input", selection_type="same_other_seq")])
def test_model_and_criterion_step(av_corpus_25hz, masking):
    from avhubert.criterion import AVHubertCriterion

    torch.manual_seed(0)
    np.random.seed(0)
    task = _task(av_corpus_25hz)
    task.load_dataset("valid")
    ds = task.dataset("valid")
    batch = ds.collater([ds[0], ds[1]])
    model = _tiny_model(task, **masking)
    assert model.feature_extractor_video.resnet.backend_out == 64
    model.train()
    crit = AVHubertCriterion(task, pred_masked_weight=1.0, pred_nomask_weight=0.5, loss_weights=[10.0])
    loss, sample_size, log = crit(model, batch)
    assert torch.isfinite(loss) and loss.item() > 0
    n_valid = int((~batch["net_input"]["padding_mask"]).sum())
    assert log["count_m_0"] + log["count_u_0"] == n_valid
    assert log["count_m_0"] > 0 and sample_size == n_valid
    loss.backward()
    assert model.feature_extractor_video.resnet.frontend3D[0].weight.grad.abs().sum() > 0
    assert model.label_embs_concat.grad.abs().sum() > 0
    assert crit.logging_outputs_can_be_summed()
    assert all(isinstance(v, (int, float)) for v in log.values())


def test_single_modality_extract_matches_zero_features(av_corpus_25hz):
    task = _task(av_corpus_25hz)
    task.load_dataset("valid")
    ds = task.dataset("valid")
    batch = ds.collater([ds[0]])
    model = _tiny_model(task).eval()
    src = batch["net_input"]["source"]
    with torch.no_grad():
        x_video, _ = model.extract_finetune({"video": src["video"], "audio": None}, output_layer=1)
        # zero *features* for the missing stream (not zero input): differs from a zero audio input
        x_zero_in, _ = model.extract_finetune({"video": src["video"], "audio": torch.zeros_like(src["audio"])},
                                              output_layer=1)
        x_av, _ = model.extract_finetune(src, output_layer=1)
    assert x_video.shape == x_av.shape == (1, src["video"].shape[2], 32)
    assert (x_video - x_zero_in).abs().max() > 1e-3
    assert (x_video - x_av).abs().max() > 1e-3


def test_input_masking_same_seq_copies_other_spans(av_corpus_25hz):
    task = _task(av_corpus_25hz)
    model = _tiny_model(task, masking_type="input", selection_type="same_seq", mask_prob_image=0.3,
                        mask_length_image=5, mask_prob_audio=0.5, mask_length_audio=5)
    np.random.seed(0)
    B, T = 2, 60
    # every frame carries its (batch, time) identity in its pixels
    ident = (torch.arange(B)[:, None] * 1000 + torch.arange(T)[None, :]).float()
    video = ident[:, None, :, None, None].expand(B, 1, T, 4, 4).clone()
    masked_video, mask = model.apply_input_mask(video, None, "video")
    assert mask.shape == (B, T) and mask.any()
    src = masked_video[:, 0, :, 0, 0]
    assert torch.equal(src[~mask], ident[~mask])  # unmasked frames untouched
    for b in range(B):
        t = mask[b].nonzero().flatten().tolist()
        for start in [i for i in t if i - 1 not in t]:
            end = start
            while end + 1 in t:
                end += 1
            copied = src[b, start:end + 1]
            assert (copied // 1000 == b).all()  # same sequence
            frames = (copied % 1000).long()
            assert not ((frames >= start) & (frames <= end)).all()  # from another place
    audio = torch.randn(B, 104, T)
    masked_audio, amask = model.apply_input_mask(audio, None, "audio")
    assert torch.allclose(masked_audio.transpose(1, 2)[amask], model.mask_emb.expand(int(amask.sum()), -1))
    assert torch.equal(masked_audio.transpose(1, 2)[~amask], audio.transpose(1, 2)[~amask])



def test_the_task_draws_each_forward_s_masks_from_the_seed(av_corpus_25hz):
    """A training forward's masks (and modality-dropout draws) are a function of (seed, update,
    micro-batch, rank) alone: a fresh task at update 5, as after a resume, draws what the running one
    drew there, whatever the process-wide numpy RNG holds, and leaves that RNG untouched. Validation
    passes draw the same masks every time."""
    from argparse import Namespace

    from fairseq.optim.sgd import SGD

    from avhubert.criterion import AVHubertCriterion

    class Run:
        def __init__(self, seed):
            torch.manual_seed(0)
            self.task = _task(av_corpus_25hz, seed=seed)
            self.task.load_dataset("valid")
            self.model = _tiny_model(self.task, masking_type="input", selection_type="same_seq",
                                     modality_dropout=0.5)
            self.crit = AVHubertCriterion(self.task, pred_masked_weight=1.0, pred_nomask_weight=0.5,
                                          loss_weights=[10.0])
            self.opt = SGD(Namespace(lr=[0.0], momentum=0.0, weight_decay=0.0), list(self.model.parameters()))

        def masks(self, update=None):
            """The (video, audio) masks of one train step at ``update`` (None: one valid step)."""
            drawn, span_mask = [], type(self.model)._span_mask.__get__(self.model)

            def spy(*args, **kwargs):
                spans = span_mask(*args, **kwargs)
                drawn.append(spans.mask)
                return spans

            self.model._span_mask = spy
            ds = self.task.dataset("valid")
            batch = ds.collater([ds[0], ds[1]])  # a fresh one: masking writes into the batch
            state = np.random.get_state()[1].copy()
            if update is None:
                self.task.valid_step(batch, self.model, self.crit)
            else:
                self.task.train_step(batch, self.model, self.crit, self.opt, update)
            assert np.array_equal(np.random.get_state()[1], state), "the global numpy RNG was drawn from"
            assert self.model.mask_rng is None
            return np.stack(drawn)

    run = Run(seed=7)
    np.random.seed(0)
    at4, at5 = run.masks(4), run.masks(5)
    at5_micro1 = run.masks(5)  # the second batch of update 5 (update_freq 2)
    assert at4.shape == (2, 2, at4.shape[-1])  # video then audio
    assert not np.array_equal(at4, at5) and not np.array_equal(at5, at5_micro1)

    resumed = Run(seed=7)  # a new process resuming at update 5, its numpy RNG elsewhere
    np.random.seed(12345)
    assert np.array_equal(resumed.masks(5), at5)
    assert not np.array_equal(Run(seed=8).masks(5), at5)

    valid = []
    for _ in range(2):
        run.task.begin_valid_epoch(1, run.model)
        valid.append(run.masks())
    assert np.array_equal(valid[0], valid[1]) and not np.array_equal(valid[0], at4)


def test_same_seq_within_item_only_with_same_seq_input_masking(av_corpus_25hz):
    task = _task(av_corpus_25hz)
    with pytest.raises(ValueError, match="same_seq_within_item only applies"):
        _tiny_model(task, masking_type="feature", same_seq_within_item=True)
    with pytest.raises(ValueError, match="same_seq_within_item only applies"):
        _tiny_model(task, masking_type="input", selection_type="same_other_seq", same_seq_within_item=True)
    # a padded batch: the reference fills some of the short item's masked frames from its padding,
    # the setting only from its own frames
    B, T, n = 2, 120, 80
    ident = (torch.arange(B)[:, None] * 1000 + torch.arange(T)[None, :]).float()
    padding = torch.zeros(B, T, dtype=torch.bool)
    padding[1, n:] = True
    from_padding = {}
    for within in (False, True):
        model = _tiny_model(task, masking_type="input", selection_type="same_seq", mask_prob_image=0.3,
                            mask_length_image=5, same_seq_within_item=within)
        model.mask_rng = np.random.RandomState(0)
        copied = []
        for _ in range(20):
            video = ident[:, None, :, None, None].expand(B, 1, T, 2, 2).clone()
            masked, mask = model.apply_input_mask(video, padding, "video")
            copied.append(masked[1, 0, :, 0, 0][mask[1]] % 1000)
        from_padding[within] = int((torch.cat(copied) >= n).sum())
    assert from_padding[False] > 0 and from_padding[True] == 0, from_padding
