"""The ``av_hubert_pretraining`` task: dictionaries of the label sets, datasets per split."""
import contextlib
import logging
import os
from argparse import Namespace
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
from omegaconf import II, MISSING
from omegaconf.errors import InterpolationResolutionError

from fairseq.data import Dictionary
from fairseq.dataclass.configs import FairseqDataclass
from fairseq.tasks import register_task
from fairseq.tasks.fairseq_task import FairseqTask

from .dataset import AVHubertDataset

logger = logging.getLogger(__name__)


class LabelEncoder:
    """A label line -> token ids of ``dictionary`` (frame labels: no eos)."""

    def __init__(self, dictionary: Dictionary) -> None:
        self.dictionary = dictionary

    def __call__(self, label: str):
        return self.dictionary.encode_line(label, append_eos=False, add_if_not_exist=False)


class LabelEncoderS2SToken:
    """A transcript -> subword ids (+ eos) for sequence-to-sequence fine-tuning."""

    def __init__(self, dictionary: Dictionary, bpe_tokenizer) -> None:
        self.bpe_tokenizer = bpe_tokenizer
        self.dictionary = dictionary

    def __call__(self, label: str):
        label = self.bpe_tokenizer.encode(label.lower())
        return self.dictionary.encode_line(label, append_eos=True, add_if_not_exist=False).long()


@dataclass
class AVHubertPretrainingConfig(FairseqDataclass):
    data: str = field(default=MISSING, metadata={"help": "directory with {split}.tsv manifests"})
    labels: List[str] = field(default_factory=lambda: ["km"],
                              metadata={"help": "label file extensions: {split}.{label}, dict.{label}.txt"})
    label_dir: Optional[str] = field(default=None, metadata={"help": "label directory (default: data)"})
    label_rate: int = field(default=-1, metadata={"help": "labels per second (-1: sequence labels)"})
    sample_rate: int = field(default=25, metadata={"help": "video frames per second"})
    normalize: bool = field(default=False, metadata={"help": "layer-norm the audio features"})
    enable_padding: bool = field(default=False, metadata={"help": "unused, kept for compatibility"})
    max_sample_size: Optional[int] = field(default=None, metadata={"help": "drop longer utterances (frames)"})
    min_sample_size: Optional[int] = field(default=None, metadata={"help": "drop shorter utterances (frames)"})
    max_trim_sample_size: Optional[int] = field(default=II("task.max_sample_size"),
                                                metadata={"help": "crop batches to this many frames"})
    single_target: Optional[bool] = field(default=False, metadata={"help": "one target, batch['target']"})
    random_crop: Optional[bool] = field(default=True, metadata={"help": "random (not leading) crops"})
    pad_audio: Optional[bool] = field(default=False, metadata={"help": "pad to the longest item"})
    pdb: Optional[bool] = field(default=False, metadata={"help": "unused, kept for compatibility"})
    stack_order_audio: int = field(default=1, metadata={"help": "filterbank frames per 25 Hz step"})
    skip_verify: Optional[bool] = field(default=False, metadata={"help": "skip label/frame alignment check"})
    image_aug: bool = field(default=False, metadata={"help": "random crop + flip on the train split"})
    image_crop_size: int = field(default=88, metadata={"help": "crop size of the ROI frames"})
    image_mean: float = field(default=0.421, metadata={"help": "pixel mean after /255"})
    image_std: float = field(default=0.165, metadata={"help": "pixel std after /255"})
    modalities: Optional[List[str]] = field(default_factory=lambda: ["audio", "video"],
                                            metadata={"help": "inputs to load"})
    is_s2s: bool = field(default=False, metadata={"help": "sequence-to-sequence targets"})
    tokenizer_bpe_name: Optional[str] = field(default=None, metadata={"help": "bpe name (sentencepiece)"})
    tokenizer_bpe_model: Optional[str] = field(default=None, metadata={"help": "bpe model path"})
    noise_wav: Optional[str] = field(default=None, metadata={"help": "dir with {split}.tsv noise lists"})
    noise_prob: float = field(default=0, metadata={"help": "probability of adding noise"})
    noise_snr: Optional[str] = field(default="0", metadata={"help": "SNR in dB, or '(low, high)'"})
    noise_num: int = field(default=1, metadata={"help": "noise files averaged per mixture"})
    noise_categories: Optional[List[str]] = field(
        default=None, metadata={"help": "read noise_wav/<category>/{split}.tsv for each (picked with equal "
                                        "probability) instead of noise_wav/{split}.tsv"})
    noise_seed: Optional[int] = field(
        default=None, metadata={"help": "seed of the per-utterance noise draws (fixed for evaluation); "
                                        "None = drawn from the global RNG (common.seed)"})
    fine_tuning: bool = field(default=False, metadata={"help": "fine-tuning: one target dictionary"})
    input_modality: str = field(default="image", metadata={"help": "kept for checkpoint compatibility"})
    label_tolerance: float = field(default=0.1, metadata={"help": "max |label - video| duration (s)"})
    seed: int = field(default=II("common.seed"),
                      metadata={"help": "seed of the mask draws (each training / validation forward "
                                        "draws from a generator derived from it) and of the per-utterance "
                                        "random crops (common.seed)"})


