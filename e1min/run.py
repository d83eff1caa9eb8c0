"""The run directory: its layout, one writer at a time (a lock file), and cleanup after interrupted saves.

results/<run>/
  .e1min.lock          pid, host and start time of the process writing this run (while it runs)
  config.yaml folds.json data_stats.json training.log summary.{json,md} thresholds.json plots/
  fold_K/              best/ last/ (adapter + heads [+ optimizer] + checkpoint.json)
                       fold_result.json metrics.jsonl oof_predictions.tsv
"""

from __future__ import annotations

import datetime
import json
import math
import os
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from e1min.errors import E1minError
from e1min.io import TMP_SUFFIX

LOCK_FILE = ".e1min.lock"
STATE_NAMES = ("best", "last")


class RunLockError(E1minError, RuntimeError):
    """Another process writes this run directory (or a dead one left its lock)."""


class RunStateError(E1minError, ValueError):
    """A run directory in a state this command must not silently overwrite."""


@dataclass(frozen=True)
class RunDir:
    """Names of everything in a run directory, in one place."""

    root: Path

    def fold(self, k: int) -> Path:
        """``fold_K`` (1-based)."""
        return self.root / f"fold_{k}"

    def fold_result(self, k: int) -> Path:
        return self.fold(k) / "fold_result.json"

    def state(self, k: int, which: str) -> Path:
        """``fold_K/best`` or ``fold_K/last``."""
        return self.fold(k) / which

    @property
    def lock(self) -> Path:
        return self.root / LOCK_FILE

    @property
    def thresholds(self) -> Path:
        return self.root / "thresholds.json"

    @property
    def folds_file(self) -> Path:
        return self.root / "folds.json"

    def oof(self, k: int) -> Path:
        return self.fold(k) / "oof_predictions.tsv"

    def metrics(self, k: int) -> Path:
        return self.fold(k) / "metrics.jsonl"


@dataclass
class FoldState:
    """Where a fold's training stands; saved as ``trainer_state`` in ``last/checkpoint.json`` for ``--resume``."""

    epoch: int = 0  # next epoch to run
    step: int = 0  # optimiser steps taken
    best_metric: float = -math.inf  # strict JSON writes -inf as null: read back with from_json
    best_epoch: int = -1
    bad_epochs: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "FoldState":
        state = cls(**d)
        if state.best_metric is None:
            state.best_metric = -math.inf
        return state


class RunLock:
    """An exclusive lock file (created with O_EXCL) holding pid, host and start time; released on exit.

    A second writer gets ``RunLockError`` naming the holder. A lock whose pid is dead on this host is
    stale (a killed run): it is reported with the command that clears it, never taken over silently.
    """

    def __init__(self, root: str | os.PathLike):
        self.path = Path(root) / LOCK_FILE
        self.held = False

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": datetime.datetime.now().isoformat(timespec="seconds")}
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            raise RunLockError(self._held_message()) from None
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(info) + "\n")
        self.held = True
        return self

    def release(self) -> None:
        if self.held:
            self.held = False
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _held_message(self) -> str:
        try:
            holder = json.loads(self.path.read_text())
            pid, host, started = int(holder["pid"]), str(holder["host"])[:80], str(holder["started"])[:40]
        except (OSError, ValueError, KeyError, TypeError):
            return f"{self.path}: locked by another e1min process (unreadable lock file); if none is running: rm {self.path}"
        if host == socket.gethostname() and not _pid_alive(pid):
            return (
                f"{self.path}: stale lock of process {pid} (started {started}), which is no longer running; "
                f"if no other e1min run uses {self.path.parent}: rm {self.path}"
            )
        return (
            f"{self.path.parent}: another e1min run is writing here (pid {pid} on {host}, started {started}); "
            f"use another training.output_dir or wait for it to finish"
        )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_temporaries(root: str | os.PathLike) -> list[Path]:
    """Delete what interrupted atomic saves left behind (hidden ``.*.tmp`` files, hidden state dirs).

    Call only while holding the run's lock: then no other writer can own them. ``best.old``-style
    directories are kept: ``checkpoint.state_dir`` falls back to them after a crash mid-swap.
    """
    removed = []
    root = Path(root)
    if not root.is_dir():
        return removed
    for path in sorted(root.rglob(".*")):
        if path.name == LOCK_FILE or not path.exists():
            continue
        is_tmp_file = path.is_file() and path.name.endswith(TMP_SUFFIX)
        is_tmp_state = path.is_dir() and any(path.name.startswith(f".{n}.") for n in STATE_NAMES)
        if is_tmp_file or is_tmp_state:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            removed.append(path)
    return removed
