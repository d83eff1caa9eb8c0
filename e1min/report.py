"""A training run's report, from what is on disk: out-of-fold predictions, thresholds, summary, plots.

``e1min report RUN_DIR`` regenerates all of it (e.g. after a run was killed right after a fold).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from e1min import metrics
from e1min.data.fasta import DataError, Record
from e1min.data.homology import format_leakage
from e1min.io import atomic_path, atomic_write_json, atomic_write_text, read_json_object
from e1min.plotting import pyplot
from e1min.recipe import Recipe, load_recipe
from e1min.run import RunDir, RunStateError

log = logging.getLogger("e1min")

OOF_HEADER = "id\tposition\tresidue\tion\tprobability\tlabel\n"


def write_oof(path: Path, records: dict[str, list[Record]], probs: dict[str, list[np.ndarray]]) -> None:
    """Out-of-fold predictions, one line per residue and ion (position 1-based)."""
    lines = [OOF_HEADER]
    for ion, recs in records.items():
        for r, p in zip(recs, probs[ion]):
            lines.extend(
                f"{r.id}\t{i + 1}\t{aa}\t{ion}\t{q:.6g}\t{y}\n"
                for i, (aa, q, y) in enumerate(zip(r.sequence, p.tolist(), r.labels.tolist()))
            )
    atomic_write_text(path, "".join(lines))


def read_oof(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """ion -> (labels, probabilities) from an oof_predictions.tsv."""
    by_ion: dict[str, tuple[list, list]] = {}
    with open(path) as fh:
        header = fh.readline()
        if header != OOF_HEADER:
            raise DataError(f"{path}: unexpected header {header.strip()!r}")
        for line in fh:
            _, _, _, ion, prob, label = line.rstrip("\n").split("\t")
            ys, ps = by_ion.setdefault(ion, ([], []))
            ys.append(int(label))
            ps.append(float(prob))
    return {ion: (np.array(ys, dtype=np.int64), np.array(ps)) for ion, (ys, ps) in by_ion.items()}


def summarise(out: Path, ions: Sequence[str], num_folds: int, method: str) -> dict[str, Any] | None:
    """thresholds.json, summary.json and summary.md from every completed fold's OOF predictions."""
    run = RunDir(out)
    notes: list[str] = []
    folds = []
    for k in range(1, num_folds + 1):
        if not run.fold_result(k).exists():
            continue
        if not run.oof(k).exists():
            notes.append(f"fold {k}: no oof_predictions.tsv (left out of the summary)")
            continue
        folds.append(k)
    for n in notes:
        log.warning("summary: %s", n)
    if not folds:
        return None
    oof = {k: read_oof(run.oof(k)) for k in folds}
    thresholds, ions_out = {}, {}
    for ion in ions:
        per_fold = {k: oof[k][ion] for k in folds if ion in oof[k] and len(oof[k][ion][0])}
        if not per_fold:
            continue
        y_all = np.concatenate([v[0] for v in per_fold.values()])
        p_all = np.concatenate([v[1] for v in per_fold.values()])
        thr, value = metrics.best_threshold(y_all, p_all, method)
        thresholds[ion] = {
            "threshold": thr,
            "method": method,
            "value": value,
            "fitted_on": "pooled out-of-fold predictions",
            "folds": list(per_fold),
        }
        cols: dict[str, list[float]] = {k: [] for k in ("auprc", "auroc", "hra", "hra_raw", "f1", "mcc", "precision", "recall")}
        for k, (y, p) in per_fold.items():
            # F1/MCC at a threshold fitted on the *other* folds' predictions (honest); own fold only if alone.
            others = [v for kk, v in per_fold.items() if kk != k]
            if others:
                t_k, _ = metrics.best_threshold(np.concatenate([o[0] for o in others]), np.concatenate([o[1] for o in others]), method)
            else:
                t_k = thr
            m = metrics.binary_metrics(y, p, threshold=t_k)
            if math.isnan(m["auprc"]):
                notes.append(f"fold {k}, {ion}: metrics undefined (no positive residue among {len(y)} validation residues)")
                log.warning("summary: %s", notes[-1])
            for key in cols:
                cols[key].append(m[key])
        ions_out[ion] = {"positive_rate": float(y_all.mean()), **{k: metrics.mean_std(v) for k, v in cols.items()}}
    fold_results = [read_json_object(run.fold_result(k), DataError) for k in folds]
    summary = {"ions": ions_out, "folds": fold_results, "config": "config.yaml", "notes": notes}
    homology = _homology(out)
    if homology is not None:
        summary["homology"] = homology
    atomic_write_json(run.thresholds, thresholds)
    atomic_write_json(out / "summary.json", summary)
    md = summary_markdown(ions_out, folds, notes)
    if homology is not None:
        md += "\n" + format_leakage(homology) + "\n"
    atomic_write_text(out / "summary.md", md)
    return summary


