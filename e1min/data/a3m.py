"""A3M files: safe reading (size cap, text only, no directories or broken links) and record splitting.

Records in file order (``>`` header, sequence lines concatenated), ``.`` read as ``-``; every problem is
a DataError naming the file, line and record.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path

from e1min.data.fasta import DataError

#: Larger A3M files are refused with a DataError (their parse alone would need several times this).
MAX_A3M_BYTES = 256 << 20

_BAD_CHAR = re.compile(r"[^A-Za-z.\-]")


def check_a3m_path(path: str | os.PathLike) -> None:
    """DataError unless ``path`` is a readable-looking regular file (directory, dangling symlink, loop...)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise DataError(f"{path}: dangling symlink (its target {os.readlink(path)!r} does not exist)") from None
        raise DataError(f"{path}: file not found") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise DataError(f"{path}: symlink loop (too many levels of symbolic links)") from None
        raise DataError(f"{path}: cannot access ({e.strerror})") from None
    if stat.S_ISDIR(st.st_mode):
        raise DataError(f"{path}: is a directory, not an A3M file")
    if not stat.S_ISREG(st.st_mode):
        raise DataError(f"{path}: not a regular file")
    if st.st_size > MAX_A3M_BYTES:
        raise DataError(f"{path}: {st.st_size} bytes, larger than the {MAX_A3M_BYTES} bytes an A3M may have here")


def _path_entry_exists(path: Path) -> bool:
    """Whether anything (file, directory, symlink even dangling) sits at ``path``; access errors raise."""
    try:
        os.lstat(path)
        return True
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise DataError(f"{path}: symlink loop in the path") from None
        raise DataError(f"{path}: cannot access ({e.strerror})") from None


def _read_text(path: Path) -> str:
    check_a3m_path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    nul = raw.find(b"\x00")
    if nul >= 0:
        line = raw.count(b"\n", 0, nul) + 1
        raise DataError(f"{path}:{line}: non-text byte 0x00 (binary file?)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: non-text byte 0x{raw[e.start]:02x} (not UTF-8/ASCII text)") from None


def _split_records(path: Path, text: str) -> tuple[list[str], list[str], list[int]]:
    """(texts, names, header line numbers); lines starting with ``#`` and blank lines are skipped."""
    texts: list[str] = []
    names: list[str] = []
    lines: list[int] = []
    parts: list[str] | None = None
    for lineno, raw in enumerate(text.split("\n"), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith(">"):
            if parts is not None:
                texts.append("".join(parts))
            names.append(line[1:].split()[0] if line[1:].strip() else f"record {len(names) + 1}")
            lines.append(lineno)
            parts = []
            continue
        if parts is None:
            raise DataError(f"{path}:{lineno}: expected a '>' header before sequence data")
        bad = _BAD_CHAR.search(line)
        if bad:
            raise DataError(
                f"{path}:{lineno}: record {names[-1]!r}: invalid character {bad.group()!r} at column {bad.start() + 1} "
                "(A3M rows hold letters, '-' and '.')"
            )
        parts.append(line)
    if parts is not None:
        texts.append("".join(parts))
    return texts, names, lines
