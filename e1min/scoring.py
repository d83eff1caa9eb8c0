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
from e1min.runtime import autocast, bf16_is_fast, cpu_has_native_bf16, parse_precision

__all__ = ["cpu_has_native_bf16", "use_bf16", "autocast_context", "to_device", "iter_scored", "score_examples"]


def use_bf16(device: torch.device, requested: bool) -> bool:
    """Kept for existing callers: bf16 when requested and the device runs it fast (see ``runtime``)."""
    return bool(requested) and bf16_is_fast(device)


def autocast_context(device: torch.device, bf16: bool | str) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` when asked for (True or ``"bf16"``), otherwise a no-op."""
    return autocast(device, _precision(bf16))


def _precision(value: bool | str) -> str:
    """Precision from the old ``bf16`` flag or a precision name."""
    if isinstance(value, bool):
        return "bf16" if value else "float32"
    return parse_precision(value) or "float32"


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def iter_scored(
    model: torch.nn.Module,
    examples: Sequence[Example],
    ion: str,
    device: torch.device,
    max_tokens: int,
    precision: str | bool = "float32",
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (example index, per-residue float32 probabilities over its query) in token-budget batches.

    Examples are length-sorted into batches (little padding); order of results follows the batches.
    Inputs are never masked. ``precision``: ``"float32"`` or ``"bf16"`` (autocast backbone; the
    head and the sigmoid stay float32). A bool is read as the old ``bf16`` flag.
    """
    lengths = [ex.num_tokens for ex in examples]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), autocast(device, _precision(precision)):
            for idx in token_budget_batches(lengths, max_tokens, seed=None):
                batch = to_device(collate([examples[i] for i in idx], masking=None, seed=0, epoch=0), device)
                probs = torch.sigmoid(model(batch, ion).binding_logits.float())
                qmask = batch["query_residue_mask"]
                for row, i in enumerate(idx):
                    yield i, probs[row][qmask[row]].cpu().numpy()
    finally:
        model.train(was_training)


def score_examples(
    model: torch.nn.Module,
    examples: Sequence[Example],
    ion: str,
    device: torch.device,
    max_tokens: int,
    precision: str | bool = "float32",
) -> list[np.ndarray]:
    """Per-example probabilities in the order of ``examples``."""
    out: list[np.ndarray | None] = [None] * len(examples)
    for i, p in iter_scored(model, examples, ion, device, max_tokens, precision):
        out[i] = p
    return out  # type: ignore[return-value]
