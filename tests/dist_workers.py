"""Process bodies for the distributed tests (spawned with a file store, gloo, short timeouts)."""

import json
import os
import sys

import numpy as np
import torch


def init(rank, world, store, timeout=20.0):
    from e1min.dist import init_distributed

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    return init_distributed(timeout, "cpu", init_method=f"file://{store}")


def make_model(seed=1):
    from e1min.config import preset
    from e1min.heads import BindingModel
    from e1min.lora import apply_lora
    from e1min.random_checkpoint import random_model

    backbone = random_model(preset("tiny"), seed=seed)
    torch.manual_seed(seed)
    apply_lora(backbone, r=4, alpha=8)
    return BindingModel(backbone, ["ZN", "CA", "MG"], head_dropout=0.0)


def micro_batches(step):
    """The global batch of optimiser step ``step``: four micro-batches; ZN ones at even, CA at odd places."""
    from e1min.data.dataset import Example

    rng = np.random.default_rng(step)
    out = []
    for k in range(4):
        exs = []
        for i in range(int(rng.integers(1, 4))):
            L = int(rng.integers(6, 30))
            seq = "".join(rng.choice(list("ACDEHKLMW"), L))
            exs.append(Example(f"s{step}m{k}p{i}", "ZN" if k % 2 == 0 else "CA", seq, (rng.random(L) < 0.3).astype(np.uint8)))
        out.append((exs, exs[0].ion))
    return out


def train_steps(ctx, steps=3):
    """Several optimiser steps on this rank's share of each global batch; returns the model."""
    from e1min.data.collate import MaskingConfig, collate
    from e1min.train import LossSpec, backward_window, build_optimizer, optimizer_step

    model = make_model()
    params = [p for p in model.parameters() if p.requires_grad]
    ctx.broadcast_parameters(params)
    opt = build_optimizer(model, 1e-3, 0.01)
    spec = LossSpec({"ZN": 3.0, "CA": 2.0}, 1.0)
    for step in range(steps):
        mine = micro_batches(step)[ctx.rank :: ctx.world_size]
        batches = [(collate(exs, masking=MaskingConfig(0.3), seed=0, epoch=step), ion) for exs, ion in mine]
        backward_window(model, batches, ctx, spec)
        optimizer_step(params, opt, ctx, 1.0, 1e-3)
        assert all(p.grad is None for p in model.heads["MG"].parameters())
    return model


def save_trainables(model, path):
    from safetensors.torch import save_file

    save_file({n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}, path)


def worker_train(rank, world, store, out):
    ctx = init(rank, world, store)
    model = train_steps(ctx)
    if rank == 0:
        save_trainables(model, out)
    ctx.barrier()
    ctx.destroy()


def validation_examples():
    from e1min.data.fasta import Record

    rng = np.random.default_rng(7)
    recs = []
    for i in range(9):
        L = int(rng.integers(10, 60))
        recs.append(Record(f"v{i}", "".join(rng.choice(list("ACDEHKLMW"), L)), (rng.random(L) < 0.2).astype(np.uint8)))
    return recs


def validate(ctx):
    from e1min import metrics
    from e1min.data.dataset import make_eval_examples
    from e1min.data.msa import MSASampling
    from e1min.train import predict_records

    model = make_model()
    recs = validation_examples()
    examples = make_eval_examples(recs, "ZN", None, MSASampling(), 0, 25, 1024)
    probs = predict_records(model, recs, examples, "ZN", ctx, 200, False)
    m = metrics.binary_metrics(np.concatenate([r.labels for r in recs]), np.concatenate(probs))
    return {"metrics": m, "probs": [p.tolist() for p in probs]}


def worker_validate(rank, world, store, out):
    ctx = init(rank, world, store)
    result = validate(ctx)
    if rank == 0:
        with open(out, "w") as fh:
            json.dump(result, fh)
    ctx.destroy()


def worker_stop_flag(rank, world, store, out):
    ctx = init(rank, world, store)
    decided = ctx.any(rank == 1)  # only rank 1 wants to stop
    with open(f"{out}.{rank}", "w") as fh:
        fh.write(str(decided))
    ctx.destroy()


def worker_dies(rank, world, store, out):
    ctx = init(rank, world, store, timeout=8.0)
    ctx.barrier()
    if rank == 1:
        os._exit(3)  # dies mid-epoch without a word
    try:
        for _ in range(3):
            ctx.all_reduce(torch.ones(4), "sum", "sync_gradients")
    except Exception as e:  # noqa: BLE001 - the test reads the message
        with open(out, "w") as fh:
            fh.write(f"{type(e).__name__}: {e}")
        sys.exit(1)
    finally:
        ctx.destroy()  # as the trainer's main() does: must neither hang nor abort after a failed collective
    sys.exit(0)


