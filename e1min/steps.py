"""One optimiser step: AdamW on the trainable parameters, the learning-rate schedule, and the forward/backward
of every micro-batch of the step with losses normalised by the step's global token counts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from e1min.dist import DistContext
from e1min.heads import BindingModel, joint_loss, loss_sums
from e1min.runtime import autocast
from e1min.scoring import _precision, to_device


def trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW on trainable parameters; no weight decay on norms and biases."""
    decay, no_decay = [], []
    for name, p in trainable(model):
        (no_decay if p.ndim < 2 or "norm" in name or name.endswith("bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.999), eps=1e-8)


def lr_at(step: int, total_steps: int, warmup_steps: int, lr: float, min_lr: float) -> float:
    """Linear warm-up from lr/warmup to lr, then cosine decay to min_lr (per optimiser step)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class LossSpec:
    pos_weight: dict[str, float]
    mlm_weight: float
    focal_gamma: float = 0.0
    use_mlm: bool = True


def backward_window(
    model: BindingModel,
    batches: Sequence[tuple[dict, str] | None],
    ctx: DistContext,
    spec: LossSpec,
    precision: str | bool = "float32",
    *,
    bf16: bool | None = None,
    seeds: Sequence[int | None] | None = None,
    host_stats: bool = True,
) -> torch.Tensor:
    """Forward + backward every micro-batch of one optimiser step (this rank's share of it).

    Both loss terms are divided by the step's *global* token counts (all micro-batches, all ranks,
    all-reduced before any backward), so the summed gradients equal the big-batch gradient.
    ``None`` entries are empty steps (a rank short of batches). Returns detached per-ion statistics
    (n_ions, 4): BCE sum, BCE tokens, MLM sum, MLM tokens. ``precision`` ``"bf16"`` autocasts the
    backbone only: heads and both loss terms are float32 (a bool is read as the old ``bf16`` flag).
    ``seeds``: one RNG seed per entry of ``batches``, set before its forward, so dropout depends on the
    global micro-batch and not on which rank runs it (world-size invariance). ``host_stats=False`` leaves
    the statistics on ``ctx.device``: no host sync, so the caller can build the next step's batches while
    the GPU still computes this one (the trainer reads them only when it logs).
    """
    precision = _precision(bf16 if bf16 is not None else precision)
    real = [b for b in batches if b is not None]
    local = [sum(int(b["binding_mask"].sum()) for b, _ in real), sum(int((b["mlm_labels"] != -100).sum()) for b, _ in real)]
    bce_tokens, mlm_tokens = ctx.sum_ints(local, "token_counts")
    ions = model.ions
    sums = torch.zeros(len(ions), 2, dtype=torch.float64, device=ctx.device)  # BCE, MLM sums (on the device)
    counts = torch.zeros(len(ions), 2, dtype=torch.float64)  # their token counts (Python ints from the CPU batch)
    seeds = list(seeds) if seeds is not None else [None] * len(batches)
    for item, seed in zip(batches, seeds):
        if item is None:
            continue
        batch, ion = item
        if seed is not None:
            torch.manual_seed(seed)
        if "mlm_index" not in batch:
            batch = {**batch, "mlm_index": (batch["mlm_labels"].flatten() != -100).nonzero().squeeze(1)}
        batch = to_device(batch, ctx.device)
        mlm_pos = batch["mlm_index"] if spec.use_mlm and batch.get("num_mlm", 1) else None
        with autocast(ctx.device, precision):
            out = model(batch, ion, mlm_pos)
        terms = loss_sums(out, batch, spec.pos_weight.get(ion, 1.0), spec.focal_gamma)
        loss = joint_loss(terms, bce_tokens, mlm_tokens, spec.mlm_weight)
        loss.backward()
        i = ions.index(ion)
        sums[i] += torch.stack([terms.bce_sum.detach(), terms.mlm_sum.detach()]).double()
        counts[i] += torch.tensor([terms.bce_tokens, terms.mlm_tokens], dtype=torch.float64)
    if host_stats:
        sums = sums.cpu()  # one device-to-host copy per optimiser step
    else:
        counts = (counts.pin_memory() if sums.device.type == "cuda" else counts).to(sums.device, non_blocking=True)
    return torch.stack([sums[:, 0], counts[:, 0], sums[:, 1], counts[:, 1]], dim=1)


def optimizer_step(
    params: Sequence[torch.nn.Parameter], optimizer: torch.optim.Optimizer, ctx: DistContext, max_grad_norm: float | None, lr: float
) -> int:
    """Sum gradients over ranks (one flat all-reduce), clip, step, clear. Returns bytes all-reduced per rank."""
    comm = ctx.sync_gradients(params)
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], max_grad_norm)
    for g in optimizer.param_groups:
        g["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return comm
