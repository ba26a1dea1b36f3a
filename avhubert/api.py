"""A small Python API: load an AV-HuBERT checkpoint, get layer features or discrete units of a clip.

    import avhubert

    model = avhubert.load("checkpoint.pt")                # pretraining or fine-tuned, ours or reference
    feats = model.extract(video="clip.mp4", layer=9)      # (T, D) float32, 25 Hz, audio-visual
    feats = model.extract(video=roi_frames, audio=wav, layer=9)   # ROI frames (T, 96, 96) uint8, 16 kHz int16
    units = model.units(video="clip.mp4", layer=9, kmeans="kmeans.joblib")   # (T,) int64

A raw video path is processed by the crop stage's code (face landmarks, 96x96 mouth ROI at 25 fps,
16 kHz mono audio from its audio track) and read back as training reads it, so features equal the
features stage's for the same clip. Arrays are taken as they are: ``video`` = gray mouth ROI
frames (T, H, W) uint8 (centre-cropped to the model's 88x88), ``audio`` = 16 kHz mono samples
(int16, or a path to any audio file, converted to 16 kHz mono by ffmpeg). With both streams the
audio features are cut or zero-padded to the video's frame count (as in training); audio alone
gives ceil(filterbank frames / 4) frames. A missing stream is fed as zeros (the model was
pretrained with modality dropout); ``modalities`` ("av", "audio", "video") picks the streams.

Layer N >= 1 is transformer layer N's output (what the pipeline clusters); None = the last layer.
No fairseq knowledge is needed; torch >= 2.6 loads the checkpoints through a scoped allow-list
(``avhubert.checkpoint``). Published AV-HuBERT weights are under a non-commercial research licence.
"""
from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np

from avprep.crop import crop_one_video
from avprep.media import MediaError, ffmpeg_exe
from speechfeat import kmeans as km
from speechfeat.kmeans import assign

PathLike = Union[str, os.PathLike]
SAMPLE_RATE = 16_000
FRAME_RATE = 25


@dataclass
class CroppedVideo:
    """A raw video after the crop stage's processing, read back as training reads it."""

    roi: np.ndarray  # (T, 96, 96) uint8 gray mouth ROI at 25 fps
    wav: Optional[np.ndarray]  # 16 kHz int16 mono, None when the video has no audio track
    video_path: Path  # the ROI mp4 written by the crop code
    audio_path: Optional[Path]  # its 16 kHz wav


def crop_video(video: PathLike, out_dir: PathLike, name: Optional[str] = None,
               mode: Optional[str] = None) -> CroppedVideo:
    """Run the crop stage's code on one raw video into ``out_dir/<name>.{mp4,wav,landmarks.npz}``.
    Raises ``avprep.crop.CropError`` (``NoFaceError`` when no frame has a face) or
    ``avprep.media.MediaError``, whose messages name the file and the reason."""
    # the crop code and the readers the features stage uses (the pipeline's, not a copy)
    from avhubert.features import media_readers

    result = crop_one_video(Path(video), Path(out_dir), mode=mode, name=name)
    read_video, read_wav = media_readers()
    roi = np.asarray(read_video(str(result.video)))
    wav = None
    if result.audio is not None and Path(result.audio).is_file():
        wav, sr = read_wav(str(result.audio))
        if sr != SAMPLE_RATE:
            raise ValueError(f"{result.audio}: {sr} Hz audio from the crop step, expected {SAMPLE_RATE}")
        wav = np.asarray(wav)
    return CroppedVideo(roi, wav, Path(result.video), Path(result.audio) if wav is not None else None)


