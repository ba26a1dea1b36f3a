"""Word error counting, in pure Python (no torch, no fairseq): the decoder
(``avhubert.s2s_decode``, which re-exports these names) and the run report (``report/``, which
must stay light on a login node) share this one implementation."""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple


def word_errors(ref: str, hyp: str) -> Tuple[int, int]:
    """(word edit distance, number of reference words)."""
    r, h = ref.split(), hyp.split()
    prev = list(range(len(h) + 1))
    for i, rw in enumerate(r, 1):
        cur = [i] + [0] * len(h)
        for j, hw in enumerate(h, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (rw != hw))
        prev = cur
    return prev[-1], len(r)


def word_error_rate(results: Sequence[Tuple[str, str, str]]) -> Dict[str, Optional[float]]:
    """WER (percent; None without reference words), errors, reference words and utterances of
    ``(utterance id, reference, hypothesis)`` triples."""
    errors = words = 0
    for _, ref, hyp in results:
        e, n = word_errors(ref, hyp)
        errors, words = errors + e, words + n
    return {"wer": (100.0 * errors / words) if words else None, "errors": errors, "ref_words": words,
            "utterances": len(results)}
