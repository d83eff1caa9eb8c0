"""Hand-written data parallelism on gloo: equivalence with one process, unused heads, stop flags, dead ranks."""

import json
import multiprocessing as mp
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from e1min.dist import DistContext
from tests import dist_workers as W
from tests.helpers import toy_config


def spawn(target, world, tmp_path, out, timeout=120):
    ctx = mp.get_context("spawn")
    store = tmp_path / f"store_{target.__name__}"
    procs = [ctx.Process(target=target, args=(r, world, str(store), str(out))) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.time() + timeout
    for p in procs:
        p.join(max(0.1, deadline - time.time()))
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, "a rank hung"
    return [p.exitcode for p in procs]


def test_two_processes_equal_one(tmp_path):
    out = tmp_path / "two.safetensors"
    assert spawn(W.worker_train, 2, tmp_path, out) == [0, 0]
    two = load_file(out)
    torch.set_num_threads(1)
    one = W.train_steps(DistContext())
    names = dict(one.named_parameters())
    assert set(two) == {n for n, p in names.items() if p.requires_grad}
    fresh = W.make_model()
    start = dict(fresh.named_parameters())
    moved = 0
    for n, t in two.items():
        assert torch.allclose(t, names[n].detach(), atol=1e-5), n
        moved += int((t - start[n].detach()).abs().max() > 1e-4)
    assert moved > len(two) // 2  # training really moved the replicas (far more than the tolerance)
    # The MG head was used by no rank: it never moved, on either side.
    for n, p in fresh.heads["MG"].named_parameters():
        assert torch.equal(two[f"heads.MG.{n}"], p.detach())


def test_validation_metrics_match_single_process(tmp_path):
    out = tmp_path / "val.json"
    assert spawn(W.worker_validate, 2, tmp_path, out) == [0, 0]
    two = json.loads(out.read_text())
    one = W.validate(DistContext())
    assert len(two["probs"]) == len(one["probs"])
    for a, b in zip(two["probs"], one["probs"]):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    for k in ("auprc", "auroc", "hra", "n", "positives"):
        assert two["metrics"][k] == pytest.approx(one["metrics"][k], abs=1e-9), k


def test_stop_flag_agreed(tmp_path):
    out = tmp_path / "flag"
    assert spawn(W.worker_stop_flag, 2, tmp_path, out) == [0, 0]
    assert [(tmp_path / f"flag.{r}").read_text() for r in range(2)] == ["True", "True"]


def test_dead_rank_gives_clear_error(tmp_path):
    out = tmp_path / "err.txt"
    start = time.time()
    codes = spawn(W.worker_dies, 2, tmp_path, out, timeout=90)
    assert codes[1] == 3 and codes[0] == 1
    msg = out.read_text()
    assert "DistributedError" in msg and "rank 0/2" in msg and "sync_gradients" in msg
    assert time.time() - start < 90


def test_trainer_style_teardown_never_aborts(tmp_path):
    """barrier -> destroy -> interpreter exit, repeated: each run must exit 0 on both ranks (it used to
    SIGABRT now and then: gloo threads touching the GIL during interpreter finalisation)."""
    for i in range(6):
        run_dir = tmp_path / f"r{i}"
        run_dir.mkdir()
        out = tmp_path / f"td{i}"
        assert spawn(W.worker_teardown, 2, run_dir, out) == [0, 0], i
        assert [(tmp_path / f"td{i}.{r}").read_text() for r in range(2)] == ["done", "done"]


def test_single_process_collectives_are_trivial():
    ctx = DistContext()
    assert ctx.sum_ints([3, 4]) == [3, 4] and ctx.any(True) and not ctx.any(False)
    t = torch.arange(5.0)
    assert torch.equal(ctx.gather_cat(t), t)
    assert ctx.sync_gradients([torch.nn.Parameter(torch.ones(2))]) == 0


def test_torchrun_two_processes_match_one(tmp_path, tiny_checkpoint):
    """The trainer under torchrun (2 gloo ranks, accum 1) = one process with accum 2 (same global batches),
    dropout included: its RNG is seeded per global micro-batch, not per rank."""
    common = dict(model={"dropout": 0.2}, lora={"r": 4, "alpha": 8, "lora_dropout": 0.1})
    one = toy_config(tmp_path / "one", tiny_checkpoint, training={"epochs": 2, "accum_steps": 2}, **common)
    two = toy_config(tmp_path / "two", tiny_checkpoint, training={"epochs": 2, "accum_steps": 1}, **common)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    r = subprocess.run([sys.executable, "-m", "e1min.train", "--config", str(one)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "e1min.train", "--config", str(two)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    s1 = json.loads((tmp_path / "one/out/summary.json").read_text())
    s2 = json.loads((tmp_path / "two/out/summary.json").read_text())
    for ion in ("ZN", "CA"):
        for key in ("auprc", "auroc", "hra"):
            assert s2["ions"][ion][key]["mean"] == pytest.approx(s1["ions"][ion][key]["mean"], abs=1e-4), (ion, key)
    a = load_file(tmp_path / "one/out/fold_1/best/adapter_model.safetensors")
    b = load_file(tmp_path / "two/out/fold_1/best/adapter_model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_replica_divergence_detected(tmp_path):
    out = tmp_path / "rep"
    assert spawn(W.worker_replicas, 2, tmp_path, out) == [0, 0]
    for r in range(2):
        msg = (tmp_path / f"rep.{r}").read_text()
        assert msg.startswith("DistributedError") and "diverged" in msg and "step 2" in msg


def test_replica_checksum_stays_on_the_parameters_device():
    """check_replicas must not mix a CPU tensor into CUDA parameters (NCCL): shown on the meta device."""
    from e1min.dist import replica_checksum

    params = [torch.empty(3, 4, device="meta"), torch.empty(5, device="meta")]
    out = replica_checksum(params)
    assert out.device.type == "meta" and out.shape == (2,) and out.dtype == torch.float64
    cpu = replica_checksum([torch.ones(3, 4), torch.full((5,), 2.0)])
    assert cpu.tolist() == [22.0, 0.0]


def test_a_rank_failing_on_its_own_does_not_hang_its_peers(tmp_path):
    out = tmp_path / "raises"
    assert spawn(W.worker_raises, 2, tmp_path, out, timeout=100) == [1, 1]
    r0, r1 = (json.loads((tmp_path / f"raises.{r}").read_text()) for r in range(2))
    assert r1["error"].startswith("MemoryError") and r1["failed"]
    assert r0["error"].startswith("DistributedError") and "sync_gradients" in r0["error"]
    assert r0["seconds"] < 30, r0  # the process-group timeout is 60 s: rank 0 did not wait it out


def test_forced_group_of_one_equals_no_group(tmp_path):
    out = tmp_path / "forced.safetensors"
    assert spawn(W.worker_forced, 1, tmp_path, out) == [0]
    forced = load_file(out)
    torch.set_num_threads(1)
    plain = dict(W.train_steps(DistContext()).named_parameters())
    for n, t in forced.items():
        assert torch.equal(t, plain[n].detach()), n


def test_rank_device(monkeypatch):
    from e1min.dist import DistributedError, rank_device

    assert rank_device("cpu", 3, 4) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DistributedError, match="CUDA is not available"):
        rank_device("cuda", 0, 1)
    assert rank_device(None, 0, 1) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert rank_device("cuda", 2, 4) == torch.device("cuda", 2)  # cuda:LOCAL_RANK under torchrun
    assert rank_device("cuda:1", 0, 1) == torch.device("cuda", 1)  # honoured for one process
    with pytest.raises(DistributedError, match="CUDA_VISIBLE_DEVICES"):
        rank_device("cuda:1", 0, 2)
    with pytest.raises(DistributedError, match="4 CUDA device"):
        rank_device("cuda:7", 0, 1)


def test_attempt_store_separates_torchrun_restarts(monkeypatch):
    """torchrun keeps its shared store across restarts: each restart on one node gets its own key prefix, so a
    restarted group never reads the dead group's addresses. Several nodes and torchrun's own store: no prefix."""
    import datetime

    import torch.distributed as tdist

    from e1min.dist import attempt_store, launcher_warning

    server = tdist.TCPStore("127.0.0.1", 0, 1, is_master=True, timeout=datetime.timedelta(seconds=10), wait_for_workers=False)
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(server.port), "TORCHELASTIC_USE_AGENT_STORE": "True", "GROUP_WORLD_SIZE": "1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    server.set("rank_0", "address of the dead group")  # what an unprefixed restarted group would read
    stores = {}
    for attempt in (0, 1):
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", str(attempt))
        stores[attempt] = attempt_store(2, 10)
        stores[attempt].set("rank_0", f"attempt {attempt}")
    assert server.get("e1min/attempt_1/rank_0") == b"attempt 1"
    assert stores[0].get("rank_0") == b"attempt 0" and stores[1].get("rank_0") == b"attempt 1"
    assert server.get("rank_0") == b"address of the dead group"
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "3")
    assert launcher_warning() is None  # one node: the prefix separates the attempts
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")  # workers host a fresh store each attempt
    assert attempt_store(2, 10) is None
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")  # agents' restart counts can differ: no prefix, a warning instead
    assert attempt_store(2, 10) is None
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in launcher_warning()
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "0")
    assert launcher_warning() is None


def test_host_group_setting(monkeypatch):
    from e1min.dist import DistributedError, wants_host_group

    monkeypatch.delenv("E1MIN_HOST_GROUP", raising=False)
    assert wants_host_group(True) and not wants_host_group(False)  # default: under NCCL only
    monkeypatch.setenv("E1MIN_HOST_GROUP", "0")
    assert not wants_host_group(True)
    monkeypatch.setenv("E1MIN_HOST_GROUP", "1")
    assert wants_host_group(False)
    monkeypatch.setenv("E1MIN_HOST_GROUP", "yes")
    with pytest.raises(DistributedError, match="E1MIN_HOST_GROUP='yes'"):
        wants_host_group(True)


def test_host_values_go_through_the_host_group(tmp_path):
    """Under NCCL, token counts, "used" flags and CPU tensors take a second (gloo) group, so agreeing on them never
    waits for the GPU; gradients keep the default group. Same numbers as one process either way."""
    out = tmp_path / "host_group.safetensors"
    assert spawn(W.worker_train_host_group, 2, tmp_path, out) == [0, 0]
    two = load_file(out)
    torch.set_num_threads(1)
    one = dict(W.train_steps(DistContext()).named_parameters())
    for n, t in two.items():
        assert torch.allclose(t, one[n].detach(), atol=1e-5), n
    record = json.loads(out.with_name(out.name + ".json").read_text())
    calls = {"host": [], "default": []}
    for name, group, shape, dtype in record["calls"]:
        calls[group].append((name, shape, dtype))
    # Per step, on the default group: exactly one flat float32 gradient all-reduce, nothing else.
    flat = sum(t.numel() for t in two.values())
    assert calls["default"] == [("all_reduce", [flat], "torch.float32")] * 3
    # On the host group: per step the token counts (2) and the "used" flag of every trainable parameter; the
    # validation scores gathered from every rank.
    assert calls["host"].count(("all_reduce", [2], "torch.int64")) == 3
    assert calls["host"].count(("all_reduce", [len(two)], "torch.int64")) == 3
    assert ("all_gather", [1], "torch.int64") in calls["host"]  # the sizes, then the float64 rows
    assert any(name == "all_gather" and dtype == "torch.float64" for name, _, dtype in calls["host"])
    one_val = W.validate(DistContext())
    for a, b in zip(record["validation"]["probs"], one_val["probs"], strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
