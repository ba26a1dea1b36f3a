"""Reading and writing the media the pipeline handles, with PyAV and the static ffmpeg that
imageio-ffmpeg ships (no system ffmpeg).

Errors name the file and the reason (``MediaError``), so a stage can record them per item. When
ffmpeg fails because of the disk or filesystem (no space left, quota, I/O error, read-only), the
error is an ``OSError`` with that errno instead: the job's fault, never the item's.

Rotation: phones store frames sideways with a display matrix (or, in older files, a ``rotate``
tag that ffmpeg's demuxer turns into one). Decoded frames are turned upright by that rotation
(multiples of 90 degrees; PyAV's ``frame.rotation``, counterclockwise), so detection and the ROI
see the picture as a player shows it.
"""
from __future__ import annotations

import errno
import itertools
import os
import subprocess
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

import numpy as np

from pipeline.atomic import atomic_path

PathLike = Union[str, os.PathLike]
TARGET_FPS = 25
TARGET_SR = 16000


class MediaError(RuntimeError):
    """A media file cannot be used; the message names the file and the reason."""


# what ffmpeg prints when the disk or filesystem fails (strerror texts)
_FS_ERRORS = {"no space left on device": errno.ENOSPC, "disk quota exceeded": errno.EDQUOT,
              "input/output error": errno.EIO, "read-only file system": errno.EROFS}


def _ffmpeg_failed(path: PathLike, what: str, stderr: str, output: Optional[PathLike] = None) -> Exception:
    """The exception for a failed ffmpeg run on ``path``: OSError(errno) for a disk/filesystem
    failure (so the shard fails and is retried), whose file name is ``output`` (what ffmpeg was
    writing, under the work dir: the disk that is full, never the input's), else MediaError (the
    item's failure record)."""
    for line in stderr.splitlines():
        for phrase, code in _FS_ERRORS.items():
            if phrase in line.lower():
                return OSError(code, f"{path}: {what}: {line.strip()}", str(output or path))
    return MediaError(f"{path}: {what}: {stderr.strip()[-300:]}")


def ffmpeg_exe() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def _open(path: PathLike):
    import av

    if not Path(path).is_file():
        raise MediaError(f"{path}: no such file")
    if os.stat(path).st_size == 0:
        raise MediaError(f"{path}: empty file (0 bytes)")
    try:
        return av.open(str(path))
    except Exception as e:  # PyAV raises many error types for broken containers
        raise MediaError(f"{path}: cannot be decoded ({describe_error(e)})") from None


def describe_error(e: BaseException) -> str:
    """A decoder's exception in words: FFmpeg's own text without PyAV's errno number (an
    ``[Errno 1094995529]`` means nothing to a reader) or the function that failed."""
    import av

    if isinstance(e, av.FFmpegError):
        text = (e.strerror or type(e).__name__).rstrip(".")
        return text[:1].lower() + text[1:]
    return f"{type(e).__name__}: {e}"


# A decoded stream may end this much before the end its container states (ffmpeg's fps
# resampling rounds to half a frame, AAC priming and edit lists trim a few hundredths, AVI and
# phone files state durations to a frame) before the file counts as truncated: an absolute
# margin and a share of the stated duration, whichever is larger.
TRUNCATION_MARGIN_S = 0.25
TRUNCATION_SHARE = 0.02


def check_complete(path: PathLike, stream: str, decoded_s: float, stated_s: Optional[float],
                   start: Optional[float] = None, end: Optional[float] = None) -> None:
    """MediaError ``truncated: ...`` when ``decoded_s`` seconds of ``stream`` ("video" or "audio")
    decoded from ``[start, end)`` fall short of what the container states (``stated_s``, from
    ``video_info``; None: it does not say, nothing to check) by more than the margins above. A
    file cut short (an interrupted copy or download) keeps its header's durations and decodes
    only up to the cut."""
    if not stated_s:
        return
    begin = start or 0.0
    expected = (stated_s if end is None else min(end, stated_s)) - begin
    if expected <= 0:
        return
    if expected - decoded_s > max(TRUNCATION_MARGIN_S, TRUNCATION_SHARE * expected):
        where = f" in its segment {begin:.2f}-{begin + expected:.2f} s" if start or end is not None else ""
        raise MediaError(f"{path}: truncated: decoded {decoded_s:.2f} s of {stream}{where} of a stated "
                         f"{expected:.2f} s (the file is cut short or damaged)")


def _quarter_turns(frame) -> int:
    """Counterclockwise quarter turns that make a decoded frame upright (display matrix)."""
    rotation = getattr(frame, "rotation", 0) or 0
    return int(round(rotation / 90.0)) % 4


def _upright(img: np.ndarray, turns: int) -> np.ndarray:
    return np.ascontiguousarray(np.rot90(img, turns)) if turns else img


