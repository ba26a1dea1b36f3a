"""Landmarks that already exist, read instead of detecting faces (``crop.landmarks_dir``).

Formats read (one file per video, a per-frame sequence of 68x2 points or None where no face):
- the reference preparation's ``detect_landmark.py`` pickles (``<fid>.pkl``: a list of int32 (68, 2)
  arrays or None, one per decoded frame, the last face of a frame);
- auto_avsr's published landmark pickles for LRS2, LRS3 and VoxCeleb2 (same shape of file: a list of
  float (68, 2) arrays or None, from RetinaFace + FAN, the largest face of a frame);
- this pipeline's own ``crop/landmarks/<id>.npz`` (``raw``: (n, 68, 2) with -1 where no face), so a
  work dir's detections can be cropped again under other settings without detecting.

Pickles from elsewhere are read with an unpickler that builds only lists, None and numpy arrays:
a landmarks archive downloaded from a drive cannot run code on the cluster.

Where the file of an item is looked up, in order: ``<dir>/<item id>.{pkl,npz}`` (a file made for
exactly this item), then ``<dir>/<source video's path relative to the corpus, without
extension>.{pkl,npz}`` (the whole video; the reference and auto_avsr mirror the corpus tree this
way). A segment of a video (LRS3 pretrain) takes its frames from the whole video's file.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Iterable, NamedTuple, Optional, Sequence

import numpy as np

N_POINTS = 68
SUFFIXES = (".pkl", ".npz")

# the globals a pickled list of numpy arrays needs, numpy 1.x and 2.x spellings
_ALLOWED = {
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
}


class Imported(NamedTuple):
    """An item's landmarks file, and the frame of it where the item starts (a segment)."""

    path: Path
    first_frame: int = 0


class LandmarkFileError(ValueError):
    """A landmarks file that cannot be read or does not fit its video; the message names both."""


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refuses to load {module}.{name} (only lists of numpy arrays)")
        if module == "numpy.core.multiarray":  # written by numpy 1.x, read by numpy 2.x
            module = "numpy._core.multiarray" if hasattr(np, "_core") else module
        return super().find_class(module, name)


def candidates(landmarks_dir: Path, item_id: str, relative_video: Optional[str]) -> list[Path]:
    """The files that may hold an item's landmarks, in the order they are tried."""
    stems = [item_id]
    if relative_video:
        stem = str(Path(relative_video).with_suffix(""))
        if stem != item_id:
            stems.append(stem)
    return [Path(landmarks_dir) / f"{s}{suffix}" for s in stems for suffix in SUFFIXES]


def find(landmarks_dir: Path, item_id: str, relative_video: Optional[str]) -> Optional[Path]:
    for path in candidates(landmarks_dir, item_id, relative_video):
        if path.is_file():
            return path
    return None


def read(path: Path) -> list[Optional[np.ndarray]]:
    """The per-frame landmarks of a file: float64 (68, 2) arrays, None where no face was found."""
    path = Path(path)
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                raw = np.asarray(z["raw"])
                found = np.asarray(z["found"]) if "found" in z.files else (raw >= 0).all(axis=(1, 2))
            if raw.ndim != 3 or raw.shape[1:] != (N_POINTS, 2) or found.shape != raw.shape[:1]:
                raise LandmarkFileError(f"{path}: 'raw' has shape {raw.shape}, not (frames, 68, 2)")
            return [r.astype(np.float64) if ok else None for r, ok in zip(raw, found)]
        with open(path, "rb") as f:
            data = _ArraysOnly(io.BytesIO(f.read())).load()
    except LandmarkFileError:
        raise
    # an OSError (I/O, permissions) is left to the caller: not necessarily the file's fault
    except (EOFError, KeyError, ValueError, pickle.UnpicklingError, AttributeError, TypeError) as e:
        raise LandmarkFileError(f"{path}: not a landmarks file ({type(e).__name__}: {e})") from None
    return _frames_of(path, data)


def _frames_of(path: Path, data) -> list[Optional[np.ndarray]]:
    if isinstance(data, np.ndarray) and data.ndim == 3:
        data = list(data)
    if not isinstance(data, (list, tuple)):
        raise LandmarkFileError(f"{path}: holds a {type(data).__name__}, not a list of per-frame landmarks")
    out = []
    for k, frame in enumerate(data):
        if frame is None:
            out.append(None)
            continue
        arr = np.asarray(frame, dtype=np.float64)
        if arr.shape != (N_POINTS, 2):
            raise LandmarkFileError(f"{path}: frame {k} has landmarks of shape {arr.shape}, not (68, 2) "
                                    "(68-point dlib/FAN landmarks are needed)")
        out.append(arr)
    return out


def fit(path: Path, frames: Sequence[Optional[np.ndarray]], video: str, n_frames: int, fps: float,
        first_frame: int = 0) -> list[Optional[np.ndarray]]:
    """The landmarks of the ``n_frames`` decoded frames of ``video`` from ``first_frame`` on (a
    segment of a whole video's file), or a LandmarkFileError naming the file and the video when
    they do not fit: landmarks of another cut of the video would crop the wrong place."""
    if first_frame == 0 and len(frames) != n_frames:
        raise LandmarkFileError(f"{path} has landmarks for {len(frames)} frames but {video} decodes to "
                                f"{n_frames} frames at {fps:g} fps: not landmarks of this video")
    if first_frame + n_frames > len(frames) + 1 or (first_frame and first_frame >= len(frames)):
        raise LandmarkFileError(f"{path} has landmarks for {len(frames)} frames, too few for frames "
                                f"{first_frame}-{first_frame + n_frames - 1} of {video} at {fps:g} fps")
    part = list(frames[first_frame:first_frame + n_frames])
    # a segment's last frame may fall one frame past the file (rounding of the cut times): the
    # interpolation copies the last landmarks into it, as it does for a frame without a face
    return part + [None] * (n_frames - len(part))


def write_reference_pickle(path: Path, frames: Iterable[Optional[np.ndarray]]) -> None:
    """Write landmarks in the reference's format (a list of int32 (68, 2) arrays or None): for
    tests, and to hand a work dir's detections to the reference's own scripts."""
    data = [None if f is None else np.asarray(f, dtype=np.int32) for f in frames]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(data, f, protocol=2)
