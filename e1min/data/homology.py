"""Homology across a split, from one MMseqs2 search: the leakage report and identity-grouped folds.

A link is an alignment found by ``mmseqs search`` (with backtrace) whose identity (``fident``: identical
columns / alignment columns) is at least a threshold and whose coverage of BOTH sequences is at least
``coverage`` (MMseqs2's ``--cov-mode 0``). The report counts, per identity threshold (30 / 50 / 90 %
over >= 80 % coverage), the proteins with a link across the split, and lists the worst pairs.
``identity_groups`` joins linked proteins into connected components (so no linked pair can be split:
MMseqs2's set-cover clusters alone do not guarantee that).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from e1min.data.fasta import DataError, Record
from e1min.data.folds import assign_folds, assign_group_folds, protein_groups
from e1min.data.mmseqs import Alignment, MMseqs, find_mmseqs

#: Identity thresholds of the leakage report.
THRESHOLDS = (0.3, 0.5, 0.9)
#: Minimum coverage of both sequences for a pair to count (report and grouping default).
COVERAGE = 0.8
#: Pairs listed in a report.
WORST_PAIRS = 10
#: mmseqs search settings of the all-vs-all / test-vs-train search: sensitive, many hits per query.
SEARCH_SENSITIVITY = 7.5
SEARCH_MAX_SEQS = 1000


@dataclass
class Homology:
    """The alignments of one search between proteins (self-hits removed) and the mmseqs version."""

    alignments: list[Alignment]
    mmseqs_version: str

    def links(self, min_seq_id: float, coverage: float = COVERAGE) -> list[Alignment]:
        """Alignments at >= ``min_seq_id`` identity covering >= ``coverage`` of both sequences."""
        return [a for a in self.alignments if a.fident >= min_seq_id and min(a.qcov, a.tcov) >= coverage]


def unique_proteins(records_by_ion: Mapping[str, Sequence[Record]]) -> list[Record]:
    """One record per protein id over all ions (the longest sequence when an id's sequences differ)."""
    out: dict[str, Record] = {}
    for recs in records_by_ion.values():
        for r in recs:
            if r.id not in out or len(r.sequence) > len(out[r.id].sequence):
                out[r.id] = r
    return [out[k] for k in sorted(out)]


def search(
    queries: Sequence[Record],
    targets: Sequence[Record] | None = None,
    threads: int = 1,
    mmseqs: MMseqs | None = None,
    work_dir: str | None = None,
) -> Homology:
    """One ``mmseqs search`` of ``queries`` against ``targets`` (None: all against all), self-hits dropped."""
    mm = mmseqs or find_mmseqs()
    if not queries or (targets is not None and not targets):
        return Homology([], mm.version)
    tmp = Path(tempfile.mkdtemp(prefix="e1min-mmseqs-", dir=work_dir))
    try:
        qdb = mm.createdb_records(queries, tmp / "query")
        tdb = qdb if targets is None else mm.createdb_records(targets, tmp / "target")
        res = mm.search(qdb, tdb, tmp / "result", tmp / "tmp", threads, SEARCH_SENSITIVITY, None, SEARCH_MAX_SEQS)
        rows = mm.convertalis(qdb, tdb, res, tmp / "result.tsv", threads)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Homology([a for a in rows if a.query != a.target], mm.version)


def leakage_report(
    homology: Homology,
    side: Callable[[str], Any],
    proteins: int,
    coverage: float = COVERAGE,
    thresholds: Sequence[float] = THRESHOLDS,
    what: str = "folds",
) -> dict[str, Any]:
    """Proteins with a homolog on another side of the split (``side(id)``: its fold, or "test"/"train").

    ``with_homolog[t]`` counts the proteins (queries and targets alike) with a cross-side link at
    identity >= t; ``worst_pairs`` lists the most identical cross-side pairs (each pair once).
    """
    cross = [a for a in homology.alignments if side(a.query) != side(a.target) and min(a.qcov, a.tcov) >= coverage]
    counts = {}
    for t in thresholds:
        ids = set()
        for a in cross:
            if a.fident >= t:
                ids.update((a.query, a.target))
        counts[f"{t:g}"] = len(ids)
    best: dict[tuple[str, str], Alignment] = {}
    for a in cross:
        key = tuple(sorted((a.query, a.target)))
        if key not in best or (a.fident, a.bits) > (best[key].fident, best[key].bits):
            best[key] = a
    worst = sorted(best.values(), key=lambda a: (-a.fident, -min(a.qcov, a.tcov), a.query, a.target))[:WORST_PAIRS]
    return {
        "split": what,
        "proteins": proteins,
        "coverage": coverage,
        "with_homolog": counts,
        "worst_pairs": [
            {
                "query": a.query,
                "target": a.target,
                "query_side": side(a.query),
                "target_side": side(a.target),
                "identity": round(a.fident, 3),
                "qcov": round(a.qcov, 3),
                "tcov": round(a.tcov, 3),
                "evalue": a.evalue,
            }
            for a in worst
        ],
        "mmseqs": homology.mmseqs_version,
    }


def fold_leakage(
    records_by_ion: Mapping[str, Sequence[Record]], assignment: Mapping[str, int], homology: Homology | None = None, threads: int = 1
) -> dict[str, Any]:
    """The leakage report of a fold assignment: proteins with a homolog in another fold."""
    proteins = unique_proteins(records_by_ion)
    homology = homology or search(proteins, threads=threads)
    report = leakage_report(homology, lambda pid: assignment.get(pid, -1) + 1, len(proteins), what="folds")
    report["per_ion"] = {}
    for ion, recs in records_by_ion.items():
        ids = {r.id for r in recs}
        sub = Homology([a for a in homology.alignments if a.query in ids and a.target in ids], homology.mmseqs_version)
        rep = leakage_report(sub, lambda pid: assignment.get(pid, -1) + 1, len(ids))
        report["per_ion"][ion] = rep["with_homolog"]
    return report


def heldout_leakage(test: Sequence[Record], train: Sequence[Record], threads: int = 1) -> dict[str, Any]:
    """The leakage report of a test set against training proteins: test proteins with a training homolog."""
    test_ids = {r.id for r in test}
    renamed = [Record(f"test:{r.id}", r.sequence) for r in test]
    homology = search(renamed, [Record(f"train:{r.id}", r.sequence) for r in train], threads=threads)
    report = leakage_report(homology, lambda pid: pid.split(":", 1)[0], len(test), what="test vs train")
    # Only test proteins are counted: a training protein with a test homolog is the same leak seen twice.
    for t in THRESHOLDS:
        ids = {a.query for a in homology.alignments if a.fident >= t and min(a.qcov, a.tcov) >= COVERAGE}
        report["with_homolog"][f"{t:g}"] = len(ids)
    for p in report["worst_pairs"]:
        p["query"], p["target"] = p["query"].split(":", 1)[1], p["target"].split(":", 1)[1]
    report["train_proteins"] = len(train)
    report["same_id"] = len(test_ids & {r.id for r in train})
    return report


def format_leakage(report: Mapping[str, Any]) -> str:
    """The report as printable lines: counts per threshold, then the worst pairs."""
    n = report["proteins"]
    counts = ", ".join(f">= {float(t) * 100:.0f} %: {c}/{n}" for t, c in report["with_homolog"].items())
    lines = [f"homology across {report['split']} (mmseqs {report['mmseqs']}, coverage >= {report['coverage'] * 100:.0f} %): {counts}"]
    for ion, per in (report.get("per_ion") or {}).items():
        lines.append(f"  {ion:<6} " + ", ".join(f">= {float(t) * 100:.0f} %: {c}" for t, c in per.items()))
    if report["worst_pairs"]:
        lines.append("  most similar pairs across the split:")
        for p in report["worst_pairs"]:
            lines.append(
                f"    {p['query']} ({p['query_side']}) ~ {p['target']} ({p['target_side']}): identity {p['identity']:.2f}, "
                f"coverage {p['qcov']:.2f}/{p['tcov']:.2f}"
            )
    return "\n".join(lines)


def identity_groups(
    records_by_ion: Mapping[str, Sequence[Record]], homology: Homology, min_seq_id: float, coverage: float
) -> list[list[str]]:
    """Connected components of proteins linked by id, identical sequence or an alignment at the thresholds."""
    links = [(a.query, a.target) for a in homology.links(min_seq_id, coverage)]
    return protein_groups(records_by_ion, links)


def check_group_sizes(groups: Sequence[Sequence[str]], num_folds: int, min_seq_id: float) -> None:
    """DataError when the largest group holds more than a fold's share of the proteins (folds cannot balance)."""
    total = sum(len(g) for g in groups)
    largest = max(groups, key=len) if groups else []
    if len(largest) > total / num_folds:
        raise DataError(
            f"identity grouping: one group of linked proteins holds {len(largest)} of {total} proteins (e.g. {largest[0]!r}), "
            f"more than a fold's share for {num_folds} folds; raise data.split_min_seq_id (now {min_seq_id:g}) "
            "or data.split_coverage, or use fewer folds"
        )


def grouping_meta(method: str, min_seq_id: float, coverage: float) -> dict[str, Any] | None:
    """What folds.json records of a grouping (None for ``sequence``, so its folds.json stays as before)."""
    if method == "sequence":
        return None
    if method != "identity":
        raise DataError(f"data.fold_grouping must be sequence or identity, got {method!r}")
    return {"method": "identity", "min_seq_id": min_seq_id, "coverage": coverage}


def make_folds(
    records_by_ion: Mapping[str, Sequence[Record]],
    num_folds: int,
    seed: int,
    grouping: str = "sequence",
    min_seq_id: float = 0.3,
    coverage: float = COVERAGE,
    threads: int = 1,
) -> tuple[dict[str, int], dict[str, Any], Homology | None]:
    """(assignment, extra folds.json metadata, the search's homology or None) for a fold grouping."""
    meta = grouping_meta(grouping, min_seq_id, coverage)
    if meta is None:
        return assign_folds(records_by_ion, num_folds, seed), {}, None
    mm = find_mmseqs()
    homology = search(unique_proteins(records_by_ion), threads=threads, mmseqs=mm)
    groups = identity_groups(records_by_ion, homology, min_seq_id, coverage)
    check_group_sizes(groups, num_folds, min_seq_id)
    assignment = assign_group_folds(records_by_ion, groups, num_folds, seed)
    extra = {"grouping": meta, "mmseqs_version": mm.version, "groups": {pid: g[0] for g in groups for pid in g}}
    return assignment, extra, homology
