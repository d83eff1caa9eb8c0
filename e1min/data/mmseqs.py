"""MMseqs2, run as a program: found on PATH or via ``E1MIN_MMSEQS``, version checked, failures as E1minErrors.

The one room that starts ``mmseqs``: databases from records, ``search``, ``convertalis`` rows and the
entries of a result database. Callers (``build_msa``, ``homology``) never call subprocess themselves.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from e1min.data.fasta import Record
from e1min.errors import E1minError

#: Environment variable naming the mmseqs binary (else ``mmseqs`` on PATH).
ENV_VAR = "E1MIN_MMSEQS"

#: Oldest release whose ``result2msa --msa-format-mode 6`` (A3M) and ``convertalis`` columns e1min uses.
MIN_MAJOR_VERSION = 13

INSTALL_HINT = (
    "install MMseqs2 (Debian/Ubuntu: apt-get install mmseqs2; conda: conda install -c bioconda mmseqs2; "
    "or a static build from https://github.com/soedinglab/MMseqs2/releases) or set E1MIN_MMSEQS to its path"
)

#: Columns of ``convertalis`` rows parsed by :func:`MMseqs.convertalis`.
ALIGNMENT_COLUMNS = ("query", "target", "fident", "alnlen", "qcov", "tcov", "evalue", "bits")


class MMseqsError(E1minError, RuntimeError):
    """MMseqs2 is missing, too old, or one of its runs failed; the message names what to install or fix."""


@dataclass(frozen=True)
class Alignment:
    """One ``convertalis`` row: identity over the alignment columns, and query / target coverage."""

    query: str
    target: str
    fident: float
    alnlen: int
    qcov: float
    tcov: float
    evalue: float
    bits: float


def _major(version: str) -> int | None:
    m = re.match(r"(\d+)[.\-]", version)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class MMseqs:
    """A checked mmseqs binary: ``path`` and ``version`` (``mmseqs version``)."""

    path: str
    version: str

    def run(self, *args: str | os.PathLike) -> str:
        """Run ``mmseqs ARGS``; MMseqsError with the command and its last error line when it fails."""
        cmd = [self.path, *map(str, args)]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, errors="replace", check=False)
        except OSError as e:
            raise MMseqsError(f"cannot run {self.path}: {e.strerror or e}; {INSTALL_HINT}") from None
        if done.returncode != 0:
            raise MMseqsError(f"mmseqs {args[0]} failed (exit {done.returncode}): {_last_error(done.stderr + done.stdout)}")
        return done.stdout

    def createdb(self, fasta: str | os.PathLike, prefix: str | os.PathLike) -> Path:
        """``mmseqs createdb`` of a FASTA file; returns the database prefix."""
        self.run("createdb", fasta, prefix, "-v", "1")
        return Path(prefix)

    def createdb_records(self, records: Iterable[Record], prefix: str | os.PathLike) -> Path:
        """A database of ``records`` (headers = ids only, so every lookup key is an e1min id)."""
        prefix = Path(prefix)
        fasta = prefix.with_name(prefix.name + ".fasta")
        fasta.write_text("".join(f">{r.id}\n{r.sequence}\n" for r in records), encoding="utf-8")
        return self.createdb(fasta, prefix)

    def search(
        self,
        query_db: Path,
        target_db: Path,
        result: Path,
        tmp: Path,
        threads: int = 1,
        sensitivity: float | None = None,
        evalue: float | None = None,
        max_seqs: int | None = None,
        extra: Sequence[str] = (),
    ) -> Path:
        """``mmseqs search`` with backtraces (``-a``: identities and A3M rows need the alignment)."""
        args: list[str] = ["search", str(query_db), str(target_db), str(result), str(tmp), "-a", "--threads", str(threads), "-v", "1"]
        if sensitivity is not None:
            args += ["-s", f"{sensitivity:g}"]
        if evalue is not None:
            args += ["-e", f"{evalue:g}"]
        if max_seqs is not None:
            args += ["--max-seqs", str(max_seqs)]
        self.run(*args, *extra)
        return result

    def convertalis(self, query_db: Path, target_db: Path, result: Path, out: Path, threads: int = 1) -> list[Alignment]:
        """The alignments of a search result as :class:`Alignment` rows (percent columns as fractions)."""
        self.run(
            "convertalis", query_db, target_db, result, out, "--format-output", ",".join(ALIGNMENT_COLUMNS),
            "--threads", str(threads), "-v", "1",
        )  # fmt: skip
        rows = []
        for line in out.read_text(encoding="utf-8").splitlines():
            f = line.split("\t")
            if len(f) != len(ALIGNMENT_COLUMNS):
                raise MMseqsError(f"mmseqs convertalis wrote an unexpected line in {out}: {line[:80]!r}")
            rows.append(Alignment(f[0], f[1], float(f[2]), int(f[3]), float(f[4]), float(f[5]), float(f[6]), float(f[7])))
        return rows


def _last_error(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "error" in ln.lower() or "not" in ln.lower() or "invalid" in ln.lower():
            return ln[:300]
    return (lines[-1][:300] if lines else "no message") or "no message"


_FOUND: dict[str, MMseqs] = {}


def find_mmseqs() -> MMseqs:
    """The mmseqs binary (``E1MIN_MMSEQS``, else PATH), version-checked; MMseqsError naming what to install."""
    given = os.environ.get(ENV_VAR, "").strip()
    if given:
        path = shutil.which(given) or (given if os.path.isfile(given) and os.access(given, os.X_OK) else None)
        if path is None:
            raise MMseqsError(f"{ENV_VAR}={given}: not an executable file; {INSTALL_HINT}")
    else:
        path = shutil.which("mmseqs")
        if path is None:
            raise MMseqsError(f"MMseqs2 not found (no 'mmseqs' on PATH); {INSTALL_HINT}")
    if path in _FOUND:
        return _FOUND[path]
    try:
        done = subprocess.run([path, "version"], capture_output=True, text=True, errors="replace", timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise MMseqsError(f"cannot run {path} version: {e}; {INSTALL_HINT}") from None
    version = done.stdout.strip().splitlines()[0].strip() if done.returncode == 0 and done.stdout.strip() else ""
    if not version:
        raise MMseqsError(f"{path} is not a working MMseqs2 ('{path} version' failed); {INSTALL_HINT}")
    major = _major(version)
    # A build from a git checkout reports a bare commit hash: accepted (no release number to compare).
    if major is None and not re.fullmatch(r"[0-9a-f]{7,40}", version):
        raise MMseqsError(f"{path} is not MMseqs2 ('{path} version' printed {version[:40]!r}); {INSTALL_HINT}")
    if major is not None and major < MIN_MAJOR_VERSION:
        raise MMseqsError(f"{path} is MMseqs2 {version}, older than release {MIN_MAJOR_VERSION}; {INSTALL_HINT}")
    _FOUND[path] = MMseqs(path, version)
    return _FOUND[path]


def is_database(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an MMseqs2 database prefix (``PATH.dbtype`` exists)."""
    return Path(f"{path}.dbtype").is_file()


def read_lookup(prefix: Path) -> dict[int, str]:
    """Database key -> accession (the header's first word), from ``PREFIX.lookup``."""
    out = {}
    for line in Path(f"{prefix}.lookup").read_text(encoding="utf-8").splitlines():
        f = line.split("\t")
        if len(f) >= 2:
            out[int(f[0])] = f[1]
    return out


def read_entries(prefix: Path) -> dict[int, str]:
    """Key -> text of every entry of a result database (data file merged, or split into PREFIX.0, .1, ...)."""
    prefix = Path(prefix)
    if prefix.is_file():
        data = prefix.read_bytes()
    else:
        parts, k = [], 0
        while Path(f"{prefix}.{k}").is_file():
            parts.append(Path(f"{prefix}.{k}").read_bytes())
            k += 1
        if not parts:
            raise MMseqsError(f"{prefix}: mmseqs result database has no data file")
        data = b"".join(parts)
    out = {}
    for line in Path(f"{prefix}.index").read_text(encoding="utf-8").splitlines():
        key, offset, length = (int(x) for x in line.split("\t")[:3])
        out[key] = data[offset : offset + length].rstrip(b"\x00").decode("utf-8", errors="replace")
    return out
