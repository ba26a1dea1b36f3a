"""infer: lip reading / audio-visual speech recognition of one raw video with a fine-tuned model.

    python launch.py infer VIDEO --checkpoint FT.pt [--modalities video|audio|av] [--beam 50]
                                 [--snr DB --noise FILE]

Runs the crop stage's code on VIDEO (face and landmark detection, mouth ROI at 25 fps, 16 kHz mono
audio from the video's audio track when it has one), builds the model inputs exactly as the
fine-tuning dataset does for evaluation (ROI frames /255, centre crop, normalised; log filterbanks
stacked to 25 Hz, cut to the video length when both streams are used, layer-normed), decodes with
beam search and prints the transcript on stdout (one line). Logs go to stderr.

``--snr DB --noise FILE`` mixes the noise recording FILE (any audio file; resampled to 16 kHz
mono) into the video's audio at exactly DB dB SNR before recognition, as the finetune stage's
evaluation under noise does: the noise is read cyclically from an offset fixed by ``--noise-seed``
and the video's name, so a rerun hears the same mixture (``--keep-crop DIR`` also writes it there
as ``<name>.noisy.wav``). It only changes what the audio stream hears.

``--modalities`` defaults to the streams the checkpoint was fine-tuned on. Exit status: 0 with a
transcript; 1 with a one-line error message (no traceback) when the input cannot be recognised
(no face found, no audio track for an audio modality, unreadable video); 2 for bad arguments.

The checkpoint is an ``av_hubert_seq2seq`` checkpoint (our finetune stage's
``finetune/checkpoints/checkpoint_final.pt``, or one written by the reference code; published
AV-HuBERT weights are under a non-commercial research licence). Its sentencepiece model is looked
up at the path stored in the checkpoint, then beside the checkpoint (``--spm`` overrides).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from avprep import crop
from avprep.media import MediaError
from speechfeat.noise import AudioError, load_mono_16k, seeded_unit
from stages.finetune import DECODING

log = logging.getLogger("infer")


class InferError(Exception):
    """A problem with the input the user can act on: printed as one line, exit status 1."""


def parse_args(argv):
    p = argparse.ArgumentParser(prog="launch.py infer", description=__doc__.split("\n\n")[0])
    p.add_argument("video", help="a raw video file (any container/codec ffmpeg reads)")
    p.add_argument("--checkpoint", required=True, help="fine-tuned av_hubert_seq2seq checkpoint")
    p.add_argument("--modalities", choices=["video", "audio", "av"], default=None,
                   help="input streams (default: those the checkpoint was fine-tuned on)")
    p.add_argument("--beam", type=int, default=None,
                   help="beam size (default: the setting the finetune stage chose on valid, decoding.json beside "
                        "the checkpoint; without one 50, as the reference)")
    p.add_argument("--max-len-a", type=float, default=1.0, help="max length = a * frames + b")
    p.add_argument("--max-len-b", type=int, default=0)
    p.add_argument("--lenpen", type=float, default=None, help="length penalty (default: as --beam; else 1.0)")
    p.add_argument("--spm", default=None, help="sentencepiece model (default: found from the checkpoint)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--crop-mode", choices=["fast", "reference"], default=None,
                   help="face tracking mode of the crop step (default: the crop stage's default)")
    p.add_argument("--keep-crop", default=None, metavar="DIR",
                   help="keep the mouth ROI video and audio written by the crop step in DIR")
    p.add_argument("--snr", type=float, default=None, metavar="DB",
                   help="mix --noise into the audio at this signal-to-noise ratio (dB)")
    p.add_argument("--noise", default=None, metavar="FILE", help="noise recording for --snr (any audio file)")
    p.add_argument("--noise-seed", type=int, default=0, help="seed of the noise offset (default 0)")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------- inputs


def crop_video(video: Path, out_dir: Path, mode: Optional[str] = None) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """The crop stage's processing of one video: (ROI frames (T, 96, 96) uint8 gray, 16 kHz int16
    mono audio or None when the video has no audio track). Raises InferError when no face is found
    or the video cannot be read.

    The ROI is read back from the mp4 the crop code writes, as training reads it (same codec)."""
    from avhubert import features as feat

    name = video.stem
    stale = out_dir / f"{name}.landmarks.npz"  # the crop code reuses landmarks it finds there
    if stale.exists():
        stale.unlink()
    try:
        result = crop.crop_one_video(video, out_dir, mode=mode, name=name)
    except (crop.CropError, MediaError) as e:  # CropError names the file and the reason
        raise InferError(str(e)) from None
    roi = feat.read_video_gray(str(result.video))
    wav = None
    if result.audio is not None and Path(result.audio).is_file():
        wav, sr = feat.read_wav_int16(str(result.audio))
        if sr != feat.AUDIO_SAMPLE_RATE:
            raise InferError(f"{result.audio}: expected 16 kHz audio from the crop step, got {sr} Hz")
    return roi, wav


def build_sample(roi: Optional[np.ndarray], wav: Optional[np.ndarray], streams, task_cfg, device: str):
    """One collated batch as the fine-tuning dataset builds it for evaluation."""
    import torch
    import torch.nn.functional as F

    from avhubert import features as feat

    video = audio = None
    if "video" in streams:
        frames = feat.image_transform(roi, int(task_cfg.image_crop_size), float(task_cfg.image_mean),
                                      float(task_cfg.image_std), train_aug=False)
        video = torch.from_numpy(np.ascontiguousarray(frames, dtype=np.float32))[None, None]  # (1, 1, T, H, W)
    if "audio" in streams:
        a = feat.audio_features(wav, int(task_cfg.stack_order_audio))
        if video is not None:
            a = feat.match_length(a, video.size(2))
        a = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
        if bool(task_cfg.normalize):
            a = F.layer_norm(a, a.shape[1:])
        audio = a.t()[None]  # (1, F, T)
    n_frames = (video if video is not None else audio).size(2)
    net_input = {"source": {"audio": None if audio is None else audio.to(device),
                            "video": None if video is None else video.to(device)},
                 "padding_mask": torch.zeros(1, n_frames, dtype=torch.bool, device=device)}
    return {"id": torch.tensor([0]), "net_input": net_input}


def add_noise(wav: np.ndarray, noise_file: Path, snr: float, seed: int, name: str) -> np.ndarray:
    """``wav`` (16 kHz int16) mixed with the recording ``noise_file`` at ``snr`` dB, read from an
    offset fixed by ``seed`` and ``name``."""
    from avhubert.features import mix_noise

    if not noise_file.is_file():
        raise InferError(f"{noise_file}: no such noise file")
    try:
        noise = load_mono_16k(noise_file)
    except AudioError as e:
        raise InferError(str(e)) from None
    offset = int(seeded_unit(seed, "infer", name) * len(noise))
    return mix_noise(wav, noise, snr, offset=offset)


# ------------------------------------------------------------------------------------- main


def transcribe(video: Path, checkpoint: Path, modalities: Optional[str] = None, beam: int = 50,
               max_len_a: float = 1.0, max_len_b: int = 0, lenpen: float = 1.0, spm: Optional[str] = None,
               device: Optional[str] = None, keep_crop: Optional[Path] = None,
               crop_mode: Optional[str] = None, snr: Optional[float] = None, noise: Optional[Path] = None,
               noise_seed: int = 0) -> str:
    import torch

    from avhubert import export, s2s_decode

    if not video.is_file():
        raise InferError(f"{video}: no such video file")
    if not checkpoint.is_file() and not export.has_seq2seq(checkpoint):
        raise InferError(f"{checkpoint}: no such checkpoint (a file, or a directory of launch.py export with its "
                         "fine-tuned model)")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model, saved_cfg, task = s2s_decode.load_finetuned(str(checkpoint), modalities=modalities, device=device)
    except ValueError as e:
        raise InferError(str(e)) from None
    streams = list(saved_cfg.task.modalities)
    spm_path = Path(spm) if spm else s2s_decode.find_spm_model(saved_cfg.task, str(checkpoint))
    if spm_path is not None and not spm_path.is_file():
        raise InferError(f"{spm_path}: no such sentencepiece model")

    with tempfile.TemporaryDirectory(prefix="avhubert-infer-") as tmp:
        out_dir = Path(keep_crop) if keep_crop else Path(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        roi, wav = crop_video(video, out_dir, mode=crop_mode)
    if "audio" in streams and wav is None:
        raise InferError(f"{video}: the video has no audio track; use --modalities video")
    if noise is not None and wav is not None:
        wav = add_noise(wav, Path(noise), float(snr), noise_seed, video.name)
        if "audio" not in streams:
            log.warning("--noise: the model reads video only here; the noise changes nothing")
        if keep_crop:
            import soundfile as sf

            sf.write(str(Path(keep_crop) / f"{video.stem}.noisy.wav"), wav, 16000, subtype="PCM_16")
    log.info("%s: %d frames, %s; decoding %s", video, len(roi),
             "no audio" if wav is None else f"{len(wav)} audio samples", "+".join(streams))

    sample = build_sample(roi, wav, streams, saved_cfg.task, device)
    generator = s2s_decode.build_generator(model, task, beam=beam, max_len_a=max_len_a,
                                           max_len_b=max_len_b, lenpen=lenpen)
    detok = s2s_decode.Detokenizer(task.target_dictionary, str(spm_path) if spm_path else None)
    return s2s_decode.decode_sample(model, generator, sample, detok)[0]


def chosen_decoding(checkpoint: Path) -> dict:
    """The decoding setting the finetune stage chose on valid for this checkpoint: ``decoding.json``
    beside it (or in the export directory it is); {} when there is none."""
    path = checkpoint / DECODING if checkpoint.is_dir() else checkpoint.parent / DECODING
    try:
        chosen = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {**chosen, "source": f"chosen on valid, {path}"}


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s | %(levelname)s | %(name)s | %(message)s")
    if not args.verbose:  # fairseq and the model log at INFO (and warn about deprecations) on load

        warnings.filterwarnings("ignore", category=FutureWarning)
        for name in ("fairseq", "avhubert", "stages", "hydra", "infer"):
            logging.getLogger(name).setLevel(logging.WARNING)
    chosen = chosen_decoding(Path(args.checkpoint))
    if args.beam is None:
        args.beam = int(chosen.get("beam", 50))
    if args.lenpen is None:
        args.lenpen = float(chosen.get("lenpen", 1.0))
    if chosen:  # stdout is the transcript alone, stderr stays quiet unless -v
        log.info("decoding with beam %d, lenpen %g (%s)", args.beam, args.lenpen, chosen.get("source"))
    if args.beam < 1:
        print("infer: --beam must be at least 1", file=sys.stderr)
        return 2
    if (args.snr is None) != (args.noise is None):
        print("infer: --snr and --noise go together", file=sys.stderr)
        return 2
    try:
        text = transcribe(Path(args.video), Path(args.checkpoint), modalities=args.modalities, beam=args.beam,
                          max_len_a=args.max_len_a, max_len_b=args.max_len_b, lenpen=args.lenpen, spm=args.spm,
                          device=args.device, keep_crop=Path(args.keep_crop) if args.keep_crop else None,
                          crop_mode=args.crop_mode, snr=args.snr,
                          noise=Path(args.noise) if args.noise else None, noise_seed=args.noise_seed)
    except InferError as e:
        print(f"infer: {e}", file=sys.stderr)
        return 1
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
