"""K-fold assignment shared by all ions: one protein (and its identical-sequence twins) -> one fold."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from e1min.data.fasta import DataError, Record
from e1min.data.seeding import stable_seed
from e1min.io import atomic_write_text

FOLDS_VERSION = 1


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            # The smaller id becomes the root so groups do not depend on insertion order.
            lo, hi = sorted((ra, rb))
            self.parent[hi] = lo


def protein_groups(records_by_ion: Mapping[str, Sequence[Record]], links: Iterable[tuple[str, str]] = ()) -> list[list[str]]:
    """Groups of protein ids that must share a fold: same id across ions, identical sequences, or ``links``
    (pairs of ids, e.g. homologs): connected components."""
    uf = _UnionFind()
    by_sequence: dict[str, str] = {}
    for records in records_by_ion.values():
        for r in records:
            uf.find(r.id)
            first = by_sequence.setdefault(r.sequence, r.id)
            uf.union(first, r.id)
    for a, b in links:
        if a in uf.parent and b in uf.parent:
            uf.union(a, b)
    groups: dict[str, list[str]] = {}
    for pid in uf.parent:
        groups.setdefault(uf.find(pid), []).append(pid)
    return sorted((sorted(g) for g in groups.values()), key=lambda g: g[0])


def assign_folds(records_by_ion: Mapping[str, Sequence[Record]], num_folds: int, seed: int) -> dict[str, int]:
    """Protein id -> fold in 0..num_folds-1 over the union of all ions' proteins.

    Groups are visited in a seeded random order and each goes to the fold with the fewest residues
    so far (ties: fewest proteins, then lowest index): deterministic and balanced.
    """
    if num_folds < 2:
        raise DataError(f"'num_folds' must be at least 2, got {num_folds}")
    lengths: dict[str, int] = {}
    for records in records_by_ion.values():
        for r in records:
            lengths[r.id] = max(lengths.get(r.id, 0), len(r.sequence))
    groups = protein_groups(records_by_ion)
    if len(groups) < num_folds:
        raise DataError(f"only {len(groups)} independent protein groups for {num_folds} folds")
    order = np.random.default_rng(stable_seed(seed, "folds")).permutation(len(groups))
    residues = np.zeros(num_folds, dtype=np.int64)
    counts = np.zeros(num_folds, dtype=np.int64)
    assignment: dict[str, int] = {}
    for g in order:
        group = groups[g]
        fold = int(np.lexsort((np.arange(num_folds), counts, residues))[0])
        residues[fold] += sum(lengths[p] for p in group)
        counts[fold] += len(group)
        for pid in group:
            assignment[pid] = fold
    return dict(sorted(assignment.items()))


def assign_group_folds(
    records_by_ion: Mapping[str, Sequence[Record]], groups: Sequence[Sequence[str]], num_folds: int, seed: int
) -> dict[str, int]:
    """Protein id -> fold for precomputed groups, largest group first, each to the fold whose share of
    proteins plus share of positive residues stays lowest (ties: seeded order of equal groups, lowest fold)."""
    if num_folds < 2:
        raise DataError(f"'num_folds' must be at least 2, got {num_folds}")
    if len(groups) < num_folds:
        raise DataError(f"only {len(groups)} independent protein groups for {num_folds} folds")
    positives: dict[str, int] = {}
    for records in records_by_ion.values():
        for r in records:
            positives[r.id] = positives.get(r.id, 0) + (int(r.labels.sum()) if r.labels is not None else 0)
    size = np.array([len(g) for g in groups], dtype=np.int64)
    pos = np.array([sum(positives.get(p, 0) for p in g) for g in groups], dtype=np.int64)
    tie = np.random.default_rng(stable_seed(seed, "folds")).permutation(len(groups))
    order = np.lexsort((tie, -pos, -size))
    total, total_pos = max(int(size.sum()), 1), max(int(pos.sum()), 1)
    counts = np.zeros(num_folds, dtype=np.int64)
    pos_counts = np.zeros(num_folds, dtype=np.int64)
    assignment: dict[str, int] = {}
    for g in order:
        load = (counts + size[g]) / total + (pos_counts + pos[g]) / total_pos
        fold = int(np.lexsort((np.arange(num_folds), counts, load))[0])
        counts[fold] += size[g]
        pos_counts[fold] += pos[g]
        for pid in groups[g]:
            assignment[pid] = fold
    return dict(sorted(assignment.items()))


def save_folds(path: str | os.PathLike, assignment: Mapping[str, int], meta: Mapping[str, Any] | None = None) -> None:
    """Write the assignment (and metadata such as seed and num_folds) as JSON, atomically."""
    num_folds = max(assignment.values()) + 1 if assignment else 0
    doc = {"version": FOLDS_VERSION, "num_folds": num_folds, "meta": dict(meta or {}), "folds": dict(assignment)}
    atomic_write_text(path, json.dumps(doc, indent=1, sort_keys=True) + "\n")


def load_folds(path: str | os.PathLike) -> tuple[dict[str, int], dict[str, Any]]:
    """Read ``(assignment, meta)`` written by save_folds; DataError naming the file if malformed."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: folds file not found") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("folds"), dict):
        raise DataError(f"{path}: not a folds file (missing 'folds' mapping)")
    if doc.get("version") != FOLDS_VERSION:
        raise DataError(f"{path}: unsupported folds file version {doc.get('version')!r}")
    folds = doc["folds"]
    num_folds = doc.get("num_folds")
    bad = [k for k, v in folds.items() if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < (num_folds or 0)]
    if bad:
        raise DataError(f"{path}: fold of protein {bad[0]!r} is not an integer in [0, {num_folds})")
    return {str(k): int(v) for k, v in folds.items()}, dict(doc.get("meta") or {})


def check_assignment(assignment: Mapping[str, int], records_by_ion: Mapping[str, Sequence[Record]]) -> list[str]:
    """Proteins of the data that the assignment does not cover (e.g. a stale folds.json on resume)."""
    return sorted({r.id for recs in records_by_ion.values() for r in recs if r.id not in assignment})


def split(records: Sequence[Record], assignment: Mapping[str, int], fold: int) -> tuple[list[Record], list[Record]]:
    """(training records, validation records) for one fold."""
    missing = [r.id for r in records if r.id not in assignment]
    if missing:
        raise DataError(f"{len(missing)} protein(s) have no fold assignment, e.g. {missing[0]!r}")
    train = [r for r in records if assignment[r.id] != fold]
    val = [r for r in records if assignment[r.id] == fold]
    return train, val
