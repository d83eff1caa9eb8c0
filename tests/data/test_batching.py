import math

import numpy as np
import pytest

from e1min.data.batching import (
    fixed_size_batches,
    interleave,
    padding_fraction,
    shard,
    shard_eval,
    token_budget_batches,
)


def _lengths(n=500, seed=0):
    return np.random.default_rng(seed).integers(20, 1000, n).tolist()


@pytest.mark.parametrize("budget", [1000, 4096, 8192])
def test_token_budget_never_exceeded_and_covers(budget):
    lengths = _lengths() + [5000]  # one over-long example
    batches = token_budget_batches(lengths, budget, seed=1)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        padded = len(b) * max(lengths[i] for i in b)
        assert padded <= budget or len(b) == 1
    assert [len(lengths) - 1] in batches


def test_token_budget_shuffles_with_seed_and_pads_less():
    lengths = _lengths()
    a, b = token_budget_batches(lengths, 8192, seed=1), token_budget_batches(lengths, 8192, seed=2)
    assert a != b and a == token_budget_batches(lengths, 8192, seed=1)
    fixed = fixed_size_batches(lengths, 8, seed=1)
    assert padding_fraction(a, lengths) < 0.1 < padding_fraction(fixed, lengths)


def test_fixed_size_batches():
    b = fixed_size_batches(list(range(10)), 4, seed=0)
    assert [len(x) for x in b] == [4, 4, 2]
    assert sorted(sum(b, [])) == list(range(10))
    assert fixed_size_batches(list(range(5)), 2) == [[0, 1], [2, 3], [4]]


def test_padding_fraction():
    assert padding_fraction([[0, 1]], [2, 4]) == pytest.approx(0.25)
    assert padding_fraction([[0], None], [3]) == 0.0


def test_interleave_keeps_every_batch():
    plan = interleave({"ZN": [[0], [1]], "CA": [[0], [1], [2]]}, seed=0)
    assert sorted(plan) == [("CA", [0]), ("CA", [1]), ("CA", [2]), ("ZN", [0]), ("ZN", [1])]
    assert plan == interleave({"CA": [[0], [1], [2]], "ZN": [[0], [1]]}, seed=0)


@pytest.mark.parametrize("n, world", [(10, 3), (9, 3), (2, 4), (0, 2), (7, 1)])
def test_shard_covers_each_batch_once_with_equal_steps(n, world):
    plan = [("ZN", [i]) for i in range(n)]
    shards = [shard(plan, r, world) for r in range(world)]
    assert {len(s) for s in shards} == {math.ceil(n / world)} or n == 0
    real = [x for s in shards for x in s if x is not None]
    assert sorted(real) == plan


@pytest.mark.parametrize("n, world", [(10, 3), (2, 4)])
def test_shard_eval(n, world):
    parts = [shard_eval(list(range(n)), r, world) for r in range(world)]
    assert sorted(sum(parts, [])) == list(range(n))
    with pytest.raises(ValueError):
        shard_eval([1], 3, 2)
