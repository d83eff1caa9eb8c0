"""The run directory: its layout, one writer at a time (a lock file), and cleanup after interrupted saves.

results/<run>/
  .e1min.lock          OS-locked by the process writing this run; holds its pid, host and start time
  config.yaml folds.json data_stats.json training.log summary.{json,md} thresholds.json plots/
  fold_K/              best/ last/ (adapter + heads [+ optimizer] + checkpoint.json)
                       fold_result.json metrics.jsonl oof_predictions.tsv
"""

from __future__ import annotations

import datetime
import errno
import json
import logging
import math
import os
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from e1min.errors import E1minError
from e1min.io import TMP_SUFFIX, OutputError, file_mode, make_output_dir

try:
    import fcntl
except ImportError:  # not on Windows: the pid/host check decides
    fcntl = None

log = logging.getLogger("e1min")

LOCK_FILE = ".e1min.lock"
STATE_NAMES = ("best", "last")


class RunLockError(E1minError, RuntimeError):
    """Another live process writes this run directory."""


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
    window: int = 0  # optimiser steps of `epoch` already taken (a signal stopped the run mid-epoch)
    partial: dict[str, Any] | None = None  # that epoch's loss sums so far, tokens, seconds, world_size, accum_steps

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "FoldState":
        state = cls(**d)
        if state.best_metric is None:
            state.best_metric = -math.inf
        return state


class RunLock:
    """Rank 0's exclusive hold on a run directory: an OS lock (``flock``) on ``.e1min.lock`` for the run's lifetime.

    The kernel releases the lock when the process ends, however it ends (kill -9, OOM kill, node failure),
    so ``--resume`` after a crash just works: a lock file left by a dead process is taken over
    (``took_over`` holds its pid, host and start time). The file names the holder for the message a second
    writer gets (``RunLockError``). On filesystems without working locks (some network filesystems) the
    pid/host check decides, said once: a file whose pid is dead on this host is taken over, any other holder
    is refused.
    """

    def __init__(self, root: str | os.PathLike, what: str = "run directory"):
        self.path = Path(root) / LOCK_FILE
        self.what = what  # how errors name the directory (e.g. training.output_dir)
        self._fd: int | None = None
        self.took_over: dict[str, Any] | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "RunLock":
        make_output_dir(self.path.parent, self.what)
        for _ in range(10):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, file_mode())
            except OSError as e:
                raise OutputError(f"{self.what} {self.path.parent}: cannot create {LOCK_FILE} ({e.strerror})") from None
            try:
                locked = self._os_lock(fd)
                holder = _read_holder(fd)
                if not locked:
                    raise RunLockError(self._held_message(holder))
                # The holder may have unlinked the file between our open and our lock: this fd is then a
                # removed inode while a newcomer could lock a new file under the name. Lock what the path names.
                if not _same_file(fd, self.path):
                    os.close(fd)
                    continue
                info = {"pid": os.getpid(), "host": socket.gethostname(), "started": datetime.datetime.now().isoformat(timespec="seconds")}
                os.ftruncate(fd, 0)
                os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
            except BaseException:
                os.close(fd)
                raise
            self._fd, self.took_over = fd, holder
            return self
        raise RunLockError(f"{self.path}: could not lock (the file kept being replaced by another process)")

    def _os_lock(self, fd: int) -> bool:
        """True when this process now holds the lock, False when a live process holds it."""
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
        except BlockingIOError:
            return False
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise RunLockError(f"{self.path}: cannot lock ({e.strerror})") from None
        global _warned_no_locks
        if not _warned_no_locks:
            _warned_no_locks = True
            log.warning("%s: this filesystem has no working file locks; falling back to the pid/host check", self.path.parent)
        holder = _read_holder(fd)
        return not holder or (holder["host"] == socket.gethostname() and not _pid_alive(holder["pid"]))

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            self.path.unlink()  # while still locked, so no newcomer locks the file being removed
        except FileNotFoundError:
            pass
        finally:
            os.close(fd)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _held_message(self, holder: dict[str, Any] | None) -> str:
        who = f"pid {holder['pid']} on host {holder['host']} since {holder['started']}" if holder else "holder unknown"
        return f"{self.path.parent}: run in use by another e1min process ({who}); use another training.output_dir or wait for it to finish"


_warned_no_locks = False


def _read_holder(fd: int) -> dict[str, Any] | None:
    """pid/host/started of a lock file, or None when it is empty or unreadable (a crash mid-write)."""
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode() or "null")
        return {"pid": int(holder["pid"]), "host": str(holder["host"])[:80], "started": str(holder["started"])[:40]}
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
        return None


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


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
