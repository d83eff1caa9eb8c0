"""report.html and evaluation.html: the data behind every figure equals what is recomputed from the run's
files (out-of-fold predictions, metrics.jsonl, thresholds, summary), the SVG draws exactly that data, and
unfinished runs still get a page with notes. The browser checks are in test_pages_browser.py."""

from __future__ import annotations

import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from e1min.pages import MAX_POINTS, build_evaluation_page, reliability_data, svg_chart, thin
from e1min.report import read_oof
from e1min.train import report_main
from tests.helpers import read_tsv


def page_data(path: Path) -> dict:
    """The JSON data block of a page (checks there is exactly one and no other <script>)."""
    text = path.read_text()
    scripts = re.findall(r"<script([^>]*)>", text)
    assert scripts == [' type="application/json" id="e1min-data"'], scripts
    block = re.search(r'<script type="application/json" id="e1min-data">(.*?)</script>', text, re.S).group(1)
    return json.loads(block.replace("<\\/", "</"))


class Polylines(HTMLParser):
    """Every chart's plot box and axis ranges, and each polyline's points, keyed by (chart, series)."""

    def __init__(self):
        super().__init__()
        self.charts, self.lines, self.current = {}, {}, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "svg":
            self.current = a["data-chart"]
            self.charts[self.current] = ([float(v) for v in a["data-box"].split()], [float(v) for v in a["data-range"].split()])
        elif tag == "polyline":
            pts = [tuple(map(float, p.split(","))) for p in a["points"].split()]
            self.lines.setdefault((self.current, a["data-series"]), []).extend(pts)


def drawn(text: str, chart: str, series: str) -> np.ndarray:
    """Data coordinates of a drawn series, mapped back from its SVG points."""
    parser = Polylines()
    parser.feed(text)
    (left, top, w, h), (x0, x1, y0, y1) = parser.charts[chart]
    pts = np.array(parser.lines[(chart, series)])
    return np.c_[x0 + (pts[:, 0] - left) / w * (x1 - x0), y0 + (top + h - pts[:, 1]) / h * (y1 - y0)]