def _homology(out: Path) -> dict[str, Any] | None:
    """The cross-fold homology report that prepare_run wrote into data_stats.json, if any."""
    try:
        stats = json.loads((out / "data_stats.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    report = stats.get("homology") if isinstance(stats, dict) else None
    return report if isinstance(report, dict) and "with_homolog" in report else None


def summary_markdown(ions_out: dict, folds: list[int], notes: Sequence[str] = ()) -> str:
    cols = ("auprc", "auroc", "hra", "f1", "mcc")
    lines = [
        f"Cross-validation summary over folds {', '.join(map(str, folds))} (mean ± std; F1/MCC at out-of-fold thresholds)",
        "",
        "| ion | positive rate | " + " | ".join(c.upper() for c in cols) + " |",
        "|---|---|" + "---|" * len(cols),
    ]
    for ion, m in ions_out.items():
        lines.append(f"| {ion} | {m['positive_rate']:.4f} | " + " | ".join(f"{m[c]['mean']:.3f} ± {m[c]['std']:.3f}" for c in cols) + " |")
    if notes:
        lines += ["", "Notes:"] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def write_plots(plot_dir: Path, fold: int, history: list[dict], ions: Sequence[str]) -> None:
    """Loss and AUPRC curves per ion: PNG with matplotlib, else CSV (and one note)."""
    rows = [
        (h["epoch"], ion, h["train_bce"].get(ion), h["val"][ion].get("val_bce"), h["val"][ion].get("auprc"))
        for h in history
        for ion in ions
    ]
    plot_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        plot_dir / f"curves_fold_{fold}.csv",
        "epoch,ion,train_bce,val_bce,val_auprc\n" + "".join(",".join("" if v is None else str(v) for v in r) + "\n" for r in rows),
    )
    plt = pyplot()
    if plt is None:
        log.info(
            "matplotlib not installed: curves written as %s only (pip install 'e1min[plot]' for PNGs)", plot_dir / f"curves_fold_{fold}.csv"
        )
        return
    for ion in ions:
        mine = [r for r in rows if r[1] == ion]
        epochs = [r[0] for r in mine]
        for name, series, ylabel in (
            ("loss", [(2, "train BCE"), (3, "validation BCE")], "BCE"),
            ("auprc", [(4, "validation AUPRC")], "AUPRC"),
        ):
            fig, ax = plt.subplots(figsize=(5, 3.5))
            for col, label in series:
                ax.plot(epochs, [np.nan if r[col] is None else r[col] for r in mine], marker="o", label=label)
            ax.set(xlabel="epoch", ylabel=ylabel, title=f"{ion}, fold {fold}")
            ax.legend()
            fig.tight_layout()
            with atomic_path(plot_dir / f"{name}_fold_{fold}_{ion}.png") as tmp:
                fig.savefig(tmp, format="png", dpi=100)
            plt.close(fig)


def report_run(out: str | os.PathLike, cfg: Recipe | dict | None = None, only_missing_plots: bool = False) -> dict[str, Any] | None:
    """Plots of every complete fold (from its metrics.jsonl) and the run summary, from what is on disk.

    ``e1min report RUN_DIR`` calls this, so a run killed after a fold still gets its plots and summary.
    """
    out = Path(out)
    if cfg is None:
        cfg_file = out / "config.yaml"
        if not cfg_file.exists():
            raise RunStateError(f"{out}: no config.yaml (not an e1min run directory)")
        cfg, _ = load_recipe(cfg_file, check_files=False)
    elif isinstance(cfg, dict):
        cfg, _ = Recipe.from_dict(cfg, check_files=False)
    t = cfg.training
    run = RunDir(out)
    for k in range(1, t.num_folds + 1):
        history_file = run.metrics(k)
        if not run.fold_result(k).exists() or not history_file.exists():
            continue
        if only_missing_plots and (out / "plots" / f"curves_fold_{k}.csv").exists():
            continue
        history = [json.loads(line) for line in history_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        write_plots(out / "plots", k, history, t.ions)
    return summarise(out, t.ions, t.num_folds, t.threshold_method)
