"""The one base class of every error a user can cause (and fix).

Each module keeps its own subclass (``DataError``, ``ConfigError``, ``CheckpointError``, ...), which
also keeps its historical base (``ValueError`` or ``RuntimeError``) so existing ``except`` clauses work.
This module imports nothing from e1min, so any module can import it without a cycle.
"""

from __future__ import annotations


class E1minError(Exception):
    """An error the user can fix (bad file, config, checkpoint, argument, dead peer rank).

    The CLI prints its message on one line and exits 2; the message names the file, record or key.
    Anything else escaping e1min is a bug (or an environment failure) and keeps its traceback.
    """


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none): for one-line errors."""
    text = str(e)
    return text.splitlines()[0] if text.strip() else type(e).__name__
