"""Binary-classification metrics for per-residue predictions, in pure numpy.

Every ranking metric sorts the scores once (O(n log n)) and then works on the
cumulative true/false-positive counts at each *distinct* threshold, so tied
scores are always grouped: a threshold ``t`` predicts positive for every residue
with ``score >= t``, and thresholds are exactly the distinct score values.

The curve functions reproduce scikit-learn's ``precision_recall_curve``,
``roc_curve``, ``average_precision_score`` and ``roc_auc_score`` on binary
inputs, except that degenerate inputs (empty, or one class missing) never warn
or raise: undefined quantities are NaN (documented per function).

Labels may be bool or any numeric array containing only 0 and 1; scores may be
any real array of the same shape (NaN scores are rejected).  Multi-dimensional
inputs are flattened.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from e1min.errors import E1minError

__all__ = [
    "MetricsError",
    "precision_recall_curve",
    "roc_curve",
    "average_precision",
    "roc_auc",
    "high_recall_auprc",
    "confusion_at",
    "best_threshold",
    "binary_metrics",
    "mean_std",
]

Criterion = Literal["youden", "f1", "mcc"]
FloatArray = NDArray[np.float64]

_NAN = float("nan")


class MetricsError(E1minError, ValueError):
    """A metric request a user can fix: NaN scores (a diverged model), a bad min_recall or criterion."""


# --------------------------------------------------------------------------- core


def _validate(y_true: ArrayLike, y_score: ArrayLike) -> tuple[NDArray[np.bool_], FloatArray]:
    """Check shapes and labels; return flattened (bool labels, float64 scores)."""
    t = np.asarray(y_true)
    s = np.asarray(y_score)
    if t.shape != s.shape:
        raise ValueError(f"y_true and y_score must have the same shape, got {t.shape} and {s.shape}")
    t = t.reshape(-1)
    s = s.reshape(-1)
    if t.dtype != np.bool_:
        if not (np.issubdtype(t.dtype, np.number)):
            raise ValueError(f"y_true must be boolean or numeric 0/1 labels, got dtype {t.dtype}")
        bad = (t != 0) & (t != 1)
        if bad.any():
            vals = np.unique(t[bad])[:5]
            raise ValueError(f"y_true must be binary (0/1 or bool); found other values, e.g. {vals.tolist()}")
        t = t == 1
    if not np.issubdtype(s.dtype, np.number) and s.dtype != np.bool_:
        raise ValueError(f"y_score must be numeric, got dtype {s.dtype}")
    s = s.astype(np.float64, copy=False)
    if np.isnan(s).any():
        # Reachable from a diverged model (NaN scores), so a user error, not a bug.
        raise MetricsError(f"y_score contains NaN ({int(np.isnan(s).sum())} of {s.size} scores): the model's outputs are not finite")
    return t, s


def _counts(t: NDArray[np.bool_], s: FloatArray) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Cumulative (tps, fps, thresholds) at each distinct score, thresholds decreasing.

    ``tps[i]``/``fps[i]`` count positives/negatives with ``score >= thresholds[i]``.
    Counts are accumulated in int64 (exact) and returned as float64.
    """
    if s.size == 0:
        empty = np.empty(0, dtype=np.float64)
        return empty, empty.copy(), empty.copy()
    order = np.argsort(-s, kind="stable")
    s_sorted = s[order]
    t_sorted = t[order]
    # last index of each run of equal scores
    last = np.flatnonzero(np.diff(s_sorted)) if s_sorted.size > 1 else np.empty(0, dtype=np.intp)
    last = np.r_[last, s_sorted.size - 1]
    tps = np.cumsum(t_sorted, dtype=np.int64)[last]
    fps = (last + 1) - tps
    return tps.astype(np.float64), fps.astype(np.float64), s_sorted[last]


def _prepare(y_true: ArrayLike, y_score: ArrayLike) -> tuple[FloatArray, FloatArray, FloatArray]:
    return _counts(*_validate(y_true, y_score))


