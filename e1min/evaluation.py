"""Evaluate a trained run on a labelled FASTA: per-ion metrics at the saved and the best thresholds, curves."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from e1min.data.fasta import Record
from e1min.data.homology import format_leakage
from e1min.data.msa import ContextProvider
from e1min.io import atomic_path, atomic_write_json, atomic_write_text, json_safe
from e1min.metrics import best_threshold, binary_metrics, confusion_at, precision_recall_curve, roc_curve
from e1min.outputs import DEFAULT_CHUNK, Progress, predict_stream, write_predictions
from e1min.pages import build_evaluation_page
from e1min.plotting import pyplot
from e1min.predictor import DEFAULT_MAX_TOKENS, PredictError, Predictor

EVALUATION_FILES = ("predictions.tsv", "evaluation.json", "evaluation.md", "evaluation.html")


def _at(y: np.ndarray, p: np.ndarray, t: float | None) -> dict[str, Any]:
    if t is None or (isinstance(t, float) and math.isnan(t)):
        return {"threshold": None, "f1": None, "mcc": None, "precision": None, "recall": None}
    c = confusion_at(y, p, t)
    return {"threshold": float(t), **{k: c[k] for k in ("f1", "mcc", "precision", "recall", "tp", "fp", "tn", "fn")}}


def ion_metrics(y: np.ndarray, p: np.ndarray, saved: float | None, min_recall: float = 0.7) -> dict[str, Any]:
    """AUPRC, AUROC, HRA, positive rate, and F1/MCC/precision/recall at the saved and the best thresholds."""
    m = binary_metrics(y, p, min_recall=min_recall)
    f1_t, _ = best_threshold(y, p, "f1")
    mcc_t, _ = best_threshold(y, p, "mcc")
    you_t, _ = best_threshold(y, p, "youden")
    out = {k: m[k] for k in ("n", "positives", "positive_rate", "auprc", "auroc", "hra", "hra_raw")}
    out["min_recall"] = min_recall
    out["at_saved"] = _at(y, p, saved)
    out["at_best_f1"] = _at(y, p, f1_t)
    out["at_best_mcc"] = _at(y, p, mcc_t)
    out["at_youden"] = _at(y, p, you_t)
    return json_safe(out)


def _f(v: Any, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def evaluation_table(results: dict[str, dict]) -> str:
    """Markdown table of ``ion_metrics`` per ion."""
    head = [
        "ion",
        "residues",
        "pos. rate",
        "AUPRC",
        "AUROC",
        "HRA",
        "thr (saved)",
        "F1",
        "MCC",
        "Prec",
        "Rec",
        "thr (best F1)",
        "F1",
        "MCC",
        "Prec",
        "Rec",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for ion, m in results.items():
        s, b = m["at_saved"], m["at_best_f1"]
        row = [
            ion,
            str(m["n"]),
            _f(m["positive_rate"], 4),
            _f(m["auprc"]),
            _f(m["auroc"]),
            _f(m["hra"]),
            _f(s["threshold"]),
            _f(s["f1"]),
            _f(s["mcc"]),
            _f(s["precision"]),
            _f(s["recall"]),
            _f(b["threshold"]),
            _f(b["f1"]),
            _f(b["mcc"]),
            _f(b["precision"]),
            _f(b["recall"]),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def write_curves(out_dir: Path, ion: str, y: np.ndarray, p: np.ndarray, m: dict) -> list[Path]:
    """ROC and PR curves as CSV (always) and a threshold-analysis PNG (when matplotlib is installed)."""

    fpr, tpr, rthr = roc_curve(y, p)
    prec, rec, pthr = precision_recall_curve(y, p)
    written = [out_dir / f"roc_{ion}.csv", out_dir / f"pr_{ion}.csv"]
    atomic_write_text(written[0], "fpr,tpr,threshold\n" + "".join(f"{a:.6g},{b:.6g},{c:.6g}\n" for a, b, c in zip(fpr, tpr, rthr)))
    # precision/recall have one more point than thresholds (the (1, 0) end point): its threshold is blank.
    pt = [f"{t:.6g}" for t in pthr] + [""]
    atomic_write_text(written[1], "precision,recall,threshold\n" + "".join(f"{a:.6g},{b:.6g},{c}\n" for a, b, c in zip(prec, rec, pt)))
    plt = pyplot()
    if plt is None:
        return written
    marks = [
        ("saved", m["at_saved"], "o"),
        ("best F1", m["at_best_f1"], "s"),
        ("best MCC", m["at_best_mcc"], "^"),
        ("Youden", m["at_youden"], "D"),
    ]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.2))
    ax1.plot(fpr, tpr, lw=1.5, label=f"ROC (AUROC {_f(m['auroc'])})")
    ax1.plot([0, 1], [0, 1], ls=":", c="grey", lw=1)
    ax2.plot(rec, prec, lw=1.5, drawstyle="steps-post", label=f"PR (AUPRC {_f(m['auprc'])})")
    ax2.axhline(m["positive_rate"] or 0, ls=":", c="grey", lw=1)
    for name, at, marker in marks:
        if at["threshold"] is None:
            continue
        fp_rate = at["fp"] / max(at["fp"] + at["tn"], 1)
        label = f"{name} t={at['threshold']:.3g} (F1 {at['f1']:.2f}, MCC {at['mcc']:.2f})"
        ax1.plot([fp_rate], [at["recall"]], marker=marker, ls="", ms=7, label=label)
        ax2.plot([at["recall"]], [at["precision"]], marker=marker, ls="", ms=7, label=label)
    ax1.set(xlabel="false positive rate", ylabel="true positive rate (recall)", title=f"{ion}: ROC")
    ax2.set(xlabel="recall", ylabel="precision", title=f"{ion}: precision-recall", xlim=(0, 1), ylim=(0, 1.02))
    ax1.legend(fontsize=7, loc="lower right")
    ax2.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    png = out_dir / f"threshold_analysis_{ion}.png"
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return written + [png]


def evaluate_records(
    predictor: Predictor,
    records: Sequence[Record],
    out_dir: str | os.PathLike,
    ions: Sequence[str] | None = None,
    provider: ContextProvider | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    chunk_size: int = DEFAULT_CHUNK,
    seed: int | None = None,
    min_recall: float = 0.7,
    progress: bool = True,
    homology: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Predict labelled ``records`` (labels apply to every requested ion) and write the evaluation.

    Writes ``predictions.tsv`` (with a ``label`` column), ``evaluation.json``, ``evaluation.md``, per-ion
    ROC/PR curves as CSV, and threshold-analysis PNGs when matplotlib is installed. ``homology`` (the
    test-vs-training leakage report of ``e1min.data.homology.heldout_leakage``) goes into both reports. Per-residue labels
    and probabilities of every requested ion are kept in memory for the metrics (fine for test sets).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ions = predictor._check_ions(ions)
    unlabelled = [r.id for r in records if r.labels is None]
    if unlabelled:
        raise PredictError(f"evaluate needs labelled records; {len(unlabelled)} have no labels (e.g. {unlabelled[0]!r})")
    thresholds = {ion: predictor.threshold(ion) for ion in ions}
    ys = {ion: [] for ion in ions}
    ps = {ion: [] for ion in ions}
    prog = Progress(len(records), sum(len(r.sequence) for r in records), enabled=progress)

    def collect():
        for rec, res in predict_stream(predictor, records, ions, provider, max_tokens, chunk_size, seed, prog):
            for ion, (mean, _) in res.items():
                ys[ion].append(rec.labels)
                ps[ion].append(mean)
            yield rec, res

    write_predictions(out_dir / "predictions.tsv", collect(), "tsv", thresholds, with_labels=True)
    speed = prog.finish()
    results = {}
    for ion in ions:
        y = np.concatenate(ys[ion]).astype(np.int64)
        p = np.concatenate(ps[ion]).astype(np.float64)
        m = ion_metrics(y, p, thresholds[ion], min_recall)
        m["saved_threshold_method"] = (predictor.thresholds.get(ion) or {}).get("method")
        results[ion] = m
        write_curves(out_dir, ion, y, p, m)
    report = {
        "checkpoint": {"folds": predictor.fold_names, "base_model": predictor.meta.get("base_model"), "ions": predictor.ions},
        "proteins": len(records),
        "runtime": predictor.runtime,
        "note": "labels of the FASTA apply to every evaluated ion; 'at_best_*' thresholds are fitted on this set (optimistic)",
        "ions": results,
        "throughput": speed,
    }
    if homology is not None:
        report["homology"] = homology
    atomic_write_json(out_dir / "evaluation.json", report)
    md = [
        f"Evaluation of {', '.join(predictor.fold_names)} on {len(records)} proteins",
        "",
        "F1/MCC/precision/recall at the saved threshold (thresholds.json) and at the best-F1 threshold of this set (optimistic).",
        "",
        evaluation_table(results),
    ]
    if homology is not None:
        md += ["", format_leakage(homology)]
    atomic_write_text(out_dir / "evaluation.md", "\n".join(md))
    build_evaluation_page(out_dir)
    return report
