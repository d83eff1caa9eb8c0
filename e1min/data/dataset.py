"""Ions, the REE union, per-ion statistics and model-ready examples (query window + context)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from e1min.data.fasta import DataError, Record, ion_fasta_path, read_fasta
from e1min.data.msa import ContextProvider, MSASampling
from e1min.data.seeding import stable_seed
from e1min.data.windows import random_crop, sliding_windows, stitch_predictions  # noqa: F401 (re-exported)
from e1min.tokenizer import SPECIALS_PER_SEQUENCE

REE_PARTS = ("LREE", "HREE")


def union_records(parts: dict[str, list[Record]]) -> list[Record]:
    """Union of several ions' records by id; labels OR-ed where a protein is in several parts."""
    merged: dict[str, Record] = {}
    origin: dict[str, str] = {}
    for ion, records in parts.items():
        for r in records:
            prev = merged.get(r.id)
            if prev is None:
                merged[r.id] = Record(r.id, r.sequence, None if r.labels is None else r.labels.copy())
                origin[r.id] = ion
                continue
            if prev.sequence != r.sequence:
                raise DataError(
                    f"protein {r.id!r} has different sequences in {origin[r.id]} and {ion} "
                    f"({len(prev.sequence)} vs {len(r.sequence)} residues); cannot build their union"
                )
            if r.labels is not None:
                prev.labels = r.labels.copy() if prev.labels is None else (prev.labels | r.labels)
    return list(merged.values())


def load_ion_records(fasta_path: str | os.PathLike, ions: Sequence[str], pattern: str = "{ION}_train.fasta") -> dict[str, list[Record]]:
    """Records per ion. REE without its own file is the union of the LREE and HREE files."""
    out: dict[str, list[Record]] = {}
    for ion in ions:
        path = ion_fasta_path(fasta_path, ion, pattern)
        if path.is_file():
            out[ion] = read_fasta(path)
            continue
        if ion == "REE":
            part_paths = {p: ion_fasta_path(fasta_path, p, pattern) for p in REE_PARTS}
            if all(p.is_file() for p in part_paths.values()):
                parts = {p: out[p] if p in out else read_fasta(pp) for p, pp in part_paths.items()}
                try:
                    out[ion] = union_records(parts)
                except DataError as e:
                    raise DataError(f"building REE from {part_paths['LREE']} and {part_paths['HREE']}: {e}") from None
                continue
            raise DataError(f"no FASTA file for ion REE: neither {path} nor both of {part_paths['LREE']} and {part_paths['HREE']} exist")
        raise DataError(f"no FASTA file for ion {ion}: {path} does not exist")
    return out


def ion_stats(records: Sequence[Record]) -> dict:
    """Proteins, labelled proteins, residues, positives, positive rate and length percentiles."""
    lengths = np.array([len(r.sequence) for r in records], dtype=np.int64)
    labelled = [r.labels for r in records if r.labels is not None]
    labelled_residues = int(sum(len(lab) for lab in labelled))
    positives = int(sum(int(lab.sum()) for lab in labelled))
    pct = (0, 5, 25, 50, 75, 95, 100)
    values = np.percentile(lengths, pct) if len(lengths) else np.zeros(len(pct))
    return {
        "proteins": len(records),
        "labelled_proteins": len(labelled),
        "residues": int(lengths.sum()),
        "labelled_residues": labelled_residues,
        "positives": positives,
        "positive_rate": positives / labelled_residues if labelled_residues else 0.0,
        "length_percentiles": {f"p{p}": float(v) for p, v in zip(pct, values)},
    }


def pos_weight(records: Sequence[Record], mode: str) -> float:
    """BCE positive weight: none -> 1, linear -> neg/pos, sqrt -> sqrt(neg/pos) over labelled residues."""
    if mode not in ("none", "linear", "sqrt"):
        raise DataError(f"unknown 'pos_weight_mode' {mode!r} (none, linear, sqrt)")
    if mode == "none":
        return 1.0
    stats = ion_stats(records)
    pos = stats["positives"]
    neg = stats["labelled_residues"] - pos
    if pos == 0 or neg == 0:
        return 1.0
    ratio = neg / pos
    return float(ratio if mode == "linear" else np.sqrt(ratio))


