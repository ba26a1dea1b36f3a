"""What a small change of features guarantees about their nearest centroids, for tests that compare
the labels of two feature matrices that differ by rounding (float16 storage, another kernel).

A frame ``x`` labelled ``a`` whose features become ``y = x + e`` can be assigned another centroid
``b`` only if its margin ``||x - c_b||^2 - ||x - c_a||^2`` is at most ``2 e.(c_a - c_b)`` (the
``||e||^2`` terms cancel), so at most ``2 ||e|| ||c_a - c_b||``, plus the float32 error of the two
scores ``||c||^2 - 2 y.c`` that ``speechfeat.kmeans.assign`` compares. A change outside that margin
is a bug, whatever the machine: the bound is derived, not measured, so a test of it cannot turn
flaky on another CPU (unlike a share of changed labels, which depends on how many frames happen to
lie near a boundary)."""
from __future__ import annotations

import numpy as np

U32 = 2.0 ** -24  # float32 unit roundoff (round to nearest)
U16 = 2.0 ** -11  # float16 unit roundoff
F16_SUBNORMAL_ERROR = 2.0 ** -25  # half float16's smallest subnormal: the rounding error below its normal range
F16_MAX = 65504.0


def float16_rounding_bound(x: np.ndarray) -> np.ndarray:
    """Per row of ``x``: the most that rounding it to float16 can move it (Euclidean norm)."""
    x = np.asarray(x, dtype=np.float64)
    return U16 * np.linalg.norm(x, axis=1) + np.sqrt(x.shape[1]) * F16_SUBNORMAL_ERROR


def unexplained_label_changes(x: np.ndarray, centroids: np.ndarray, labels_x: np.ndarray,
                              labels_y: np.ndarray, e_bound) -> np.ndarray:
    """Indices of the frames whose label went from ``labels_x`` to ``labels_y`` though neither the
    feature change (at most ``e_bound``, per row or one number, in Euclidean norm) nor float32
    arithmetic can explain it. ``labels_y`` are float32 nearest-centroid labels of features within
    ``e_bound`` of ``x``; ``labels_x`` may come from anywhere (a wrong one only widens the margin)."""
    x = np.asarray(x, dtype=np.float64)
    c = np.asarray(centroids, dtype=np.float64)
    a, b = np.asarray(labels_x, dtype=np.int64), np.asarray(labels_y, dtype=np.int64)
    assert x.shape[0] == len(a) == len(b) and x.shape[1] == c.shape[1], (x.shape, c.shape, len(a), len(b))
    changed = np.flatnonzero(a != b)
    if not len(changed):
        return changed
    xs, ca, cb = x[changed], c[a[changed]], c[b[changed]]
    e = np.broadcast_to(np.asarray(e_bound, dtype=np.float64), (len(x),))[changed]
    margin = ((xs - cb) ** 2).sum(1) - ((xs - ca) ** 2).sum(1)
    allowed = 2 * e * np.linalg.norm(ca - cb, axis=1)
    # float32 scores: a dot product of D terms (error <= D u sum|y c|), an exact -2, ||c||^2 and
    # the sum rounded once each; |y_i| <= |x_i| + ||e||. Doubled for headroom, for both centroids.
    d = x.shape[1]
    y_abs = np.abs(xs) + e[:, None]
    for cc in (ca, cb):
        allowed += 2 * (d + 2) * U32 * (2 * (y_abs * np.abs(cc)).sum(1) + (cc ** 2).sum(1))
    return changed[margin > allowed]
