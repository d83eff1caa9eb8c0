"""One optimiser step: accumulation equals the big batch, empty MLM is zero, unused heads get no gradient, focal loss, schedule."""

import pytest
import torch

from e1min.data.collate import MaskingConfig, collate
from e1min.dist import DistContext
from e1min.train import LossSpec, backward_window, lr_at
from tests.helpers import toy_binding_model, toy_examples


@pytest.mark.parametrize("mlm_weight", [0.0, 1.0])
def test_accumulation_equals_big_batch(tiny_model, mlm_weight):
    model = toy_binding_model(tiny_model)
    exs = toy_examples(6)
    masking = MaskingConfig(probability=0.3) if mlm_weight else None
    spec = LossSpec({"ZN": 2.0}, mlm_weight, use_mlm=masking is not None)
    ctx = DistContext()

    def grads(groups):
        model.zero_grad(set_to_none=True)
        batches = [(collate(g, masking=masking, seed=1, epoch=0), "ZN") for g in groups]
        stats = backward_window(model, batches, ctx, spec)
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, stats

    big, s_big = grads([exs])
    small, s_small = grads([exs[:2], exs[2:3], exs[3:]])
    assert big.keys() == small.keys() and len(big) > 0
    for n in big:
        assert torch.allclose(big[n], small[n], atol=1e-6, rtol=1e-4), n
    assert torch.allclose(s_big, s_small)
    if mlm_weight:
        assert s_big[0, 3] > 0  # some MLM tokens were selected


def test_no_mlm_tokens_gives_zero_not_nan(tiny_model):
    model = toy_binding_model(tiny_model)
    batch = collate(toy_examples(2), masking=MaskingConfig(probability=0.0), seed=0, epoch=0)
    stats = backward_window(model, [(batch, "ZN")], DistContext(), LossSpec({}, 1.0))
    assert stats[0, 3] == 0 and stats[0, 2] == 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_unused_head_gets_no_gradient(tiny_model):
    model = toy_binding_model(tiny_model)
    batch = collate(toy_examples(3), masking=None, seed=0, epoch=0)
    backward_window(model, [(batch, "ZN"), None], DistContext(), LossSpec({}, 0.0, use_mlm=False))
    assert all(p.grad is None for p in model.heads["CA"].parameters())
    assert all(p.grad is not None for p in model.heads["ZN"].parameters())


def test_focal_loss_down_weights_easy_tokens(tiny_model):
    from e1min.heads import loss_sums

    model = toy_binding_model(tiny_model)
    batch = collate(toy_examples(3), masking=None, seed=0, epoch=0)
    with torch.no_grad():
        out = model(batch, "ZN")
        plain = loss_sums(out, batch, 1.0, focal_gamma=0.0)
        focal = loss_sums(out, batch, 1.0, focal_gamma=2.0)
    assert 0 < float(focal.bce_sum) < float(plain.bce_sum) and focal.bce_tokens == plain.bce_tokens


def test_lr_schedule():
    lrs = [lr_at(s, 100, 10, 1e-3, 1e-5) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(1e-5, rel=0.05)
    assert lr_at(200, 100, 10, 1e-3, 1e-5) == pytest.approx(1e-5)


def test_statistics_left_on_the_device_equal_the_host_ones(tiny_model, monkeypatch):
    """host_stats=False (the trainer: no host sync per step) returns the same statistics, on ctx.device."""
    model = toy_binding_model(tiny_model)
    model.backbone.set_attn_impl("dense")  # the CPU block path reads its spans on the host, as it must
    batch = collate(toy_examples(3), masking=MaskingConfig(probability=0.3), seed=0, epoch=0)
    spec, ctx = LossSpec({"ZN": 2.0}, 1.0), DistContext()
    host = backward_window(model, [(batch, "ZN"), None], ctx, spec, seeds=[5, None])
    with monkeypatch.context() as m:  # a read back to the host is what host_stats=False must not do
        for name in ("cpu", "tolist", "item", "numpy"):
            m.setattr(torch.Tensor, name, lambda *a, _name=name, **k: pytest.fail(f"Tensor.{_name} called"))
        kept = backward_window(model, [(batch, "ZN"), None], ctx, spec, seeds=[5, None], host_stats=False)
    assert kept.device == ctx.device and kept.dtype == torch.float64
    assert torch.equal(kept, host) and host[0, 1] > 0 and host[0, 3] > 0
