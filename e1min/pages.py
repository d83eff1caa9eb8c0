"""Self-contained HTML pages: a run's report.html and an evaluation's evaluation.html.

Everything is drawn here as hand-written SVG (no JavaScript, font or stylesheet from anywhere), and the
numbers behind every figure are embedded as a JSON data block (``<script type="application/json"
id="e1min-data">``: data, never executed), so tests and users can check what is drawn. Pages are built
only from files a run or an evaluation wrote, so a run killed halfway still gets one.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from e1min import __version__, metrics
from e1min.data.fasta import DataError
from e1min.io import atomic_write_text, dumps_json, format_duration
from e1min.report import read_oof
from e1min.run import RunDir

MAX_POINTS = 1000  # points per drawn curve; longer curves are thinned evenly (endpoints kept)
RELIABILITY_BINS = 10
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f")

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:0 auto;max-width:1320px;padding:0 18px 40px;color:#222}
h1{font-size:1.5em;margin:18px 0 4px}h2{font-size:1.25em;border-bottom:1px solid #ccc;padding-bottom:3px;margin-top:28px}
h3{font-size:1.05em;margin:16px 0 6px}
table{border-collapse:collapse;margin:6px 0 10px;font-size:.9em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}
.meta td{text-align:left}.figs{display:flex;flex-wrap:wrap;gap:8px}.figs svg{border:1px solid #e3e3e3;background:#fff}
.note{color:#8a4b00}.small{font-size:.85em;color:#555}pre{background:#f7f7f7;padding:8px;overflow:auto;font-size:.85em}
code{background:#f2f2f2;padding:0 3px}table.worst td:last-child,table.worst th:last-child{text-align:left}
"""


# ------------------------------------------------------------------------------------------ SVG
def _fmt(v: float) -> str:
    return f"{v:.2f}".rstrip("0").rstrip(".")


def _tick_values(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=raw)
    start = math.ceil(lo / step - 1e-9) * step
    return [start + i * step for i in range(int((hi - start) / step + 1e-9) + 1)]


def _tick_label(v: float) -> str:
    return f"{v:.6g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.1e}"


def thin(n: int, limit: int = MAX_POINTS) -> np.ndarray:
    """Indices of at most ``limit`` evenly spaced points of ``n`` (first and last kept)."""
    if n <= limit:
        return np.arange(n)
    return np.unique(np.round(np.linspace(0, n - 1, limit)).astype(np.int64))


