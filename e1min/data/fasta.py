"""Labelled FASTA: ``>id`` / sequence / 0-1 label line (labelled) or ``>id`` / sequence (unlabelled)."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from e1min.errors import E1minError
from e1min.io import atomic_write_text

_BAD_RESIDUE = re.compile(r"[^A-Z]")
_DIGITS = re.compile(r"[0-9]")
_BAD_LABEL = re.compile(r"[^01]")


class DataError(E1minError, ValueError):
    """Malformed or inconsistent input data, or a data-pipeline setting (MSA sampling, masking, batching,
    windows, folds) out of range; the message names the file, line and record, or the setting."""


@dataclass
class Record:
    """One protein: id, upper-case sequence and per-residue 0/1 labels (None when unlabelled)."""

    id: str
    sequence: str
    labels: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.labels is not None and len(self.labels) != len(self.sequence):
            raise DataError(f"record {self.id!r}: {len(self.labels)} labels for {len(self.sequence)} residues")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Record):
            return NotImplemented
        if self.id != other.id or self.sequence != other.sequence:
            return False
        if self.labels is None or other.labels is None:
            return self.labels is None and other.labels is None
        return bool(np.array_equal(self.labels, other.labels))


def parse_labels(text: str) -> np.ndarray:
    """A ``0101`` string as a uint8 array (no validation)."""
    return np.frombuffer(text.encode("ascii"), dtype=np.uint8) - ord("0")


def format_labels(labels: np.ndarray) -> str:
    """A 0/1 array as a ``0101`` string."""
    return (np.asarray(labels, dtype=np.uint8) + ord("0")).tobytes().decode("ascii")


def _read_lines(path: Path) -> list[tuple[int, str]]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not a FASTA file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8/ASCII text ({e})") from None
    # splitlines() treats \r\n, \r and \n alike; rstrip drops trailing blanks.
    return [(n, line.rstrip()) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]


def _check_residues(path: Path, lineno: int, rid: str, line: str) -> None:
    bad = _BAD_RESIDUE.search(line)
    if bad:
        hint = " (lower-case is not allowed)" if bad.group().islower() else ""
        raise DataError(
            f"{path}:{lineno}: record {rid!r}: invalid residue {bad.group()!r} at column {bad.start() + 1}"
            f"{hint}; sequences must be upper-case letters A-Z"
        )


def _parse_record(path: Path, header: tuple[int, str], body: list[tuple[int, str]]) -> Record:
    hline, htext = header
    rid = htext[1:].split()[0] if htext[1:].strip() else ""
    if not rid:
        raise DataError(f"{path}:{hline}: header without an id")
    if not body:
        raise DataError(f"{path}:{hline}: record {rid!r}: header without a sequence")
    labels = None
    last_no, last = body[-1]
    if _DIGITS.search(last):
        # A line with digits is a label line: residues are letters, so it cannot be sequence.
        if len(body) == 1:
            raise DataError(f"{path}:{last_no}: record {rid!r}: empty sequence (only a label line follows the header)")
        bad = _BAD_LABEL.search(last)
        if bad:
            raise DataError(
                f"{path}:{last_no}: record {rid!r}: invalid label character {bad.group()!r} at column "
                f"{bad.start() + 1}; labels must be 0 or 1"
            )
        labels = parse_labels(last)
        body = body[:-1]
    for lineno, line in body:
        _check_residues(path, lineno, rid, line)
    sequence = "".join(line for _, line in body)
    if labels is not None and len(labels) != len(sequence):
        raise DataError(f"{path}:{last_no}: record {rid!r}: label length {len(labels)} differs from sequence length {len(sequence)}")
    return Record(rid, sequence, labels)


def read_fasta(
    path: str | os.PathLike,
    require_labels: bool = False,
    max_length: int | None = None,
    on_invalid: Callable[[str, DataError], None] | None = None,
) -> list[Record]:
    """Read labelled (3-line) and unlabelled (2-line or wrapped) FASTA records.

    Raises DataError naming file, line and record id on any malformed input. With ``on_invalid``, a bad
    record (invalid residue, bad labels, duplicate id, missing labels, longer than ``max_length``) is
    passed to ``on_invalid(record_id, error)`` and left out instead; file-level problems still raise.
    """
    path = Path(path)
    lines = _read_lines(path)
    if not lines:
        raise DataError(f"{path}: empty file (no records)")
    if not lines[0][1].startswith(">"):
        raise DataError(f"{path}:{lines[0][0]}: expected a '>' header line, got {lines[0][1][:40]!r}")
    records: list[Record] = []
    seen: dict[str, int] = {}
    header_idx = [i for i, (_, text) in enumerate(lines) if text.startswith(">")] + [len(lines)]
    for a, b in zip(header_idx[:-1], header_idx[1:]):
        hline, htext = lines[a]
        try:
            rec = _parse_record(path, lines[a], lines[a + 1 : b])
            if rec.id in seen:
                raise DataError(f"{path}:{hline}: record {rec.id!r}: duplicate id (first at line {seen[rec.id]})")
            if require_labels and rec.labels is None:
                raise DataError(f"{path}:{hline}: record {rec.id!r}: no label line (labels are required here)")
            if max_length is not None and len(rec.sequence) > max_length:
                raise DataError(f"{path}:{hline}: record {rec.id!r}: {len(rec.sequence)} residues, more than the limit of {max_length}")
        except DataError as e:
            if on_invalid is None:
                raise
            on_invalid(htext[1:].split()[0] if htext[1:].strip() else f"<line {hline}>", e)
            continue
        seen[rec.id] = hline
        records.append(rec)
    return records


def format_fasta(records: Iterable[Record]) -> str:
    """Records in the labelled-FASTA format (label line only for labelled records)."""
    out: list[str] = []
    for r in records:
        out += [f">{r.id}", r.sequence]
        if r.labels is not None:
            out.append(format_labels(r.labels))
    return "\n".join(out) + "\n"


def write_fasta(path: str | os.PathLike, records: Iterable[Record]) -> None:
    """Write records atomically in the labelled-FASTA format."""
    atomic_write_text(path, format_fasta(records))


def ion_fasta_path(fasta_path: str | os.PathLike, ion: str, pattern: str = "{ION}_train.fasta") -> Path:
    """``fasta_path`` with ``{ION}`` substituted, or ``fasta_path/pattern`` when it has no placeholder."""
    text = str(fasta_path)
    if "{ION}" in text:
        return Path(text.replace("{ION}", ion))
    return Path(text) / pattern.replace("{ION}", ion)