def read_audio(path: PathLike) -> np.ndarray:
    """Any audio (or video) file's first audio track as 16 kHz mono int16 (the static ffmpeg)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such audio file")
    proc = subprocess.run([ffmpeg_exe(), "-nostdin", "-v", "error", "-i", str(path), "-vn", "-map", "0:a:0",
                           "-ac", "1", "-ar", str(SAMPLE_RATE), "-f", "s16le", "-acodec", "pcm_s16le", "-"],
                          capture_output=True)
    if proc.returncode != 0:
        raise MediaError(f"{path}: cannot be read as audio: {proc.stderr.decode(errors='replace').strip()[-300:]}")
    return np.frombuffer(proc.stdout, dtype="<i2").astype(np.int16)


def kmeans_centroids(kmeans) -> np.ndarray:
    """(K, D) float32 centroids of a k-means model given as a path (``kmeans.joblib`` of the
    pipeline, or an sklearn model saved by the reference ``learn_kmeans.py``), a model dict of
    ``speechfeat.kmeans``, an sklearn model or an array."""
    if isinstance(kmeans, (str, os.PathLike)):
        if not Path(kmeans).is_file():
            raise FileNotFoundError(f"{kmeans}: k-means model not found")
        return km.load_centroids(kmeans)
    if isinstance(kmeans, dict) and "centroids" in kmeans:
        return np.asarray(kmeans["centroids"], dtype=np.float32)
    if hasattr(kmeans, "cluster_centers_"):
        return np.asarray(kmeans.cluster_centers_, dtype=np.float32)
    c = np.asarray(kmeans, dtype=np.float32)
    if c.ndim != 2:
        raise ValueError(f"k-means centroids must be (K, D), got shape {c.shape}")
    return c


class AVHubert:
    """An AV-HuBERT encoder in eval mode (see the module doc). Build it with :func:`load`."""

    def __init__(self, model, task_cfg, device: str, checkpoint: str):
        self.model, self.task_cfg, self.device, self.checkpoint = model, task_cfg, device, checkpoint

    @property
    def n_layers(self) -> int:
        return len(self.model.encoder.layers)

    @property
    def dim(self) -> int:
        return int(self.model.encoder.layers[0].fc2.out_features)

    def __repr__(self) -> str:
        return f"AVHubert({self.checkpoint!r}, layers={self.n_layers}, dim={self.dim}, device={self.device!r})"

    # ------------------------------------------------------------------------------ inputs
    def _streams(self, video, audio, modalities: Optional[str], crop_dir: Optional[PathLike],
                 crop_mode: Optional[str]):
        """(roi | None, wav | None, video frame count | None) of the arguments, keeping only
        the streams the chosen modalities use."""
        if modalities not in (None, "av", "audio", "video"):
            raise ValueError(f"modalities={modalities!r}: av, audio or video")
        if video is None and audio is None:
            raise ValueError("give video (a raw video path or ROI frames), audio (a path or 16 kHz samples) or both")
        roi = wav = None
        if isinstance(video, (str, os.PathLike)):
            if not Path(video).is_file():
                raise FileNotFoundError(f"{video}: no such video file")
            if crop_dir is not None:
                cropped = crop_video(video, crop_dir, mode=crop_mode)
            else:
                with tempfile.TemporaryDirectory(prefix="avhubert-crop-") as tmp:
                    cropped = crop_video(video, tmp, mode=crop_mode)
            roi = cropped.roi
            if audio is None and modalities != "video":
                wav = cropped.wav
        elif video is not None:
            roi = np.asarray(video)
            if roi.ndim != 3 or roi.dtype != np.uint8:
                raise ValueError(f"video frames must be gray mouth ROIs (T, H, W) uint8, got {roi.dtype} {roi.shape}")
        if isinstance(audio, (str, os.PathLike)):
            wav = read_audio(audio)
        elif audio is not None:
            wav = np.asarray(audio)
            if wav.ndim != 1:
                raise ValueError(f"audio must be 16 kHz mono samples (N,), got shape {wav.shape}")
        want = modalities or ("av" if roi is not None and wav is not None else "video" if roi is not None else "audio")
        if want in ("av", "video") and roi is None:
            raise ValueError(f"modalities={want!r} needs video")
        if want in ("av", "audio") and wav is None:
            why = f"{video} has no audio track" if isinstance(video, (str, os.PathLike)) else "no audio given"
            raise ValueError(f"modalities={want!r} needs audio: {why} (use modalities='video')")
        return (roi if want != "audio" else None, wav if want != "video" else None,
                len(roi) if roi is not None else None)

    def inputs(self, video=None, audio=None, modalities: Optional[str] = None, crop_dir: Optional[PathLike] = None,
               crop_mode: Optional[str] = None):
        """The model inputs (video (T, 88, 88) | None, audio (T, 26*stack) | None) as tensors,
        normalised as in training."""
        from avhubert import features as feat
        from avhubert.extract import audio_input, video_input

        roi, wav, n_video = self._streams(video, audio, modalities, crop_dir, crop_mode)
        v = video_input(roi, self.task_cfg) if roi is not None else None
        a = None
        if wav is not None:
            # with a video, audio frames follow its frame count (also for audio-only features of a
            # video, as the features stage does); audio alone keeps its own length
            n = n_video if n_video is not None else len(
                feat.audio_features(wav, int(getattr(self.task_cfg, "stack_order_audio", 4) or 4)))
            a = audio_input(wav, n, self.task_cfg)
        return v, a

    # ------------------------------------------------------------------------------ outputs
    def extract(self, video=None, audio=None, layer: Optional[int] = None, modalities: Optional[str] = None,
                max_frames: int = 2500, crop_dir: Optional[PathLike] = None,
                crop_mode: Optional[str] = None) -> np.ndarray:
        """(T, D) float32 features of ``layer`` (None = last) at 25 Hz. Clips longer than
        ``max_frames`` are cut into independent pieces, as the features stage does.
        ``crop_dir`` keeps the crop of a raw video (ROI mp4, wav, landmarks) there."""
        from avhubert.extract import extract_batched

        layer = self._layer(layer)
        v, a = self.inputs(video, audio, modalities, crop_dir, crop_mode)
        (feats,) = extract_batched(self.model, [(v, a)], layer, max_frames, 0)
        return feats

    def units(self, video=None, audio=None, layer: Optional[int] = None, kmeans=None,
              modalities: Optional[str] = None, **kwargs) -> np.ndarray:
        """(T,) int64 unit ids: the nearest centroid of ``kmeans`` (a path, model or (K, D)
        array; see :func:`kmeans_centroids`) for every frame of :meth:`extract`."""
        if kmeans is None:
            raise ValueError("units() needs kmeans= (a k-means model path, dict or centroid array)")
        centroids = kmeans_centroids(kmeans)
        if centroids.shape[1] != self.dim:
            raise ValueError(f"k-means centroids are {centroids.shape[1]}-d but the model's features are {self.dim}-d")
        return assign(self.extract(video, audio, layer, modalities, **kwargs), centroids)

    def _layer(self, layer: Optional[int]) -> int:
        if layer is None:
            return self.n_layers
        if not 0 <= int(layer) <= self.n_layers:
            raise ValueError(f"layer {layer}: {self.checkpoint} has layers 0..{self.n_layers}")
        return int(layer)


def load(checkpoint: PathLike, device: Optional[str] = None) -> AVHubert:
    """Load any AV-HuBERT checkpoint (pretraining or fine-tuned ``av_hubert_seq2seq`` / ``_ctc``;
    ours or written by the reference code, e.g. Meta's published weights, which are under a
    non-commercial research licence) on ``device`` (default: cuda when available)."""
    import torch

    from avhubert.extract import load_pretrained

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    with _quiet("fairseq", "avhubert"):  # importing fairseq turns on INFO logging of its model set-up
        model, task_cfg = load_pretrained(str(checkpoint), device=device)
    return AVHubert(model, task_cfg, device, str(checkpoint))


@contextlib.contextmanager
def _quiet(*names):
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
