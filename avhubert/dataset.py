"""AV-HuBERT dataset: tsv manifest + per-utterance label files -> padded audio/video batches.

Manifest ``{split}.tsv``: first line the root directory (a relative root is relative to the tsv's
own directory); then one row per utterance
``id <TAB> video_rel_path <TAB> audio_rel_path <TAB> n_video_frames <TAB> n_audio_samples``.
Labels ``{split}.{label}``: one line per manifest row (all rows, also those filtered out here),
space-separated tokens at ``label_rate`` per second (-1 = a sequence label, e.g. words).
"""
import ast
import hashlib
import logging
import os
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from fairseq.data import data_utils
from fairseq.data.fairseq_dataset import FairseqDataset

from . import features as feat

logger = logging.getLogger(__name__)


def load_manifest(manifest_path: str, max_keep: Optional[int], min_keep: Optional[int], frame_rate: float,
                  label_paths: Sequence[str], label_rates: Sequence[float], tol: float = 0.1):
    """Read the manifest, dropping too short/long utterances and those whose label duration differs
    from the video duration by more than ``tol`` seconds. Returns (root, names, kept row indices,
    total rows, sizes in video frames)."""
    label_durations, duration_paths = [], []
    for path, rate in zip(label_paths, label_rates):
        if rate == -1:  # sequence labels (e.g. words): no per-frame alignment to check
            continue
        with open(path) as f:
            label_durations.append([len(line.split()) / rate for line in f])
        duration_paths.append(path)
    with open(manifest_path) as f:
        root = f.readline().strip()
        rows = [line.rstrip("\n") for line in f if line.strip()]
    if not os.path.isabs(root):  # the manifest stage writes the crop dir relative to the tsv
        root = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(manifest_path)), root))
    for path, durs in zip(duration_paths, label_durations):
        if len(durs) != len(rows):
            raise ValueError(f"{path}: {len(durs)} label lines but {manifest_path} has {len(rows)} rows")
    names, inds, sizes = [], [], []
    n_short = n_long = n_unaligned = 0
    for i, row in enumerate(rows):
        items = row.split("\t")
        if len(items) != 5:
            raise ValueError(f"{manifest_path}: row {i + 2} has {len(items)} columns, expected 5 "
                             "(id, video, audio, n_video_frames, n_audio_samples)")
        try:
            size = int(items[3])
        except ValueError:
            raise ValueError(f"{manifest_path}: row {i + 2}: n_video_frames {items[3]!r} is not an int")
        if min_keep is not None and size < min_keep:
            n_short += 1
        elif max_keep is not None and size > max_keep:
            n_long += 1
        elif any(abs(size / frame_rate - durs[i]) > tol for durs in label_durations):
            n_unaligned += 1
        else:
            names.append((items[1], items[2], items[0]))
            inds.append(i)
            sizes.append(size)
    logger.info(f"{manifest_path}: kept {len(names)} of {len(rows)} "
                f"(short {n_short}, long {n_long}, label/frame misaligned {n_unaligned}); "
                f"frames min {min(sizes, default=0)} max {max(sizes, default=0)}")
    return root, names, inds, len(rows), sizes


def load_label_lines(label_path: str, inds: Sequence[int], total: int) -> List[str]:
    with open(label_path) as f:
        lines = [line.rstrip("\n") for line in f]
    if len(lines) != total:
        raise ValueError(f"{label_path}: {len(lines)} lines, manifest has {total} rows")
    return [lines[i] for i in inds]


def talker_key(utt_id: str) -> str:
    """Who speaks in an utterance, as far as its id tells: the id's directory (the LRS3 speaker,
    the VoxCeleb2 video, the sub-folder of a plain corpus), else the id itself. Noise lists name
    the talkers of each corpus-made clip this way, so an utterance is not mixed with its own voice."""
    head, sep, _ = utt_id.rpartition("/")
    return head if sep else utt_id


