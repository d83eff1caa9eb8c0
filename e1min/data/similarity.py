"""Row similarities of an aligned MSA matrix, block by block: neighbour counts and query similarity.

Memory is O(rows x width) plus a fixed block (``BLOCK_ROWS`` x ``BLOCK_FEATURES``), never O(rows^2);
counts are exact integers (one-hot float32 matrix products), identical to the unblocked computation.
See ``e1min.data.msa`` for the definitions (E1's reference sampler).
"""

from __future__ import annotations

import numpy as np

GAP = ord("-")

#: Rows per block of the neighbour and query-similarity computations.
BLOCK_ROWS = 2048

#: (column, letter) one-hot features per matrix product; with BLOCK_ROWS this fixes the block memory.
BLOCK_FEATURES = 12288


def _onehot(block: np.ndarray, cols: np.ndarray, letters: np.ndarray) -> np.ndarray:
    """(rows, features) float32: 1 where the row holds ``letters[k]`` in column ``cols[k]``."""
    return (block[:, cols] == letters).astype(np.float32)


def neighbour_counts(matrix: np.ndarray, bound: float, block_rows: int | None = None) -> np.ndarray:
    """``neighbours(i) = #{j : sim(i -> j) >= bound}`` for an (N, W) uint8 aligned matrix (no lower case).

    ``sim(i -> j)`` = matches on row i's non-gap columns / row j's non-gap count, a float32 division
    compared in float32 (all-gap rows: 0 / 0, never a neighbour). Identical rows are counted once with
    their multiplicity; match counts of distinct rows come from one-hot products over blocks of rows
    (exact: integer sums below 2**24 in float32), for block pairs ``J >= I`` only (the counts are
    symmetric). Only (column, letter) features held by two distinct rows or more enter the products; the
    others match only on the diagonal, which is set to ``len(i)``. Memory: O(N x W) plus a fixed block.
    """
    if matrix.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    uniq, inverse, mult = np.unique(matrix, axis=0, return_inverse=True, return_counts=True)
    return _distinct_neighbour_counts(uniq, mult, bound, max(1, int(block_rows or BLOCK_ROWS)))[inverse.ravel()]


def _distinct_neighbour_counts(matrix: np.ndarray, mult: np.ndarray, bound: float, b: int) -> np.ndarray:
    n, width = matrix.shape
    lengths = np.zeros(n, dtype=np.int64)
    feature_counts = np.zeros(width * 256, dtype=np.int64)
    offsets = np.arange(width, dtype=np.int64) * 256
    for i0 in range(0, n, b):
        block = matrix[i0 : i0 + b]
        lengths[i0 : i0 + b] = (block != GAP).sum(axis=1)
        feature_counts += np.bincount((block + offsets).ravel(), minlength=width * 256)
    feature_counts = feature_counts.reshape(width, 256)
    feature_counts[:, GAP] = 0
    cols, letters = np.nonzero(feature_counts >= 2)
    letters = letters.astype(np.uint8)
    chunks = [(k, min(k + BLOCK_FEATURES, len(cols))) for k in range(0, len(cols), BLOCK_FEATURES)] or [(0, 0)]
    len32 = lengths.astype(np.float32)
    b32 = np.float32(bound)
    neighbours = np.zeros(n, dtype=np.int64)
    for i0 in range(0, n, b):
        rows_i = matrix[i0 : i0 + b]
        # With one feature chunk, block I's one-hot is built once and reused for every block J.
        onehot_i = _onehot(rows_i, cols, letters) if len(chunks) == 1 else None
        for j0 in range(i0, n, b):
            rows_j = matrix[j0 : j0 + b]
            if onehot_i is not None:
                onehot_j = onehot_i if j0 == i0 else _onehot(rows_j, cols, letters)
                match = onehot_i @ onehot_j.T
            else:
                match = np.zeros((len(rows_i), len(rows_j)), dtype=np.float32)
                for k0, k1 in chunks:
                    c, a = cols[k0:k1], letters[k0:k1]
                    match += _onehot(rows_i, c, a) @ _onehot(rows_j, c, a).T
            if i0 == j0:
                np.fill_diagonal(match, len32[i0 : i0 + b])
            with np.errstate(divide="ignore", invalid="ignore"):  # 0 / 0 for all-gap rows: NaN, never >= bound
                neighbours[i0 : i0 + b] += (match / len32[j0 : j0 + b] >= b32) @ mult[j0 : j0 + b]
                if j0 != i0:
                    neighbours[j0 : j0 + b] += mult[i0 : i0 + b] @ (match / len32[i0 : i0 + b, None] >= b32)
    return neighbours


def query_similarity(matrix: np.ndarray, block_rows: int | None = None) -> np.ndarray:
    """``qsim(j)`` = (columns equal to the query row, gap == gap included) / W, float32."""
    n, width = matrix.shape
    b = max(1, int(block_rows or BLOCK_ROWS))
    same = np.zeros(n, dtype=np.int64)
    for i0 in range(0, n, b):
        same[i0 : i0 + b] = (matrix[i0 : i0 + b] == matrix[0]).sum(axis=1)
    return same.astype(np.float32) / np.float32(width)