def test_run_report_curves_equal_the_ones_recomputed_from_oof_predictions(run_dir):
    sk = pytest.importorskip("sklearn.metrics")
    page = run_dir / "report.html"
    text = page.read_text()
    data = page_data(page)
    thresholds = json.loads((run_dir / "thresholds.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert data["summary"] == summary and data["thresholds"] == thresholds
    for ion in ("ZN", "CA"):
        folds = {k: read_oof(run_dir / f"fold_{k}/oof_predictions.tsv")[ion] for k in (1, 2)}
        y = np.concatenate([v[0] for v in folds.values()])
        p = np.concatenate([v[1] for v in folds.values()])
        d = data["ions"][ion]
        prec, rec, _ = sk.precision_recall_curve(y, p)
        assert len(prec) < MAX_POINTS  # demo size: nothing thinned, every point compared
        assert np.allclose(d["pr"]["pooled"]["precision"], prec, atol=1e-6) and np.allclose(d["pr"]["pooled"]["recall"], rec, atol=1e-6)
        assert d["pr"]["pooled"]["auprc"] == pytest.approx(sk.average_precision_score(y, p))
        for k, (yk, pk) in folds.items():
            pk_, rk_, _ = sk.precision_recall_curve(yk, pk)
            assert np.allclose(d["pr"]["groups"][f"fold {k}"]["precision"], pk_, atol=1e-6)
            assert np.allclose(d["pr"]["groups"][f"fold {k}"]["recall"], rk_, atol=1e-6)
        fpr, tpr, _ = sk.roc_curve(y, p)
        assert np.allclose(d["roc"]["pooled"]["fpr"], fpr, atol=1e-6) and np.allclose(d["roc"]["pooled"]["tpr"], tpr, atol=1e-6)
        assert d["roc"]["pooled"]["auroc"] == pytest.approx(sk.roc_auc_score(y, p))
        assert d["positive_rate"] == pytest.approx(y.mean())
        # reliability: 10 equal-width bins, recomputed here independently
        bins = np.minimum((p * 10).astype(int), 9)
        used = sorted(set(bins.tolist()))
        assert d["reliability"]["mean_predicted"] == pytest.approx([p[bins == b].mean() for b in used], abs=1e-6)
        assert d["reliability"]["observed"] == pytest.approx([y[bins == b].mean() for b in used], abs=1e-6)
        assert d["reliability"]["count"] == [int((bins == b).sum()) for b in used]
        # the saved threshold and the metrics at it
        t = thresholds[ion]["threshold"]
        yhat = (p >= t).astype(int)
        at = d["at_threshold"]
        assert at["threshold"] == pytest.approx(t)
        assert at["precision"] == pytest.approx(sk.precision_score(y, yhat, zero_division=0))
        assert at["recall"] == pytest.approx(sk.recall_score(y, yhat))
        assert at["f1"] == pytest.approx(sk.f1_score(y, yhat))
        assert at["mcc"] == pytest.approx(sk.matthews_corrcoef(y, yhat))
        tc = d["threshold_curve"]
        i = tc["threshold"].index(min(tc["threshold"], key=lambda v: abs(v - t)))
        assert tc["mcc"][i] == pytest.approx(at["mcc"], abs=1e-6) and tc["f1"][i] == pytest.approx(at["f1"], abs=1e-6)
        # what is drawn is that data: the SVG points map back to the curves, the mark sits at the threshold
        assert np.allclose(drawn(text, f"pr-{ion}", "pooled"), np.c_[rec, prec], atol=0.01)
        assert np.allclose(drawn(text, f"roc-{ion}", "pooled"), np.c_[fpr, tpr], atol=0.01)
        assert np.allclose(
            drawn(text, f"pr-{ion}", "fold 2"),
            np.c_[d["pr"]["groups"]["fold 2"]["recall"], d["pr"]["groups"]["fold 2"]["precision"]],
            atol=0.01,
        )
        assert f'data-mark="saved threshold (youden) {t:.3g}"' in text
        # per-epoch curves equal metrics.jsonl; the selected epoch is fold_result.json's
        for k in (1, 2):
            hist = [json.loads(line) for line in (run_dir / f"fold_{k}/metrics.jsonl").read_text().splitlines()]
            ep = d["epochs"][str(k)]
            assert ep["train_bce"] == [h["train_bce"][ion] for h in hist]
            assert ep["val_auprc"] == [h["val"][ion]["auprc"] for h in hist]
            assert ep["best_epoch"] == json.loads((run_dir / f"fold_{k}/fold_result.json").read_text())["best_epoch"]
    # the summary table shows summary.json's numbers
    for ion, m in summary["ions"].items():
        for key in ("auprc", "auroc", "hra", "f1", "mcc"):
            cell = re.search(rf'<tr data-ion="{ion}">.*?<td data-key="{key}">([^<]*)</td>', text).group(1)
            assert cell == f"{m[key]['mean']:.3f} ± {m[key]['std']:.3f}"
    assert data["notes"] == summary["notes"] == []
    assert data["folds"]["1"]["complete"] and data["folds"]["2"]["stopping_epoch"] == 1


def test_training_log_points_at_the_report(run_dir):
    lines = (run_dir / "training.log").read_text().splitlines()
    assert lines[-1].endswith(f"report: {(run_dir / 'report.html').resolve()}")


def test_run_killed_after_fold_1_gets_a_report_with_notes(run_dir, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    for name in ("fold_result.json", "oof_predictions.tsv"):
        (out / f"fold_2/{name}").unlink()
    for name in ("report.html", "summary.json", "summary.md", "thresholds.json"):
        (out / name).unlink()
    assert report_main([str(out)]) == 0
    data = page_data(out / "report.html")
    assert "fold 2: not complete (no fold_result.json); 1 epoch(s) recorded" in data["notes"]
    assert list(data["ions"]["ZN"]["pr"]["groups"]) == ["fold 1"]
    assert data["ions"]["ZN"]["epochs"]["2"]["complete"] is False  # the unfinished fold's epochs are still drawn
    assert "fold 2: not complete" in (out / "report.html").read_text()
    # nothing complete at all: still a page, saying so
    (out / "fold_1/fold_result.json").unlink()
    assert report_main([str(out)]) == 0
    text = (out / "report.html").read_text()
    assert "fold 1: not complete" in text and "no out-of-fold predictions for this ion yet" in text


def test_evaluation_page_data_and_worst_proteins(run_dir, ensemble, tmp_path):
    sk = pytest.importorskip("sklearn.metrics")
    from e1min.predict import evaluate_records, read_input_fasta

    recs = read_input_fasta(run_dir.parent / "data/ZN_train.fasta")[0]
    evaluate_records(ensemble, recs, tmp_path, ["ZN"], progress=False)
    data = page_data(tmp_path / "evaluation.html")
    report = json.loads((tmp_path / "evaluation.json").read_text())
    # the page is built from predictions.tsv (probabilities as written there), so recompute from it
    rows = read_tsv(tmp_path / "predictions.tsv")
    y = np.array([int(r["label"]) for r in rows])
    p = np.array([float(r["probability"]) for r in rows])
    by_id = {r.id: p[[i for i, row in enumerate(rows) if row["id"] == r.id]] for r in recs}
    d = data["ions"]["ZN"]
    prec, rec, _ = sk.precision_recall_curve(y, p)
    assert np.allclose(d["pr"]["pooled"]["precision"], prec, atol=1e-5) and np.allclose(d["pr"]["pooled"]["recall"], rec, atol=1e-5)
    assert d["pr"]["pooled"]["auprc"] == pytest.approx(report["ions"]["ZN"]["auprc"], abs=1e-5)
    assert d["at_threshold"]["f1"] == pytest.approx(report["ions"]["ZN"]["at_saved"]["f1"], abs=1e-6)
    per_protein = sorted((sk.average_precision_score(r.labels, by_id[r.id]), r.id) for r in recs if r.labels.sum())
    worst = d["worst"]
    assert [w["id"] for w in worst] == [i for _, i in per_protein[: len(worst)]]
    assert [w["auprc"] for w in worst] == pytest.approx([a for a, _ in per_protein[: len(worst)]], abs=1e-5)
    first = next(r for r in recs if r.id == worst[0]["id"])
    assert [q["position"] for q in worst[0]["positives"]] == (np.flatnonzero(first.labels) + 1).tolist()
    assert (tmp_path / "evaluation.html").read_text().count('<tr data-id="') == len(worst)
    assert build_evaluation_page(tmp_path) == tmp_path / "evaluation.html"


def test_thin_keeps_endpoints_and_limit():
    assert thin(10, 20).tolist() == list(range(10))
    idx = thin(100_000, 2000)
    assert len(idx) <= 2000 and idx[0] == 0 and idx[-1] == 99_999 and np.all(np.diff(idx) > 0)


def test_reliability_bins_include_probability_one_and_ece():
    r = reliability_data(np.array([0, 1, 1, 0]), np.array([0.05, 1.0, 0.95, 0.5]))
    assert r["count"] == [1, 1, 2] and r["observed"] == [0.0, 0.0, 1.0]
    assert r["ece"] == pytest.approx((0.05 + 0.5 + 2 * 0.025) / 4)


def test_svg_breaks_lines_at_missing_values_and_escapes_names():
    svg = svg_chart([{"name": "a<b", "x": [1, 2, 3, 4], "y": [1, None, 2, 3]}], title="t&", xlabel="x", ylabel="y", chart_id="c")
    assert svg.count('data-series="a&lt;b"') == 2 and "t&amp;" in svg


def test_wall_time_from_the_log_of_the_last_run():
    from e1min.pages import _log_wall_time

    log = "10:00:00 e1min train: a\n10:05:00 x\n23:59:00 e1min train: b\n23:59:30 fold 1\nnot a stamp\n00:01:00 report: r\n"
    assert _log_wall_time(log) == 120.0
    assert _log_wall_time("no run here\n") is None
