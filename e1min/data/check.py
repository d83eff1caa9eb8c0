"""``check-data``: validate every input a config names and summarise it, listing all problems at once."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from e1min.data.dataset import ion_stats, load_ion_records
from e1min.data.fasta import DataError, Record
from e1min.data.homology import fold_leakage, format_leakage, make_folds
from e1min.data.mmseqs import MMseqsError
from e1min.data.msa import ContextProvider


def _msa_coverage(provider: ContextProvider, ion: str, records: Sequence[Record], problems: list[str]) -> int:
    """Parse and check every protein's A3M (nothing cached): unreadable paths (directory, dangling symlink,
    symlink loop), malformed files and query rows that differ from the FASTA sequence are problems."""
    found = 0
    for r in records:
        try:
            if provider.validate(ion, r.id, r.sequence) is not None:
                found += 1
        except DataError as e:
            problems.append(f"{ion}: {e}")
    return found


def check_data(
    fasta_path: str | os.PathLike,
    ions: Sequence[str],
    pattern: str = "{ION}_train.fasta",
    msa_dir: str | os.PathLike | None = None,
    num_folds: int = 5,
    seed: int = 0,
    grouping: str = "sequence",
    min_seq_id: float = 0.3,
    coverage: float = 0.8,
    homology: bool = True,
    threads: int = 1,
) -> tuple[str, list[str]]:
    """Return (printable report, every problem found) for the FASTA files, MSAs and folds of ``ions``.

    With ``homology`` (and MMseqs2 installed) the report adds the proteins with a homolog in another fold;
    ``grouping="identity"`` builds the folds as a run would (MMseqs2 required).
    """
    problems: list[str] = []
    if not ions:
        problems.append("no ions configured")
    records_by_ion: dict[str, list[Record]] = {}
    for ion in ions:
        try:
            records_by_ion.update(load_ion_records(fasta_path, [ion], pattern))
        except DataError as e:
            problems.append(f"{ion}: {e}")
    provider = None
    if msa_dir is not None:
        base = str(msa_dir).split("{ION}")[0]
        if not Path(base or ".").is_dir():
            problems.append(f"MSA directory {msa_dir} does not exist")
        else:
            provider = ContextProvider(msa_dir)
    lines = [f"data: {fasta_path} (pattern {pattern}); MSAs: {msa_dir or 'none (single sequence)'}", ""]
    header = (
        f"{'ion':<6} {'proteins':>8} {'labelled':>8} {'residues':>9} {'positives':>9} {'pos_rate':>8} "
        f"{'len p5/p50/p95/max':>22} {'MSA':>10}"
    )
    lines.append(header)
    for ion, records in records_by_ion.items():
        s = ion_stats(records)
        p = s["length_percentiles"]
        cov = "-"
        if provider is not None:
            found = _msa_coverage(provider, ion, records, problems)
            cov = f"{found}/{len(records)}"
        if s["labelled_proteins"] == 0:
            problems.append(f"{ion}: no labelled proteins")
        elif s["positives"] == 0:
            problems.append(f"{ion}: no positive residues")
        lengths = f"{p['p5']:.0f}/{p['p50']:.0f}/{p['p95']:.0f}/{p['p100']:.0f}"
        lines.append(
            f"{ion:<6} {s['proteins']:>8} {s['labelled_proteins']:>8} {s['residues']:>9} {s['positives']:>9} "
            f"{s['positive_rate']:>8.4f} {lengths:>22} {cov:>10}"
        )
    if records_by_ion:
        found = None
        try:
            assignment, _, found = make_folds(records_by_ion, num_folds, seed, grouping, min_seq_id, coverage, threads)
            lines += ["", f"folds (K={num_folds}, seed={seed}, grouping {grouping}): proteins per fold"]
            for ion, records in records_by_ion.items():
                sizes = [0] * num_folds
                for r in records:
                    sizes[assignment[r.id]] += 1
                lines.append(f"{ion:<6} " + " ".join(f"{n:>6}" for n in sizes))
        except (DataError, ValueError, MMseqsError) as e:
            problems.append(f"folds: {e}")
            assignment = None
        if homology and assignment is not None:
            try:
                lines += ["", format_leakage(fold_leakage(records_by_ion, assignment, found, threads))]
            except MMseqsError as e:
                lines += ["", f"homology across folds: not checked ({e})"]
    if problems:
        lines += ["", f"{len(problems)} problem(s):"] + [f"  - {p}" for p in problems]
    else:
        lines += ["", "no problems found"]
    return "\n".join(lines), problems


def main(argv: Sequence[str] | None = None) -> int:
    """``e1min check-data ARGS`` (arguments are parsed in ``e1min.cli``)."""
    from e1min.cli import command

    return command("check-data")(argv)
