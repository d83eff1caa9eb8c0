"""e1min.metrics cross-checked against scikit-learn and naive reference loops."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

from e1min import metrics as M

SEEDS = [0, 1, 2, 3]
TIE_MODES = ["none", "round1", "int"]


def _data(seed: int, ties: str, n: int = 400, pos_rate: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Random labels with informative scores; ``ties`` controls how many tied scores there are."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < pos_rate).astype(np.int64)
    y[0], y[1] = 1, 0  # both classes always present
    s = rng.normal(size=n) + 1.2 * y
    if ties == "round1":
        s = np.round(s, 1)  # many ties, many distinct values
    elif ties == "int":
        s = np.round(s).astype(np.float64)  # few distinct values, heavy ties
    return y, s


def _naive_hra(y: np.ndarray, s: np.ndarray, min_recall: float) -> float:
    """Reference raw HRA: explicit loop over distinct thresholds, high to low."""
    P = int(y.sum())
    area, prev_recall = 0.0, 0.0
    for t in sorted(set(s.tolist()), reverse=True):
        pred = s >= t
        tp = int((pred & (y == 1)).sum())
        fp = int((pred & (y == 0)).sum())
        recall, precision = tp / P, tp / (tp + fp)
        lo = max(prev_recall, min_recall)
        if recall > lo:
            area += (recall - lo) * precision
        prev_recall = recall
    return area


def _brute_best(y: np.ndarray, s: np.ndarray, criterion: str) -> tuple[list[float], list[float]]:
    """Criterion value at every distinct threshold (descending) using sklearn's scorers."""
    thresholds = sorted(set(s.tolist()), reverse=True)
    values = []
    for t in thresholds:
        pred = (s >= t).astype(int)
        if criterion == "f1":
            v = skm.f1_score(y, pred, zero_division=0)
        elif criterion == "mcc":
            v = skm.matthews_corrcoef(y, pred)
        else:
            tn, fp, fn, tp = skm.confusion_matrix(y, pred, labels=[0, 1]).ravel()
            v = tp / (tp + fn) - fp / (fp + tn)
        values.append(float(v))
    return thresholds, values


# ----------------------------------------------------------------- sklearn cross-checks


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("ties", TIE_MODES)
def test_precision_recall_curve_matches_sklearn(seed, ties):
    y, s = _data(seed, ties)
    p, r, t = M.precision_recall_curve(y, s)
    ep, er, et = skm.precision_recall_curve(y, s)
    assert p.shape == ep.shape and r.shape == er.shape and t.shape == et.shape
    np.testing.assert_allclose(p, ep, rtol=0, atol=1e-12)
    np.testing.assert_allclose(r, er, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(t, et)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("ties", TIE_MODES)
@pytest.mark.parametrize("drop", [True, False])
def test_roc_curve_matches_sklearn(seed, ties, drop):
    y, s = _data(seed, ties)
    f, tp, t = M.roc_curve(y, s, drop_intermediate=drop)
    ef, etp, et = skm.roc_curve(y, s, drop_intermediate=drop)
    assert f.shape == ef.shape
    np.testing.assert_allclose(f, ef, rtol=0, atol=1e-12)
    np.testing.assert_allclose(tp, etp, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(t, et)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("ties", TIE_MODES)
@pytest.mark.parametrize("pos_rate", [0.03, 0.2, 0.7])
def test_ap_and_auc_match_sklearn(seed, ties, pos_rate):
    y, s = _data(seed, ties, n=1000, pos_rate=pos_rate)
    assert M.average_precision(y, s) == pytest.approx(skm.average_precision_score(y, s), abs=1e-12)
    assert M.roc_auc(y, s) == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)


def test_ties_matter():
    """Sanity: grouping ties gives a different AP than breaking them in a lucky order."""
    y = np.array([0, 1, 1, 0])
    s = np.array([0.5, 0.5, 0.5, 0.1])
    assert M.average_precision(y, s) == pytest.approx(skm.average_precision_score(y, s))
    assert M.average_precision(y, s) == pytest.approx(2 / 3)
    assert M.roc_auc(y, s) == pytest.approx(0.75)  # positives tie with one negative: half credit


@pytest.mark.parametrize("seed", SEEDS[:2])
@pytest.mark.parametrize("ties", TIE_MODES)
def test_confusion_at_matches_sklearn(seed, ties):
    y, s = _data(seed, ties)
    for thr in [-np.inf, np.quantile(s, 0.3), float(np.median(s)), 0.5, float(s.max()), np.inf]:
        c = M.confusion_at(y, s, thr)
        pred = (s >= thr).astype(int)
        tn, fp, fn, tp = skm.confusion_matrix(y, pred, labels=[0, 1]).ravel()
        assert (c["tp"], c["fp"], c["tn"], c["fn"]) == (tp, fp, tn, fn)
        assert c["precision"] == pytest.approx(skm.precision_score(y, pred, zero_division=0))
        assert c["recall"] == pytest.approx(skm.recall_score(y, pred, zero_division=0))
        assert c["f1"] == pytest.approx(skm.f1_score(y, pred, zero_division=0))
        assert c["mcc"] == pytest.approx(skm.matthews_corrcoef(y, pred), abs=1e-12)
        assert c["specificity"] == pytest.approx(skm.recall_score(y, pred, pos_label=0, zero_division=0))


def test_confusion_at_zero_division():
    c = M.confusion_at([0, 0, 1], [0.1, 0.2, 0.3], threshold=0.9)  # nothing predicted positive
    assert (c["tp"], c["fp"], c["tn"], c["fn"]) == (0, 0, 2, 1)
    assert c["precision"] == 0.0 and c["f1"] == 0.0 and c["mcc"] == 0.0 and c["recall"] == 0.0
    assert c["specificity"] == 1.0


# ----------------------------------------------------------------- best threshold


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("ties", TIE_MODES)
@pytest.mark.parametrize("criterion", ["youden", "f1", "mcc"])
def test_best_threshold_matches_brute_force(seed, ties, criterion):
    y, s = _data(seed, ties, n=80)
    thr, val = M.best_threshold(y, s, criterion=criterion)
    thresholds, values = _brute_best(y, s, criterion)
    best = max(values)
    assert val == pytest.approx(best, abs=1e-12)
    # the returned threshold really achieves the optimum ...
    assert values[thresholds.index(thr)] == pytest.approx(best, abs=1e-12)
    # ... and is the highest threshold that does (documented tie-break)
    first = next(t for t, v in zip(thresholds, values) if v >= best - 1e-12)
    assert thr == first


def test_best_threshold_small_example():
    y = np.array([1, 1, 0, 1, 0, 0])
    s = np.array([0.9, 0.8, 0.7, 0.6, 0.2, 0.1])
    # thresholds 0.9, 0.8, 0.7, 0.6 -> F1 = 0.5, 0.8, 2/3, 6/7
    thr, f1 = M.best_threshold(y, s, "f1")
    assert thr == 0.6 and f1 == pytest.approx(6 / 7)
    thr, j = M.best_threshold(y, s, "youden")  # J at 0.8: 2/3; at 0.6: 1 - 1/3 = 2/3 -> highest wins
    assert thr == 0.8 and j == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="criterion"):
        M.best_threshold(y, s, "accuracy")  # type: ignore[arg-type]