def _safe_div(num: FloatArray, den: FloatArray) -> FloatArray:
    """Elementwise num/den with 0 where den == 0 (no warnings)."""
    out = np.zeros(np.broadcast(num, den).shape, dtype=np.float64)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _ap(tps: FloatArray, fps: FloatArray) -> float:
    if tps.size == 0 or tps[-1] == 0:
        return _NAN
    recall = tps / tps[-1]
    precision = tps / (tps + fps)  # tps + fps >= 1 at every distinct threshold
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def _auc(tps: FloatArray, fps: FloatArray) -> float:
    if tps.size == 0 or tps[-1] == 0 or fps[-1] == 0:
        return _NAN
    tpr = np.r_[0.0, tps / tps[-1]]
    fpr = np.r_[0.0, fps / fps[-1]]
    # trapezoid over the full (un-thinned) curve: ties give diagonal segments = 1/2 credit
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1])) / 2.0)


def _hra(tps: FloatArray, fps: FloatArray, min_recall: float) -> tuple[float, float]:
    if not 0.0 <= min_recall < 1.0:
        raise MetricsError(f"'min_recall' must be in [0, 1), got {min_recall}")
    if tps.size == 0 or tps[-1] == 0:
        return _NAN, _NAN
    recall = tps / tps[-1]
    prev = np.r_[0.0, recall[:-1]]
    precision = tps / (tps + fps)
    width = np.clip(recall - np.maximum(prev, min_recall), 0.0, None)
    raw = float(np.sum(width * precision))
    return raw / (1.0 - min_recall), raw


def _confusion(tp: float, fp: float, tn: float, fn: float) -> dict[str, float]:
    precision = tp / (tp + fp) if tp + fp > 0 else 0.0
    recall = tp / (tp + fn) if tp + fn > 0 else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn > 0 else 0.0
    spec = tn / (tn + fp) if tn + fp > 0 else 0.0
    den = (tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)
    mcc = (tp * tn - fp * fn) / math.sqrt(den) if den > 0 else 0.0
    return {
        "tp": int(tp),
        "fp": int(fp),
        "tn": int(tn),
        "fn": int(fn),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "mcc": float(mcc),
        "specificity": float(spec),
    }


def _criterion_values(tps: FloatArray, fps: FloatArray, criterion: str) -> FloatArray:
    P, N = tps[-1], fps[-1]
    fns = P - tps
    tns = N - fps
    # youden and f1 are one division of exact integers, so equal optima compare equal
    if criterion == "youden":
        return (tps * N - fps * P) / (P * N)
    if criterion == "f1":
        return _safe_div(2 * tps, tps + fps + P)
    if criterion == "mcc":
        den = np.sqrt((tps + fps) * P * N * (tns + fns))
        return _safe_div(tps * tns - fps * fns, den)
    raise ValueError(f"criterion must be 'youden', 'f1' or 'mcc', got {criterion!r}")


def _best(tps: FloatArray, fps: FloatArray, thresholds: FloatArray, criterion: str) -> tuple[float, float]:
    if criterion not in ("youden", "f1", "mcc"):
        raise MetricsError(f"threshold criterion must be 'youden', 'f1' or 'mcc', got {criterion!r}")
    if tps.size == 0 or tps[-1] == 0 or fps[-1] == 0:
        return _NAN, _NAN
    vals = _criterion_values(tps, fps, criterion)
    i = int(np.argmax(vals))  # first maximum = highest threshold among ties
    return float(thresholds[i]), float(vals[i])


# --------------------------------------------------------------------------- public


