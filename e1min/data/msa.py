"""A3M alignments and E1-style context sampling (weighted draw of homologs, seeded)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from e1min.data.fasta import DataError

GAP = ord("-")
_LOWER = re.compile(r"[a-z]")
_BAD_ALIGNED = re.compile(r"[^A-Z\-]")
# Bound on the one-hot block built at once when counting identities (bytes).
_ONEHOT_BYTES = 1 << 28


@dataclass
class MSASampling:
    """How context rows are drawn from an MSA (names follow the E1 reference sampler)."""

    max_num_samples: int = 64
    max_token_length: int = 8192
    neighbor_similarity_lower_bound: float = 0.8
    min_query_similarity: float = 0.0
    max_query_similarity: float = 0.95

    def __post_init__(self) -> None:
        if self.max_num_samples < 0 or self.max_token_length < 0:
            raise ValueError("max_num_samples and max_token_length must be >= 0")
        for name in ("neighbor_similarity_lower_bound", "min_query_similarity", "max_query_similarity"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.min_query_similarity > self.max_query_similarity:
            raise ValueError("min_query_similarity is larger than max_query_similarity")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, base: "MSASampling | None" = None) -> "MSASampling":
        """Settings from a config mapping; unknown keys are an error. Missing keys come from ``base``."""
        d = dict(d or {})
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(allowed))
        if unknown:
            raise ValueError(f"unknown MSA sampling setting(s) {unknown}; allowed: {allowed}")
        start = {f: getattr(base, f) for f in allowed} if base is not None else {}
        return cls(**{**start, **d})

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for metadata files)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


TRAIN_SAMPLING = MSASampling()
VALIDATION_SAMPLING = MSASampling(max_num_samples=128, max_token_length=12288)


def parse_a3m(path: str | os.PathLike) -> list[str]:
    """Aligned rows of an A3M file (first = query): insertions (lower case) dropped, ``.`` read as ``-``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not text ({e})") from None
    rows: list[str] = []
    names: list[tuple[str, int]] = []
    current: list[str] | None = None
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith(">"):
            if current is not None:
                rows.append("".join(current))
            names.append((line[1:].split()[0] if line[1:].strip() else f"record {len(names) + 1}", lineno))
            current = []
            continue
        if current is None:
            raise DataError(f"{path}:{lineno}: expected a '>' header before sequence data")
        aligned = _LOWER.sub("", line).replace(".", "-")
        bad = _BAD_ALIGNED.search(aligned)
        if bad:
            raise DataError(f"{path}:{lineno}: record {names[-1][0]!r}: invalid character {bad.group()!r} in alignment")
        current.append(aligned)
    if current is not None:
        rows.append("".join(current))
    if not rows:
        raise DataError(f"{path}: empty A3M file (no records)")
    for (name, lineno), row in zip(names, rows):
        if not row:
            raise DataError(f"{path}:{lineno}: record {name!r} has no aligned residues")
        if len(row) != len(rows[0]):
            raise DataError(
                f"{path}:{lineno}: record {name!r} has {len(row)} aligned columns, the query has {len(rows[0])} "
                "(rows must be equal length once insertions are dropped)"
            )
    return rows


def _as_matrix(rows: Sequence[str]) -> np.ndarray:
    return np.frombuffer("".join(rows).encode("ascii"), dtype=np.uint8).reshape(len(rows), -1)