# ----------------------------------------------------------------- high-recall AUPRC


def test_hra_perfect_ranking():
    y = np.array([0, 1, 0, 1, 1, 0, 0, 1])
    s = y + 0.01 * np.arange(8)  # every positive above every negative
    norm, raw = M.high_recall_auprc(y, s)
    assert norm == pytest.approx(1.0) and raw == pytest.approx(0.3)


def test_hra_hand_computed():
    y = np.array([1, 0, 1, 1, 0])
    s = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    # (R, P) at thresholds: (1/3, 1), (1/3, 1/2), (2/3, 2/3), (1, 3/4), (1, 3/5)
    # min_recall 0.7: only the step 2/3 -> 1 counts, from 0.7: 0.3 * 3/4
    norm, raw = M.high_recall_auprc(y, s, 0.7)
    assert raw == pytest.approx(0.225) and norm == pytest.approx(0.75)
    # min_recall 0.5: (2/3 - 1/2) * 2/3 + (1 - 2/3) * 3/4 = 1/9 + 1/4
    norm, raw = M.high_recall_auprc(y, s, 0.5)
    assert raw == pytest.approx(13 / 36) and norm == pytest.approx(13 / 18)
    # min_recall 0 is plain average precision
    norm, raw = M.high_recall_auprc(y, s, 0.0)
    assert norm == raw == pytest.approx(skm.average_precision_score(y, s))


def test_hra_ties_grouped():
    y = np.array([1, 0, 1, 0])
    s = np.array([0.9, 0.9, 0.5, 0.5])
    # (R, P): (1/2, 1/2), (1, 1/2) -> 0.3 * 1/2; an ungrouped order would give precision 1 at R=1/2
    norm, raw = M.high_recall_auprc(y, s)
    assert raw == pytest.approx(0.15) and norm == pytest.approx(0.5)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("ties", TIE_MODES)
@pytest.mark.parametrize("min_recall", [0.7, 0.0, 0.5, 0.95])
def test_hra_matches_naive_reference(seed, ties, min_recall):
    y, s = _data(seed, ties, n=300)
    norm, raw = M.high_recall_auprc(y, s, min_recall)
    assert raw == pytest.approx(_naive_hra(y, s, min_recall), abs=1e-12)
    assert raw == pytest.approx((1 - min_recall) * norm, abs=1e-12)
    if min_recall == 0.7:
        assert raw == pytest.approx(0.3 * norm, abs=1e-12)
    assert 0.0 <= norm <= 1.0 + 1e-12


