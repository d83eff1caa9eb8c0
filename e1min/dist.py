"""The only module that talks to torch.distributed. Single-process behaviour is trivial.

Launched by torchrun (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT set) it joins a process group:
NCCL on CUDA (device cuda:LOCAL_RANK), gloo on CPU. Under NCCL a second, gloo group carries what lives on
the host (token counts, flags, CPU tensors), so agreeing on them never waits for the GPU: a training step
has no host sync, and the next step's batches are built while the GPU still works on this one
(``E1MIN_HOST_GROUP=0`` turns it off where gloo cannot connect; see ``wants_host_group``).
Every collective runs under a timeout, and a
failed collective (dead or stuck peer) becomes a DistributedError naming the operation. A rank that
fails on its own (an exception, CUDA out of memory) marks the context failed: it then skips the final
barrier its peers would never join and aborts its NCCL communicator, so they fail fast instead of
hanging. ``E1MIN_FORCE_DIST=1`` forms a process group even for one process (NCCL code on one GPU).
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import gc
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as tdist

from e1min.errors import E1minError, first_line


class DistributedError(E1minError, RuntimeError):
    """A collective failed: another rank died, hung, or disagreed."""


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    timeout_s: float = 300.0
    # Set once a collective failed (dead/hung peer) or this rank raised: destroy() then skips its final barrier.
    failed: bool = False
    # A process group of one process (E1MIN_FORCE_DIST=1): collectives run through the backend anyway.
    forced: bool = False
    # The gloo group for CPU tensors when the default group is NCCL; None: CPU tensors use the default group.
    cpu_group: object = None
    # The tensors of the last few collectives (see _pin and destroy()).
    _recent: collections.deque = field(default_factory=lambda: collections.deque(maxlen=8), repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or self.forced

    # -- collectives -------------------------------------------------------------------------
    def _pin(self, *tensors) -> None:
        """Keep Python references to a collective's tensors: a gloo worker thread drops its own reference
        just *after* the caller has been woken, and must never be the one to free a Python-owned tensor
        (that needs the GIL, fatal once the interpreter is finalising)."""
        self._recent.append(tensors)

    def _run(self, name: str, fn, *args, **kwargs):
        self._pin(*[a for a in args if isinstance(a, (torch.Tensor, list))])
        try:
            return fn(*args, **kwargs)
        except (RuntimeError, ValueError) as e:
            self.failed = True
            raise DistributedError(
                f"rank {self.rank}/{self.world_size}: collective '{name}' failed (a peer rank died, hung for more "
                f"than {self.timeout_s:.0f}s, or disagreed): {first_line(e)}"
            ) from e

    def _route(self, t: torch.Tensor) -> tuple[torch.device, object]:
        """Where a collective on ``t`` runs: a CPU tensor stays on the host (the gloo group under NCCL)."""
        if t.device.type == "cpu" and self.cpu_group is not None:
            return t.device, self.cpu_group
        return self.device, None

    def all_reduce(self, t: torch.Tensor, op: str = "sum", name: str = "all_reduce") -> torch.Tensor:
        """In-place all-reduce (``sum`` or ``max``) of a tensor; returns it (on its original device)."""
        if not self.distributed:
            return t
        device, group = self._route(t)
        work = t.to(device)
        reduce_op = {"sum": tdist.ReduceOp.SUM, "max": tdist.ReduceOp.MAX}[op]
        self._run(name, tdist.all_reduce, work, op=reduce_op, group=group)
        if work is not t:
            t.copy_(work)
        return t

    def sum_ints(self, values: Sequence[int], name: str = "sum_ints") -> list[int]:
        """Sum a few integers over ranks (int64)."""
        t = torch.tensor(list(values), dtype=torch.int64)
        return [int(v) for v in self.all_reduce(t, "sum", name)]

    def any(self, flag: bool, name: str = "any") -> bool:
        """True on every rank if ``flag`` is True on any rank (int32 MAX all-reduce)."""
        t = torch.tensor([int(flag)], dtype=torch.int32)
        return bool(self.all_reduce(t, "max", name)[0])

    def max_int(self, value: int, name: str = "max_int") -> int:
        t = torch.tensor([value], dtype=torch.int64)
        return int(self.all_reduce(t, "max", name)[0])

    def barrier(self, name: str = "barrier") -> None:
        if self.distributed:
            # A tiny all-reduce rather than tdist.barrier(): it honours the process-group timeout on gloo and NCCL.
            self.all_reduce(torch.zeros(1), "sum", name)

    def broadcast_parameters(self, params: Iterable[torch.Tensor]) -> None:
        """Copy rank 0's values into every rank's tensors (one flat broadcast)."""
        params = list(params)
        if not self.distributed or not params:
            return
        flat = torch.cat([p.detach().reshape(-1).float() for p in params]).to(self.device)
        self._run("broadcast_parameters", tdist.broadcast, flat, src=0)
        offset = 0
        with torch.no_grad():
            for p in params:
                n = p.numel()
                p.copy_(flat[offset : offset + n].view_as(p).to(p.dtype))
                offset += n

    def sync_gradients(self, params: Sequence[torch.nn.Parameter]) -> int:
        """Sum gradients over ranks with one flat all-reduce; returns the bytes sent per rank.

        A parameter without a gradient contributes zeros; one that no rank used (its "used" flags are
        summed on the host, so the GPU is never waited for) keeps ``grad = None`` so the optimiser leaves it
        alone. Not divided by world size: the losses were already normalised by the global token counts.
        """
        if not self.distributed:
            return 0
        used_any = [n > 0 for n in self.sum_ints([p.grad is not None for p in params], "gradients_used")]
        grads = [p.grad.reshape(-1).float() if p.grad is not None else torch.zeros(p.numel(), device=p.device) for p in params]
        flat = torch.cat(grads).to(self.device)
        self._run("sync_gradients", tdist.all_reduce, flat, op=tdist.ReduceOp.SUM)
        offset = 0
        for p, u in zip(params, used_any):
            n = p.numel()
            if u:
                g = flat[offset : offset + n].view_as(p).to(device=p.device, dtype=p.dtype)
                if p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.copy_(g)
            offset += n
        return flat.numel() * flat.element_size()

    def gather_cat(self, t: torch.Tensor, name: str = "gather") -> torch.Tensor:
        """Concatenate a 1-D or 2-D tensor of any per-rank length along dim 0, in rank order, on every rank."""
        if not self.distributed:
            return t
        device, group = self._route(t)
        n = torch.tensor([t.shape[0]], dtype=torch.int64, device=device)
        sizes = [torch.zeros_like(n) for _ in range(self.world_size)]
        self._run(name + ":sizes", tdist.all_gather, sizes, n, group=group)
        sizes_i = [int(s) for s in sizes]
        longest = max(sizes_i)
        padded = torch.zeros((longest, *t.shape[1:]), dtype=t.dtype, device=device)
        padded[: t.shape[0]] = t.to(device)
        parts = [torch.zeros_like(padded) for _ in range(self.world_size)]
        self._run(name, tdist.all_gather, parts, padded, group=group)
        return torch.cat([p[:s] for p, s in zip(parts, sizes_i)]).to(t.device)

    def check_replicas(self, params: Sequence[torch.Tensor], step: int) -> None:
        """Debug: fail loudly if the trainable parameters differ between ranks."""
        if not self.distributed:
            return
        local = replica_checksum(params)
        lo, hi = local.clone(), local.clone()
        lo[0] = -lo[0]
        self.all_reduce(hi, "max", "check_replicas")
        self.all_reduce(lo, "max", "check_replicas")
        if float(hi[0]) != float(-lo[0]):
            raise DistributedError(
                f"rank {self.rank}: trainable parameters diverged across ranks at step {step} (checksums {float(-lo[0])} .. {float(hi[0])})"
            )

    def destroy(self) -> None:
        """Tear the process group down while the interpreter is fully alive; safe to call twice.

        Normal end: a real ``tdist.barrier()`` first (every rank has finished every collective), then
        ``destroy_process_group()``. After a failed collective (``self.failed``: peer dead or hung) the
        barrier is skipped -- it could only wait out the timeout again -- but the group is still destroyed
        here (tests/dist_workers.py::worker_dies does this and must exit 1, not hang or abort): leaving it
        for interpreter finalisation is the path that can abort with "terminate called
        without an active exception" (gloo threads touching the GIL after finalisation started).
        Caveat: ``destroy_process_group()`` only drops torch.distributed's own references; while anything
        else references the ProcessGroup its C++ threads outlive this call.
        """
        if not (self.distributed and tdist.is_initialized()):
            return
        if not self.failed:
            try:
                self._run("shutdown_barrier", tdist.barrier)
            except DistributedError:
                pass  # a peer vanished at the very end: the run's own results are already written
        abort = getattr(tdist.distributed_c10d, "_abort_process_group", None)
        if self.failed and self.device.type == "cuda" and abort is not None:
            # ncclCommAbort: peers blocked in a collective with this rank get an error instead of waiting for the
            # watchdog; a plain destroy could itself block on the collectives still queued on this rank.
            abort()
        else:
            tdist.destroy_process_group()
        self.cpu_group = None  # no reference may keep the gloo group's threads alive into interpreter exit
        gc.collect()
        self._recent.clear()

    @contextlib.contextmanager
    def session(self):
        """``with ctx.session():`` marks the context failed if the block raises, then always calls ``destroy``."""
        try:
            yield self
        except BaseException:
            self.failed = True
            raise
        finally:
            self.destroy()


def exit_code_for_launcher(code: int) -> int:
    """End a torchrun worker with ``code`` without interpreter finalisation; single process: return it.

    Under torchrun, gloo's threads can outlive ``destroy_process_group()`` (something still references
    the group) and abort the process during finalisation ("terminate called without an active
    exception"), turning a finished run or a clean ``DistributedError`` exit 2 into SIGABRT. Everything
    e1min writes is already flushed and renamed by then, so a worker flushes its streams and logs and
    leaves with ``os._exit``; the launcher sees the true exit code.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return code
    import logging
    import sys

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def replica_checksum(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """(2,) float64 [sum of every parameter element, 0] on the parameters' own device (CUDA under NCCL)."""
    total = torch.cat([p.detach().reshape(-1).double() for p in params]).sum()
    return torch.stack([total, torch.zeros((), dtype=torch.float64, device=total.device)])


def rank_device(device: str | None, local_rank: int, world_size: int) -> torch.device:
    """This rank's device: ``cpu``; ``cuda`` (or None with CUDA available) -> ``cuda:LOCAL_RANK``; ``cuda:N`` -> GPU N
    for a single process. Under torchrun an explicit index is an error (choose GPUs with CUDA_VISIBLE_DEVICES)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type != "cuda":
        return dev
    if not torch.cuda.is_available():
        raise DistributedError(f"general.device {device!r}: CUDA is not available on this machine")
    if dev.index is None:
        dev = torch.device("cuda", local_rank)
    elif world_size > 1:
        raise DistributedError(
            f"general.device {device!r}: under torchrun each rank uses cuda:LOCAL_RANK; give 'cuda' and choose the GPUs with CUDA_VISIBLE_DEVICES"
        )
    if dev.index >= torch.cuda.device_count():
        raise DistributedError(f"general.device {str(dev)!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def init_distributed(timeout_s: float = 300.0, device: str | None = None, init_method: str | None = None) -> DistContext:
    """Join torchrun's process group when launched by it; otherwise a single-process context.

    ``device``: "cpu", "cuda", "cuda:N" or None (CUDA when available), see ``rank_device``. ``init_method``:
    default ``env://`` (torchrun); tests pass a ``file://`` store. ``E1MIN_FORCE_DIST=1`` forms a group of one.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = rank_device(device, local_rank, world)
    use_cuda = dev.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(dev)
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # the watchdog tears down a rank whose collective failed
    forced = world == 1 and os.environ.get("E1MIN_FORCE_DIST", "") not in ("", "0")
    host_group = wants_host_group(use_cuda)
    ctx = DistContext(rank, world, local_rank, dev, timeout_s, forced=forced)
    if forced and init_method is None and "MASTER_ADDR" not in os.environ:
        init_method = f"tcp://127.0.0.1:{_free_port()}"
    if (world > 1 or forced) and not tdist.is_initialized():
        try:
            store = attempt_store(world, timeout_s) if init_method is None else None
            tdist.init_process_group(
                backend="nccl" if use_cuda else "gloo",
                timeout=datetime.timedelta(seconds=timeout_s),
                rank=rank,
                world_size=world,
                init_method=None if store is not None else init_method,
                store=store,
                **({"device_id": dev} if use_cuda else {}),
            )
        except (RuntimeError, ValueError) as e:  # a peer that never came up, a refused connection, a bad store
            raise DistributedError(f"rank {rank}/{world}: could not join the process group: {first_line(e)}") from e
        if host_group:
            try:
                ctx.cpu_group = tdist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
            except (RuntimeError, ValueError) as e:
                raise DistributedError(
                    f"rank {rank}/{world}: could not form the gloo host group ({first_line(e)}); set GLOO_SOCKET_IFNAME to the network "
                    "interface the ranks reach each other on, or E1MIN_HOST_GROUP=0 to keep host values on NCCL"
                ) from e
    return ctx


def wants_host_group(use_cuda: bool) -> bool:
    """Whether a gloo group for host values joins the default one: under NCCL, unless ``E1MIN_HOST_GROUP=0`` (each
    step then waits for the GPU a few times); ``E1MIN_HOST_GROUP=1`` forms it under gloo too (tests)."""
    setting = os.environ.get("E1MIN_HOST_GROUP", "")
    if setting not in ("", "0", "1"):
        raise DistributedError(f"E1MIN_HOST_GROUP={setting!r}: give 0 or 1 (unset: on under NCCL)")
    return use_cuda if setting == "" else setting == "1"


def attempt_store(world_size: int, timeout_s: float) -> "tdist.Store | None":
    """The process-group store for a worker that torchrun restarts on one node; None where env:// is safe.

    torchrun (since torch 2.5) lends its workers the rendezvous TCPStore (``TORCHELASTIC_USE_AGENT_STORE=True``)
    and keeps that store across ``--max-restarts`` restarts, under the same keys (pytorch/pytorch#135712): a
    restarted group can read the dead group's gloo addresses or NCCL ids and connect to them (connection refused,
    or a hang in process-group setup). One agent starts all its workers with the same
    ``TORCHELASTIC_RESTART_COUNT``, so on one node a key prefix per restart separates the groups exactly. With
    several nodes the counts can differ between agents (see ``launcher_warning``), so nothing is prefixed there.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or os.environ.get("GROUP_WORLD_SIZE", "1") != "1":
        return None
    base = tdist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size,
        is_master=False,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return tdist.PrefixStore(f"e1min/attempt_{int(os.environ.get('TORCHELASTIC_RESTART_COUNT', '0'))}", base)


def launcher_warning() -> str | None:
    """A line for the run log when torchrun's restarts on several nodes may reuse a dead group's store keys."""
    if (
        os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        and os.environ.get("GROUP_WORLD_SIZE", "1") != "1"
        and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0
    ):
        return (
            "torchrun --max-restarts on several nodes: use --rdzv-backend=c10d with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in "
            "torchrun's environment, or a restarted group may read the dead group's addresses and fail to form "
            "(pytorch/pytorch#135712)"
        )
    return None


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
