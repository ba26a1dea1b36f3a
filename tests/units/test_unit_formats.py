"""The unit text formats (speechfeat/units.py): run-length form, vocoder manifest lines."""
from __future__ import annotations

import ast
import json

import numpy as np
import pytest

from speechfeat.units import (expand, parse_rle_line, parse_units_line, rle_line, run_length, units_line,
                              vocoder_record)


def test_run_length_round_trip():
    rng = np.random.default_rng(0)
    for n in (0, 1, 2, 17, 500):
        units = rng.integers(0, 4, size=n)  # few ids: long runs and single frames
        values, durations = run_length(units)
        assert (durations >= 1).all() and durations.sum() == n
        assert (values[1:] != values[:-1]).all()  # runs are maximal
        assert np.array_equal(expand(values, durations), units)
        assert np.array_equal(parse_rle_line(rle_line(units) + "\n"), units)
        assert np.array_equal(parse_units_line(units_line(units)), units)
    assert rle_line([5, 5, 5, 2, 7, 7]) == "5 2 7\t3 1 2"
    assert rle_line([]) == "" and parse_rle_line("\n").size == 0
    with pytest.raises(ValueError):
        expand([1, 2], [1, 0])


def test_vocoder_record_is_json_and_a_python_literal():
    line = vocoder_record("spk/utt 1", "/data/crop/audio/spk/utt 1.wav", [3, 3, 9], 0.12)
    rec = json.loads(line)
    assert rec == {"id": "spk/utt 1", "audio": "/data/crop/audio/spk/utt 1.wav", "hubert": "3 3 9", "duration": 0.12}
    assert ast.literal_eval(line) == rec  # speech-resynthesis evaluates each manifest line
    assert json.loads(vocoder_record("a", "/a.wav", [1], 1.0, key="units"))["units"] == "1"
