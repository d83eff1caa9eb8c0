"""Score examples with a BindingModel: unmasked inputs, token-budget batches, one probability per residue.

Shared by validation (trainer) and prediction so both score residues the same way.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import numpy as np
import torch

from e1min.data.batching import token_budget_batches
from e1min.data.collate import collate
from e1min.data.dataset import Example


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX). Without them, bf16 matmuls are
    emulated and far slower than float32 (measured ~100x on an AVX2-only EPYC: tools/bench_model.py)."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = fh.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def use_bf16(device: torch.device, requested: bool) -> bool:
    """bf16 autocast when requested and the device runs it fast: CUDA, or a CPU with native bf16."""
    return requested and (device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16()))


def autocast_context(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` when asked for, otherwise a no-op."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def iter_scored(
    model: torch.nn.Module,
    examples: Sequence[Example],
    ion: str,
    device: torch.device,
    max_tokens: int,
    bf16: bool = False,
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (example index, per-residue probabilities over its query) in token-budget batches.

    Examples are length-sorted into batches (little padding); order of results follows the batches.
    Inputs are never masked.
    """
    lengths = [ex.num_tokens for ex in examples]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), autocast_context(device, bf16):
            for idx in token_budget_batches(lengths, max_tokens, seed=None):
                batch = to_device(collate([examples[i] for i in idx], masking=None, seed=0, epoch=0), device)
                probs = torch.sigmoid(model(batch, ion).binding_logits.float())
                qmask = batch["query_residue_mask"]
                for row, i in enumerate(idx):
                    yield i, probs[row][qmask[row]].cpu().numpy()
    finally:
        model.train(was_training)


def score_examples(
    model: torch.nn.Module, examples: Sequence[Example], ion: str, device: torch.device, max_tokens: int, bf16: bool = False
) -> list[np.ndarray]:
    """Per-example probabilities in the order of ``examples``."""
    out: list[np.ndarray | None] = [None] * len(examples)
    for i, p in iter_scored(model, examples, ion, device, max_tokens, bf16):
        out[i] = p
    return out  # type: ignore[return-value]