def match_counts(matrix: np.ndarray) -> np.ndarray:
    """(N, N) number of columns where rows i and j hold the same residue (gaps never match)."""
    n, length = matrix.shape
    letters = [c for c in np.unique(matrix) if c != GAP]
    counts = np.zeros((n, n), dtype=np.float32)  # exact: counts stay far below 2**24
    if not letters or length == 0:
        return counts
    chunk = max(1, _ONEHOT_BYTES // max(1, 4 * n * len(letters)))
    code = np.array(letters, dtype=np.uint8)
    for a in range(0, length, chunk):
        block = matrix[:, a : a + chunk]
        onehot = (block[:, :, None] == code[None, None, :]).reshape(n, -1).astype(np.float32)
        counts += onehot @ onehot.T
    return counts


def identity_matrix(matrix: np.ndarray) -> np.ndarray:
    """identity[i, j]: fraction of row i's non-gap columns where row j has the same residue."""
    nongap = (matrix != GAP).sum(axis=1).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        ident = match_counts(matrix) / nongap[:, None]
    return np.nan_to_num(ident, nan=0.0)


def sequence_weights(rows: Sequence[str] | np.ndarray, bound: float = 0.8) -> np.ndarray:
    """Weight 1 / (number of rows with identity >= ``bound`` over the row's non-gap columns, itself included)."""
    matrix = rows if isinstance(rows, np.ndarray) else _as_matrix(rows)
    ident = identity_matrix(matrix)
    neighbours = (ident >= bound).sum(axis=1)
    # An all-gap row has no columns to compare; it counts only itself.
    neighbours = np.maximum(neighbours, 1)
    return (1.0 / neighbours).astype(np.float64)


@dataclass
class MSA:
    """A parsed MSA with everything sampling needs, computed once."""

    rows: list[str]
    weights: np.ndarray  # per row, for neighbor_similarity_lower_bound = bound
    query_identity: np.ndarray  # identity of each row to the query over the row's non-gap columns
    query_columns: np.ndarray  # alignment column of each query residue
    bound: float

    @classmethod
    def from_rows(cls, rows: Sequence[str], bound: float = 0.8) -> "MSA":
        """Build from aligned rows (first = query)."""
        rows = list(rows)
        matrix = _as_matrix(rows)
        ident = identity_matrix(matrix)
        neighbours = np.maximum((ident >= bound).sum(axis=1), 1)
        return cls(
            rows=rows,
            weights=1.0 / neighbours,
            query_identity=ident[:, 0].astype(np.float64),
            query_columns=np.flatnonzero(matrix[0] != GAP),
            bound=bound,
        )

    @property
    def query_sequence(self) -> str:
        """The query row without gaps."""
        return self.rows[0].replace("-", "").upper()


def sample_context(
    rows: Sequence[str] | MSA,
    seed: int,
    sampling: MSASampling = TRAIN_SAMPLING,
    window: tuple[int, int] | None = None,
) -> list[str]:
    """Draw context sequences (gaps removed, upper case) from an MSA, never the query row itself.

    Rows are filtered by identity to the query, drawn without replacement with probability
    proportional to their weight, and appended until the next would exceed ``max_token_length``
    residues or ``max_num_samples`` rows. ``window`` = query residues ``[start, end)`` restricts
    each row to the alignment columns of that part of the query.
    """
    msa = rows if isinstance(rows, MSA) else MSA.from_rows(rows, sampling.neighbor_similarity_lower_bound)
    if msa.bound != sampling.neighbor_similarity_lower_bound:
        msa = MSA.from_rows(msa.rows, sampling.neighbor_similarity_lower_bound)
    if sampling.max_num_samples == 0 or len(msa.rows) < 2:
        return []
    qid = msa.query_identity[1:]
    candidates = 1 + np.flatnonzero((qid >= sampling.min_query_similarity) & (qid <= sampling.max_query_similarity))
    if len(candidates) == 0:
        return []
    rng = np.random.default_rng(seed)
    # Weighted sampling without replacement (Efraimidis-Spirakis): sort by log(u) / w.
    keys = np.log(rng.random(len(candidates))) / msa.weights[candidates]
    order = candidates[np.argsort(-keys, kind="stable")]
    lo, hi = 0, len(msa.rows[0])
    if window is not None:
        cols = msa.query_columns[window[0] : window[1]]
        if len(cols):
            lo, hi = int(cols[0]), int(cols[-1]) + 1
    out: list[str] = []
    total = 0
    for i in order:
        seq = msa.rows[i][lo:hi].replace("-", "").upper()
        if not seq:
            continue
        if total + len(seq) > sampling.max_token_length:
            break
        out.append(seq)
        total += len(seq)
        if len(out) >= sampling.max_num_samples:
            break
    return out


DEFAULT_FALLBACK_IONS: dict[str, tuple[str, ...]] = {"REE": ("LREE", "HREE")}


class ContextProvider:
    """Finds, parses, validates and caches per-protein MSAs; samples context from them.

    Lookup order: ``{msa_dir}/{ION}/{id}.a3m`` (or ``{ION}`` substituted inside ``msa_dir``), then the
    directories of the ion's parts (REE -> LREE, HREE), then ``{msa_dir}/{id}.a3m``.
    """

    def __init__(self, msa_dir: str | os.PathLike | None, fallback_ions: Mapping[str, Sequence[str]] | None = None):
        self.msa_dir = None if msa_dir is None else str(msa_dir)
        self.fallback_ions = dict(DEFAULT_FALLBACK_IONS if fallback_ions is None else fallback_ions)
        self._cache: dict[Path, MSA] = {}
        self._missing: set[tuple[str, str]] = set()

    @property
    def enabled(self) -> bool:
        """Whether an MSA directory was configured."""
        return self.msa_dir is not None

    def clear_cache(self) -> None:
        """Drop parsed MSAs (callers streaming through large inputs keep memory bounded)."""
        self._cache.clear()

    @property
    def missing(self) -> set[tuple[str, str]]:
        """(ion, protein id) pairs looked up without finding an MSA."""
        return set(self._missing)

    def candidates(self, ion: str, protein_id: str) -> list[Path]:
        """Paths tried, in order, for one protein."""
        if self.msa_dir is None:
            return []
        name = f"{protein_id}.a3m"
        if "{ION}" in self.msa_dir:
            ions = [ion, *self.fallback_ions.get(ion, ())]
            return [Path(self.msa_dir.replace("{ION}", i)) / name for i in ions]
        base = Path(self.msa_dir)
        return [base / i / name for i in (ion, *self.fallback_ions.get(ion, ()))] + [base / name]

    def find(self, ion: str, protein_id: str) -> Path | None:
        """The first existing MSA file for the protein, or None."""
        return next((p for p in self.candidates(ion, protein_id) if p.is_file()), None)

    def msa(self, ion: str, protein_id: str, query_sequence: str) -> MSA | None:
        """The protein's parsed MSA (cached), or None when it has none; checks the query row."""
        path = self.find(ion, protein_id)
        if path is None:
            if self.msa_dir is not None:
                self._missing.add((ion, protein_id))
            return None
        msa = self._cache.get(path)
        if msa is None:
            msa = MSA.from_rows(parse_a3m(path), TRAIN_SAMPLING.neighbor_similarity_lower_bound)
            self._cache[path] = msa
        if msa.query_sequence != query_sequence:
            raise DataError(
                f"{path}: first row (query, gaps removed) does not match the sequence of {protein_id!r} "
                f"({len(msa.query_sequence)} vs {len(query_sequence)} residues)"
            )
        return msa

    def rows(self, ion: str, protein_id: str, query_sequence: str) -> list[str] | None:
        """Aligned rows of the protein's MSA, or None when it has none."""
        msa = self.msa(ion, protein_id, query_sequence)
        return None if msa is None else msa.rows

    def context(
        self,
        ion: str,
        protein_id: str,
        query_sequence: str,
        seed: int,
        sampling: MSASampling = TRAIN_SAMPLING,
        window: tuple[int, int] | None = None,
    ) -> list[str]:
        """Sampled context sequences for the protein ([] without an MSA)."""
        msa = self.msa(ion, protein_id, query_sequence)
        if msa is None:
            return []
        if msa.bound != sampling.neighbor_similarity_lower_bound:
            msa = MSA.from_rows(msa.rows, sampling.neighbor_similarity_lower_bound)
            self._cache[self.find(ion, protein_id)] = msa  # type: ignore[index]
        return sample_context(msa, seed, sampling, window)
