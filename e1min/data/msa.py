"""A3M alignments and E1's MSA context sampler, reproduced exactly, in memory O(rows x width).

``read_a3m(path)`` parses an A3M once into an :class:`MSA`; ``sample_context(msa, seed, sampling)``
returns the context sequences E1's reference ``sample_context`` draws with the same A3M, settings and
seed, in the same order:

1. records in file order, ``.`` read as ``-``; the first record is the query;
2. for similarities only, lower-case letters (insertions) are removed: every row then has the query's
   alignment width W (matrix ``M``, ``len(j)`` = non-gap columns of row j);
3. ``sim(i -> j)`` = (columns where row i is not a gap and row j equals row i) / ``len(j)`` -- divided
   by the OTHER row's non-gap count -- as a float32 division compared in float32 with
   ``neighbor_similarity_lower_bound``; ``neighbours(i) = #{j : sim(i -> j) >= bound}`` (i included),
   weight(i) = 1 / neighbours(i) as float64 (int count -> ``1.0 / count``);
4. ``qsim(j)`` = (columns where row j equals the query, gap == gap included) / W, float32;
5. candidates: ``min_query_similarity <= qsim <= max_query_similarity`` (bounds compared in float32, as
   torch compares a float32 tensor with a Python float); the query itself is a candidate when the
   maximum is 1.0;
6. ``numpy.random.default_rng(seed).choice(N, size=min(max_num_samples, #candidates), p=w / w.sum(),
   replace=False, shuffle=True)`` with ``w`` float64, non-candidates 0;
7. each drawn row's ORIGINAL text (insertions kept), upper-cased, gaps removed, in draw order, stopping
   at the first row that would push the running residue total past ``max_token_length``.

e1min's departures (the reference gives no result in these cases, or has no such option):

- ``window=(start, end)`` restricts each drawn row to the alignment columns of query residues
  ``[start, end)`` (insertions between those columns kept; a window reaching the query's first/last
  residue keeps the row's text before/after it); rows empty in the window are skipped. A window that
  covers the whole query is no window: the rows are exactly the reference's.
- Rows without an aligned residue (all gaps) are never drawn; they stay in the index space so every
  other draw is unchanged. (The reference's weight for them is 1/0 and its draw crashes; with a bound of
  0.0 it could draw them as empty sequences.)
- No candidate row: an empty context (single-sequence) and an info log line, where the reference raises.

Neighbour counts are computed block by block (one-hot matrix products over row blocks, exact integer
counts in float32), so memory is O(rows x width) plus a fixed block, never O(rows^2).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from e1min.data.a3m import _BAD_CHAR, MAX_A3M_BYTES, _path_entry_exists, _read_text, _split_records, check_a3m_path  # noqa: F401
from e1min.data.fasta import DataError
from e1min.data.similarity import BLOCK_FEATURES, BLOCK_ROWS, GAP, neighbour_counts, query_similarity  # noqa: F401

log = logging.getLogger("e1min")


_DROP_LOWER = str.maketrans("", "", "abcdefghijklmnopqrstuvwxyz")


@dataclass
class MSASampling:
    """How context rows are drawn from an MSA (names and meaning follow E1's reference sampler).

    The defaults are the original pipeline's training settings; E1's own function defaults are
    511 / 32768 / 0.8 / 0.0 / 1.0.
    """

    max_num_samples: int = 64
    max_token_length: int = 8192
    neighbor_similarity_lower_bound: float = 0.8
    min_query_similarity: float = 0.0
    max_query_similarity: float = 0.95

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            want_int = f.name in ("max_num_samples", "max_token_length")
            if isinstance(v, bool) or not isinstance(v, int if want_int else (int, float)):
                raise DataError(f"MSA sampling: {f.name!r} must be {'an integer' if want_int else 'a number'}, got {v!r}")
        if self.max_num_samples < 0 or self.max_token_length < 0:
            raise DataError(
                f"MSA sampling: 'max_num_samples' and 'max_token_length' must be >= 0, got {self.max_num_samples} and {self.max_token_length}"
            )
        for name in ("neighbor_similarity_lower_bound", "min_query_similarity", "max_query_similarity"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise DataError(f"MSA sampling: {name!r} must be in [0, 1], got {getattr(self, name)}")
        if self.min_query_similarity > self.max_query_similarity:
            raise DataError(
                f"MSA sampling: 'min_query_similarity' ({self.min_query_similarity}) is larger than 'max_query_similarity' ({self.max_query_similarity})"
            )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, base: "MSASampling | None" = None) -> "MSASampling":
        """Settings from a config mapping; unknown keys are an error. Missing keys come from ``base``."""
        d = dict(d or {})
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(allowed))
        if unknown:
            raise DataError(f"unknown MSA sampling setting(s) {unknown}; allowed: {allowed}")
        start = {f: getattr(base, f) for f in allowed} if base is not None else {}
        return cls(**{**start, **d})

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for metadata files)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


TRAIN_SAMPLING = MSASampling()
VALIDATION_SAMPLING = MSASampling(max_num_samples=128, max_token_length=12288)
#: E1's reference function defaults.
E1_REFERENCE_SAMPLING = MSASampling(511, 32768, 0.8, 0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# Files and parsing
# ---------------------------------------------------------------------------------------------


def read_a3m(path: str | os.PathLike) -> "MSA":
    """Parse and validate an A3M file once (weights are computed on first use, cached per bound).

    Errors (missing file, directory, dangling symlink, symlink loop, non-text bytes, no records, empty
    records, rows of unequal aligned width, invalid characters) are DataErrors naming file, line and record.
    """
    path = Path(path)
    try:
        texts, names, lines = _split_records(path, _read_text(path))
        return MSA(texts, names, lines, path)
    except MemoryError:
        raise DataError(f"{path}: out of memory while reading this A3M (too large)") from None


def parse_a3m(path: str | os.PathLike) -> list[str]:
    """Aligned rows of an A3M file (first = query): insertions (lower case) dropped, ``.`` read as ``-``."""
    return read_a3m(path).rows


# ---------------------------------------------------------------------------------------------
# Similarities (blocked)
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# The MSA
# ---------------------------------------------------------------------------------------------
class MSA:
    """A parsed A3M: original rows, aligned matrix, query similarity; weights cached per bound.

    ``texts[i]``: record i as written (insertions kept, ``.`` -> ``-``); ``matrix``: (N, W) uint8 aligned
    rows (insertions removed); ``lengths``: non-gap columns per row; ``query_similarity``: float32 qsim.
    """

    def __init__(
        self,
        texts: Sequence[str],
        names: Sequence[str] | None = None,
        lines: Sequence[int] | None = None,
        path: str | os.PathLike | None = None,
    ):
        self.path = None if path is None else Path(path)
        where = str(self.path) if self.path is not None else "<rows>"
        self.names = list(names) if names is not None else [f"row {i + 1}" for i in range(len(texts))]
        self.lines = list(lines) if lines is not None else [0] * len(texts)

        def at(i: int) -> str:
            return f"{where}:{self.lines[i]}" if self.lines[i] else where

        if not texts:
            raise DataError(f"{where}: empty A3M file (no records)")
        self.texts = [t.replace(".", "-") for t in texts]
        aligned = [t.translate(_DROP_LOWER) for t in self.texts]
        width = len(aligned[0])
        for i, (t, a) in enumerate(zip(self.texts, aligned)):
            if not t:
                raise DataError(f"{at(i)}: record {self.names[i]!r} is empty (a header without sequence lines)")
            if len(a) != width:
                raise DataError(
                    f"{at(i)}: record {self.names[i]!r} has {len(a)} aligned columns, the query {self.names[0]!r} has "
                    f"{width} (rows must be equal length once insertions, lower case, are dropped)"
                )
            bad = _BAD_CHAR.search(t)
            if bad:
                raise DataError(f"{at(i)}: record {self.names[i]!r}: invalid character {bad.group()!r}")
        if width == 0 or aligned[0].count("-") == width:
            raise DataError(f"{at(0)}: the query row {self.names[0]!r} has no aligned residue")
        self.matrix = np.frombuffer("".join(aligned).encode("ascii"), dtype=np.uint8).reshape(len(aligned), width)
        del aligned
        self.lengths = (self.matrix != GAP).sum(axis=1)
        self.query_similarity = query_similarity(self.matrix)
        self.query_columns = np.flatnonzero(self.matrix[0] != GAP)
        self.query_sequence = self.matrix[0][self.query_columns].tobytes().decode("ascii")
        self._neighbours: dict[float, np.ndarray] = {}
        self._probabilities: dict[tuple[float, float, float], tuple[np.ndarray, int]] = {}
        self._noted: set[tuple[float, float]] = set()

    @classmethod
    def from_rows(cls, rows: Sequence[str], bound: float | None = None) -> "MSA":
        """Build from A3M row texts (first = query; lower-case insertions and ``.`` allowed)."""
        msa = cls(list(rows))
        if bound is not None:
            msa.neighbour_counts(bound)
        return msa

    def __len__(self) -> int:
        return self.matrix.shape[0]

    @property
    def width(self) -> int:
        """Alignment width W (the query's aligned columns, gaps included)."""
        return self.matrix.shape[1]

    @property
    def rows(self) -> list[str]:
        """Aligned rows (insertions dropped, ``.`` as ``-``), as strings."""
        return [r.tobytes().decode("ascii") for r in self.matrix]

    @property
    def label(self) -> str:
        return str(self.path) if self.path is not None else "<rows>"

    def neighbour_counts(self, bound: float) -> np.ndarray:
        """``neighbours(i)`` for this bound (computed once per bound)."""
        key = float(bound)
        if key not in self._neighbours:
            try:
                self._neighbours[key] = neighbour_counts(self.matrix, key)
            except MemoryError:
                raise DataError(f"{self.label}: out of memory computing sequence weights ({len(self)} rows)") from None
        return self._neighbours[key]

    def weights(self, bound: float) -> np.ndarray:
        """float64 ``1.0 / neighbours(i)``; 0 for rows without an aligned residue (never drawn)."""
        n = self.neighbour_counts(bound)
        w = np.zeros(len(n), dtype=np.float64)
        ok = (self.lengths > 0) & (n > 0)
        w[ok] = 1.0 / n[ok]
        return w

    def probabilities(self, sampling: MSASampling) -> tuple[np.ndarray, int]:
        """(``p = w / w.sum()`` over all rows with non-candidates 0, number of candidates)."""
        key = (float(sampling.neighbor_similarity_lower_bound), float(sampling.min_query_similarity), float(sampling.max_query_similarity))
        if key not in self._probabilities:
            q = self.query_similarity
            mask = (q >= np.float32(key[1])) & (q <= np.float32(key[2])) & (self.lengths > 0)
            count = int(mask.sum())
            # Same array (length N, float64, zeros off the candidates) as the reference: same sum, same p.
            w = np.where(mask, self.weights(key[0]), 0.0)
            self._probabilities[key] = (w / w.sum() if count else w, count)
        return self._probabilities[key]

    def check_query(self, sequence: str, protein_id: str) -> None:
        """DataError when the query row (gaps removed) is not ``sequence``."""
        if self.query_sequence == sequence:
            return
        first = next((k for k, (a, b) in enumerate(zip(self.query_sequence, sequence)) if a != b), None)
        where = f"first difference at residue {first + 1}" if first is not None else "one is a prefix of the other"
        line = f":{self.lines[0]}" if self.lines[0] else ""
        raise DataError(
            f"{self.label}{line}: record {self.names[0]!r}: first row (query, gaps removed) does not match the "
            f"sequence of {protein_id!r} ({len(self.query_sequence)} vs {len(sequence)} residues, {where})"
        )

    def _span(self, window: tuple[int, int] | None) -> tuple[int, int, bool, bool] | None:
        """(first column, last column + 1, open at the start, open at the end) of a query window."""
        if window is None:
            return None
        start, end = max(0, window[0]), min(len(self.query_columns), window[1])
        if end <= start or (start == 0 and end == len(self.query_columns)):
            return None
        cols = self.query_columns[start:end]
        return int(cols[0]), int(cols[-1]) + 1, start == 0, end == len(self.query_columns)

    def context_text(self, i: int, span: tuple[int, int, bool, bool] | None = None) -> str:
        """Row i's original text (insertions kept), upper case, gaps removed; cut to ``span`` if given."""
        text = self.texts[i]
        if span is not None:
            lo, hi, open_start, open_end = span
            raw = np.frombuffer(text.encode("ascii"), dtype=np.uint8)
            at = np.flatnonzero((raw < ord("a")) | (raw > ord("z")))  # text position of each aligned column
            text = text[0 if open_start else at[lo] : len(text) if open_end else at[hi - 1] + 1]
        return text.upper().replace("-", "")

    def note_no_candidates(self, sampling: MSASampling) -> None:
        """Log once per range that this MSA runs single-sequence (E1's sampler would raise)."""
        key = (sampling.min_query_similarity, sampling.max_query_similarity)
        if key not in self._noted:
            self._noted.add(key)
            log.info(
                "%s: no row has query similarity in [%g, %g]; running single-sequence (E1's sampler would raise)",
                self.label,
                key[0],
                key[1],
            )


def sample_context(
    msa: Sequence[str] | MSA,
    seed: int,
    sampling: MSASampling = TRAIN_SAMPLING,
    window: tuple[int, int] | None = None,
) -> list[str]:
    """Context sequences in draw order, exactly as E1's ``sample_context`` (see the module docstring).

    ``msa`` is an :class:`MSA` or A3M row texts (first = query). The query row is a candidate like any
    other (when ``max_query_similarity`` is 1.0 the context may contain the query itself, as in E1).
    ``window=(start, end)`` cuts the drawn rows to the query residues ``[start, end)`` (e1min's departure).
    """
    if not isinstance(msa, MSA):
        msa = MSA.from_rows(msa)
    if sampling.max_num_samples == 0:
        return []
    p, count = msa.probabilities(sampling)
    if count == 0:
        msa.note_no_candidates(sampling)
        return []
    drawn = np.random.default_rng(seed).choice(len(p), size=min(sampling.max_num_samples, count), p=p, replace=False, shuffle=True)
    span = msa._span(window)
    out: list[str] = []
    total = 0
    for i in drawn:
        seq = msa.context_text(int(i), span)
        if not seq:
            continue  # empty in the window (departure: skipped)
        if total + len(seq) > sampling.max_token_length:
            break
        out.append(seq)
        total += len(seq)
    return out


# ---------------------------------------------------------------------------------------------
# Per-protein lookup
# ---------------------------------------------------------------------------------------------
DEFAULT_FALLBACK_IONS: dict[str, tuple[str, ...]] = {"REE": ("LREE", "HREE")}


class ContextProvider:
    """Finds, parses, validates and caches per-protein MSAs; samples context from them.

    Lookup order: ``{msa_dir}/{ION}/{id}.a3m`` (or ``{ION}`` substituted inside ``msa_dir``), then the
    directories of the ion's parts (REE -> LREE, HREE), then ``{msa_dir}/{id}.a3m``. The first path
    where anything exists is the protein's MSA: a directory, dangling symlink or symlink loop there is a
    DataError, not "no MSA".
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
        """The protein's MSA file, or None; DataError when the first existing path is not a regular file."""
        for p in self.candidates(ion, protein_id):
            if _path_entry_exists(p):
                check_a3m_path(p)
                return p
        return None

    def validate(self, ion: str, protein_id: str, query_sequence: str) -> Path | None:
        """Parse and check the protein's MSA without caching it; its path, or None when it has none."""
        path = self.find(ion, protein_id)
        if path is not None:
            msa = self._cache.get(path) or read_a3m(path)
            msa.check_query(query_sequence, protein_id)
        return path

    def msa(self, ion: str, protein_id: str, query_sequence: str) -> MSA | None:
        """The protein's parsed MSA (cached), or None when it has none; checks the query row."""
        path = self.find(ion, protein_id)
        if path is None:
            if self.msa_dir is not None:
                self._missing.add((ion, protein_id))
            return None
        msa = self._cache.get(path)
        if msa is None:
            msa = read_a3m(path)
            self._cache[path] = msa
        msa.check_query(query_sequence, protein_id)
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
        return sample_context(msa, seed, sampling, window)
