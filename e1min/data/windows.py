"""Windows over long queries: random training crops, sliding evaluation windows, and stitching them back."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from e1min.data.fasta import DataError


@dataclass(frozen=True)
class Window:
    """Residues ``[start, end)`` are fed to the model; ``[keep_start, keep_end)`` are scored from it."""

    start: int
    end: int
    keep_start: int
    keep_end: int


def sliding_windows(length: int, max_len: int | None, overlap: int | None = None) -> list[Window]:
    """Windows of at most ``max_len`` residues whose keep spans partition ``range(length)``.

    Consecutive windows overlap by at least ``overlap`` (default ``max_len // 4``); each residue of an
    overlap is kept from the window in which it lies farther from the edge (split at the midpoint).
    """
    if length <= 0:
        raise ValueError(f"length must be positive, got {length}")
    if max_len is None or length <= max_len:
        return [Window(0, length, 0, length)]
    if max_len < 2:
        raise DataError(f"'max_query_length' (window length) must be at least 2, got {max_len}")
    overlap = max_len // 4 if overlap is None else overlap
    if not 0 <= overlap < max_len:
        raise DataError(f"window 'overlap' must be in [0, max_query_length), got {overlap} (max_query_length {max_len})")
    stride = max_len - overlap
    starts = list(range(0, length - max_len, stride)) + [length - max_len]
    ends = [s + max_len for s in starts]
    cuts = [0] + [(starts[k + 1] + ends[k]) // 2 for k in range(len(starts) - 1)] + [length]
    return [Window(s, e, cuts[k], cuts[k + 1]) for k, (s, e) in enumerate(zip(starts, ends))]


def random_crop(length: int, max_len: int | None, labels: np.ndarray | None, rng: np.random.Generator) -> tuple[int, int]:
    """A random ``[start, end)`` window of ``max_len`` residues, containing a positive label when there is one."""
    if max_len is None or length <= max_len:
        return 0, length
    lo, hi = 0, length - max_len
    if labels is not None:
        positives = np.flatnonzero(labels)
        if len(positives):
            p = int(positives[rng.integers(len(positives))])
            lo, hi = max(0, p - max_len + 1), min(p, length - max_len)
    start = int(rng.integers(lo, hi + 1))
    return start, start + max_len


def stitch_predictions(examples: Sequence, predictions: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """Per-protein arrays from per-example predictions over each example's query window (the one stitching path).

    Each example (``dataset.Example``) scores residues ``[keep_start, keep_end)`` of its protein; the keep
    spans of a protein's windows must partition it (every residue exactly once), else ValueError.
    """
    if len(examples) != len(predictions):
        raise ValueError(f"{len(examples)} examples but {len(predictions)} predictions")
    out: dict[str, np.ndarray] = {}
    covered: dict[str, np.ndarray] = {}
    for ex, pred in zip(examples, predictions):
        pred = np.asarray(pred)
        if len(pred) != len(ex.query):
            raise ValueError(f"{ex.protein_id}: {len(pred)} predictions for a {len(ex.query)}-residue window")
        if ex.protein_id not in out:
            out[ex.protein_id] = np.zeros((ex.protein_length, *pred.shape[1:]), dtype=pred.dtype)
            covered[ex.protein_id] = np.zeros(ex.protein_length, dtype=np.int64)
        a, b = ex.keep_start - ex.offset, ex.keep_end - ex.offset
        out[ex.protein_id][ex.keep_start : ex.keep_end] = pred[a:b]
        covered[ex.protein_id][ex.keep_start : ex.keep_end] += 1
    for pid, c in covered.items():
        if not np.all(c == 1):
            raise ValueError(f"{pid}: windows do not cover every residue exactly once")
    return out