# the last key of the generator that seeds the process-wide numpy RNG for one forward pass (the
# mask draws' generator has one key fewer)
_GLOBAL_DRAWS = 1


@register_task("av_hubert_pretraining", dataclass=AVHubertPretrainingConfig)
class AVHubertPretrainingTask(FairseqTask):
    cfg: AVHubertPretrainingConfig

    def __init__(self, cfg: AVHubertPretrainingConfig) -> None:
        super().__init__(cfg)
        logger.info(f"AVHubertPretrainingTask Config {cfg}")
        self.fine_tuning = cfg.fine_tuning
        if cfg.fine_tuning:
            self.state.add_factory("target_dictionary", lambda: self.load_dictionaries()[0])
        else:
            self.state.add_factory("dictionaries", self.load_dictionaries)
        self.blank_symbol = "<s>"
        self._micro_batch = (None, 0)  # (update number, forward passes drawn for it so far)
        self._valid_batch = 0  # forward passes of the current validation pass

    @property
    def source_dictionary(self) -> Optional[Dictionary]:
        return None

    @property
    def target_dictionary(self) -> Optional[Dictionary]:
        return self.state.target_dictionary if self.fine_tuning else None

    @property
    def dictionaries(self) -> List[Dictionary]:
        return self.state.dictionaries

    @classmethod
    def setup_task(cls, cfg: AVHubertPretrainingConfig, **kwargs) -> "AVHubertPretrainingTask":
        return cls(cfg)

    def get_label_dir(self) -> str:
        return self.cfg.label_dir if self.cfg.label_dir is not None else self.cfg.data

    def load_dictionaries(self) -> List[Dictionary]:
        dictionaries = []
        for label in self.cfg.labels:
            path = os.path.join(self.get_label_dir(), f"dict.{label}.txt")
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path}: label dictionary not found (task.label_dir / task.labels)")
            dictionaries.append(Dictionary.load(path))
        return dictionaries

    @property
    def s2s_tokenizer(self):
        from fairseq.data import encoders

        if self.cfg.tokenizer_bpe_name is None:
            raise ValueError("is_s2s needs task.tokenizer_bpe_name and task.tokenizer_bpe_model")
        return encoders.build_bpe(Namespace(bpe=self.cfg.tokenizer_bpe_name,
                                            sentencepiece_model=self.cfg.tokenizer_bpe_model))

    def load_dataset(self, split: str, **kwargs) -> None:
        manifest = os.path.join(self.cfg.data, f"{split}.tsv")
        if not os.path.exists(manifest):
            raise FileNotFoundError(f"{manifest}: manifest for split {split!r} not found")
        dictionaries = [self.target_dictionary] if self.fine_tuning else self.dictionaries
        if self.cfg.is_s2s:
            tokenizer = self.s2s_tokenizer
            procs = [LabelEncoderS2SToken(d, tokenizer) for d in dictionaries]
        else:
            procs = [LabelEncoder(d) for d in dictionaries]
        paths = [os.path.join(self.get_label_dir(), f"{split}.{label}") for label in self.cfg.labels]
        for p in paths:
            if not os.path.exists(p):
                raise FileNotFoundError(f"{p}: label file for split {split!r} not found")
        noise_fn = self.noise_manifests(split)
        self.datasets[split] = AVHubertDataset(
            manifest,
            sample_rate=self.cfg.sample_rate,
            label_paths=paths,
            label_rates=self.cfg.label_rate,
            pad_list=[d.pad() for d in dictionaries],
            eos_list=[d.eos() for d in dictionaries],
            label_processors=procs,
            max_keep_sample_size=self.cfg.max_sample_size,
            min_keep_sample_size=self.cfg.min_sample_size,
            max_sample_size=self.cfg.max_trim_sample_size,
            pad_audio=self.cfg.pad_audio,
            normalize=self.cfg.normalize,
            random_crop=self.cfg.random_crop,
            single_target=self.cfg.single_target,
            stack_order_audio=self.cfg.stack_order_audio,
            skip_verify=self.cfg.skip_verify,
            image_mean=self.cfg.image_mean,
            image_std=self.cfg.image_std,
            image_crop_size=self.cfg.image_crop_size,
            image_aug=self.cfg.image_aug if split == "train" else False,
            modalities=self.cfg.modalities,
            is_s2s=self.cfg.is_s2s,
            noise_fn=noise_fn,
            noise_prob=self.cfg.noise_prob,
            noise_snr=self.cfg.noise_snr,
            noise_num=self.cfg.noise_num,
            noise_seed=self.cfg.get("noise_seed", None),
            label_tolerance=self.cfg.label_tolerance,
            augment_seed=self._augment_seed(),
        )

    def _augment_seed(self) -> Optional[int]:
        """common.seed; None (the dataset's drawn base seed) for a task built outside a fairseq
        config, where the interpolation has nothing to resolve against."""
        try:
            return self.cfg.get("seed", None)
        except InterpolationResolutionError:
            return None

    def noise_manifests(self, split: str) -> Optional[List[str]]:
        """The noise lists of ``split`` (None without noise): ``noise_wav/{split}.tsv``, or one
        ``noise_wav/<category>/{split}.tsv`` per entry of ``noise_categories``."""
        if not self.cfg.noise_wav or self.cfg.noise_prob <= 0:
            return None
        categories = self.cfg.get("noise_categories", None)
        if categories:
            paths = [os.path.join(self.cfg.noise_wav, str(c), f"{split}.tsv") for c in categories]
        else:
            paths = [os.path.join(self.cfg.noise_wav, f"{split}.tsv")]
        for path in paths:
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path}: noise manifest not found (task.noise_wav"
                                        + (", task.noise_categories)" if categories else ")"))
        return paths

    # ------------------------------------------------------------------ mask draws
    # The reference draws its masks from the process-wide numpy RNG, seeded once at start: the
    # draws of a resumed run differ from those of an uninterrupted one, and anything else drawing
    # from it (the data loader's thread) shifts them. Here every forward pass of training draws from
    # its own generator, a function of (seed, update, micro-batch, rank), and every validation pass
    # from (seed, batch index, rank): the same masks straight or resumed, and the same validation
    # masks at every validation (the valid loss compares like with like). The draws themselves are
    # the reference's (avhubert.masking). What else a forward draws from the process-wide RNG
    # (fairseq's encoder layerdrop) gets it seeded from the same keys for the pass and restored
    # after: nothing else draws from it meanwhile (the dataset's draws have their own generators).
    @contextlib.contextmanager
    def _mask_draws(self, model, *keys):
        import torch.distributed as dist

        from .masking import step_rng
        from .model import AVHubertModel

        rank = 0
        if dist.is_available() and dist.is_initialized():
            rank = dist.get_rank()
        rng = step_rng(self.cfg.seed, *keys, rank)
        models = [m for m in model.modules() if isinstance(m, AVHubertModel)]
        for m in models:
            m.mask_rng = rng
        outer = np.random.get_state()
        np.random.set_state(step_rng(self.cfg.seed, *keys, rank, _GLOBAL_DRAWS).get_state())
        try:
            yield
        finally:
            np.random.set_state(outer)
            for m in models:
                m.mask_rng = None

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False, **kwargs):
        last_update, count = self._micro_batch
        micro = count if last_update == update_num else 0
        self._micro_batch = (update_num, micro + 1)
        with self._mask_draws(model, 0, update_num, micro):
            return super().train_step(sample, model, criterion, optimizer, update_num, ignore_grad, **kwargs)

    def begin_valid_epoch(self, epoch, model):
        super().begin_valid_epoch(epoch, model)
        self._valid_batch = 0

    def valid_step(self, sample, model, criterion):
        index, self._valid_batch = self._valid_batch, self._valid_batch + 1
        with self._mask_draws(model, 1, index):
            return super().valid_step(sample, model, criterion)

    def max_positions(self):
        return (np.iinfo(np.int64).max, np.iinfo(np.int64).max)

    def filter_indices_by_size(self, indices, *args, **kwargs):
        # length filtering already happened when the manifest was read (min/max_sample_size)
        return indices