def worker_teardown(rank, world, store, out):
    """Ends a 2-rank group exactly as the trainer does: every kind of collective, a final barrier,
    destroy(), then a normal interpreter exit (the path that used to SIGABRT now and then)."""
    ctx = init(rank, world, store)
    p = torch.nn.Parameter(torch.ones(5))
    ctx.broadcast_parameters([p])
    for step in range(20):
        p.grad = torch.full((5,), float(rank + step))
        ctx.sync_gradients([p])
        ctx.gather_cat(torch.arange(rank + 1.0))
        ctx.any(step == 19 and rank == 1)
        ctx.sum_ints([step, rank])
    ctx.check_replicas([p.detach()], 20)
    ctx.barrier("run_end")
    ctx.destroy()
    ctx.destroy()  # idempotent
    with open(f"{out}.{rank}", "w") as fh:
        fh.write("done")
    sys.exit(0)


def worker_replicas(rank, world, store, out):
    ctx = init(rank, world, store)
    params = [torch.nn.Parameter(torch.ones(3))]
    ctx.check_replicas(params, step=1)  # identical: passes
    if rank == 1:
        with torch.no_grad():
            params[0][0] += 1e-3
    try:
        ctx.check_replicas(params, step=2)
        result = "no error"
    except Exception as e:  # noqa: BLE001 - the test reads the message
        result = f"{type(e).__name__}: {e}"
    with open(f"{out}.{rank}", "w") as fh:
        fh.write(result)
    ctx.destroy()


def worker_raises(rank, world, store, out):
    """Rank 1 fails on its own (as a CUDA OOM or a bad batch would) while rank 0 waits in a gradient all-reduce:
    rank 1 must not enter a final barrier rank 0 never joins, so rank 0 fails fast instead of at the timeout."""
    import time

    ctx = init(rank, world, store, timeout=60.0)
    ctx.barrier()
    t0 = time.time()
    try:
        with ctx.session():
            if rank == 1:
                raise MemoryError("CUDA out of memory (simulated)")
            for _ in range(3):
                ctx.all_reduce(torch.ones(4), "sum", "sync_gradients")
    except Exception as e:  # noqa: BLE001 - the test reads the message
        with open(f"{out}.{rank}", "w") as fh:
            fh.write(json.dumps({"error": f"{type(e).__name__}: {e}", "seconds": time.time() - t0, "failed": ctx.failed}))
        sys.exit(1)
    sys.exit(0)


def worker_forced(rank, world, store, out):
    """E1MIN_FORCE_DIST=1: a process group of one, and every collective really runs through it."""
    import torch.distributed as tdist
    from safetensors.torch import save_file

    os.environ["E1MIN_FORCE_DIST"] = "1"
    ctx = init(rank, world, store)
    assert ctx.distributed and ctx.world_size == 1 and tdist.is_initialized() and tdist.get_world_size() == 1
    calls = []
    real = tdist.all_reduce
    tdist.all_reduce = lambda *a, **k: calls.append(1) or real(*a, **k)
    model = train_steps(ctx)
    tdist.all_reduce = real
    assert calls, "no collective ran"
    save_file({n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}, out)
    ctx.destroy()


def worker_train_host_group(rank, world, store, out):
    """worker_train and validate with a second gloo group for host values, as under NCCL; records which group
    each all_reduce / all_gather took."""
    import torch.distributed as tdist

    os.environ["E1MIN_HOST_GROUP"] = "1"  # what NCCL gets by default
    ctx = init(rank, world, store)
    assert ctx.cpu_group is not None
    calls = []
    real_reduce, real_gather = tdist.all_reduce, tdist.all_gather

    def note(name, t, group):
        calls.append([name, "host" if group is ctx.cpu_group else "default", list(t.shape), str(t.dtype)])

    def all_reduce(t, *args, group=None, **kwargs):
        note("all_reduce", t, group)
        return real_reduce(t, *args, group=group, **kwargs)

    def all_gather(outputs, t, *args, group=None, **kwargs):
        note("all_gather", t, group)
        return real_gather(outputs, t, *args, group=group, **kwargs)

    tdist.all_reduce, tdist.all_gather = all_reduce, all_gather
    try:
        model = train_steps(ctx)
        result = validate(ctx)
    finally:
        tdist.all_reduce, tdist.all_gather = real_reduce, real_gather
    if rank == 0:
        save_trainables(model, out)
        with open(f"{out}.json", "w") as fh:
            json.dump({"calls": calls, "validation": result}, fh)
    ctx.barrier()
    ctx.destroy()