def svg_chart(
    series: Sequence[dict[str, Any]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    xlim: tuple[float, float] | None = None,
    ylim: tuple[float, float] | None = None,
    marks: Sequence[dict[str, Any]] = (),
    hlines: Sequence[dict[str, Any]] = (),
    vlines: Sequence[dict[str, Any]] = (),
    diagonal: bool = False,
    chart_id: str = "",
    width: int = 305,
    height: int = 265,
) -> str:
    """A line chart as inline SVG.

    ``series``: dicts with ``name``, ``x``, ``y`` (NaN/None break the line), optional ``color``, ``width``,
    ``dash``, ``dots``. ``marks``: points with ``x``, ``y``, ``label``. The plot box and axis ranges are
    attributes of the ``<svg>`` (``data-box``, ``data-range``) so a test can map ``points`` back to data.
    """
    left, top, right, bottom = 52, 26, 12, 40
    legend_items = [s for s in series if s.get("legend", True)] + [m for m in marks if m.get("label")]
    legend_h = 13 * len(legend_items)
    pw, ph = width - left - right, height - top - bottom
    total_h = height + legend_h

    def finite(vals):
        return [float(v) for v in vals if v is not None and math.isfinite(float(v))]

    xs = finite([v for s in series for v in s["x"]] + [m["x"] for m in marks] + [v["x"] for v in vlines])
    ys = finite([v for s in series for v in s["y"]] + [m["y"] for m in marks] + [h["y"] for h in hlines])
    x0, x1 = xlim or ((min(xs), max(xs)) if xs else (0.0, 1.0))
    y0, y1 = ylim or ((min(ys), max(ys)) if ys else (0.0, 1.0))
    if x1 <= x0:
        x0, x1 = x0 - 0.5, x1 + 0.5
    if y1 <= y0:
        pad = abs(y0) * 0.1 or 0.5
        y0, y1 = y0 - pad, y1 + pad

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def py(y: float) -> float:
        return top + ph - (y - y0) / (y1 - y0) * ph

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{total_h}" viewBox="0 0 {width} {total_h}" '
        f'role="img" data-chart="{html.escape(chart_id)}" data-box="{left} {top} {pw} {ph}" data-range="{x0!r} {x1!r} {y0!r} {y1!r}" '
        f'font-family="Helvetica,Arial,sans-serif" font-size="11">',
        f"<title>{html.escape(title)}</title>",
        f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="13" font-weight="bold">{html.escape(title)}</text>',
    ]
    for t in _tick_values(x0, x1):
        X = px(t)
        out.append(f'<line x1="{X:.2f}" y1="{top}" x2="{X:.2f}" y2="{top + ph}" stroke="#eee"/>')
        out.append(f'<text x="{X:.2f}" y="{top + ph + 14}" text-anchor="middle">{_tick_label(t)}</text>')
    for t in _tick_values(y0, y1):
        Y = py(t)
        out.append(f'<line x1="{left}" y1="{Y:.2f}" x2="{left + pw}" y2="{Y:.2f}" stroke="#eee"/>')
        out.append(f'<text x="{left - 4}" y="{Y + 4:.2f}" text-anchor="end">{_tick_label(t)}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>')
    out.append(f'<text x="{left + pw / 2}" y="{top + ph + 30}" text-anchor="middle">{html.escape(xlabel)}</text>')
    out.append(
        f'<text x="14" y="{top + ph / 2}" text-anchor="middle" transform="rotate(-90 14 {top + ph / 2})">{html.escape(ylabel)}</text>'
    )
    out.append(f'<clipPath id="clip-{html.escape(chart_id)}"><rect x="{left}" y="{top}" width="{pw}" height="{ph}"/></clipPath>')
    out.append(f'<g clip-path="url(#clip-{html.escape(chart_id)})">')
    if diagonal:
        lo, hi = max(x0, y0), min(x1, y1)
        out.append(f'<line x1="{px(lo):.2f}" y1="{py(lo):.2f}" x2="{px(hi):.2f}" y2="{py(hi):.2f}" stroke="#999" stroke-dasharray="3 3"/>')
    for h in hlines:
        Y = py(h["y"])
        out.append(f'<line x1="{left}" y1="{Y:.2f}" x2="{left + pw}" y2="{Y:.2f}" stroke="#777" stroke-dasharray="4 3"/>')
        if h.get("label"):
            out.append(f'<text x="{left + pw - 3}" y="{Y - 3:.2f}" text-anchor="end" fill="#555">{html.escape(h["label"])}</text>')
    for v in vlines:
        X = px(v["x"])
        out.append(f'<line x1="{X:.2f}" y1="{top}" x2="{X:.2f}" y2="{top + ph}" stroke="{v.get("color", "#777")}" stroke-dasharray="4 3"/>')
        if v.get("label"):
            out.append(f'<text x="{X + 3:.2f}" y="{top + 10}" fill="#555">{html.escape(v["label"])}</text>')
    for i, s in enumerate(series):
        color = s.get("color", PALETTE[i % len(PALETTE)])
        segments, cur = [], []
        for x, y in zip(s["x"], s["y"]):
            if x is None or y is None or not (math.isfinite(float(x)) and math.isfinite(float(y))):
                if cur:
                    segments.append(cur)
                cur = []
                continue
            cur.append((px(float(x)), py(float(y))))
        if cur:
            segments.append(cur)
        dash = f' stroke-dasharray="{s["dash"]}"' if s.get("dash") else ""
        name = html.escape(s["name"])
        for seg in segments:
            pts = " ".join(f"{a:.2f},{b:.2f}" for a, b in seg)
            out.append(
                f'<polyline data-series="{name}" points="{pts}" fill="none" stroke="{color}" '
                f'stroke-width="{s.get("width", 1.8)}"{dash} stroke-linejoin="round"><title>{name}</title></polyline>'
            )
            if s.get("dots"):
                out.extend(f'<circle cx="{a:.2f}" cy="{b:.2f}" r="2.5" fill="{color}"/>' for a, b in seg)
    out.append("</g>")
    for m in marks:
        if m["x"] is None or m["y"] is None or not (math.isfinite(m["x"]) and math.isfinite(m["y"])):
            continue
        color = m.get("color", "#000")
        X, Y = px(m["x"]), py(m["y"])
        tip = html.escape(m.get("tip") or m.get("label") or "")
        out.append(
            f'<path data-mark="{html.escape(m.get("label", ""))}" d="M{X:.2f},{Y - 6:.2f} L{X + 6:.2f},{Y:.2f} L{X:.2f},{Y + 6:.2f} '
            f'L{X - 6:.2f},{Y:.2f} Z" fill="{color}" stroke="#fff"><title>{tip}</title></path>'
        )
    y = height - 2
    for i, item in enumerate(legend_items):
        y += 13
        if "name" in item:
            color = item.get("color", PALETTE[series.index(item) % len(PALETTE)])
            dash = f' stroke-dasharray="{item["dash"]}"' if item.get("dash") else ""
            out.append(f'<line x1="{left}" y1="{y - 4}" x2="{left + 18}" y2="{y - 4}" stroke="{color}" stroke-width="2"{dash}/>')
            label = item.get("legend_label", item["name"])
        else:
            color = item.get("color", "#000")
            out.append(f'<path d="M{left + 9},{y - 9} L{left + 14},{y - 4} L{left + 9},{y + 1} L{left + 4},{y - 4} Z" fill="{color}"/>')
            label = item["label"]
        out.append(f'<text x="{left + 24}" y="{y}">{html.escape(label)}</text>')
        del i
    out.append("</svg>")
    return "".join(out)


