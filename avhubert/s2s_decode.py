"""Beam-search decoding and word error rate for ``av_hubert_seq2seq`` models.

    model, cfg, task = load_finetuned("checkpoint_final.pt", modalities=["video"])
    generator = build_generator(model, task, beam=50)
    spm = load_sentencepiece(cfg.task, "checkpoint_final.pt")
    results = decode_split(model, task, "test", generator, spm)   # [(utt_id, ref, hyp)]
    wer = word_error_rate(results)

    decoder = Decoder("checkpoint_final.pt", modalities="av")       # the same, loaded once:
    decoder.score("test", modalities="audio", noise={"dir": "WORKDIR/noise", "category": "babble",
                                                      "snr": 0, "seed": 0})   # WER under noise

fairseq's ``SequenceGenerator`` sizes its buffers from ``net_input["src_tokens"]`` (or a tensor
``source``); AV-HuBERT's ``source`` is a dict of two streams, so :class:`AVSequenceGenerator` hands
it a stand-in ``src_tokens`` of the right batch size, frame count and device. The encoder ignores it.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import List, Optional, Tuple

from omegaconf import open_dict
import torch

from fairseq.sequence_generator import SequenceGenerator

from speechfeat.wer import word_error_rate, word_errors  # noqa: F401  (public names of this module)

from . import export
from .extract import _PLUGIN_DIR, ensure_plugin_registered

logger = logging.getLogger(__name__)

MODALITY_CHOICES = {"video": ["video"], "audio": ["audio"], "av": ["audio", "video"]}
# reference decoding settings (beam search without a language model, length = frames)
DEFAULT_BEAM = 50
DEFAULT_MAX_LEN_A = 1.0
DEFAULT_MAX_LEN_B = 0
DEFAULT_LENPEN = 1.0


def register() -> None:
    """The plugin (task, av_hubert) and the seq2seq model registered with fairseq."""
    ensure_plugin_registered()
    from . import hubert_asr  # noqa: F401  (registers av_hubert_seq2seq)


def modality_list(modalities) -> List[str]:
    """'video' | 'audio' | 'av' (or a list of stream names) -> the task's ``modalities`` list."""
    if isinstance(modalities, str):
        if modalities not in MODALITY_CHOICES:
            raise ValueError(f"modalities must be one of {sorted(MODALITY_CHOICES)}, got {modalities!r}")
        return list(MODALITY_CHOICES[modalities])
    streams = sorted(set(modalities))
    if not streams or set(streams) - {"audio", "video"}:
        raise ValueError(f"modalities must be audio and/or video, got {list(modalities)}")
    return streams


class AVSequenceGenerator(SequenceGenerator):
    """fairseq's beam search over AV-HuBERT's two-stream ``source``."""

    def _generate(self, sample, **kwargs):
        net_input = sample["net_input"]
        if "src_tokens" not in net_input:
            source = net_input["source"]
            stream = next((s for s in (source.get("audio"), source.get("video")) if s is not None), None)
            if stream is None:
                raise ValueError("net_input['source'] holds neither audio nor video")
            n_frames = stream.size(2)  # audio (B, F, T), video (B, C, T, H, W)
            stand_in = torch.zeros(stream.size(0), n_frames, dtype=torch.long, device=stream.device)
            sample = dict(sample)
            sample["net_input"] = dict(net_input, src_tokens=stand_in)
        return super()._generate(sample, **kwargs)


def build_generator(model, task, beam: int = DEFAULT_BEAM, max_len_a: float = DEFAULT_MAX_LEN_A,
                    max_len_b: int = DEFAULT_MAX_LEN_B, lenpen: float = DEFAULT_LENPEN,
                    min_len: int = 1) -> AVSequenceGenerator:
    from fairseq.dataclass.configs import GenerationConfig

    gen_cfg = GenerationConfig(beam=beam, max_len_a=max_len_a, max_len_b=max_len_b, lenpen=lenpen,
                               min_len=min_len)
    return task.build_generator([model], gen_cfg, seq_gen_cls=AVSequenceGenerator)


