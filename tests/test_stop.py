"""Restart after a crash or a stop signal: SIGTERM/SIGINT/SIGUSR1 save last/ and exit cleanly, kill -9 needs no
cleanup, and --resume then ends where an uninterrupted run ends, bit for bit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from e1min.checkpoint import read_meta
from e1min.crossval import run_cross_validation, setup_logging
from e1min.dist import DistContext
from e1min.recipe import load_recipe
from e1min.stop import GracefulStop, StopRequested
from e1min.train import main as train_main
from tests.helpers import toy_config

# Dropout on everything, so a resume that drew different random numbers would show.
DROPOUT = dict(model={"dropout": 0.2}, lora={"r": 4, "alpha": 8, "lora_dropout": 0.1})
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd(), "PYTHONUNBUFFERED": "1"}


def final_tensors(out: Path) -> dict[str, torch.Tensor]:
    """Every trained tensor a run ends with (best/ and last/ adapters and heads) and its validation history."""
    t = {}
    for which in ("best", "last"):
        for name in ("adapter_model.safetensors", "heads.safetensors"):
            for k, v in load_file(out / "fold_1" / which / name).items():
                t[f"{which}/{name}/{k}"] = v
    return t


def history(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "fold_1/metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("seconds", "tokens_per_s", "comm_bytes_per_step")} for r in rows]


def assert_same_run(a: Path, b: Path) -> None:
    ta, tb = final_tensors(a), final_tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    assert history(a) == history(b)
    assert json.loads((a / "fold_1/fold_result.json").read_text()) == json.loads((b / "fold_1/fold_result.json").read_text())


class StopAfter(GracefulStop):
    """Raises the flag at the n-th check, as a signal arriving during that step would."""

    def __init__(self, n: int):
        super().__init__(signals=())
        self.checks, self.n = 0, n

    @property
    def requested(self) -> bool:
        self.checks += 1
        if self.checks >= self.n:
            self.request(signal.SIGTERM)
        return self.signum is not None


@pytest.mark.parametrize("stop_at", [2, 6])  # mid-epoch 1; in epoch 2 (each epoch: a few steps + one end-of-epoch check)
def test_stop_saves_last_and_resume_equals_an_uninterrupted_run(tmp_path, tiny_checkpoint, stop_at):
    cfg_ref = toy_config(tmp_path / "ref", tiny_checkpoint, training={"epochs": 2}, **DROPOUT)
    assert train_main(["--config", str(cfg_ref)]) == 0
    cfg = toy_config(tmp_path / "stop", tiny_checkpoint, training={"epochs": 2}, **DROPOUT)
    recipe, _ = load_recipe(str(cfg), [])
    out = tmp_path / "stop/out"
    setup_logging(out, True)
    with pytest.raises(StopRequested, match="stopped by SIGTERM in fold 1 epoch .* after step .*; resume with --resume") as e:
        run_cross_validation(recipe, DistContext(), stop=StopAfter(stop_at))
    assert e.value.exit_code == 143
    state = read_meta(out / "fold_1/last")["trainer_state"]
    assert state["window"] > 0 and state["partial"]["world_size"] == 1  # saved mid-epoch
    assert not (out / "fold_1/fold_result.json").exists()
    assert train_main(["--config", str(cfg), "--resume"]) == 0
    assert_same_run(tmp_path / "ref/out", out)


def test_stopped_mid_epoch_refuses_another_world_size(tmp_path, tiny_checkpoint):
    from e1min.run import RunStateError

    cfg = toy_config(tmp_path, tiny_checkpoint, training={"epochs": 1})
    recipe, _ = load_recipe(str(cfg), [])
    setup_logging(tmp_path / "out", True)
    with pytest.raises(StopRequested):
        run_cross_validation(recipe, DistContext(), stop=StopAfter(1))
    with pytest.raises(RunStateError, match="stopped mid-epoch with 1 process.*accum_steps 1; resume with the same"):
        train_main(["--config", str(cfg), "--resume", "--set", "training.accum_steps=2"])


def test_first_signal_sets_the_flag_a_second_ends_the_process():
    with GracefulStop():
        pass
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # no stop: handlers restored
    try:
        with GracefulStop() as stop:
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.01)  # Python runs the handler between bytecodes
            assert stop.requested and stop.name == "SIGUSR1"
        # a stop under way: still handled, so a late copy of the signal cannot kill the winding-down process
        assert signal.getsignal(signal.SIGUSR1) == stop._handle
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.01)
    finally:
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            signal.signal(s, signal.SIG_DFL if s != signal.SIGINT else signal.default_int_handler)
    # A repeat within REPEAT_WINDOW_S is the same request (SLURM and torchrun both deliver it); a later one kills.
    code = "import os, signal, time\nfrom e1min.stop import GracefulStop, REPEAT_WINDOW_S\nwith GracefulStop() as s:\n"
    code += "    os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.05)\n    os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.05)\n"
    code += "    print('alive', s.requested, flush=True); time.sleep(REPEAT_WINDOW_S)\n"
    code += "    os.kill(os.getpid(), signal.SIGTERM); time.sleep(5)\nprint('survived')"
    r = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=60)
    assert r.stdout.splitlines() == ["alive True"]
    assert r.returncode == -signal.SIGTERM and "survived" not in r.stdout
    assert r.stderr.count("SIGTERM received: stopping after the current step") == 1


# -- real processes, real signals --------------------------------------------------------------
def _train(cfg: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "e1min.cli", "train", "--config", str(cfg), *extra],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.time() < end, f"{path} did not appear"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def long_run(tmp_path_factory):
    """A reference run in a subprocess (same thread count as the interrupted ones) and a config maker."""
    root = tmp_path_factory.mktemp("signals")
    ckpt = root / "ckpt"
    from e1min.config import preset
    from e1min.random_checkpoint import write_random_checkpoint

    write_random_checkpoint(ckpt, preset("tiny", num_hidden_layers=6), seed=1)

    def make(name: str) -> Path:
        return toy_config(root / name, ckpt, training={"epochs": 4, "max_tokens_per_batch": 256}, **DROPOUT)

    ref = make("ref")
    p = _train(ref)
    _wait_for(root / "ref/out/training.log", p)
    t0 = time.time()
    assert p.wait(timeout=300) == 0, p.stderr.read()[-2000:]
    return make, root / "ref/out", time.time() - t0  # from training.log's appearance to the end


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "kill -9", "SIGTERM twice at once"])
def test_interrupt_at_a_random_moment_then_resume(long_run, how):
    """After a stop signal (one clean line, exit 128+N, last/ loadable) or a hard kill (lock left behind),
    plain --resume finishes the run with the uninterrupted run's numbers."""
    make, ref, seconds = long_run
    name = how.replace(" ", "_").replace("-", "")
    cfg = make(name)
    out = cfg.parent / "out"
    rng = np.random.default_rng(zlib.crc32(how.encode()))
    p = _train(cfg)
    _wait_for(out / "training.log", p)  # the handlers are installed before training.log is written
    time.sleep(float(rng.uniform(0.15, 0.5)) * seconds)
    if how == "kill -9":
        p.kill()
    elif how == "SIGTERM twice at once":  # SLURM's and torchrun's copy of one request
        p.send_signal(signal.SIGTERM)
        time.sleep(0.05)
        p.send_signal(signal.SIGTERM)
    else:
        p.send_signal(getattr(signal, how))
    rc = p.wait(timeout=120)
    err = p.stderr.read()
    assert "Traceback" not in err, err[-3000:]
    assert rc != 0, "the run finished before the signal"
    if how != "kill -9":
        name = how.split()[0]
        assert rc == 128 + getattr(signal, name), err[-2000:]
        assert err.strip().splitlines()[-1].startswith(f"e1min train: stopped by {name} "), err[-2000:]
        assert "trainer_state" in read_meta(out / "fold_1/last")
        assert not (out / ".e1min.lock").exists()  # released
    else:
        assert rc == -signal.SIGKILL, err[-2000:]
    r = _train(cfg, "--resume")
    assert r.wait(timeout=300) == 0, r.stderr.read()[-3000:]
    assert_same_run(ref, out)