# ------------------------------------------------------------------------------- curves and data
def _list(a: np.ndarray) -> list[float | None]:
    return [None if not math.isfinite(v) else round(float(v), 6) for v in np.asarray(a, dtype=np.float64)]


def pr_data(y: np.ndarray, p: np.ndarray) -> dict[str, Any]:
    """Precision-recall curve (``metrics.precision_recall_curve``, thinned to MAX_POINTS) and AUPRC."""
    prec, rec, _ = metrics.precision_recall_curve(y, p)
    keep = thin(len(prec))
    return {
        "recall": _list(rec[keep]),
        "precision": _list(prec[keep]),
        "thinned": bool(len(keep) < len(prec)),
        "auprc": _num(metrics.average_precision(y, p)),
    }


def roc_data(y: np.ndarray, p: np.ndarray) -> dict[str, Any]:
    """ROC curve (``metrics.roc_curve``, thinned to MAX_POINTS) and AUROC."""
    fpr, tpr, _ = metrics.roc_curve(y, p)
    keep = thin(len(fpr))
    return {"fpr": _list(fpr[keep]), "tpr": _list(tpr[keep]), "thinned": bool(len(keep) < len(fpr)), "auroc": _num(metrics.roc_auc(y, p))}


def reliability_data(y: np.ndarray, p: np.ndarray, bins: int = RELIABILITY_BINS) -> dict[str, Any]:
    """Equal-width probability bins: mean predicted probability, observed positive fraction, count; and the ECE."""
    idx = np.clip((np.asarray(p, dtype=np.float64) * bins).astype(np.int64), 0, bins - 1)
    count = np.bincount(idx, minlength=bins)
    psum = np.bincount(idx, weights=p, minlength=bins)
    ysum = np.bincount(idx, weights=np.asarray(y, dtype=np.float64), minlength=bins)
    used = count > 0
    mean_p = psum[used] / count[used]
    frac = ysum[used] / count[used]
    ece = float(np.sum(count[used] * np.abs(mean_p - frac)) / max(count.sum(), 1))
    return {"bins": bins, "mean_predicted": _list(mean_p), "observed": _list(frac), "count": count[used].tolist(), "ece": round(ece, 6)}


def threshold_data(y: np.ndarray, p: np.ndarray) -> dict[str, Any]:
    """Precision, recall, F1 and MCC predicting ``score >= t`` at every distinct score t (increasing, thinned)."""
    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    order = np.argsort(-p, kind="mergesort")
    ps, ys = p[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(ps)), len(ps) - 1] if len(ps) else np.zeros(0, dtype=np.int64)
    tp = np.cumsum(ys)[last]
    fp = last + 1 - tp
    pos, n = ys.sum(), len(ys)
    fn, tn = pos - tp, n - pos - fp
    with np.errstate(invalid="ignore", divide="ignore"):
        prec = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 0.0)
        rec = tp / pos if pos else np.full(tp.shape, np.nan)
        f1 = np.where(2 * tp + fp + fn > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 0.0)
        den = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        mcc = np.where(den > 0, (tp * tn - fp * fn) / np.where(den > 0, den, 1), 0.0)
    rev = slice(None, None, -1)
    keep = thin(len(last))
    return {k: _list(v[rev][keep]) for k, v in (("threshold", ps[last]), ("precision", prec), ("recall", rec), ("f1", f1), ("mcc", mcc))}


def at_threshold(y: np.ndarray, p: np.ndarray, t: float | None) -> dict[str, Any] | None:
    """Confusion counts and precision/recall/F1/MCC at ``t`` (None when there is no threshold)."""
    if t is None or not math.isfinite(t) or len(y) == 0:
        return None
    c = metrics.confusion_at(y, p, t)
    fpr = c["fp"] / max(c["fp"] + c["tn"], 1)
    return {"threshold": float(t), "fpr": fpr, **{k: _num(c[k]) for k in ("precision", "recall", "f1", "mcc", "tp", "fp", "tn", "fn")}}


def _num(v: Any) -> float | None:
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _group_color(name: str, i: int) -> str:
    """Fold k keeps one colour in every figure (PALETTE[0] is the pooled curve's)."""
    m = re.fullmatch(r"fold (\d+)", name)
    return PALETTE[(int(m.group(1)) if m else i + 1) % len(PALETTE)]


def _f(v: Any, digits: int = 3) -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def _e(s: Any) -> str:
    return html.escape(str(s))


def _pooled_and_groups(curves: dict[str, Any], x: str, y: str, metric: str) -> list[dict[str, Any]]:
    """svg_chart series: the pooled curve (thick) and each group's (thin), each labelled with its ``metric``."""

    def series(name: str, v: dict[str, Any], width: float, color: str) -> dict[str, Any]:
        label = f"{name} ({metric.upper()} {_f(v[metric])})"
        return {"name": name, "x": v[x], "y": v[y], "width": width, "color": color, "legend_label": label}

    groups = [series(f"{g}", v, 0.9, _group_color(g, i)) for i, (g, v) in enumerate(curves["groups"].items())]
    return [series("pooled", curves["pooled"], 2.4, PALETTE[0]), *groups]