def precision_recall_curve(y_true: ArrayLike, y_score: ArrayLike) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Precision-recall pairs at every distinct threshold (sklearn semantics).

    Returns ``(precision, recall, thresholds)`` with thresholds increasing and
    ``len(precision) == len(recall) == len(thresholds) + 1``; the final point is
    the sentinel ``(precision=1, recall=0)``.  Precision is 0 where nothing is
    predicted positive.  With no positives, recall is NaN (sklearn warns and uses
    1); empty input gives just the sentinel and no thresholds.
    """
    tps, fps, thr = _prepare(y_true, y_score)
    precision = _safe_div(tps, tps + fps)
    if tps.size and tps[-1] > 0:
        recall = tps / tps[-1]
    else:
        recall = np.full(tps.shape, _NAN)
    return np.r_[precision[::-1], 1.0], np.r_[recall[::-1], 0.0], thr[::-1].copy()


def roc_curve(y_true: ArrayLike, y_score: ArrayLike, drop_intermediate: bool = True) -> tuple[FloatArray, FloatArray, FloatArray]:
    """ROC curve ``(fpr, tpr, thresholds)`` with thresholds decreasing (sklearn semantics).

    The first point is ``(0, 0)`` at threshold ``+inf``.  ``drop_intermediate``
    (default True, as in sklearn) removes collinear points that do not change the
    curve.  fpr (tpr) is all-NaN when there are no negatives (positives).
    """
    tps, fps, thr = _prepare(y_true, y_score)
    if drop_intermediate and fps.size > 2:
        keep = np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True]
        tps, fps, thr = tps[keep], fps[keep], thr[keep]
    tps = np.r_[0.0, tps]
    fps = np.r_[0.0, fps]
    thr = np.r_[np.inf, thr]
    fpr = fps / fps[-1] if fps[-1] > 0 else np.full(fps.shape, _NAN)
    tpr = tps / tps[-1] if tps[-1] > 0 else np.full(tps.shape, _NAN)
    return fpr, tpr, thr


def average_precision(y_true: ArrayLike, y_score: ArrayLike) -> float:
    """Average precision (our AUPRC) = sum_n (R_n - R_{n-1}) P_n over distinct thresholds.

    Identical to ``sklearn.metrics.average_precision_score`` (step-wise, no
    interpolation).  NaN if there are no positives (or the input is empty).
    """
    return _ap(*_prepare(y_true, y_score)[:2])


def roc_auc(y_true: ArrayLike, y_score: ArrayLike) -> float:
    """Area under the ROC curve, ties counted as 1/2 (= ``sklearn.metrics.roc_auc_score``).

    NaN if either class is missing.
    """
    return _auc(*_prepare(y_true, y_score)[:2])


def high_recall_auprc(y_true: ArrayLike, y_score: ArrayLike, min_recall: float = 0.7) -> tuple[float, float]:
    """High-recall AUPRC (HRA): the average-precision area restricted to recall >= ``min_recall``.

    With distinct thresholds taken in decreasing order, recall ``R_n`` and
    precision ``P_n`` at each, and ``R_0 = 0``::

        raw = sum_n max(0, R_n - max(R_{n-1}, min_recall)) * P_n

    i.e. the step-wise AP area where the step crossing ``min_recall`` only counts
    its width above ``min_recall`` (at that step's precision ``P_n``) and steps
    entirely below it count nothing.  Returns ``(normalised, raw)`` with
    ``normalised = raw / (1 - min_recall)``, so a perfect ranking scores 1.0 and
    ``raw`` is at most ``1 - min_recall``.  With ``min_recall=0`` both equal the
    average precision.  NaN (both) if there are no positives.
    ``min_recall`` must lie in ``[0, 1)``.
    """
    tps, fps, _ = _prepare(y_true, y_score)
    return _hra(tps, fps, float(min_recall))


def confusion_at(y_true: ArrayLike, y_score: ArrayLike, threshold: float) -> dict[str, float]:
    """Confusion counts and derived metrics predicting positive where ``score >= threshold``.

    Keys: tp, fp, tn, fn (ints), precision, recall, f1, mcc, specificity
    (floats; any 0/0 gives 0, matching sklearn's ``zero_division=0``).
    """
    t, s = _validate(y_true, y_score)
    pred = s >= threshold
    tp = int(np.count_nonzero(pred & t))
    fp = int(np.count_nonzero(pred)) - tp
    pos = int(np.count_nonzero(t))
    fn = pos - tp
    tn = t.size - pos - fp
    return _confusion(float(tp), float(fp), float(tn), float(fn))


def best_threshold(y_true: ArrayLike, y_score: ArrayLike, criterion: Criterion = "youden") -> tuple[float, float]:
    """Threshold maximising ``criterion`` over all distinct score values; returns ``(threshold, value)``.

    Criteria: ``"youden"`` (TPR - FPR), ``"f1"``, ``"mcc"`` (0/0 counted as 0).
    Prediction is ``score >= threshold``; among equal optima the highest threshold
    wins.  ``(nan, nan)`` if the input is empty or either class is missing.
    """
    tps, fps, thr = _prepare(y_true, y_score)
    return _best(tps, fps, thr, criterion)


def binary_metrics(y_true: ArrayLike, y_score: ArrayLike, threshold: float | None = None, min_recall: float = 0.7) -> dict[str, float]:
    """All headline metrics from one sort.

    Keys: n, positives, positive_rate, auprc, auroc, hra, hra_raw, best_f1,
    best_f1_threshold, best_mcc, best_mcc_threshold (the ``best_*`` are
    optimistic: fitted on the same data), plus f1, mcc, precision, recall at
    ``threshold`` when it is given.  If the input is empty or either class is
    missing, every metric except n/positives/positive_rate is NaN
    (positive_rate is NaN only when empty).  Never warns.
    """
    t, s = _validate(y_true, y_score)
    n = int(t.size)
    pos = int(np.count_nonzero(t))
    out: dict[str, float] = {
        "n": n,
        "positives": pos,
        "positive_rate": pos / n if n else _NAN,
    }
    keys = ["auprc", "auroc", "hra", "hra_raw", "best_f1", "best_f1_threshold", "best_mcc", "best_mcc_threshold"]
    thr_keys = ["f1", "mcc", "precision", "recall"] if threshold is not None else []
    if n == 0 or pos == 0 or pos == n:
        out.update({k: _NAN for k in keys + thr_keys})
        return out
    tps, fps, thr = _counts(t, s)
    hra, hra_raw = _hra(tps, fps, float(min_recall))
    f1_t, f1_v = _best(tps, fps, thr, "f1")
    mcc_t, mcc_v = _best(tps, fps, thr, "mcc")
    out.update(
        auprc=_ap(tps, fps),
        auroc=_auc(tps, fps),
        hra=hra,
        hra_raw=hra_raw,
        best_f1=f1_v,
        best_f1_threshold=f1_t,
        best_mcc=mcc_v,
        best_mcc_threshold=mcc_t,
    )
    if threshold is not None:
        pred = s >= threshold
        tp = float(np.count_nonzero(pred & t))
        fp = float(np.count_nonzero(pred)) - tp
        c = _confusion(tp, fp, float(n - pos) - fp, float(pos) - tp)
        out.update({k: c[k] for k in thr_keys})
    return out


def mean_std(values: Iterable[Any]) -> dict[str, Any]:
    """Mean and *population* std (ddof=0) over folds, ignoring NaN.

    Returns ``{"mean", "std", "folds", "n"}``: ``folds`` lists every fold's value as given (NaN kept),
    ``n`` counts the non-NaN values used; mean and std are NaN when there are none.
    """
    given = [float(v) for v in np.asarray(list(values), dtype=np.float64).reshape(-1)]
    a = np.array([v for v in given if not np.isnan(v)], dtype=np.float64)
    if a.size == 0:
        return {"mean": _NAN, "std": _NAN, "folds": given, "n": 0}
    return {"mean": float(a.mean()), "std": float(a.std(ddof=0)), "folds": given, "n": int(a.size)}
