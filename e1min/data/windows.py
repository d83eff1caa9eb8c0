"""Windows over long queries: random training crops, sliding evaluation windows, stitching."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

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


def stitch(windows: Sequence[Window], predictions: Sequence[np.ndarray], length: int | None = None) -> np.ndarray:
    """Assemble per-window predictions (first axis = window residues) into one per-residue array."""
    if len(windows) != len(predictions) or not windows:
        raise ValueError(f"{len(windows)} windows but {len(predictions)} predictions")
    length = max(w.keep_end for w in windows) if length is None else length
    first = np.asarray(predictions[0])
    out = np.zeros((length, *first.shape[1:]), dtype=first.dtype)
    covered = np.zeros(length, dtype=np.int64)
    for w, p in zip(windows, predictions):
        p = np.asarray(p)
        if len(p) != w.end - w.start:
            raise ValueError(f"window [{w.start}, {w.end}) got {len(p)} predictions")
        out[w.keep_start : w.keep_end] = p[w.keep_start - w.start : w.keep_end - w.start]
        covered[w.keep_start : w.keep_end] += 1
    if not np.all(covered == 1):
        raise ValueError("windows do not partition the sequence (a residue is scored 0 or 2+ times)")
    return out