def ion_panels(
    ion: str, y: np.ndarray, p: np.ndarray, groups: dict[str, tuple[np.ndarray, np.ndarray]], threshold: float | None, threshold_label: str
) -> tuple[str, dict[str, Any]]:
    """PR (pooled + each group thin), ROC, reliability and threshold-analysis SVGs for one ion, and their data."""
    pos_rate = float(np.mean(y)) if len(y) else None
    data: dict[str, Any] = {"n": int(len(y)), "positives": int(np.sum(y)), "positive_rate": pos_rate, "threshold": threshold}
    data["pr"] = {"pooled": pr_data(y, p), "groups": {g: pr_data(*v) for g, v in groups.items()}}
    data["roc"] = {"pooled": roc_data(y, p), "groups": {g: roc_data(*v) for g, v in groups.items()}}
    data["reliability"] = reliability_data(y, p)
    data["at_threshold"] = at_threshold(y, p, threshold)
    data["threshold_curve"] = threshold_data(y, p)
    at = data["at_threshold"]

    def mark(x: str, y: str) -> list[dict[str, Any]]:  # the chosen threshold's point on a curve
        return [{"x": at[x], "y": at[y], "label": f"{threshold_label} {at['threshold']:.3g}", "color": "#000"}] if at else []

    figs = [
        svg_chart(
            _pooled_and_groups(data["pr"], "recall", "precision", "auprc"),
            title=f"{ion}: precision-recall",
            xlabel="recall",
            ylabel="precision",
            xlim=(0, 1),
            ylim=(0, 1.02),
            hlines=[{"y": pos_rate, "label": f"positive rate {pos_rate:.3f}"}] if pos_rate is not None else [],
            marks=mark("recall", "precision"),
            chart_id=f"pr-{ion}",
        )
    ]
    figs.append(
        svg_chart(
            _pooled_and_groups(data["roc"], "fpr", "tpr", "auroc"),
            title=f"{ion}: ROC",
            xlabel="false positive rate",
            ylabel="true positive rate",
            xlim=(0, 1),
            ylim=(0, 1.02),
            diagonal=True,
            marks=mark("fpr", "recall"),
            chart_id=f"roc-{ion}",
        )
    )
    rel = data["reliability"]
    figs.append(
        svg_chart(
            [
                {
                    "name": "observed",
                    "x": rel["mean_predicted"],
                    "y": rel["observed"],
                    "dots": True,
                    "legend_label": f"observed fraction of binders (ECE {rel['ece']:.3f})",
                }
            ],
            title=f"{ion}: reliability ({rel['bins']} bins)",
            xlabel="mean predicted probability",
            ylabel="observed positive fraction",
            xlim=(0, 1),
            ylim=(0, 1.02),
            diagonal=True,
            chart_id=f"reliability-{ion}",
        )
    )
    tc = data["threshold_curve"]
    tseries = [{"name": k, "x": tc["threshold"], "y": tc[k]} for k in ("precision", "recall", "f1", "mcc") if k in tc]
    figs.append(
        svg_chart(
            tseries,
            title=f"{ion}: metrics vs threshold",
            xlabel="threshold",
            ylabel="value",
            xlim=(0, 1),
            ylim=(-0.02 if "mcc" not in tc else min(-0.02, min((v for v in tc["mcc"] if v is not None), default=0)), 1.02),
            vlines=[{"x": threshold, "label": threshold_label}] if threshold is not None and math.isfinite(threshold) else [],
            chart_id=f"threshold-{ion}",
        )
    )
    counts = ""
    if at:
        counts = (
            f'<table class="at-threshold" data-ion="{_e(ion)}"><tr><th>{_e(threshold_label)}</th><th>precision</th><th>recall</th><th>F1</th><th>MCC</th>'
            f"<th>TP</th><th>FP</th><th>TN</th><th>FN</th></tr><tr><td>{at['threshold']:.4g}</td><td>{_f(at['precision'])}</td>"
            f"<td>{_f(at['recall'])}</td><td>{_f(at['f1'])}</td><td>{_f(at['mcc'])}</td><td>{int(at['tp'])}</td><td>{int(at['fp'])}</td>"
            f"<td>{int(at['tn'])}</td><td>{int(at['fn'])}</td></tr></table>"
        )
    else:
        counts = f'<p class="note">{_e(ion)}: no threshold (or no prediction): nothing to mark.</p>'
    return f'<div class="figs">{"".join(figs)}</div>{counts}', data


def _page(title: str, body: str, data: dict[str, Any]) -> str:
    # '</' inside a JSON string would end the data block early; '<\/' is the same JSON string.
    payload = dumps_json(data, separators=(",", ":")).replace("</", "<\\/")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{_e(title)}</title>'
        f"<style>{CSS}</style></head><body>\n{body}\n"
        f'<script type="application/json" id="e1min-data">{payload}</script>\n</body></html>\n'
    )