def video_info(path: PathLike) -> dict:
    """fps, frame size as displayed, duration (s: the video stream's as the container states it),
    rotation (degrees counterclockwise applied to the stored frames, 0/90/180/270), frame count
    from the container header (None when it does not say), whether there is an audio track and
    the audio stream's stated duration (s, None without one)."""
    with _open(path) as c:
        if not c.streams.video:
            raise MediaError(f"{path}: no video stream")
        vs = c.streams.video[0]
        rate = vs.average_rate or vs.guessed_rate or Fraction(TARGET_FPS)
        duration = _stated(vs, c)
        if vs.frames and rate:  # AVI states its frame count; its stream duration is what is there
            duration = max(duration or 0.0, float(vs.frames / rate))
        audio_duration = _stated(c.streams.audio[0], c) if c.streams.audio else None
        turns = 0
        try:  # the display matrix travels with the frames: look at the first one
            for frame in c.decode(vs):
                turns = _quarter_turns(frame)
                break
        except Exception:  # noqa: BLE001 - undecodable: iter_frames reports it with the reason
            pass
        width, height = vs.codec_context.width, vs.codec_context.height
        if turns % 2:
            width, height = height, width
        return {
            "fps": float(rate),
            "width": width,
            "height": height,
            "duration": duration,
            "rotation": 90 * turns,
            "header_frames": int(vs.frames) or None,
            "has_audio": bool(c.streams.audio),
            "audio_duration": audio_duration,
        }


