"""Discrete speech units as text: the formats the units stage, ``launch.py units`` and the Python
API write, for unit-to-speech vocoders and speech-to-unit models.

One sequence of unit ids per utterance at the feature rate (25 Hz for AV-HuBERT layers):

- **full** (``.units``): ``"12 12 40 40 40 7"``, one id per frame, space-separated (one sequence
  per line: the ``--in-code-file`` of fairseq's ``generate_waveform_from_code.py``);
- **run-length deduplicated** (``.rle``): ``"12 40 7<TAB>2 3 1"``: consecutive repeats merged,
  then the duration of every run in frames (25 Hz), so ``sum(durations)`` = the frame count and
  :func:`expand` gives the full sequence back. What duration predictors and unit-to-speech
  models that take reduced units (fairseq's speech-to-unit recipes, ``--reduce-unit``) read;
- **vocoder manifest** (``.jsonl``): one JSON object per utterance, ``{"id", "audio" (absolute
  path of the 16 kHz wav), "<key>" (the full unit string), "duration" (seconds of audio)}``, the
  form of facebookresearch/speech-resynthesis manifests (its ``CodeDataset`` reads the units
  under ``"hubert"``, our default key, evaluating each line as a Python dict: JSON of strings and
  numbers is one). 25 Hz units over 16 kHz audio are 640 samples per unit (``code_hop_size``).
"""
from __future__ import annotations

import json
from typing import Sequence, Tuple

import numpy as np

DEFAULT_JSONL_KEY = "hubert"


def run_length(units: Sequence[int]) -> Tuple[np.ndarray, np.ndarray]:
    """(values, durations) of the runs of equal consecutive ids, int64 both."""
    u = np.asarray(units, dtype=np.int64)
    if len(u) == 0:
        return u, np.zeros(0, dtype=np.int64)
    starts = np.concatenate([[0], np.flatnonzero(u[1:] != u[:-1]) + 1])
    durations = np.diff(np.concatenate([starts, [len(u)]]))
    return u[starts], durations.astype(np.int64)


def expand(values: Sequence[int], durations: Sequence[int]) -> np.ndarray:
    """The full sequence of a run-length form (inverse of :func:`run_length`)."""
    values, durations = np.asarray(values, dtype=np.int64), np.asarray(durations, dtype=np.int64)
    if values.shape != durations.shape or (durations < 1).any():
        raise ValueError("run-length form: as many durations as values, each at least 1")
    return np.repeat(values, durations)


def units_line(units: Sequence[int]) -> str:
    return " ".join(map(str, np.asarray(units, dtype=np.int64).tolist()))


def rle_line(units: Sequence[int]) -> str:
    """``"values<TAB>durations"`` of a full sequence (an empty sequence gives an empty line)."""
    values, durations = run_length(units)
    if len(values) == 0:
        return ""
    return units_line(values) + "\t" + units_line(durations)


def parse_units_line(line: str) -> np.ndarray:
    return np.array(line.split(), dtype=np.int64)


def parse_rle_line(line: str) -> np.ndarray:
    """The full sequence of an ``.rle`` line."""
    line = line.rstrip("\n")
    if not line.strip():
        return np.zeros(0, dtype=np.int64)
    values, _, durations = line.partition("\t")
    return expand(parse_units_line(values), parse_units_line(durations))


def vocoder_record(utt_id: str, audio_path: str, units: Sequence[int], duration_seconds: float,
                   key: str = DEFAULT_JSONL_KEY) -> str:
    """One line of the vocoder manifest (no trailing newline)."""
    return json.dumps({"id": utt_id, "audio": str(audio_path), key: units_line(units),
                       "duration": round(float(duration_seconds), 6)}, ensure_ascii=False)