# ------------------------------------------------------------------------------------ run report
def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _history(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line cut by a kill: the epochs before it still count
    return out


def _run_header(run: RunDir, cfg: dict[str, Any], folds: list[int], histories: dict[int, list]) -> tuple[str, dict[str, Any]]:
    meta = {}
    for k in folds or range(1, 100):
        for which in ("best", "last"):
            m = _read_json(run.state(k, which) / "checkpoint.json")
            if isinstance(m, dict):
                meta = m
                break
        if meta or not folds:
            break
    model = cfg.get("model", {})
    runtime = meta.get("runtime") or {}
    log_line, wall = "", None
    log = run.root / "training.log"
    if log.exists():
        text = log.read_text(encoding="utf-8", errors="replace")
        found = re.findall(r"e1min train: .*", text)
        log_line = found[-1] if found else ""
        wall = _log_wall_time(text)
    seconds = sum(float(h.get("seconds", 0) or 0) for hist in histories.values() for h in hist)
    info = {
        "e1min version (run)": meta.get("e1min_version", "?"),
        "e1min version (report)": __version__,
        "base model": meta.get("base_model") or model.get("checkpoint", "?"),
        "base revision": meta.get("base_revision") or model.get("revision") or "–",
        "precision / device": f"{runtime.get('precision', '?')} on {runtime.get('device', '?')} (float32 matmul {runtime.get('matmul_precision', '?')})"
        if runtime
        else "?",
        "launch": log_line or "–",
        "wall time": "?" if wall is None else f"{format_duration(wall)} (the last e1min train in training.log, start to last line)",
        "training time": f"{format_duration(seconds)} (sum of the recorded epochs' training time)",
        "run directory": str(run.root),
    }
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in info.items())
    return f'<table class="meta">{rows}</table>', info


def _log_wall_time(text: str) -> float | None:
    """Seconds from the last ``e1min train:`` line of training.log to its last line (times are HH:MM:SS: a day wraps)."""
    stamps = [
        (m.group(4), int(m.group(1)) * 3600 + int(m.group(2)) * 60 + int(m.group(3)))
        for m in re.finditer(r"^(\d\d):(\d\d):(\d\d) (.*)$", text, re.M)
    ]
    starts = [i for i, (msg, _) in enumerate(stamps) if msg.startswith("e1min train:")]
    if not starts:
        return None
    t0, day, prev = stamps[starts[-1]][1], 0, stamps[starts[-1]][1]
    for _, t in stamps[starts[-1] + 1 :]:
        day += 86400 if t < prev else 0
        prev = t
    return float(prev + day - t0)


def _data_table(stats: dict[str, Any] | None) -> str:
    if not stats or "ions" not in stats:
        return '<p class="note">no data_stats.json</p>'
    rows = []
    for ion, s in stats["ions"].items():
        cov = s.get("msa_coverage")
        rows.append(
            f"<tr><td>{_e(ion)}</td><td>{s.get('proteins', '–')}</td><td>{s.get('labelled_proteins', '–')}</td><td>{s.get('residues', '–')}</td>"
            f"<td>{s.get('positives', '–')}</td><td>{_f(s.get('positive_rate'), 4)}</td><td>{'no MSAs' if cov is None else f'{100 * cov:.1f}%'}</td></tr>"
        )
    sizes = stats.get("fold_sizes") or {}
    fold_line = f'<p class="small">proteins per fold: {", ".join(f"{k}: {v}" for k, v in sizes.items())}</p>' if sizes else ""
    return (
        "<table><tr><th>ion</th><th>proteins</th><th>labelled</th><th>residues</th><th>positives</th><th>positive rate</th><th>MSA coverage</th></tr>"
        + "".join(rows)
        + "</table>"
        + fold_line
    )


SUMMARY_COLS = ("auprc", "auroc", "hra", "f1", "mcc")


def _summary_table(summary: dict[str, Any] | None) -> str:
    if not summary or not summary.get("ions"):
        return '<p class="note">no summary yet (no complete fold with out-of-fold predictions)</p>'
    head = "".join(f"<th>{c.upper()}</th>" for c in SUMMARY_COLS)
    rows = []
    for ion, m in summary["ions"].items():
        cells = "".join(f'<td data-key="{c}">{_f(m[c]["mean"])} ± {_f(m[c]["std"])}</td>' for c in SUMMARY_COLS)
        rows.append(f'<tr data-ion="{_e(ion)}"><td>{_e(ion)}</td><td data-key="positive_rate">{_f(m["positive_rate"], 4)}</td>{cells}</tr>')
    return (
        '<table id="summary"><tr><th>ion</th><th>positive rate</th>' + head + "</tr>" + "".join(rows) + "</table>"
        '<p class="small">mean ± std over folds; F1/MCC of fold k at the threshold fitted on the other folds\' out-of-fold predictions</p>'
    )


