"""Batch plans: token-budget or fixed-size batches (one ion each), interleaving and per-rank sharding."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeVar

import numpy as np

from e1min.data.fasta import DataError
from e1min.data.seeding import stable_seed

T = TypeVar("T")


def token_budget_batches(lengths: Sequence[int], max_tokens: int, seed: int | None = None) -> list[list[int]]:
    """Index batches whose padded size (batch size x longest length) stays within ``max_tokens``.

    Examples are sorted by length (ties broken randomly when ``seed`` is given) and cut greedily,
    so each batch holds similar lengths; the batch order is shuffled when ``seed`` is given. An
    example longer than the budget forms a batch of its own.
    """
    if max_tokens <= 0:
        raise DataError(f"'max_tokens' (tokens per batch) must be positive, got {max_tokens}")
    lens = np.asarray(lengths, dtype=np.int64)
    if len(lens) == 0:
        return []
    rng = np.random.default_rng(stable_seed(seed, "token_budget")) if seed is not None else None
    tiebreak = rng.random(len(lens)) if rng is not None else np.arange(len(lens))
    order = np.lexsort((tiebreak, lens))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order.tolist():  # per example, not per token
        # Sorted ascending, so the newcomer is the longest of the batch.
        if current and (len(current) + 1) * int(lens[i]) > max_tokens:
            batches.append(current)
            current = []
        current.append(i)
    batches.append(current)
    if rng is not None:
        batches = [batches[k] for k in rng.permutation(len(batches))]
    return batches


def fixed_size_batches(lengths: Sequence[int], batch_size: int, seed: int | None = None, sort_by_length: bool = False) -> list[list[int]]:
    """Batches of ``batch_size`` indices: shuffled (when seeded) then chunked, as in the original pipeline.

    ``sort_by_length`` chunks length-sorted indices instead and shuffles the batch order.
    """
    if batch_size <= 0:
        raise DataError(f"'batch_size' must be positive, got {batch_size}")
    n = len(lengths)
    rng = np.random.default_rng(stable_seed(seed, "fixed_size")) if seed is not None else None
    if sort_by_length:
        tiebreak = rng.random(n) if rng is not None else np.arange(n)
        order = np.lexsort((tiebreak, np.asarray(lengths)))
    else:
        order = rng.permutation(n) if rng is not None else np.arange(n)
    batches = [order[a : a + batch_size].tolist() for a in range(0, n, batch_size)]
    if sort_by_length and rng is not None:
        batches = [batches[k] for k in rng.permutation(len(batches))]
    return batches


def padding_fraction(batches: Sequence[Sequence[int] | None], lengths: Sequence[int]) -> float:
    """Fraction of padded tokens among all tokens of the padded batches (``None`` entries skipped)."""
    lens = np.asarray(lengths, dtype=np.int64)
    real = padded = 0
    for b in batches:
        if not b:
            continue
        bl = lens[list(b)]
        real += int(bl.sum())
        padded += len(bl) * int(bl.max())
    return 1.0 - real / padded if padded else 0.0


def interleave(batches_by_ion: dict[str, list[list[int]]], seed: int) -> list[tuple[str, list[int]]]:
    """All ions' batches as (ion, batch) pairs in one seeded random order."""
    plan = [(ion, b) for ion in sorted(batches_by_ion) for b in batches_by_ion[ion]]
    order = np.random.default_rng(stable_seed(seed, "interleave")).permutation(len(plan))
    return [plan[k] for k in order]


def shard(plan: Sequence[T], rank: int, world_size: int) -> list[T | None]:
    """This rank's steps: every rank gets ceil(n / W) entries, disjoint, together all of ``plan``.

    A rank short of batches gets ``None`` for its last step (the trainer runs an empty step so
    collectives stay in lockstep).
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"invalid rank {rank} for world size {world_size}")
    steps = math.ceil(len(plan) / world_size)
    mine: list[T | None] = list(plan[rank::world_size])
    return mine + [None] * (steps - len(mine))


def shard_eval(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Strided split for validation: disjoint, no duplicates, sizes differ by at most one."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"invalid rank {rank} for world size {world_size}")
    return list(items[rank::world_size])