def load_finetuned(path: str, modalities=None, device: str = "cpu", task_overrides: Optional[dict] = None):
    """(model in eval mode, saved cfg, task) of a fine-tuned ``av_hubert_seq2seq`` checkpoint
    (ours or the reference's). ``modalities`` ('video'|'audio'|'av' or a list) replaces the
    streams the task loads; the model gets zeros for a stream it is not given. Decoding is clean
    whatever noise the model was fine-tuned with (``set_inputs`` adds noise)."""
    exported = export.has_seq2seq(path)  # a directory written by ``launch.py export``
    if not exported and not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: fine-tuned checkpoint not found")
    register()
    from fairseq import checkpoint_utils

    from .checkpoint import fairseq_checkpoint_loading, load_checkpoint_to_cpu

    state = export.load_finetuned_state(path) if exported else load_checkpoint_to_cpu(path)
    cfg = state.get("cfg")
    if cfg is None or cfg.get("model") is None or cfg.model.get("_name") != "av_hubert_seq2seq":
        name = None if cfg is None or cfg.get("model") is None else cfg.model.get("_name")
        raise ValueError(f"{path}: model {name!r} is not an av_hubert_seq2seq (fine-tuned) checkpoint")
    with open_dict(cfg):
        if cfg.get("common") is not None:
            cfg.common.user_dir = _PLUGIN_DIR  # where it was trained is not where we are
        if modalities is not None:
            cfg.task.modalities = modality_list(modalities)
        cfg.task.noise_prob = 0.0  # fine-tuned with noise or not, decoding is clean unless asked
        for key, value in (task_overrides or {}).items():
            cfg.task[key] = value
    with fairseq_checkpoint_loading():
        models, saved_cfg, task = checkpoint_utils.load_model_ensemble_and_task([path], state=state)
    model = models[0].to(device).eval()
    return model, saved_cfg, task


def set_inputs(task, modalities=None, noise: Optional[dict] = None) -> None:
    """What the next ``task.load_dataset`` feeds the model: ``modalities`` (as ``load_finetuned``;
    None = unchanged) and ``noise``: None for clean audio, or ``{"dir": a noise dir, "category": one
    of its sub-folders or None (its own lists), "snr": dB, "seed": int}`` to mix every utterance's
    audio with a noise clip of the split's list at exactly that SNR, the clip and its offset drawn
    per utterance from the seed (the same noise for every model and modality)."""
    with open_dict(task.cfg):
        if modalities is not None:
            task.cfg.modalities = modality_list(modalities)
        if noise is None:
            task.cfg.noise_prob = 0.0
            return
        task.cfg.noise_wav = str(noise["dir"])
        task.cfg.noise_prob = 1.0
        task.cfg.noise_snr = repr(float(noise["snr"]))
        task.cfg.noise_num = 1
        task.cfg.noise_categories = [str(noise["category"])] if noise.get("category") else None
        task.cfg.noise_seed = int(noise.get("seed", 0))


class Decoder:
    """A fine-tuned checkpoint loaded once, decoding manifest splits with any streams and noise."""

    def __init__(self, checkpoint, modalities=None, beam: int = DEFAULT_BEAM, max_len_a: float = DEFAULT_MAX_LEN_A,
                 max_len_b: int = DEFAULT_MAX_LEN_B, lenpen: float = DEFAULT_LENPEN, data_dir=None,
                 max_tokens: int = 2000, device: str = "cpu"):
        overrides = {"data": str(data_dir), "label_dir": str(data_dir)} if data_dir is not None else None
        self.model, self.saved_cfg, self.task = load_finetuned(str(checkpoint), modalities=modalities, device=device,
                                                               task_overrides=overrides)
        spm = find_spm_model(self.saved_cfg.task, str(checkpoint))
        self.detok = Detokenizer(self.task.target_dictionary, str(spm) if spm else None)
        self.max_len_a, self.max_len_b = max_len_a, max_len_b
        self.set_generation(beam=beam, lenpen=lenpen)
        self.max_tokens, self.device = max_tokens, device

    def set_generation(self, beam: int, lenpen: float) -> None:
        """Decode with another beam size and length penalty (the model stays loaded)."""
        self.beam, self.lenpen = int(beam), float(lenpen)
        self.generator = build_generator(self.model, self.task, beam=self.beam, max_len_a=self.max_len_a,
                                         max_len_b=self.max_len_b, lenpen=self.lenpen)

    def score(self, split: str, modalities=None, noise: Optional[dict] = None) -> dict:
        """WER of ``split`` (``word_error_rate``) with every ``hypotheses`` (id, ref, hyp)."""
        tsv = Path(self.task.cfg.data) / f"{split}.tsv"
        if not tsv.is_file():
            raise FileNotFoundError(f"{tsv}: manifest split {split!r} not found")
        set_inputs(self.task, modalities, noise)
        results = decode_split(self.model, self.task, split, self.generator, self.detok,
                               max_tokens=self.max_tokens, device=self.device)
        scores = word_error_rate(results)
        scores["hypotheses"] = [{"id": i, "ref": r, "hyp": h} for i, r, h in results]
        return scores