def _notes(notes: Sequence[str], element_id: str = "notes") -> str:
    if not notes:
        return "<p>none</p>"
    return f'<ul id="{element_id}">' + "".join(f'<li class="note">{_e(n)}</li>' for n in notes) + "</ul>"


def build_run_report(out: str | Path) -> Path:
    """Write ``report.html`` of a run directory from its files (complete folds, and curves of unfinished ones)."""
    run = RunDir(Path(out))
    cfg_text = (run.root / "config.yaml").read_text(encoding="utf-8") if (run.root / "config.yaml").exists() else ""
    cfg = yaml.safe_load(cfg_text) or {} if cfg_text else {}
    t = cfg.get("training", {})
    num_folds = int(t.get("num_folds") or 0)
    ions = list(t.get("ions") or [])
    summary = _read_json(run.root / "summary.json")
    thresholds = _read_json(run.thresholds) or {}
    stats = _read_json(run.root / "data_stats.json")
    notes = list((summary or {}).get("notes") or [])
    results, histories, oof = {}, {}, {}
    for k in range(1, num_folds + 1):
        res = _read_json(run.fold_result(k))
        hist = _history(run.metrics(k))
        if hist:
            histories[k] = hist
        if res is None and not run.fold(k).exists():
            notes.append(f"fold {k}: not trained (no {run.fold(k).name}/)")
            continue
        if res is None:
            notes.append(f"fold {k}: not complete (no fold_result.json)" + (f"; {len(hist)} epoch(s) recorded" if hist else ""))
            continue
        results[k] = res
        if run.oof(k).exists():
            try:
                oof[k] = read_oof(run.oof(k))
            except (DataError, ValueError) as e:
                notes.append(f"fold {k}: unreadable oof_predictions.tsv ({e})")
        elif not any(f"fold {k}: no oof" in n for n in notes):
            notes.append(f"fold {k}: no oof_predictions.tsv")
    header, info = _run_header(run, cfg, sorted(results), histories)
    data: dict[str, Any] = {
        "kind": "run",
        "info": info,
        "summary": summary,
        "thresholds": thresholds,
        "ions": {},
        "folds": {},
        "notes": notes,
    }
    sections = []
    for ion in ions:
        per_fold = {f"fold {k}": v[ion] for k, v in oof.items() if ion in v and len(v[ion][0])}
        body = [f'<section class="ion" id="ion-{_e(ion)}"><h2>{_e(ion)}</h2>']
        ion_data: dict[str, Any] = {}
        if per_fold:
            y = np.concatenate([v[0] for v in per_fold.values()])
            p = np.concatenate([v[1] for v in per_fold.values()])
            thr = (thresholds.get(ion) or {}).get("threshold")
            method = (thresholds.get(ion) or {}).get("method", "saved")
            panels, ion_data = ion_panels(ion, y, p, per_fold, thr, f"saved threshold ({method})")
            body.append(f"<h3>Out-of-fold predictions ({len(per_fold)} fold(s), {len(y)} residues)</h3>{panels}")
            body.append(
                '<p class="small">precision/recall/F1/MCC above: pooled out-of-fold predictions at the saved threshold, which was fitted on them (optimistic; the summary\'s F1/MCC are honest)</p>'
            )
        else:
            body.append('<p class="note">no out-of-fold predictions for this ion yet</p>')
        ep_html, ep_data = _epoch_panels(ion, histories, results, t.get("selection_metric", "auprc"))
        ion_data["epochs"] = ep_data
        body.append(f"<h3>Training per epoch (all folds)</h3>{ep_html}</section>")
        data["ions"][ion] = ion_data
        sections.append("".join(body))
    fold_html, data["folds"] = _fold_table(results, histories, oof, ions)
    name = run.root.name
    body = [
        f"<h1>e1min run report: {_e(name)}</h1>",
        header,
        f"<details><summary>recipe (config.yaml)</summary><pre>{_e(cfg_text)}</pre></details>",
        "<h2>Data</h2>",
        _data_table(stats),
        "<h2>Cross-validation summary</h2>",
        _summary_table(summary),
        _notes((summary or {}).get("notes") or [], "summary-notes") if (summary or {}).get("notes") else "",
        *sections,
        "<h2>Folds</h2>",
        fold_html,
        "<h2>Notes</h2>",
        _notes(notes),
    ]
    path = run.root / "report.html"
    atomic_write_text(path, _page(f"e1min report: {name}", "\n".join(body), data))
    return path


