"""Prediction inputs, checked before any model work: FASTA records and their MSAs, with ``--skip-invalid``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from e1min.data.fasta import DataError, Record, read_fasta
from e1min.data.msa import ContextProvider


@dataclass
class Skipped:
    id: str
    reason: str


def read_input_fasta(
    path: str | os.PathLike, skip_invalid: bool = False, require_labels: bool = False, max_length: int | None = None
) -> tuple[list[Record], list[Skipped]]:
    """Records of a labelled (3-line), unlabelled (2-line) or wrapped FASTA, checked before any work.

    File-level problems (missing, empty, not text, no header first) are always a DataError. A bad record
    (invalid residue, bad label line, duplicate id, missing labels when ``require_labels``, longer than
    ``max_length``) is a DataError naming file, line and id, or with ``skip_invalid`` it is returned in
    the skipped list instead.
    """
    skipped: list[Skipped] = []

    def skip(rid: str, error: DataError) -> None:
        if not skip_invalid:
            raise DataError(f"{error} (use --skip-invalid to skip such proteins)") from None
        skipped.append(Skipped(rid, str(error)))

    path = Path(path)
    records = read_fasta(path, require_labels=require_labels, max_length=max_length, on_invalid=skip)
    if not records:
        raise DataError(f"{path}: no valid records ({len(skipped)} skipped as invalid)")
    return records, skipped


def check_msas(
    provider: ContextProvider, ions: Sequence[str], records: Sequence[Record], skip_invalid: bool
) -> tuple[list[Record], list[Skipped]]:
    """Parse each protein's MSA once and check its query row (without caching it) before any work."""
    keep, skipped = [], []
    for r in records:
        try:
            for ion in ions:
                provider.validate(ion, r.id, r.sequence)
        except DataError as e:
            if not skip_invalid:
                raise DataError(f"{e} (use --skip-invalid to skip such proteins)") from None
            skipped.append(Skipped(r.id, str(e)))
            continue
        keep.append(r)
    return keep, skipped
