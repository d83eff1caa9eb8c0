"""Examples -> per-residue outputs: unmasked inputs, token-budget batches, windows stitched, ranks gathered.

The one path shared by validation (trainer) and prediction (predictor), so both score every residue the
same way: ``score_records`` (probabilities per protein) and ``iter_embedded`` (hidden states).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from e1min.data.batching import shard_eval, token_budget_batches
from e1min.data.collate import collate
from e1min.data.dataset import Example, stitch_predictions
from e1min.dist import DistContext
from e1min.runtime import autocast, bf16_is_fast, cpu_has_native_bf16, parse_precision

__all__ = [
    "cpu_has_native_bf16",
    "use_bf16",
    "autocast_context",
    "to_device",
    "iter_scored",
    "score_examples",
    "score_records",
    "iter_embedded",
]


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
    """Tensors of ``batch`` on ``device``; to a GPU through pinned memory, so the copies do not block the host."""
    if device.type != "cuda":
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    return {
        k: v.pin_memory().to(device, non_blocking=True) if torch.is_tensor(v) and v.device.type == "cpu" else v for k, v in batch.items()
    }


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
    was_training = model.training
    model.eval()
    try:
        for idx, batch in _inference_batches(examples, device, max_tokens, precision):
            probs = torch.sigmoid(model(batch, ion).binding_logits.float()).cpu()  # one copy to the host per batch
            qmask = batch["query_residue_mask"].cpu()
            for row, i in enumerate(idx):
                yield i, probs[row][qmask[row]].numpy()
    finally:
        model.train(was_training)


def _inference_batches(
    examples: Sequence[Example], device: torch.device, max_tokens: int, precision: str | bool
) -> Iterator[tuple[list[int], dict]]:
    """(example indices, unmasked batch on ``device``) in length-sorted token-budget batches, under
    ``inference_mode`` and the precision's autocast."""
    lengths = [ex.num_tokens for ex in examples]
    with torch.inference_mode(), autocast(device, _precision(precision)):
        for idx in token_budget_batches(lengths, max_tokens, seed=None):
            yield idx, to_device(collate([examples[i] for i in idx], masking=None, seed=0, epoch=0), device)


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


def score_records(
    model: torch.nn.Module,
    examples: Sequence[Example],
    ion: str,
    device: torch.device,
    max_tokens: int,
    precision: str | bool = "float32",
    ctx: DistContext | None = None,
) -> dict[str, np.ndarray]:
    """{protein id: float32 probability per residue}: every residue scored exactly once, windows stitched.

    With a distributed ``ctx`` each rank scores a strided share of the examples and every rank receives
    all results (one gather), so all ranks compute the same validation metrics.
    """
    if ctx is None or not ctx.distributed:
        return stitch_predictions(examples, score_examples(model, examples, ion, device, max_tokens, precision))
    mine = shard_eval(list(range(len(examples))), ctx.rank, ctx.world_size)
    rows = [torch.zeros(0, 3, dtype=torch.float64)]
    for j, p in iter_scored(model, [examples[i] for i in mine], ion, device, max_tokens, precision):
        pos = torch.arange(len(p), dtype=torch.float64)
        rows.append(torch.stack([torch.full_like(pos, mine[j]), pos, torch.from_numpy(p).double()], 1))
    gathered = ctx.gather_cat(torch.cat(rows), f"scores:{ion}").numpy()
    gathered = gathered[np.lexsort((gathered[:, 1], gathered[:, 0]))]
    index = gathered[:, 0].astype(np.int64)
    starts = np.searchsorted(index, np.arange(len(examples) + 1))
    preds = [gathered[starts[i] : starts[i + 1], 2].astype(np.float32) for i in range(len(examples))]
    return stitch_predictions(examples, preds)


def iter_embedded(
    backbone: torch.nn.Module, examples: Sequence[Example], device: torch.device, max_tokens: int, precision: str | bool = "float32"
) -> Iterator[tuple[int, torch.Tensor]]:
    """(example index, final-norm hidden states of its query residues, float32 on CPU) in token-budget batches."""
    for idx, batch in _inference_batches(examples, device, max_tokens, precision):
        emb = backbone.model(batch["input_ids"], batch["within_seq_position_ids"], batch["global_position_ids"], batch["sequence_ids"])
        # Only the query rows travel to the host (with MSA context L is often 10x the query), in one copy.
        q = batch["query_residue_mask"].cpu()
        flat = q.flatten().nonzero().squeeze(1)
        picked = emb.flatten(0, 1).index_select(0, flat.to(emb.device)).float().cpu()
        yield from ((i, part.clone()) for i, part in zip(idx, picked.split(q.sum(1).tolist())))  # own storage (safetensors)