def _epoch_panels(ion: str, histories: dict[int, list], results: dict[int, dict], selection: str) -> tuple[str, dict[str, Any]]:
    data: dict[str, Any] = {}
    loss_series, val_series, marks = [], [], []
    for k, hist in sorted(histories.items()):
        color = _group_color(f"fold {k}", k - 1)
        ep = [h["epoch"] for h in hist]
        tr = [(h.get("train_bce") or {}).get(ion) for h in hist]
        vb = [((h.get("val") or {}).get(ion) or {}).get("val_bce") for h in hist]
        va = [((h.get("val") or {}).get(ion) or {}).get(selection if selection in ("auprc", "hra") else "auprc") for h in hist]
        best = (results.get(k) or {}).get("best_epoch")
        data[str(k)] = {"epoch": ep, "train_bce": tr, "val_bce": vb, f"val_{selection}": va, "best_epoch": best, "complete": k in results}
        tag = "" if k in results else " (unfinished)"
        loss_series.append(
            {"name": f"fold {k} train", "x": ep, "y": tr, "color": color, "dots": True, "legend_label": f"fold {k} train BCE{tag}"}
        )
        loss_series.append(
            {
                "name": f"fold {k} val",
                "x": ep,
                "y": vb,
                "color": color,
                "dash": "5 3",
                "dots": True,
                "legend_label": f"fold {k} validation BCE",
            }
        )
        val_series.append({"name": f"fold {k}", "x": ep, "y": va, "color": color, "dots": True, "legend_label": f"fold {k}{tag}"})
        if best is not None and best in ep:
            marks.append({"x": best, "y": va[ep.index(best)], "color": color, "label": f"fold {k} selected epoch {best}"})
    if not histories:
        return '<p class="note">no metrics.jsonl yet</p>', data
    xmax = max(max(h["epoch"] for h in hist) for hist in histories.values())
    figs = [
        svg_chart(loss_series, title=f"{ion}: BCE per epoch", xlabel="epoch", ylabel="BCE", xlim=(0.8, xmax + 0.2), chart_id=f"loss-{ion}"),
        svg_chart(
            val_series,
            title=f"{ion}: validation {selection.upper()} per epoch",
            xlabel="epoch",
            ylabel=selection.upper(),
            xlim=(0.8, xmax + 0.2),
            marks=marks,
            chart_id=f"val-{ion}",
        ),
    ]
    note = f"diamonds: each fold's selected epoch (best mean validation {selection.upper()} over all ions, so not always this ion's best)"
    return f'<div class="figs">{"".join(figs)}</div><p class="small">{_e(note)}</p>', data


def _fold_table(results: dict[int, dict], histories: dict[int, list], oof: dict, ions: Sequence[str]) -> tuple[str, dict[str, Any]]:
    rows, data = [], {}
    for k in sorted(set(results) | set(histories)):
        res, hist = results.get(k), histories.get(k, [])
        per_ion = {}
        for ion in ions:
            if k in oof and ion in oof[k] and len(oof[k][ion][0]):
                y, p = oof[k][ion]
                per_ion[ion] = {
                    "auprc": _num(metrics.average_precision(y, p)),
                    "auroc": _num(metrics.roc_auc(y, p)),
                    "positives": int(y.sum()),
                    "residues": int(len(y)),
                }
        entry = {
            "complete": res is not None,
            "best_epoch": (res or {}).get("best_epoch"),
            "stopping_epoch": hist[-1]["epoch"] if hist else None,
            "best_metric": (res or {}).get("best_metric"),
            "selection_metric": (res or {}).get("selection_metric"),
            "ions": per_ion,
        }
        data[str(k)] = entry
        ion_cells = "".join(
            f"<td>{_f(per_ion[i]['auprc'])} / {_f(per_ion[i]['auroc'])} ({per_ion[i]['positives']}/{per_ion[i]['residues']})</td>"
            if i in per_ion
            else "<td>–</td>"
            for i in ions
        )
        rows.append(
            f'<tr data-fold="{k}"><td>{k}</td><td>{"yes" if res else "no"}</td><td>{entry["best_epoch"] if entry["best_epoch"] is not None else "–"}</td>'
            f"<td>{entry['stopping_epoch'] or '–'}</td><td>{_f(entry['best_metric'], 4)}</td>{ion_cells}</tr>"
        )
    if not rows:
        return '<p class="note">no fold has started</p>', data
    head = "".join(f"<th>{_e(i)} AUPRC / AUROC (pos./residues)</th>" for i in ions)
    return (
        f'<table id="folds"><tr><th>fold</th><th>complete</th><th>best epoch</th><th>last epoch</th><th>best selection metric</th>{head}</tr>{"".join(rows)}</table>'
        '<p class="small">per-fold AUPRC/AUROC on that fold\'s out-of-fold predictions (its best epoch)</p>',
        data,
    )


# ------------------------------------------------------------------------------ evaluation page
def read_labelled_predictions(path: Path) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray, str]]]:
    """ion -> id -> (labels, probabilities, residues) from an evaluation's predictions.tsv (with a label column)."""
    rows: dict[str, dict[str, tuple[list, list, list]]] = {}
    with open(path, encoding="utf-8") as fh:
        header = fh.readline().rstrip("\n").split("\t")
        try:
            i_id, i_res, i_ion, i_p, i_lab = (header.index(c) for c in ("id", "residue", "ion", "probability", "label"))
        except ValueError:
            raise DataError(f"{path}: not an evaluation predictions.tsv (columns {header})") from None
        for line in fh:
            f = line.rstrip("\n").split("\t")
            ys, ps, rs = rows.setdefault(f[i_ion], {}).setdefault(f[i_id], ([], [], []))
            ys.append(int(f[i_lab]))
            ps.append(float(f[i_p]))
            rs.append(f[i_res])
    return {
        ion: {pid: (np.array(y, dtype=np.int64), np.array(p), "".join(r)) for pid, (y, p, r) in prots.items()}
        for ion, prots in rows.items()
    }