def test_torchrun_restarts_a_killed_worker_and_resumes(tmp_path, tiny_checkpoint):
    """One worker killed once mid-run under torchrun's restarts: the restarted workers take the dead rank 0's lock
    over, resume from last/ and finish."""
    cfg = toy_config(tmp_path, tiny_checkpoint, training={"epochs": 4, "max_tokens_per_batch": 256})
    out = tmp_path / "out"
    # One restart allowed: the restarted group must form at once (dist.attempt_store keeps it from reading the dead
    # group's addresses out of torchrun's shared store; without it this failed or hung in 7 runs of 8).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1"]
    cmd += ["--monitor-interval=0.2", "-m", "e1min.train", "--config", str(cfg), "--resume"]
    p = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        _wait_for(out / "fold_1/last/checkpoint.json", p, timeout=240)  # one epoch done
        rank0 = json.loads((out / ".e1min.lock").read_text())["pid"]
        os.kill(rank0, signal.SIGKILL)  # rank 0: its lock file stays behind for the restarted rank 0
        output, _ = p.communicate(timeout=240)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 0, output[-4000:]
    log = (out / "training.log").read_text()
    assert "took over the run lock left by process" in log and "fold 1: resumed from" in log, log[-3000:]
    assert (out / "fold_1/fold_result.json").exists() and (out / "summary.json").exists()