def test_hra_bad_min_recall():
    with pytest.raises(ValueError, match="min_recall"):
        M.high_recall_auprc([0, 1], [0.1, 0.2], min_recall=1.0)


# ----------------------------------------------------------------- binary_metrics / mean_std


@pytest.mark.parametrize("ties", TIE_MODES)
def test_binary_metrics_consistent(ties):
    y, s = _data(5, ties)
    thr = float(np.median(s))
    m = M.binary_metrics(y, s, threshold=thr)
    assert m["n"] == y.size and m["positives"] == int(y.sum())
    assert m["positive_rate"] == pytest.approx(y.mean())
    assert m["auprc"] == pytest.approx(skm.average_precision_score(y, s), abs=1e-12)
    assert m["auroc"] == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)
    assert (m["hra"], m["hra_raw"]) == pytest.approx(M.high_recall_auprc(y, s))
    assert (m["best_f1_threshold"], m["best_f1"]) == M.best_threshold(y, s, "f1")
    assert (m["best_mcc_threshold"], m["best_mcc"]) == M.best_threshold(y, s, "mcc")
    c = M.confusion_at(y, s, thr)
    for k in ["f1", "mcc", "precision", "recall"]:
        assert m[k] == pytest.approx(c[k])
    assert "f1" not in M.binary_metrics(y, s)


@pytest.mark.parametrize(
    "y, s",
    [
        (np.zeros(0, dtype=int), np.zeros(0)),
        (np.zeros(10, dtype=int), np.linspace(0, 1, 10)),  # no positives
        (np.ones(10, dtype=int), np.linspace(0, 1, 10)),  # no negatives
        (np.array([1]), np.array([0.3])),
    ],
)
def test_degenerate_inputs_nan_no_warnings(y, s):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = M.binary_metrics(y, s, threshold=0.5)
        for k in ["auprc", "auroc", "hra", "hra_raw", "best_f1", "best_f1_threshold", "best_mcc", "f1", "mcc"]:
            assert math.isnan(m[k]), k
        assert m["n"] == y.size and m["positives"] == int(y.sum())
        assert math.isnan(M.roc_auc(y, s))
        assert all(math.isnan(v) for v in M.best_threshold(y, s, "mcc"))
        M.precision_recall_curve(y, s)
        M.roc_curve(y, s)
        M.average_precision(y, s)
        M.high_recall_auprc(y, s)
        M.confusion_at(y, s, 0.5)
    if y.size == 0:
        assert math.isnan(m["positive_rate"])
    if y.size and y.sum() == 0:
        assert math.isnan(M.average_precision(y, s))
        assert all(math.isnan(v) for v in M.high_recall_auprc(y, s))
        assert np.isnan(M.precision_recall_curve(y, s)[1][:-1]).all()
        assert np.isnan(M.roc_curve(y, s)[1]).all()
    if y.size and y.sum() == y.size:
        assert M.average_precision(y, s) == pytest.approx(1.0)  # as sklearn
        assert np.isnan(M.roc_curve(y, s)[0]).all()


def test_input_validation():
    with pytest.raises(ValueError, match="same shape"):
        M.binary_metrics([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="binary"):
        M.roc_auc([0, 1, 2], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="binary"):
        M.average_precision([0.0, 0.5, 1.0], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="NaN"):
        M.average_precision([0, 1], [0.1, np.nan])
    with pytest.raises(ValueError):
        M.confusion_at(["a", "b"], [0.1, 0.2], 0.5)


def test_label_dtypes_and_2d_inputs_agree():
    y, s = _data(7, "round1")
    ref = M.binary_metrics(y, s, threshold=0.0)
    for yy in (y.astype(bool), y.astype(np.float32), y.reshape(20, 20)):
        ss = s.reshape(yy.shape)
        assert M.binary_metrics(yy, ss, threshold=0.0) == ref


def test_mean_std():
    r = M.mean_std([0.5, float("nan"), 0.7, 0.9])
    assert r["n"] == 3
    assert r["folds"][0] == 0.5 and math.isnan(r["folds"][1]) and r["folds"][2:] == [0.7, 0.9]
    assert r["mean"] == pytest.approx(0.7)
    assert r["std"] == pytest.approx(np.std([0.5, 0.7, 0.9], ddof=0))
    r = M.mean_std([float("nan")])
    assert r["n"] == 0 and math.isnan(r["mean"]) and math.isnan(r["std"])
    assert M.mean_std([])["n"] == 0


def test_large_input_matches_sklearn():
    rng = np.random.default_rng(0)
    n = 1_000_000
    y = rng.random(n) < 0.05
    s = np.round(rng.normal(size=n) + y, 3)
    m = M.binary_metrics(y, s, threshold=0.5)
    assert m["auroc"] == pytest.approx(skm.roc_auc_score(y, s), abs=1e-9)
