"""Per-ion binding heads on a LoRA'd E1 backbone, and the joint BCE + MLM loss.

One backbone forward per batch feeds both terms: the batch's ion head scores query residues,
E1's own pretrained ``mlm_head`` predicts the masked tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from e1min.model import E1ForMaskedLM
from e1min.runtime import float32_island


class IonHead(nn.Module):
    """LayerNorm(H) -> Dropout -> Linear(H, 1), applied per residue, always in float32.

    Autocast is switched off inside: a bf16 Linear here would quantise the logits (and so the
    probabilities) to bf16's 8 mantissa bits, which is visible in rankings and thresholds.
    """

    def __init__(self, hidden_size: int, dropout: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Linear(hidden_size, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        with float32_island(h.device.type):
            return self.proj(self.dropout(self.norm(h.float()))).squeeze(-1)


class BindingModel(nn.Module):
    """E1 backbone (usually with LoRA) plus a ``ModuleDict`` of ion heads. Heads stay float32."""

    def __init__(self, backbone: E1ForMaskedLM, ions: list[str], head_dropout: float = 0.0):
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleDict({ion: IonHead(backbone.config.hidden_size, head_dropout) for ion in ions})

    @property
    def ions(self) -> list[str]:
        return list(self.heads.keys())

    def forward(self, batch: dict, ion: str, mlm_positions: torch.Tensor | None = None) -> "BindingOutput":
        """Binding logits (B, L) from ``ion``'s head; MLM logits (N, vocab) only at ``mlm_positions``: a bool (B, L)
        mask, or flat indices into B*L (``collate``'s ``mlm_index``: no host sync on a GPU)."""
        emb = self.backbone.model(batch["input_ids"], batch["within_seq_position_ids"], batch["global_position_ids"], batch["sequence_ids"])
        binding = self.heads[ion](emb)
        mlm = None
        if mlm_positions is not None:
            flat = emb.flatten(0, 1)
            x = flat[mlm_positions.flatten()] if mlm_positions.dtype == torch.bool else flat.index_select(0, mlm_positions)
            head_dtype = self.backbone.mlm_head[0].weight.dtype
            if not torch.is_autocast_enabled(x.device.type) and x.dtype != head_dtype:
                x = x.to(head_dtype)  # a trainable (float32) mlm_head on a bf16 base, outside autocast
            mlm = self.backbone.mlm_head(x).float()
        return BindingOutput(binding_logits=binding, mlm_logits=mlm, embeddings=emb)


@dataclass
class BindingOutput:
    binding_logits: torch.Tensor
    mlm_logits: torch.Tensor | None
    embeddings: torch.Tensor


@dataclass
class LossTerms:
    """Sums over contributing tokens; divide by the step's global token counts to get the loss."""

    bce_sum: torch.Tensor
    mlm_sum: torch.Tensor
    bce_tokens: int
    mlm_tokens: int


def loss_sums(out: BindingOutput, batch: dict, pos_weight: float = 1.0, focal_gamma: float = 0.0) -> LossTerms:
    """Summed BCE over ``binding_mask`` and summed MLM cross-entropy over ``mlm_labels != -100``.

    Sums, not means: the trainer divides by the number of contributing tokens of the whole optimiser
    step (all micro-batches, all ranks), so accumulation and data parallelism give the big-batch loss.
    Computed in float32 whatever the autocast state (targets, ``pos_weight`` and both terms).
    """
    with float32_island(out.binding_logits.device.type):
        return _loss_sums(out, batch, pos_weight, focal_gamma)


def _loss_sums(out: BindingOutput, batch: dict, pos_weight: float, focal_gamma: float) -> LossTerms:
    # Every position is computed and the mask multiplies: boolean indexing would be a host sync on a GPU.
    mask = batch["binding_mask"]
    logits = out.binding_logits.float()
    target = batch["binding_labels"].float()
    pw = torch.full((), pos_weight, dtype=torch.float32, device=logits.device)  # a fill: no host-to-device copy
    bce = F.binary_cross_entropy_with_logits(logits, target, pos_weight=pw, reduction="none")
    if focal_gamma > 0:
        p = torch.sigmoid(logits)
        p_t = p * target + (1 - p) * (1 - target)
        bce = bce * (1 - p_t).pow(focal_gamma)
    bce_sum = torch.where(mask, bce, 0.0).sum()
    labels = batch["mlm_labels"]
    # collate's counts and indices were made on the CPU; a hand-made batch without them is counted here.
    num_mlm = batch["num_mlm"] if "num_mlm" in batch else int((labels != -100).sum())
    num_binding = batch["num_binding"] if "num_binding" in batch else int(mask.sum())
    if out.mlm_logits is not None and num_mlm:
        idx = batch.get("mlm_index")
        targets = labels.flatten().index_select(0, idx) if idx is not None else labels[labels != -100]
        mlm = F.cross_entropy(out.mlm_logits.float(), targets, reduction="sum")
    else:
        mlm = out.binding_logits.new_zeros(())  # no masked token: zero, never NaN
    return LossTerms(bce_sum, mlm, num_binding, num_mlm)


def joint_loss(terms: LossTerms, bce_tokens: int, mlm_tokens: int, mlm_weight: float) -> torch.Tensor:
    """BCE_sum / bce_tokens + mlm_weight * MLM_sum / mlm_tokens, with global counts (0 counts -> term 0)."""
    loss = terms.bce_sum / max(bce_tokens, 1)
    if mlm_weight > 0:
        loss = loss + mlm_weight * terms.mlm_sum / max(mlm_tokens, 1)
    return loss