@dataclass
class Example:
    """One model row: context sequences then the query window ``[offset, offset + len(query))``.

    ``keep_start``/``keep_end`` (absolute residue indices) are the residues this example scores;
    the default (-1) means the whole window.
    """

    protein_id: str
    ion: str
    query: str
    labels: np.ndarray | None
    context: list[str] = field(default_factory=list)
    offset: int = 0
    keep_start: int = -1
    keep_end: int = -1
    protein_length: int = -1

    def __post_init__(self) -> None:
        if self.keep_start < 0:
            self.keep_start = self.offset
        if self.keep_end < 0:
            self.keep_end = self.offset + len(self.query)
        if self.protein_length < 0:
            self.protein_length = self.offset + len(self.query)

    @property
    def num_tokens(self) -> int:
        """Encoded length: residues plus special tokens of every sequence."""
        return example_tokens(self.context, len(self.query))


def example_tokens(context: Sequence[str], query_length: int) -> int:
    """Tokens of an encoded example with this context and query length."""
    return sum(len(c) for c in context) + query_length + SPECIALS_PER_SEQUENCE * (len(context) + 1)


def fit_context(context: list[str], query_length: int, max_example_tokens: int | None) -> list[str]:
    """Drop whole context sequences, last sampled first, until the example fits; the query is never cut."""
    if max_example_tokens is None or not context:
        return context
    budget = max_example_tokens - query_length - SPECIALS_PER_SEQUENCE
    used = np.cumsum([len(c) + SPECIALS_PER_SEQUENCE for c in context])
    return context[: int(np.searchsorted(used, budget, side="right"))]


def make_train_examples(
    records: Iterable[Record],
    ion: str,
    provider: ContextProvider | None,
    sampling: MSASampling,
    seed: int,
    epoch: int,
    max_query_length: int | None,
    max_example_tokens: int | None,
) -> list[Example]:
    """One example per protein with a fresh context and crop per epoch (seeded by seed, epoch, id)."""
    out = []
    for r in records:
        rng = np.random.default_rng(stable_seed(seed, epoch, r.id, "crop"))
        start, end = random_crop(len(r.sequence), max_query_length, r.labels, rng)
        ctx: list[str] = []
        if provider is not None:
            ctx = provider.context(ion, r.id, r.sequence, stable_seed(seed, epoch, r.id), sampling, (start, end))
        out.append(
            Example(
                protein_id=r.id,
                ion=ion,
                query=r.sequence[start:end],
                labels=None if r.labels is None else r.labels[start:end],
                context=fit_context(ctx, end - start, max_example_tokens),
                offset=start,
                protein_length=len(r.sequence),
            )
        )
    return out


def make_eval_examples(
    records: Iterable[Record],
    ion: str,
    provider: ContextProvider | None,
    sampling: MSASampling,
    seed: int,
    max_query_length: int | None,
    max_example_tokens: int | None,
    overlap: int | None = None,
) -> list[Example]:
    """Examples with a fixed context; long proteins become sliding windows whose keep spans partition them."""
    out = []
    for r in records:
        ctx_seed = stable_seed(seed, "eval", r.id)
        for w in sliding_windows(len(r.sequence), max_query_length, overlap):
            ctx: list[str] = []
            if provider is not None:
                ctx = provider.context(ion, r.id, r.sequence, ctx_seed, sampling, (w.start, w.end))
            out.append(
                Example(
                    protein_id=r.id,
                    ion=ion,
                    query=r.sequence[w.start : w.end],
                    labels=None if r.labels is None else r.labels[w.start : w.end],
                    context=fit_context(ctx, w.end - w.start, max_example_tokens),
                    offset=w.start,
                    keep_start=w.keep_start,
                    keep_end=w.keep_end,
                    protein_length=len(r.sequence),
                )
            )
    return out
