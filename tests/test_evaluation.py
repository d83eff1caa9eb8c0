"""Evaluation on a labelled FASTA: metrics against scikit-learn, figures, labels required.

Shares the tiny trained 2-fold run of conftest.py (built once per session)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from e1min.data.fasta import DataError
from e1min.predict import (
    evaluate_main,
    evaluate_records,
    ion_metrics,
    read_input_fasta,
)
from tests.helpers import host_reports_native_bf16, one_thread, read_tsv  # noqa: F401 (module-scoped autouse fixtures)

TOL = 1e-5


def test_evaluate_metrics_equal_sklearn(run_dir, ensemble, tmp_path):
    sk = pytest.importorskip("sklearn.metrics")
    recs = read_input_fasta(run_dir.parent / "data/CA_train.fasta")[0]
    assert (
        evaluate_main(
            [
                "--checkpoint",
                str(run_dir),
                "--fasta",
                str(run_dir.parent / "data/CA_train.fasta"),
                "--out-dir",
                str(tmp_path / "ev"),
                "--quiet",
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "ev/evaluation.json").read_text())
    assert (tmp_path / "ev/evaluation.md").read_text().count("| ZN |") == 1
    pred = ensemble.predict(recs)
    y = np.concatenate([r.labels for r in recs]).astype(int)
    for ion in ("ZN", "CA"):
        p = np.concatenate([pred[r.id][ion][0] for r in recs]).astype(np.float64)
        m = report["ions"][ion]
        assert m["auprc"] == pytest.approx(sk.average_precision_score(y, p), abs=1e-9)
        assert m["auroc"] == pytest.approx(sk.roc_auc_score(y, p), abs=1e-9)
        assert m["positive_rate"] == pytest.approx(y.mean())
        t = ensemble.threshold(ion)
        yhat = (p >= t).astype(int)
        assert m["at_saved"]["threshold"] == pytest.approx(t)
        assert m["at_saved"]["f1"] == pytest.approx(sk.f1_score(y, yhat, zero_division=0))
        assert m["at_saved"]["mcc"] == pytest.approx(sk.matthews_corrcoef(y, yhat))
        assert m["at_saved"]["precision"] == pytest.approx(sk.precision_score(y, yhat, zero_division=0))
        assert m["at_saved"]["recall"] == pytest.approx(sk.recall_score(y, yhat))
        prec, rec, thr = sk.precision_recall_curve(y, p)
        f1 = np.where(prec + rec > 0, 2 * prec * rec / np.maximum(prec + rec, 1e-300), 0)[:-1]
        assert m["at_best_f1"]["f1"] == pytest.approx(f1.max())
        fpr, tpr, rthr = sk.roc_curve(y, p, drop_intermediate=False)
        assert m["at_youden"]["recall"] - m["at_youden"]["fp"] / (m["at_youden"]["fp"] + m["at_youden"]["tn"]) == pytest.approx(
            (tpr - fpr).max()
        )
        # Curves as CSV reproduce sklearn's ROC.
        roc = np.loadtxt(tmp_path / f"ev/roc_{ion}.csv", delimiter=",", skiprows=1)
        fpr2, tpr2, _ = sk.roc_curve(y, p)
        assert np.allclose(roc[:, 0], fpr2, atol=1e-6) and np.allclose(roc[:, 1], tpr2, atol=1e-6)
    tsv = read_tsv(tmp_path / "ev/predictions.tsv")
    assert "label" in tsv[0] and len(tsv) == 2 * len(y)


def test_ion_metrics_match_sklearn_on_random_arrays():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(3)
    y = (rng.random(500) < 0.15).astype(int)
    p = np.round(np.clip(0.3 * y + rng.random(500) * 0.7, 0, 1), 2)  # many ties
    m = ion_metrics(y, p, 0.5)
    assert m["auprc"] == pytest.approx(sk.average_precision_score(y, p))
    assert m["auroc"] == pytest.approx(sk.roc_auc_score(y, p))
    yhat = (p >= 0.5).astype(int)
    assert m["at_saved"]["mcc"] == pytest.approx(sk.matthews_corrcoef(y, yhat))
    assert m["at_saved"]["f1"] == pytest.approx(sk.f1_score(y, yhat))
    best = max(sk.matthews_corrcoef(y, (p >= t).astype(int)) for t in np.unique(p))
    assert m["at_best_mcc"]["mcc"] == pytest.approx(best)


def test_evaluate_figure_with_matplotlib(run_dir, ensemble, tmp_path):
    pytest.importorskip("matplotlib")
    recs = read_input_fasta(run_dir.parent / "data/ZN_train.fasta")[0]
    evaluate_records(ensemble, recs, tmp_path, ["ZN"], progress=False)
    assert (tmp_path / "threshold_analysis_ZN.png").stat().st_size > 1000


def test_evaluate_needs_labels(run_dir, query_fasta, tmp_path):
    with pytest.raises(DataError, match="no label line"):
        evaluate_main(["--checkpoint", str(run_dir), "--fasta", str(query_fasta), "--out-dir", str(tmp_path)])


def test_evaluate_reports_test_proteins_with_a_training_homolog(run_dir, tmp_path, capsys, monkeypatch):
    from e1min.data.fasta import Record, write_fasta
    from tests.helpers import random_records, require_mmseqs

    require_mmseqs()
    train = run_dir.parent / "data/ZN_train.fasta"
    long = [r for r in read_input_fasta(train)[0] if len(r.sequence) >= 35][:2]
    assert len(long) == 2
    test = [Record(f"copy_{r.id}", r.sequence, r.labels) for r in long]
    test += random_records(np.random.default_rng(99), 1, "new", lo=50, hi=51)
    write_fasta(tmp_path / "test.fasta", test)
    args = ["--checkpoint", str(run_dir), "--fasta", str(tmp_path / "test.fasta"), "--quiet", "--train-fasta", str(train)]
    assert evaluate_main(args + ["--out-dir", str(tmp_path / "ev")]) == 0
    report = json.loads((tmp_path / "ev/evaluation.json").read_text())["homology"]
    assert report["with_homolog"] == {"0.3": 2, "0.5": 2, "0.9": 2} and report["proteins"] == 3
    assert {p["query"] for p in report["worst_pairs"]} == {t.id for t in test[:2]}
    assert "homology across test vs train" in (tmp_path / "ev/evaluation.md").read_text()
    assert ">= 90 %: 2/3" in capsys.readouterr().err
    # No mmseqs: a one-line error before the model loads.
    monkeypatch.setenv("E1MIN_MMSEQS", str(tmp_path / "none"))
    from e1min.cli import main as cli_main

    assert cli_main(["evaluate", *args, "--out-dir", str(tmp_path / "ev2")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "MMseqs2" in err and "E1MIN_MMSEQS" in err
