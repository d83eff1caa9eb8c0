"""Stable seeds derived from (seed, epoch, protein, ...) so every process draws the same numbers."""

from __future__ import annotations

import hashlib

_SEP = "\x1f"


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from ``parts``; identical across processes, runs and machines.

    Python's ``hash()`` is salted per process, so it would make distributed ranks disagree.
    """
    text = _SEP.join(str(p) for p in parts)
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)
