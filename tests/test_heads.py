"""Ion heads and the joint loss: float32 islands, and a trainable mlm_head that stays float32 on a bf16 base."""

from __future__ import annotations

import pytest
import torch

from e1min.heads import BindingModel, IonHead, joint_loss, loss_sums
from e1min.lora import apply_lora
from e1min.random_checkpoint import random_model
from e1min.tokenizer import prepare_batch


def test_ion_head_output_is_float32_for_bf16_input():
    head = IonHead(16)
    h = torch.randn(3, 5, 16).bfloat16()
    assert head(h).dtype == torch.float32
    assert torch.equal(head(h), head(h.float()))


def test_pos_weight_and_label_smoothing_targets_are_float32_under_autocast():
    from e1min.heads import BindingOutput

    logits = torch.randn(2, 6)
    batch = {
        "binding_mask": torch.ones(2, 6, dtype=torch.bool),
        "binding_labels": torch.full((2, 6), 0.05),
        "mlm_labels": torch.full((2, 6), -100),
    }
    out = BindingOutput(binding_logits=logits, mlm_logits=None, embeddings=torch.zeros(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = loss_sums(out, batch, pos_weight=2.5)
    # Written out: BCE with pos_weight p on target t = -(p t log s(x) + (1 - t) log(1 - s(x))).
    s = torch.sigmoid(logits.double())
    expected = -(2.5 * 0.05 * torch.log(s) + 0.95 * torch.log(1 - s)).sum()
    assert terms.bce_sum.dtype == torch.float32
    assert abs(float(terms.bce_sum) - float(expected)) < 1e-4
    assert float(joint_loss(terms, 12, 0, 1.0)) == pytest.approx(float(expected) / 12, rel=1e-5)


def test_trainable_mlm_head_is_float32_on_bf16_base_and_moves_at_small_lr(tiny_config):
    backbone = random_model(tiny_config, seed=1, dtype=torch.bfloat16)
    apply_lora(backbone, r=4, alpha=8, train_mlm_head=True)
    head_params = list(backbone.mlm_head.parameters())
    assert all(p.dtype == torch.float32 and p.requires_grad for p in head_params)
    assert backbone.model.layers[0].ffn.mlp.w1.weight.dtype == torch.bfloat16  # the frozen base stays bf16
    model = BindingModel(backbone, ["ZN"])
    batch = prepare_batch(["MKVLAAGHCE", "MCHHEKL"])
    batch["binding_labels"] = torch.zeros(batch["input_ids"].shape)
    batch["binding_mask"] = batch.pop("query_residue_mask")
    labels = batch["input_ids"].clone()
    labels[~batch["binding_mask"]] = -100
    batch["mlm_labels"] = labels
    before = [p.detach().clone() for p in head_params]
    opt = torch.optim.AdamW(head_params, lr=1e-4, weight_decay=0.0)
    for precision in ("float32", "bf16"):  # outside autocast (bf16 hidden states cast up) and under it
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else torch.autocast("cpu", enabled=False)
        with ctx:
            out = model(batch, "ZN", batch["binding_mask"])
        loss = joint_loss(loss_sums(out, batch), 1, int(batch["binding_mask"].sum()), 1.0)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(s["exp_avg"].dtype == torch.float32 for s in opt.state.values())
    moved = sum(int((a != b).sum()) for a, b in zip(head_params, before)) / sum(p.numel() for p in head_params)
    # AdamW's first steps move every element with a non-zero gradient by ~lr; in bf16 master weights
    # (8 mantissa bits) a 1e-4 step is lost for any |w| > ~0.03, i.e. most of them.
    assert moved > 0.9
