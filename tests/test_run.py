"""The run directory: one writer (lock file), no silent restart of a fold, cleanup, regenerated reports."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from e1min.run import LOCK_FILE, RunLock, RunLockError, RunStateError, remove_temporaries
from e1min.train import main as train_main
from tests.helpers import toy_config


def test_second_writer_is_refused_naming_the_holder(tmp_path):
    with RunLock(tmp_path):
        holder = json.loads((tmp_path / LOCK_FILE).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(
            RunLockError, match=f"run in use by another e1min process \\(pid {os.getpid()} on host {socket.gethostname()} since "
        ):
            RunLock(tmp_path).acquire()
    assert not (tmp_path / LOCK_FILE).exists()  # released on exit
    with RunLock(tmp_path):  # and can be taken again
        pass


_HOLD = """
import os, sys, time
from e1min.run import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
if sys.argv[2] == "die":
    os.kill(os.getpid(), 9)  # no cleanup at all: the lock file stays on disk
time.sleep(60)
"""


def _holder(tmp_path, mode):
    p = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(tmp_path), mode], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()}
    )
    assert p.stdout.readline().strip() == "locked"
    return p


def test_lock_of_a_killed_process_is_taken_over(tmp_path):
    p = _holder(tmp_path, "die")
    assert p.wait(timeout=30) == -9
    left = json.loads((tmp_path / LOCK_FILE).read_text())
    assert left["pid"] == p.pid  # the dead process's lock file is still there
    with RunLock(tmp_path) as lock:
        assert lock.took_over == {"pid": p.pid, "host": socket.gethostname(), "started": left["started"]}
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_live_holder_in_another_process_is_refused(tmp_path):
    p = _holder(tmp_path, "hold")  # asleep, as a run blocked in a long step would be
    try:
        with pytest.raises(RunLockError, match=f"pid {p.pid} on host {socket.gethostname()}"):
            RunLock(tmp_path).acquire()
    finally:
        p.kill()
        p.wait()
    with RunLock(tmp_path) as lock:  # the kernel released it with the process
        assert lock.took_over["pid"] == p.pid


def test_without_os_locks_the_pid_check_decides(tmp_path, monkeypatch, caplog):
    import errno

    import e1min.run as run_mod

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(run_mod.fcntl, "flock", no_locks)
    monkeypatch.setattr(run_mod, "_warned_no_locks", False)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": int(dead), "host": socket.gethostname(), "started": "2026-01-01T00:00:00"}))
    with caplog.at_level("WARNING", logger="e1min"):
        with RunLock(tmp_path) as lock:  # a dead pid on this host: taken over
            assert lock.took_over["pid"] == int(dead)
            with pytest.raises(RunLockError, match=f"pid {os.getpid()}"):  # a live one: refused
                RunLock(tmp_path).acquire()
    assert sum("no working file locks" in r.message for r in caplog.records) == 1  # said once
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": int(dead), "host": "another-node", "started": "2026-01-01T00:00:00"}))
    with pytest.raises(RunLockError, match="another-node"):  # another host's pid cannot be checked: refused
        RunLock(tmp_path).acquire()


def test_train_refuses_a_locked_output_dir_before_writing(tmp_path, tiny_checkpoint):
    cfg = toy_config(tmp_path, tiny_checkpoint, training={"epochs": 1})
    out = tmp_path / "out"
    with RunLock(out):
        with pytest.raises(RunLockError, match="run in use by another e1min process"):
            train_main(["--config", str(cfg)])
    assert sorted(p.name for p in out.iterdir()) == []  # not even training.log


def test_unfinished_fold_needs_resume_or_restart(tmp_path, tiny_checkpoint):
    cfg = toy_config(tmp_path, tiny_checkpoint, training={"epochs": 1})
    assert train_main(["--config", str(cfg)]) == 0
    fold = tmp_path / "out/fold_1"
    (fold / "fold_result.json").unlink()  # as if killed after the last epoch checkpoint
    before = (fold / "last/adapter_model.safetensors").read_bytes()
    with pytest.raises(RunStateError, match="fold_1: holds an unfinished fold 1; rerun with --resume.*--restart-fold"):
        train_main(["--config", str(cfg)])
    assert (fold / "last/adapter_model.safetensors").read_bytes() == before  # nothing overwritten
    with pytest.raises(RunStateError, match="exclude each other"):
        train_main(["--config", str(cfg), "--resume", "--restart-fold"])
    assert train_main(["--config", str(cfg), "--restart-fold"]) == 0
    assert (fold / "fold_result.json").exists()


def test_leftovers_of_interrupted_saves_are_removed_at_the_next_start(tmp_path, tiny_checkpoint):
    cfg = toy_config(tmp_path, tiny_checkpoint, training={"epochs": 1})
    assert train_main(["--config", str(cfg)]) == 0
    out = tmp_path / "out"
    junk = [out / ".folds.json.abc123.tmp", out / "fold_1/.best.x9y8z7", out / "fold_1/best/.heads.safetensors.q1.tmp"]
    junk[0].write_text("{")
    junk[1].mkdir()
    (junk[1] / "checkpoint.json").write_text("{}")
    junk[2].write_bytes(b"\0" * 10)
    keep = out / "fold_1/best.old"
    shutil.copytree(out / "fold_1/best", keep)  # a crash mid-swap: kept (state_dir falls back to it)
    assert train_main(["--config", str(cfg)]) == 0  # fold 1 is complete: skipped, but cleanup ran
    assert not any(p.exists() for p in junk) and keep.exists()
    assert sorted(p.name for p in remove_temporaries(out)) == []