def _stated(stream, container) -> Optional[float]:
    """A stream's duration as its container states it (the stream's header, else the
    container's, as Matroska gives it), in seconds; None when neither says."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1e6
    return None


def iter_frames(
    path: PathLike,
    fmt: str = "bgr24",
    fps: Optional[float] = None,
    start: Optional[float] = None,
    end: Optional[float] = None,
) -> Iterator[np.ndarray]:
    """Decoded frames in order, as (H, W, 3) bgr24/rgb24 or (H, W) gray arrays, streamed.

    ``fps``: resample to this rate by taking, for each output instant k/fps, the last frame
    shown at that instant (frames are dropped or repeated, as ffmpeg's fps filter does).
    ``start``/``end`` (seconds) trim to a segment; output instants count from ``start``.
    Frames come upright (the display matrix's rotation applied, see the module docstring).
    """
    c = _open(path)
    try:
        if not c.streams.video:
            raise MediaError(f"{path}: no video stream")
        vs = c.streams.video[0]
        vs.thread_type = "AUTO"
        in_rate = float(vs.average_rate or vs.guessed_rate or TARGET_FPS)
        if start:
            # jump to the key frame before the segment instead of decoding from the beginning
            c.seek(int(start / vs.time_base), stream=vs, backward=True, any_frame=False)
        base = start or 0.0
        k = 0
        prev = prev_t = t = None
        try:
            for frame in c.decode(vs):
                if frame.pts is None:
                    raise MediaError(f"{path}: frames without timestamps")
                t = float(frame.pts * vs.time_base)
                if end is not None and t >= end - 1e-6:
                    break
                if fps is None:
                    if start is None or t >= start - 1e-6:
                        yield _upright(_to_ndarray(frame, fmt), _quarter_turns(frame))
                    continue
                if prev is not None:
                    # output instant base + k/fps shows the input frame nearest to it
                    mid = (prev_t + t) / 2
                    while base + k / fps < mid:
                        yield prev
                        k += 1
                prev, prev_t = _upright(_to_ndarray(frame, fmt), _quarter_turns(frame)), t
            if fps is not None and prev is not None:
                stop = prev_t + 1.0 / in_rate
                if end is not None:
                    stop = min(stop, end)
                # output frame k covers [k, k+1)/fps: emit it when most of it lies before the end,
                # so a clip of d seconds gives round(d * fps) frames, as ffmpeg's fps filter
                while base + (k + 0.5) / fps < stop - 1e-6:
                    yield prev
                    k += 1
        except MediaError:
            raise
        except Exception as e:  # corrupt packets (zeroed or overwritten bytes) stop the decoder
            at = f" after {t:.2f} s" if t is not None else " at its first frame"
            raise MediaError(f"{path}: damaged: the video decoder failed{at} ({describe_error(e)})") from None
    finally:
        c.close()


def _to_ndarray(frame, fmt: str) -> np.ndarray:
    """The frame converted to ``fmt`` by one swscale thread: PyAV >= 17 converts with automatic
    threads, which cost ~0.4 ms of CPU per 640x480 frame more (measured: 1.09 -> 0.68 ms with the
    decoding, same pixels); the crop jobs already use every core."""
    global _SWS_THREADS
    if _SWS_THREADS:
        try:
            return frame.to_ndarray(format=fmt, threads=1)
        except TypeError:  # PyAV < 17: no threads argument, one thread anyway
            _SWS_THREADS = False
    return frame.to_ndarray(format=fmt)


_SWS_THREADS = True


def read_gray_video(path: PathLike) -> np.ndarray:
    """All frames of a video as uint8 (T, H, W) gray."""
    frames = list(iter_frames(path, fmt="gray"))
    if not frames:
        raise MediaError(f"{path}: no frame could be decoded")
    return np.stack(frames)


def iter_gray_video(path: PathLike) -> Iterator[np.ndarray]:
    return iter_frames(path, fmt="gray")


def count_video_frames(path: PathLike) -> int:
    """Exact number of decodable frames (demux + decode; container headers can lie)."""
    n = 0
    for _ in iter_frames(path, fmt="gray"):
        n += 1
    return n


def header_frame_count(path: PathLike) -> Optional[int]:
    """The frame count an mp4's header states (its sample table; no decoding), None when the
    container does not say. Exact for the ROI videos ``write_gray_video`` writes."""
    with _open(path) as c:
        if not c.streams.video:
            raise MediaError(f"{path}: no video stream")
        return int(c.streams.video[0].frames) or None


def write_gray_video(path: PathLike, frames: Union[np.ndarray, Iterable[np.ndarray]], fps: int = TARGET_FPS,
                     crf: int = 18) -> int:
    """Encode uint8 (H, W) gray frames as an h264 mp4 (yuv420p, the form every decoder reads),
    streamed into the static ffmpeg's stdin, written under a temporary name and renamed. Returns
    the number of frames written.

    Why a pipe to ffmpeg and not PyAV's encoder: inside a long-running process PyAV's bundled
    libx264 gave different bytes for the same frames from run to run (up to ~1 gray level mean
    after decoding), whatever its thread settings; the ffmpeg process gives the same file every
    time. One encoder thread: the shard jobs already use every core."""
    it = iter(frames)
    first = next(it, None)
    if first is None:
        raise MediaError(f"{path}: no frames to write")
    h, w = np.shape(first)[:2]
    n = 0
    with atomic_path(path) as tmp:
        cmd = [ffmpeg_exe(), "-nostdin", "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "gray",
               "-s", f"{w}x{h}", "-r", str(fps), "-i", "-", "-c:v", "libx264", "-preset", "veryfast",
               "-crf", str(crf), "-pix_fmt", "yuv420p", "-threads", "1", "-f", "mp4", str(tmp)]
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            for img in itertools.chain([first], it):
                img = np.ascontiguousarray(img, dtype=np.uint8)
                if img.shape[:2] != (h, w):
                    raise MediaError(f"{path}: frame {n} is {img.shape[1]}x{img.shape[0]}, the first was {w}x{h}")
                proc.stdin.write(img.tobytes())
                n += 1
            proc.stdin.close()
        except BrokenPipeError:
            pass  # ffmpeg stopped: its exit status and message below say why
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        err = proc.stderr.read().decode(errors="replace")
        if proc.wait() != 0:
            raise _ffmpeg_failed(path, "encoding failed", err)
    return n


def extract_audio(video_path: PathLike, wav_path: PathLike, start: Optional[float] = None,
                  end: Optional[float] = None, sr: int = TARGET_SR) -> int:
    """The first audio track of ``video_path`` (optionally trimmed) as mono 16-bit wav at ``sr``,
    written atomically. Returns the number of samples."""
    info = video_info(video_path)
    if not info["has_audio"]:
        raise MediaError(f"{video_path}: no audio track")
    cmd = [ffmpeg_exe(), "-nostdin", "-v", "error", "-y"]
    if start is not None:
        cmd += ["-ss", f"{start:.3f}"]
    cmd += ["-i", str(video_path)]
    if end is not None:
        cmd += ["-t", f"{end - (start or 0.0):.3f}"]
    with atomic_path(wav_path) as tmp:
        cmd += ["-vn", "-map", "0:a:0", "-ac", "1", "-ar", str(sr), "-acodec", "pcm_s16le", "-f", "wav", str(tmp)]
        proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
        if proc.returncode != 0:
            raise _ffmpeg_failed(video_path, "audio extraction failed", proc.stderr, wav_path)
    return count_wav_samples(wav_path)


def read_wav(path: PathLike) -> tuple[np.ndarray, int]:
    import soundfile as sf

    try:
        data, sr = sf.read(str(path), dtype="int16", always_2d=False)
    except Exception as e:
        raise MediaError(f"{path}: cannot be read as audio ({e})") from None
    if data.ndim > 1:
        data = data.mean(axis=1).astype(np.int16)
    return data, sr


def count_wav_samples(path: PathLike) -> int:
    import soundfile as sf

    try:
        return sf.info(str(path)).frames
    except Exception as e:
        raise MediaError(f"{path}: cannot be read as audio ({e})") from None