def parse_snr(value: Union[str, int, float, None]):
    """'5' -> 5.0; '(-5, 5)' or '-5,5' -> (-5, 5) a range sampled per utterance (integers)."""
    if value is None:
        return 0.0
    if isinstance(value, (int, float)):
        return float(value)
    parsed = ast.literal_eval(value.strip())
    if isinstance(parsed, (int, float)):
        return float(parsed)
    if isinstance(parsed, (tuple, list)) and len(parsed) == 2:
        return (int(parsed[0]), int(parsed[1]))
    raise ValueError(f"noise_snr {value!r}: expected a number or a (low, high) pair")


def _keyed_rng(key: str) -> np.random.RandomState:
    """A generator seeded from a text key (sha256): the same key, the same draws in any process."""
    return np.random.RandomState(int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:4], "big"))


class AVHubertDataset(FairseqDataset):
    def __init__(
        self,
        manifest_path: str,
        sample_rate: float,
        label_paths: List[str],
        label_rates: Union[List[float], float],
        pad_list: List[int],
        eos_list: List[int],
        label_processors: Optional[List[Any]] = None,
        max_keep_sample_size: Optional[int] = None,
        min_keep_sample_size: Optional[int] = None,
        max_sample_size: Optional[int] = None,
        shuffle: bool = True,
        pad_audio: bool = False,
        normalize: bool = False,
        random_crop: bool = False,
        single_target: bool = False,
        stack_order_audio: int = 1,
        skip_verify: bool = False,
        image_mean: float = 0.0,
        image_std: float = 1.0,
        image_crop_size: int = 88,
        image_aug: bool = False,
        modalities: Optional[List[str]] = None,
        is_s2s: bool = False,
        noise_fn: Union[str, Sequence[str], None] = None,
        noise_prob: float = 0.0,
        noise_snr: Union[str, float] = 0,
        noise_num: int = 1,
        noise_seed: Optional[int] = None,
        label_tolerance: float = 0.1,
        augment_seed: Optional[int] = None,
    ):
        self.modalities = set(modalities or ["audio", "video"])
        unknown = self.modalities - {"audio", "video"}
        if unknown or not self.modalities:
            raise ValueError(f"modalities must be a non-empty subset of audio/video, got {modalities}")
        self.label_rates = ([label_rates] * len(label_paths) if isinstance(label_rates, (int, float))
                            else list(label_rates))
        self.root, self.names, inds, total, self.sizes = load_manifest(
            manifest_path, max_keep_sample_size, min_keep_sample_size, sample_rate,
            label_paths if not skip_verify else [], self.label_rates if not skip_verify else [],
            tol=label_tolerance,
        )
        self.sizes = np.asarray(self.sizes, dtype=np.int64)
        self.sample_rate = sample_rate
        self.stack_order_audio = stack_order_audio
        self.shuffle = shuffle
        self.random_crop = random_crop
        self.num_labels = len(label_paths)
        self.pad_list, self.eos_list = pad_list, eos_list
        self.label_processors = label_processors
        self.single_target = single_target
        self.is_s2s = is_s2s
        self.label_list = [load_label_lines(p, inds, total) for p in label_paths]
        self.max_sample_size = max_sample_size if max_sample_size is not None else np.iinfo(np.int64).max
        self.pad_audio = pad_audio
        self.normalize = normalize
        self.image_mean, self.image_std = image_mean, image_std
        self.image_crop_size, self.image_aug = image_crop_size, image_aug
        self.noise_prob, self.noise_num = noise_prob, noise_num
        self.noise_snr = parse_snr(noise_snr)
        # noise lists (one per category manifest), each picked with equal probability
        self.noise_lists: List[List[Tuple[str, frozenset]]] = []
        if noise_fn is not None and noise_prob > 0:
            self.noise_lists = self._read_noise_manifests([noise_fn] if isinstance(noise_fn, str) else noise_fn)
        # Noise draws come from a generator seeded per utterance and epoch, not from the global
        # RNG: the same utterance gets the same noise, offset and SNR whatever the batch order or
        # the number of data loader workers (forked workers share the global RNG's state).
        # None: a base seed drawn from the global RNG now (fairseq seeds it from common.seed).
        self.noise_seed = int(noise_seed) if noise_seed is not None else int(np.random.randint(2 ** 31))
        # The random crops (random_crop, image_aug) likewise: the reference draws them from the
        # global RNG, which fairseq's epoch iterator reseeds and restores (numpy_seed) on the main
        # thread while its prefetch thread collates batches, so which state a crop drew from
        # depended on thread timing. None: the noise base seed.
        self.augment_seed = int(augment_seed) if augment_seed is not None else self.noise_seed
        self.epoch = 1

    @staticmethod
    def _read_noise_manifests(noise_fns: Sequence[str]) -> List[List[Tuple[str, frozenset]]]:
        """Noise lists: one wav a line (absolute, or relative to the list's directory), optionally
        followed by tab-separated ``talker_key``s of the voices in it (the noise stage writes them
        for clips made of corpus utterances). An empty list is skipped (a category without noise
        for this split), but at least one must list something."""
        lists = []
        for noise_fn in noise_fns:
            base = os.path.dirname(os.path.abspath(noise_fn))
            clips = []
            with open(noise_fn) as f:
                for line in f:
                    if not line.strip():
                        continue
                    path, *talkers = line.rstrip("\n").split("\t")
                    path = path.strip()
                    clips.append((path if os.path.isabs(path) else os.path.join(base, path), frozenset(talkers)))
            if not clips:
                logger.warning(f"{noise_fn}: noise manifest lists no wav files; not used")
                continue
            lists.append(clips)
        if not lists:
            raise ValueError(f"{', '.join(noise_fns)}: noise manifest lists no wav files")
        return lists

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    # ------------------------------------------------------------------ items
    def _path(self, rel: str) -> str:
        return rel if os.path.isabs(rel) else os.path.join(self.root, rel)

    def noise_rng(self, utt_id: str) -> np.random.RandomState:
        """The generator of one utterance's noise draws in this epoch."""
        return _keyed_rng(f"{self.noise_seed}\x1f{self.epoch}\x1f{utt_id}")

    def augment_rng(self, purpose: str, utt_id: str) -> np.random.RandomState:
        """The generator of one utterance's ``purpose`` draws ("crop": its start in a batch,
        "image": its image crop and flip) in this epoch."""
        return _keyed_rng(f"{self.augment_seed}\x1f{purpose}\x1f{self.epoch}\x1f{utt_id}")

    def _select_noise(self, rng: np.random.RandomState, talker: Optional[str] = None) -> np.ndarray:
        clips = self.noise_lists[rng.randint(0, len(self.noise_lists))]
        waves = []
        for _ in range(self.noise_num):
            # a clip with the utterance's own talker in it is drawn again (a few times: in a tiny
            # corpus every clip may hold every talker)
            for _attempt in range(8):
                path, talkers = clips[rng.randint(0, len(clips))]
                if talker not in talkers:
                    break
            wav, sr = feat.read_wav_int16(path)
            if sr != feat.AUDIO_SAMPLE_RATE or wav.ndim != 1:
                raise ValueError(f"{path}: noise must be 16 kHz mono, got {sr} Hz {wav.shape}")
            waves.append(wav.astype(np.float32))
        if len(waves) == 1:
            return waves[0]
        n = min(len(w) for w in waves)
        return np.floor(np.stack([w[:n] for w in waves]).mean(axis=0))

    def add_noise(self, clean: np.ndarray, rng: Optional[np.random.RandomState] = None,
                  talker: Optional[str] = None) -> np.ndarray:
        """``clean`` with one draw of noise: a category, a clip (``noise_num`` averaged) without
        ``talker``'s voice, an SNR from the range and a start offset in the clip, all from ``rng``."""
        rng = rng if rng is not None else np.random
        snr = self.noise_snr
        if isinstance(snr, tuple):
            snr = rng.randint(snr[0], snr[1] + 1)
        noise = self._select_noise(rng, talker)
        return feat.mix_noise(clean, noise, float(snr), offset=int(rng.randint(0, len(noise))))

    def load_feature(self, index: int) -> Tuple[Optional[np.ndarray], Optional[np.ndarray]]:
        video_rel, audio_rel, _ = self.names[index]
        video = audio = None
        if "video" in self.modalities:
            path = self._path(video_rel)
            frames = feat.read_video_gray(path)
            rng = self.augment_rng("image", self.names[index][2]) if self.image_aug else None
            video = feat.image_transform(frames, self.image_crop_size, self.image_mean, self.image_std,
                                         train_aug=self.image_aug, rng=rng)[..., None]  # (T, H, W, 1)
        if "audio" in self.modalities:
            path = self._path(audio_rel)
            wav, sr = feat.read_wav_int16(path)
            if sr != feat.AUDIO_SAMPLE_RATE or wav.ndim != 1:
                raise ValueError(f"{path}: audio must be 16 kHz mono, got {sr} Hz, shape {wav.shape}")
            if self.noise_lists:
                utt_id = self.names[index][2]
                rng = self.noise_rng(utt_id)
                if rng.random_sample() < self.noise_prob:
                    wav = self.add_noise(wav, rng, talker_key(utt_id))
            audio = feat.audio_features(wav, self.stack_order_audio)
        if audio is not None and video is not None:
            audio = feat.match_length(audio, len(video))
        return video, audio

    def get_label(self, index: int, label_idx: int):
        label = self.label_list[label_idx][index]
        if self.label_processors is not None:
            label = self.label_processors[label_idx](label)
        return label

    def __getitem__(self, index: int):
        video, audio = self.load_feature(index)
        audio_t = torch.from_numpy(audio.astype(np.float32)) if audio is not None else None
        video_t = torch.from_numpy(np.ascontiguousarray(video, dtype=np.float32)) if video is not None else None
        if self.normalize and audio_t is not None:
            with torch.no_grad():
                audio_t = F.layer_norm(audio_t, audio_t.shape[1:])
        labels = [self.get_label(index, i) for i in range(self.num_labels)]
        return {"id": index, "fid": self.names[index][2], "video_source": video_t,
                "audio_source": audio_t, "label_list": labels}

    def __len__(self) -> int:
        return len(self.sizes)

    # ------------------------------------------------------------------ batching
    def crop_to_max_size(self, x: torch.Tensor, target_size: int, start: Optional[int] = None,
                         rng: Optional[np.random.RandomState] = None):
        diff = len(x) - target_size
        if diff <= 0:
            return x, 0
        if start is None:
            rng = rng if rng is not None else np.random
            start = int(rng.randint(0, diff + 1)) if self.random_crop else 0
        return x[start:start + target_size], start

    def collater_audio(self, sources: List[torch.Tensor], size: int, starts: Optional[List[int]] = None,
                       ids: Optional[List[str]] = None):
        """Pad/crop (T, ...) items to ``size`` frames; returns (B, F, T) or (B, C, T, H, W), the
        padding mask (B, T) and the crop starts (shared between modalities). A random start is
        drawn from the item's own generator (``ids``: the items' utterance ids)."""
        shape = list(sources[0].shape[1:])
        out = sources[0].new_zeros([len(sources), size] + shape)
        padding_mask = torch.zeros(len(sources), size, dtype=torch.bool)
        known = starts is not None
        starts = list(starts) if known else [0] * len(sources)
        for i, x in enumerate(sources):
            diff = len(x) - size
            if diff == 0:
                out[i] = x
            elif diff < 0:
                if not self.pad_audio:
                    raise RuntimeError("item shorter than the batch length with pad_audio=False")
                out[i, :len(x)] = x
                padding_mask[i, diff:] = True
            else:
                rng = self.augment_rng("crop", ids[i]) if ids is not None and not known else None
                out[i], starts[i] = self.crop_to_max_size(x, size, starts[i] if known else None, rng)
        if out.dim() == 3:
            out = out.transpose(1, 2)  # (B, T, F) -> (B, F, T)
        else:
            out = out.permute(0, 4, 1, 2, 3).contiguous()  # (B, T, H, W, C) -> (B, C, T, H, W)
        return out, padding_mask, starts

    def collater_frm_label(self, targets, size: int, starts, label_rate: float, pad: int):
        per_frame = label_rate / self.sample_rate
        frm_starts = [int(round(s * per_frame)) for s in starts]
        frm_size = int(round(size * per_frame))
        if not self.pad_audio:
            frm_size = min(frm_size, *[len(t) - s for t, s in zip(targets, frm_starts)])
        targets = [t[s:s + frm_size] for t, s in zip(targets, frm_starts)]
        lengths = torch.LongTensor([len(t) for t in targets])
        return data_utils.collate_tokens(targets, pad_idx=pad, left_pad=False), lengths, lengths.sum().item()

    def collater_seq_label(self, targets, pad: int, eos: int):
        lengths = torch.LongTensor([len(t) for t in targets])
        ntokens = lengths.sum().item()
        collated = data_utils.collate_tokens(targets, pad_idx=pad, eos_idx=eos, left_pad=False)
        if not self.is_s2s:
            return collated, lengths, ntokens
        prev = data_utils.collate_tokens(targets, pad_idx=pad, eos_idx=eos, left_pad=False,
                                         move_eos_to_beginning=True)
        return (collated, prev), lengths, ntokens

    def collater(self, samples):
        samples = [s for s in samples if s["id"] is not None]
        if not samples:
            return {}
        audios = [s["audio_source"] for s in samples]
        videos = [s["video_source"] for s in samples]
        audios = None if audios[0] is None else audios
        videos = None if videos[0] is None else videos
        lengths = [len(x) for x in (audios if audios is not None else videos)]
        ids = [s["fid"] for s in samples]
        size = min(max(lengths) if self.pad_audio else min(lengths), self.max_sample_size)
        starts = None
        collated_audio = collated_video = None
        if audios is not None:
            collated_audio, padding_mask, starts = self.collater_audio(audios, size, ids=ids)
        if videos is not None:
            collated_video, padding_mask, starts = self.collater_audio(videos, size, starts, ids=ids)
        targets_list, lengths_list, ntokens_list = [], [], []
        for i in range(self.num_labels):
            targets = [s["label_list"][i] for s in samples]
            if self.label_rates[i] == -1:
                t, l, n = self.collater_seq_label(targets, self.pad_list[i], self.eos_list[i])
            else:
                t, l, n = self.collater_frm_label(targets, size, starts, self.label_rates[i], self.pad_list[i])
            targets_list.append(t)
            lengths_list.append(l)
            ntokens_list.append(n)
        net_input = {"source": {"audio": collated_audio, "video": collated_video},
                     "padding_mask": padding_mask}
        batch = {"id": torch.LongTensor([s["id"] for s in samples]), "net_input": net_input,
                 "utt_id": [s["fid"] for s in samples]}
        if self.single_target:
            batch["target_lengths"] = lengths_list[0]
            batch["ntokens"] = ntokens_list[0]
            if self.is_s2s:
                batch["target"], net_input["prev_output_tokens"] = targets_list[0]
            else:
                batch["target"] = targets_list[0]
        else:
            batch["target_lengths_list"] = lengths_list
            batch["ntokens_list"] = ntokens_list
            batch["target_list"] = targets_list
        return batch

    def num_tokens(self, index: int) -> int:
        return self.size(index)

    def num_tokens_vec(self, indices):
        sizes = self.sizes[indices]
        return sizes if self.pad_audio else np.minimum(sizes, self.max_sample_size)

    def size(self, index: int) -> int:
        if self.pad_audio:
            return int(self.sizes[index])
        return int(min(self.sizes[index], self.max_sample_size))

    def ordered_indices(self):
        order = [np.random.permutation(len(self))] if self.shuffle else [np.arange(len(self))]
        order.append(self.sizes)
        return np.lexsort(order)[::-1]
