"""``e1min build-msa``: one A3M per protein of a FASTA file, searched with MMseqs2 against the user's database.

Layout as e1min reads it: ``OUT/{ION}/{id}.a3m`` (with an ion) or ``OUT/{id}.a3m``. Each file holds the
query first, equal to the FASTA sequence, then the hits as ``mmseqs result2msa --msa-format-mode 6``
writes them (ColabFold's A3M: match columns upper case, insertions lower case, deletions ``-``; every
row has the query's width once lower case is removed). A hit that is the query itself (same id, same
row: the database holds the query set) is left out; a protein without hits gets a query-only A3M.
Proteins are searched in chunks; finished A3Ms are skipped on a rerun unless ``overwrite``.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from e1min.data.fasta import DataError, Record, read_fasta
from e1min.data.mmseqs import MMseqs, MMseqsError, find_mmseqs, is_database, read_entries, read_lookup
from e1min.errors import E1minError
from e1min.io import atomic_write_text, format_duration, make_temp_dir


@dataclass
class BuildResult:
    """What a build did: A3Ms written, skipped (already there), failures (id, reason) and hits per protein."""

    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    depth: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def msa_path(out: str | os.PathLike, protein_id: str, ion: str | None = None) -> Path:
    """Where e1min reads a protein's A3M: ``out/ion/id.a3m`` or ``out/id.a3m``."""
    return (Path(out) / ion if ion else Path(out)) / f"{protein_id}.a3m"


def _records_of_entry(text: str) -> list[tuple[str, str]]:
    out = []
    for block in text.split(">")[1:]:
        header, _, body = block.partition("\n")
        out.append((header.rstrip(), "".join(body.split())))
    return out


def a3m_text(record: Record, entry: str | None) -> tuple[str, int]:
    """The A3M of ``record`` from its ``result2msa`` entry (None: no hits) and the number of hit rows kept."""
    lines = [f">{record.id}", record.sequence]
    width = len(record.sequence)
    kept = 0
    hits = _records_of_entry(entry or "")[1:]  # the first record is mmseqs's copy of the query
    for header, row in hits:
        name = header.split()[0] if header.split() else ""
        if name == record.id and row == record.sequence:
            continue
        aligned = sum(1 for c in row if c.isupper() or c == "-")
        if aligned != width:
            raise DataError(f"hit {name!r}: {aligned} aligned columns, the query has {width} (mmseqs result2msa output not understood)")
        lines += [f">{header}", row]
        kept += 1
    return "\n".join(lines) + "\n", kept


def _check_inputs(fasta: str | os.PathLike, db: str | os.PathLike, ion: str | None) -> list[Record]:
    if ion is not None and (not ion or "/" in ion or os.sep in ion or ion in (".", "..")):
        raise DataError(f"--ion {ion!r}: not a directory name (expected e.g. ZN)")
    path = Path(fasta)
    if not path.is_file():
        raise DataError(f"{path}: FASTA file not found" if not path.exists() else f"{path}: not a regular file")
    records = read_fasta(path)
    if not is_database(db) and not Path(db).is_file():
        raise MMseqsError(f"--db {db}: neither an MMseqs2 database ({db}.dbtype) nor a FASTA file")
    bad = [r.id for r in records if "/" in r.id or os.sep in r.id or r.id in (".", "..")]
    if bad:
        raise DataError(f"{path}: record {bad[0]!r}: the id cannot be a file name (it holds a '/')")
    return records


def build_msas(
    fasta: str | os.PathLike,
    db: str | os.PathLike,
    out: str | os.PathLike,
    ion: str | None = None,
    threads: int = 1,
    sensitivity: float | None = None,
    max_seqs: int | None = None,
    evalue: float | None = None,
    overwrite: bool = False,
    chunk_size: int = 1000,
    progress: Callable[[str], None] | None = None,
    mmseqs: MMseqs | None = None,
) -> BuildResult:
    """Search every protein of ``fasta`` against ``db`` (an MMseqs2 database or a FASTA file) and write its A3M.

    MMseqs2 and every input are checked before any search. A failing mmseqs run is an MMseqsError (the
    A3Ms of earlier chunks stay, so a rerun resumes); a protein whose A3M cannot be written is a failure
    line and the others go on.
    """
    mm = mmseqs or find_mmseqs()
    if threads < 1 or chunk_size < 1:
        raise DataError(f"--threads and --chunk-size must be at least 1, got {threads} and {chunk_size}")
    records = _check_inputs(fasta, db, ion)
    say = progress or (lambda _msg: None)
    result = BuildResult()
    todo: list[Record] = []
    for r in records:
        if not overwrite and msa_path(out, r.id, ion).is_file():
            result.skipped.append(r.id)
        else:
            todo.append(r)
    out_dir = msa_path(out, "x", ion).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    if result.skipped:
        say(
            f"build-msa: {len(result.skipped)} of {len(records)} proteins already have an A3M in {out_dir} (skipped; --overwrite redoes them)"
        )
    if not todo:
        return result
    start = time.monotonic()
    tmp = make_temp_dir(out_dir, ".build-msa-")
    try:
        target = Path(db) if is_database(db) else mm.createdb(db, tmp / "target")
        for k in range(0, len(todo), chunk_size):
            chunk = todo[k : k + chunk_size]
            entries = _search_chunk(mm, chunk, target, tmp / f"chunk{k}", threads, sensitivity, max_seqs, evalue)
            for r in chunk:
                try:
                    text, depth = a3m_text(r, entries.get(r.id))
                    atomic_write_text(msa_path(out, r.id, ion), text)
                except (E1minError, OSError) as e:  # a malformed entry, or an A3M that cannot be written
                    result.failed.append((r.id, str(e) if isinstance(e, E1minError) else f"cannot write its A3M ({e.strerror or e})"))
                    say(f"build-msa: {r.id}: failed: {result.failed[-1][1]}")
                    continue
                result.written.append(r.id)
                result.depth[r.id] = depth
            done = k + len(chunk)
            elapsed = time.monotonic() - start
            eta = elapsed / done * (len(todo) - done)
            say(f"build-msa: {done}/{len(todo)} proteins searched, {format_duration(elapsed)} elapsed, ETA {format_duration(eta)}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result.seconds = time.monotonic() - start
    return result


def _search_chunk(
    mm: MMseqs,
    chunk: Sequence[Record],
    target: Path,
    work: Path,
    threads: int,
    sensitivity: float | None,
    max_seqs: int | None,
    evalue: float | None,
) -> dict[str, str]:
    """protein id -> its ``result2msa`` A3M entry (proteins without hits may have a query-only entry)."""
    work.mkdir()
    qdb = mm.createdb_records(chunk, work / "query")
    res = mm.search(qdb, target, work / "result", work / "tmp", threads, sensitivity, evalue, max_seqs)
    mm.run("result2msa", qdb, target, res, work / "msa", "--msa-format-mode", "6", "--threads", str(threads), "-v", "1")
    names = read_lookup(qdb)
    return {names[key]: text for key, text in read_entries(work / "msa").items() if key in names}