# ------------------------------------------------------------------------------------- text


class Detokenizer:
    """Token ids -> words: the dictionary's pieces, then sentencepiece decoding (with the model
    when it is available; otherwise pieces joined and '▁' read as a space, which is what a
    sentencepiece unigram model without byte fallback decodes to)."""

    def __init__(self, dictionary, spm_model: Optional[str] = None):
        self.dictionary = dictionary
        self.spm = None
        if spm_model is not None:
            import sentencepiece

            self.spm = sentencepiece.SentencePieceProcessor(model_file=str(spm_model))

    def __call__(self, tokens: torch.Tensor) -> str:
        d = self.dictionary
        ids = [int(t) for t in tokens if int(t) not in (d.eos(), d.pad(), d.bos())]
        pieces = [d[i] for i in ids]
        if self.spm is not None:
            text = self.spm.decode_pieces(pieces)
        else:
            text = "".join(pieces).replace("\u2581", " ")
        return " ".join(text.split())


def find_spm_model(task_cfg, checkpoint: Optional[str] = None) -> Optional[Path]:
    """The sentencepiece model of a fine-tuned checkpoint: the path in its task config when it
    exists, else a file of that name next to the checkpoint (the finetune stage copies it there)."""
    configured = task_cfg.get("tokenizer_bpe_model") if task_cfg is not None else None
    if configured and os.path.isfile(configured):
        return Path(configured)
    if configured and checkpoint is not None:
        beside = Path(checkpoint).resolve().parent / Path(configured).name
        if beside.is_file():
            return beside
    return None


# ------------------------------------------------------------------------------------- decoding


@torch.no_grad()
def decode_sample(model, generator, sample, detok: Detokenizer) -> List[str]:
    """Best hypothesis (words) of every item of a collated batch."""
    hypos = generator.generate([model], sample)
    return [detok(h[0]["tokens"].cpu()) for h in hypos]


@torch.no_grad()
def decode_split(model, task, split: str, generator, detok: Detokenizer, max_tokens: int = 2000,
                 device: str = "cpu") -> List[Tuple[str, str, str]]:
    """[(utt_id, reference words, hypothesis words)] over a manifest split, references read from
    the split's ``.wrd`` lines (not from the token ids: an unknown piece cannot hide an error)."""
    from fairseq import utils as fairseq_utils

    task.load_dataset(split)
    dataset = task.dataset(split)
    if len(dataset) == 0:
        return []
    itr = task.get_batch_iterator(
        dataset=dataset, max_tokens=max_tokens, max_sentences=None, ignore_invalid_inputs=False,
        required_batch_size_multiple=1, seed=1, num_shards=1, shard_id=0, num_workers=0,
    ).next_epoch_itr(shuffle=False)
    out = []
    for sample in itr:
        if not sample:
            continue
        if device != "cpu":
            sample = fairseq_utils.move_to_cuda(sample)
        hyps = decode_sample(model, generator, sample, detok)
        for index, utt_id, hyp in zip(sample["id"].tolist(), sample["utt_id"], hyps):
            ref = " ".join(dataset.label_list[0][index].split())
            out.append((utt_id, ref, hyp))
    return sorted(out)
