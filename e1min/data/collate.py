"""Joint collator: encode context + query, align binding labels, choose MLM positions (seeded per protein)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from e1min.data.dataset import Example
from e1min.data.fasta import DataError
from e1min.data.seeding import stable_seed
from e1min.tokenizer import AMINO_ACID_IDS, FIRST_LETTER_ID, MASK_ID, RESIDUE_OFFSET, encode, pad_batch

IGNORE_INDEX = -100
_AA_IDS = torch.tensor(AMINO_ACID_IDS, dtype=torch.long)


@dataclass
class MaskingConfig:
    """MLM corruption: choose residues with ``probability``; of those 80% ``?``, 10% random, 10% unchanged."""

    probability: float = 0.15
    mask_fraction: float = 0.8
    random_fraction: float = 0.1
    mask_context: bool = False

    def __post_init__(self) -> None:
        for name in ("probability", "mask_fraction", "random_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise DataError(f"masking: {name!r} must be in [0, 1], got {getattr(self, name)}")
        if self.mask_fraction + self.random_fraction > 1.0 + 1e-9:
            raise DataError(
                f"masking: 'mask_fraction' + 'random_fraction' must not exceed 1, got {self.mask_fraction} + {self.random_fraction}"
            )


def mask_row(
    input_ids: torch.Tensor, candidates: torch.Tensor, masking: MaskingConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Corrupt a copy of one encoded row; returns (corrupted input_ids, mask of chosen positions)."""
    n = len(input_ids)
    chosen = candidates & (torch.rand(n, generator=generator) < masking.probability)
    action = torch.rand(n, generator=generator)
    random_ids = _AA_IDS[torch.randint(len(_AA_IDS), (n,), generator=generator)]
    out = input_ids.clone()
    to_mask = chosen & (action < masking.mask_fraction)
    to_random = chosen & (action >= masking.mask_fraction) & (action < masking.mask_fraction + masking.random_fraction)
    out[to_mask] = MASK_ID
    out[to_random] = random_ids[to_random]
    return out, chosen


def collate(
    examples: Sequence[Example],
    *,
    masking: MaskingConfig | None,
    seed: int,
    epoch: int,
    label_smoothing: float = 0.0,
) -> dict[str, Any]:
    """Batch examples of one ion into padded (B, L) tensors for the joint BCE + MLM loss.

    ``binding_mask``: query residues of labelled rows inside the example's keep span, minus MLM
    positions (scoring reads ``query_residue_mask`` and stitches keep spans in ``windows``).
    ``masking=None`` leaves the input uncorrupted (validation, prediction). Label smoothing applies
    to whatever is passed; the caller passes 0 outside training.
    """
    if not examples:
        raise ValueError("empty batch")
    ions = {ex.ion for ex in examples}
    if len(ions) != 1:
        raise ValueError(f"a batch must hold one ion, got {sorted(ions)}")
    if not 0.0 <= label_smoothing < 1.0:
        raise DataError(f"'label_smoothing' must be in [0, 1), got {label_smoothing}")
    encoded = [encode([*ex.context, ex.query]) for ex in examples]
    mlm_rows = []
    for ex, enc in zip(examples, encoded):
        mlm = torch.full_like(enc["input_ids"], IGNORE_INDEX)
        if masking is not None and masking.probability > 0:
            residues = enc["input_ids"] >= FIRST_LETTER_ID
            candidates = residues if masking.mask_context else residues & enc["query_residue_mask"]
            g = torch.Generator().manual_seed(stable_seed(seed, epoch, ex.protein_id, ex.offset))
            corrupted, chosen = mask_row(enc["input_ids"], candidates, masking, g)
            mlm[chosen] = enc["input_ids"][chosen]
            enc["input_ids"] = corrupted
        mlm_rows.append(mlm)
    batch = pad_batch(encoded)
    bsz, length = batch["input_ids"].shape
    mlm_labels = torch.full((bsz, length), IGNORE_INDEX, dtype=torch.long)
    binding_labels = torch.zeros((bsz, length), dtype=torch.float32)
    binding_mask = torch.zeros((bsz, length), dtype=torch.bool)
    for b, (ex, enc, mlm) in enumerate(zip(examples, encoded, mlm_rows)):
        n = len(enc["input_ids"])
        mlm_labels[b, :n] = mlm
        q0 = n - RESIDUE_OFFSET - len(ex.query)  # first query residue token
        q1 = q0 + len(ex.query)
        k0, k1 = q0 + ex.keep_start - ex.offset, q0 + ex.keep_end - ex.offset
        if ex.labels is not None:
            y = torch.from_numpy(ex.labels.astype("float32"))
            binding_labels[b, q0:q1] = y * (1.0 - label_smoothing) + label_smoothing / 2 if label_smoothing else y
            binding_mask[b, k0:k1] = True
    binding_mask &= mlm_labels == IGNORE_INDEX
    batch.update(
        binding_labels=binding_labels,
        binding_mask=binding_mask,
        mlm_labels=mlm_labels,
        # Counted and indexed here, on the CPU: on a GPU, boolean indexing and .sum() of device tensors are host syncs.
        mlm_index=(mlm_labels.flatten() != IGNORE_INDEX).nonzero().squeeze(1),
        num_binding=int(binding_mask.sum()),
        num_mlm=int((mlm_labels != IGNORE_INDEX).sum()),
        ion=examples[0].ion,
        protein_ids=[ex.protein_id for ex in examples],
    )
    return batch