WORST = 15


def _worst_proteins(
    ion: str, prots: dict[str, tuple[np.ndarray, np.ndarray, str]], threshold: float | None
) -> tuple[str, list[dict[str, Any]]]:
    rows = []
    for pid, (y, p, res) in prots.items():
        if y.sum() == 0:
            continue
        positives = [{"position": int(i) + 1, "residue": res[i], "probability": round(float(p[i]), 4)} for i in np.flatnonzero(y)]
        rows.append({"id": pid, "length": len(y), "auprc": float(metrics.average_precision(y, p)), "positives": positives})
    rows.sort(key=lambda r: (r["auprc"], r["id"]))
    rows = rows[:WORST]
    if not rows:
        return '<p class="note">no protein with a positive residue</p>', rows
    body = []
    for r in rows:
        sites = ", ".join(
            f"{q['residue']}{q['position']} ({q['probability']:.2f}{'*' if threshold is not None and q['probability'] >= threshold else ''})"
            for q in r["positives"]
        )
        body.append(
            f'<tr data-id="{_e(r["id"])}"><td>{_e(r["id"])}</td><td>{r["length"]}</td><td>{r["auprc"]:.3f}</td><td>{_e(sites)}</td></tr>'
        )
    return (
        f'<table class="worst" data-ion="{_e(ion)}"><tr><th>protein</th><th>length</th><th>AUPRC</th><th>positives: residue, position (probability; * = called)</th></tr>{"".join(body)}</table>',
        rows,
    )


def build_evaluation_page(out_dir: str | Path) -> Path:
    """Write ``evaluation.html`` from an evaluation directory's evaluation.json and predictions.tsv."""
    out_dir = Path(out_dir)
    report = _read_json(out_dir / "evaluation.json") or {}
    by_ion = read_labelled_predictions(out_dir / "predictions.tsv")
    ck = report.get("checkpoint") or {}
    rt = report.get("runtime") or {}
    info = {
        "e1min version": __version__,
        "checkpoint folds": ", ".join(ck.get("folds") or []) or "?",
        "base model": ck.get("base_model") or "?",
        "precision / device": f"{rt.get('precision', '?')} on {rt.get('device', '?')}",
        "proteins": report.get("proteins", "?"),
    }
    data: dict[str, Any] = {"kind": "evaluation", "info": info, "ions": {}, "evaluation": report.get("ions")}
    rows = []
    for ion, m in (report.get("ions") or {}).items():
        s = m.get("at_saved") or {}
        rows.append(
            f'<tr data-ion="{_e(ion)}"><td>{_e(ion)}</td><td>{m.get("n")}</td><td data-key="positive_rate">{_f(m.get("positive_rate"), 4)}</td>'
            + "".join(f'<td data-key="{k}">{_f(m.get(k))}</td>' for k in ("auprc", "auroc", "hra"))
            + f"<td>{_f(s.get('threshold'))}</td>"
            + "".join(f'<td data-key="saved_{k}">{_f(s.get(k))}</td>' for k in ("f1", "mcc", "precision", "recall"))
            + "</tr>"
        )
    sections = []
    for ion, prots in by_ion.items():
        y = np.concatenate([v[0] for v in prots.values()])
        p = np.concatenate([v[1] for v in prots.values()])
        thr = ((report.get("ions") or {}).get(ion) or {}).get("at_saved", {}).get("threshold")
        panels, ion_data = ion_panels(ion, y, p, {}, thr, "saved threshold")
        worst_html, ion_data["worst"] = _worst_proteins(ion, prots, thr)
        data["ions"][ion] = ion_data
        sections.append(
            f'<section class="ion" id="ion-{_e(ion)}"><h2>{_e(ion)}</h2>{panels}<h3>Worst-predicted proteins (lowest per-protein AUPRC)</h3>{worst_html}</section>'
        )
    body = [
        f"<h1>e1min evaluation: {_e(out_dir.name)}</h1>",
        '<table class="meta">' + "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in info.items()) + "</table>",
        "<h2>Metrics</h2>",
        '<table id="summary"><tr><th>ion</th><th>residues</th><th>positive rate</th><th>AUPRC</th><th>AUROC</th><th>HRA</th><th>saved threshold</th>'
        "<th>F1</th><th>MCC</th><th>precision</th><th>recall</th></tr>" + "".join(rows) + "</table>",
        f'<p class="small">{_e(report.get("note", ""))}</p>',
        *sections,
    ]
    path = out_dir / "evaluation.html"
    atomic_write_text(path, _page(f"e1min evaluation: {out_dir.name}", "\n".join(body), data))
    return path
