"""LoRA layer and injection: exact no-op init, freezing, merge, dtypes, dropout, rslora, gradients, counts, errors."""

import math
import re

import pytest
import torch
from torch import nn

from e1min.config import preset
from e1min.lora import (
    DEFAULT_TARGETS,
    LoRAConfig,
    LoRAError,
    LoRALinear,
    apply_lora,
    dropout_keep_probability,
    dropout_mask,
    format_trainable_parameters,
    load_lora_state_dict,
    lora_modules,
    lora_parameter_count,
    lora_parameters,
    lora_state_dict,
    lora_state_shapes,
    merge_lora,
    trainable_parameters,
    unmerge_lora,
)
from e1min.model import E1ForMaskedLM
from e1min.random_checkpoint import random_model
from e1min.tokenizer import prepare_batch

ROWS = ["MKTAYIAKQRQISFVKSHFSRQ,ACDEFGHIKLMNPQRSTVWY", "MKVLAAGIVGLLLA"]


@pytest.fixture
def batch():
    return prepare_batch(ROWS)


def _out(model, batch):
    with torch.no_grad():
        o = model(**batch)
    return o.logits, o.embeddings


def _randomize_b(model, std=0.05, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * std)


def _loss(model, batch):
    logits = model(**batch).logits
    valid = batch["sequence_ids"] >= 0
    return nn.functional.cross_entropy(logits[valid], batch["input_ids"][valid])


def test_fresh_adapter_is_bit_identical(tiny_model, batch):
    ref = _out(tiny_model, batch)
    apply_lora(tiny_model, r=8, alpha=16)
    assert len(lora_modules(tiny_model)) == 7 * tiny_model.config.num_hidden_layers
    got = _out(tiny_model, batch)
    assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])
    # Also in train mode with grad enabled (dropout 0).
    tiny_model.train()
    assert torch.equal(tiny_model(**batch).embeddings.detach(), ref[1])


def test_init_follows_peft(tiny_model):
    apply_lora(tiny_model, r=8, alpha=16)
    for m in lora_modules(tiny_model).values():
        assert m.lora_A.dtype == m.lora_B.dtype == torch.float32
        assert m.lora_A.shape == (8, m.in_features) and m.lora_B.shape == (m.out_features, 8)
        assert torch.count_nonzero(m.lora_B) == 0
        # kaiming_uniform_(a=sqrt(5)) on (r, in): bound = sqrt(6 / ((1 + 5) * in)) = 1 / sqrt(in)
        bound = 1 / math.sqrt(m.in_features)
        assert m.lora_A.abs().max() <= bound and m.lora_A.abs().max() > 0.5 * bound
        assert m.scaling == 2.0


def test_state_dict_keys_keep_base_names(tiny_model):
    base_keys = set(tiny_model.state_dict())
    apply_lora(tiny_model, r=4, alpha=8)
    keys = set(tiny_model.state_dict())
    assert base_keys <= keys
    extra = keys - base_keys
    assert all(k.endswith((".lora_A", ".lora_B")) for k in extra)
    assert "model.layers.0.norm_attn_norm.self_attn.q_proj.lora_A" in extra
    assert set(lora_state_dict(tiny_model)) == extra


def test_frozen_base_and_mlm_head_flag(tiny_config):
    model = apply_lora(random_model(tiny_config, seed=1), r=4, alpha=8)
    for name, p in model.named_parameters():
        assert p.requires_grad == name.endswith((".lora_A", ".lora_B")), name
    model = apply_lora(random_model(tiny_config, seed=1), r=4, alpha=8, train_mlm_head=True)
    for name, p in model.named_parameters():
        assert p.requires_grad == (name.endswith((".lora_A", ".lora_B")) or name.startswith("mlm_head.")), name
    assert model.lora_config.train_mlm_head


def test_merge_equivalence_and_unmerge_restore(tiny_model, batch):
    weights = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    apply_lora(tiny_model, r=8, alpha=16)
    _randomize_b(tiny_model)
    unmerged = _out(tiny_model, batch)
    merge_lora(tiny_model)
    assert all(m.merged for m in lora_modules(tiny_model).values())
    merged = _out(tiny_model, batch)
    torch.testing.assert_close(merged[0], unmerged[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged[1], unmerged[1], atol=1e-5, rtol=1e-5)
    q = tiny_model.model.layers[0].norm_attn_norm.self_attn.q_proj
    assert not torch.equal(q.weight, weights["model.layers.0.norm_attn_norm.self_attn.q_proj.weight"])
    merge_lora(tiny_model)  # idempotent
    unmerge_lora(tiny_model)
    for name, m in lora_modules(tiny_model).items():
        assert (m.weight - weights[f"{name}.weight"]).abs().max() <= 1e-6
    torch.testing.assert_close(_out(tiny_model, batch)[0], unmerged[0], atol=1e-5, rtol=1e-5)


def test_bf16_base_fp32_lora_no_weight_copy(tiny_config, batch):
    model = apply_lora(random_model(tiny_config, seed=1, dtype=torch.bfloat16), r=4, alpha=8)
    _randomize_b(model)
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    q = model.model.layers[1].norm_attn_norm.self_attn.q_proj
    assert q.weight.dtype == torch.bfloat16 and q.lora_A.dtype == torch.float32
    model.train()
    loss = _loss(model, batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == ptrs
    for name, p in model.named_parameters():
        if name.endswith((".lora_A", ".lora_B")):
            assert p.grad is not None and p.grad.dtype == torch.float32 and bool((p.grad != 0).any())
        else:
            assert p.grad is None and p.dtype == torch.bfloat16
    # bf16 merge: merged and unmerged agree to bf16 round-off
    model.eval()
    a = _out(model, batch)[0]
    merge_lora(model)
    b = _out(model, batch)[0]
    assert (a - b).abs().max() <= 0.05 * (1 + a.abs().max())
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == ptrs


def test_dropout_only_on_lora_branch():
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    x = torch.randn(5, 16)
    ref = base(x).detach()
    layer = LoRALinear(base, r=4, alpha=8, dropout=0.5).train()
    # B = 0: train-mode dropout cannot touch the base path.
    assert torch.equal(layer(x), ref)
    with torch.no_grad():
        layer.lora_B.normal_()
    a, b = layer(x), layer(x)
    assert not torch.equal(a, b)  # dropout active on the LoRA input
    layer.eval()
    expected = ref + (x @ layer.lora_A.T @ layer.lora_B.T) * layer.scaling
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    # The bias is the base bias, frozen.
    assert layer.bias is base.bias and not layer.bias.requires_grad


def _fused_and_reference(layer, x, p):
    """(output, dx, dA, dB) of the fused forward and of the plain-autograd oracle, same dropout draw."""
    results = []
    for fused in (True, False):
        layer.lora_A.grad = layer.lora_B.grad = None
        xi = x.detach().clone().requires_grad_(True)
        torch.manual_seed(7)  # the same mask for both: dropout_mask draws from the default generator
        y = layer(xi) if fused else layer._forward_autograd(xi, p)
        g = torch.Generator().manual_seed(1)
        y.backward(torch.randn(y.shape, generator=g).to(y.dtype))
        results.append((y.detach(), xi.grad, layer.lora_A.grad, layer.lora_B.grad))
    return results


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
def test_fused_lora_matches_autograd_reference(p, base_dtype):
    """The one-node forward/backward equals the textbook formula: outputs and all three gradients."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(24, 20, bias=True).to(base_dtype), r=4, alpha=8, dropout=p).train()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 5, 24).to(base_dtype)
    (y, dx, da, db), (y_ref, dx_ref, da_ref, db_ref) = _fused_and_reference(layer, x, p)
    assert y.dtype == dx.dtype == base_dtype and da.dtype == db.dtype == torch.float32
    tol = dict(atol=1e-5, rtol=1e-5) if base_dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(dx, dx_ref, **tol)
    torch.testing.assert_close(da, da_ref, **tol)
    torch.testing.assert_close(db, db_ref, **tol)
    if p > 0:  # dropout really acts: a different draw gives a different output
        torch.manual_seed(8)
        assert not torch.equal(layer(x).detach(), y)


def test_lora_output_can_be_modified_in_place():
    layer = LoRALinear(nn.Linear(8, 6), r=2, alpha=4, dropout=0.1).train()
    for x in (torch.randn(3, 8, requires_grad=True), torch.randn(2, 3, 8, requires_grad=True)):
        y = layer(x)
        y.add_(1.0).relu_()
        y.sum().backward()
        assert x.grad is not None and layer.lora_B.grad is not None


def test_dropout_under_checkpointing_same_grads(tiny_config, batch):
    """Checkpointing recomputes each layer with the RNG state restored: the same dropout masks, the same gradients."""
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)  # lora_A's init draws from the default generator too
        model = apply_lora(random_model(tiny_config, seed=1), r=4, alpha=8, dropout=0.3)
        _randomize_b(model)
        model.set_gradient_checkpointing(ckpt)
        model.train()
        torch.manual_seed(5)
        _loss(model, batch).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], atol=1e-6, rtol=1e-5)
    # and dropout is really on: another draw changes the gradients
    torch.manual_seed(0)
    model = apply_lora(random_model(tiny_config, seed=1), r=4, alpha=8, dropout=0.3)
    _randomize_b(model)
    model.train()
    torch.manual_seed(6)
    _loss(model, batch).backward()
    assert any(not torch.allclose(p.grad, grads[0][n]) for n, p in model.named_parameters() if p.requires_grad)


def test_fused_lora_under_autocast_matches_reference():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(24, 20, bias=False), r=4, alpha=8, dropout=0.2).train()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 7, 24)
    exact, _ = _fused_and_reference(layer, x, 0.2)  # float32, the ground truth
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused, ref = _fused_and_reference(layer, x, 0.2)
    assert fused[0].dtype == torch.bfloat16 and fused[1].dtype == torch.float32 and fused[2].dtype == torch.float32
    for a, b, e in zip(fused, ref, exact):
        # both bf16 computations sit within bf16 round-off of the float32 result
        for t in (a, b):
            assert (t.float() - e).norm() <= 2e-2 * e.norm()


@pytest.mark.parametrize("p", [0.1, 0.25, 0.5])
def test_dropout_mask_rate_and_scaling(p):
    """Kept with probability ~1 - p in both halves of every random draw, and the kept inputs are scaled by
    1 / keep (the expectation is preserved)."""
    torch.manual_seed(0)
    keep = dropout_keep_probability(p)
    assert abs(keep - (1 - p)) <= 2**-16
    layer = LoRALinear(nn.Linear(64, 1, bias=False), r=1, alpha=1, dropout=p).train()
    with torch.no_grad():
        layer.weight.zero_()
        layer.lora_A.fill_(1.0)
        layer.lora_B.fill_(1.0)
    x = torch.ones(4000, 64)
    y = layer(x).detach().squeeze(1)  # = (number kept in the row) / keep
    kept = y * keep
    assert torch.allclose(kept, kept.round(), atol=1e-3)
    assert abs(y.mean().item() - 64) < 0.7
    mask = dropout_mask(torch.empty(200_001), p)  # odd size: the last draw is cut
    assert mask.shape == (200_001,) and mask.dtype == torch.bool
    for half in (mask[0::2], mask[1::2]):
        assert abs(half.float().mean().item() - keep) < 0.006


def test_dropout_mask_draws_from_the_default_generator():
    torch.manual_seed(3)
    a = dropout_mask(torch.empty(5, 7), 0.3)
    torch.manual_seed(3)
    assert torch.equal(a, dropout_mask(torch.empty(5, 7), 0.3))
    assert not torch.equal(a, dropout_mask(torch.empty(5, 7), 0.3))


def test_rslora_scaling():
    base = nn.Linear(16, 12, bias=False)
    layer = LoRALinear(base, r=16, alpha=32, use_rslora=True)
    assert layer.scaling == pytest.approx(32 / 4)
    assert LoRALinear(nn.Linear(16, 12), r=16, alpha=32).scaling == pytest.approx(2.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 16)
    torch.testing.assert_close(layer(x) - base(x), (x @ layer.lora_A.T @ layer.lora_B.T) * 8.0, atol=1e-4, rtol=1e-4)
    assert LoRAConfig(r=16, alpha=32, use_rslora=True).scaling == pytest.approx(8.0)


def test_gradients_at_step_zero(tiny_model, batch):
    apply_lora(tiny_model, r=4, alpha=8)
    tiny_model.train()
    _loss(tiny_model, batch).backward()
    for m in lora_modules(tiny_model).values():
        assert bool((m.lora_B.grad != 0).any())
        assert m.lora_A.grad is not None and torch.count_nonzero(m.lora_A.grad) == 0


def test_activation_checkpointing_same_grads(tiny_config, batch):
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = apply_lora(random_model(tiny_config, seed=1), r=4, alpha=8)
        _randomize_b(model)
        model.set_gradient_checkpointing(ckpt)
        model.train()
        _loss(model, batch).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], atol=1e-6, rtol=1e-5)
        assert bool((grads[0][k] != 0).any())


def test_autocast_bf16_cpu(tiny_model, batch):
    apply_lora(tiny_model, r=4, alpha=8)
    _randomize_b(tiny_model)
    tiny_model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = _loss(tiny_model, batch)
    loss.backward()
    assert torch.isfinite(loss)
    for m in lora_modules(tiny_model).values():
        assert m.lora_A.grad.dtype == torch.float32 and torch.isfinite(m.lora_A.grad).all()
    q = tiny_model.model.layers[0].norm_attn_norm.self_attn.q_proj
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = q(torch.randn(2, 5, q.in_features))
        out = tiny_model(**batch)
    assert y.dtype == torch.bfloat16 and torch.isfinite(out.logits).all()


def test_target_errors(tiny_config):
    with pytest.raises(LoRAError, match="unknown target"):
        apply_lora(random_model(tiny_config), target_modules=["q_proj", "query"])
    with pytest.raises(LoRAError, match="unknown target"):
        apply_lora(random_model(tiny_config), target_modules=["self_attn"])  # a module, but not a Linear
    with pytest.raises(LoRAError, match="regex"):
        apply_lora(random_model(tiny_config), target_modules=".*q_proj")
    with pytest.raises(LoRAError, match="do not exist"):
        apply_lora(random_model(tiny_config), layers=[0, 99])
    with pytest.raises(LoRAError, match="empty"):
        apply_lora(random_model(tiny_config), layers=[])
    with pytest.raises(LoRAError, match="positive integer"):
        apply_lora(random_model(tiny_config), r=0)
    with pytest.raises(LoRAError, match="dropout"):
        apply_lora(random_model(tiny_config), dropout=1.5)
    model = apply_lora(random_model(tiny_config))
    with pytest.raises(LoRAError, match="already has LoRA"):
        apply_lora(model)
    with pytest.raises(LoRAError, match="no LoRA"):
        merge_lora(random_model(tiny_config))
    # a failed apply leaves the model untouched
    m = random_model(tiny_config)
    with pytest.raises(LoRAError):
        apply_lora(m, target_modules=["nope"])
    assert not lora_modules(m) and all(p.requires_grad for p in m.parameters())


def test_layers_subset_and_dotted_targets(tiny_model):
    apply_lora(tiny_model, r=4, alpha=8, target_modules=["self_attn.q_proj", "w2"], layers=[1, 4])
    names = sorted(lora_modules(tiny_model))
    assert names == [
        "model.layers.1.ffn.mlp.w2",
        "model.layers.1.norm_attn_norm.self_attn.q_proj",
        "model.layers.4.ffn.mlp.w2",
        "model.layers.4.norm_attn_norm.self_attn.q_proj",
    ]
    assert tiny_model.lora_config.layers == (1, 4)
    rep = trainable_parameters(tiny_model)
    assert rep["trainable"] == lora_parameter_count(tiny_model.config, 4, ["q_proj", "w2"], [1, 4])


def test_trainable_count_and_report(tiny_model):
    total_before = sum(p.numel() for p in tiny_model.parameters())
    apply_lora(tiny_model, r=8, alpha=16, train_mlm_head=True)
    rep = trainable_parameters(tiny_model)
    head = sum(p.numel() for p in tiny_model.mlm_head.parameters())
    closed = lora_parameter_count(tiny_model.config, 8)
    assert rep["trainable"] == closed + head
    assert rep["total"] == total_before + closed
    assert rep["by_type"]["mlm_head"]["trainable"] == head
    h, i, n = 64, 128, 6
    assert rep["by_type"]["w2"]["trainable"] == n * 8 * (i + h)
    assert rep["by_type"]["q_proj"]["total"] == n * (h * h + 8 * 2 * h)
    assert rep["by_type"]["other"]["trainable"] == 0
    assert rep["percent"] == pytest.approx(100 * rep["trainable"] / rep["total"])
    table = format_trainable_parameters(rep)
    assert "q_proj" in table and "mlm_head" in table and "% trainable" in table


@pytest.mark.parametrize(
    "name,expected",
    [("e1-150m", 4_915_200), ("e1-300m", 6_553_600), ("e1-600m", 12_288_000)],
)
def test_released_shapes_closed_form_on_meta(name, expected):
    config = preset(name)
    assert lora_parameter_count(config, 16) == expected
    with torch.device("meta"):
        model = E1ForMaskedLM(config)
    apply_lora(model, r=16, alpha=32)
    assert trainable_parameters(model)["trainable"] == expected


def test_lora_config_round_trip():
    c = LoRAConfig(r=8, alpha=16.0, dropout=0.1, target_modules=("q_proj", "v_proj"), layers=(0, 2), use_rslora=True)
    assert LoRAConfig.from_dict(c.to_dict()) == c
    assert LoRAConfig().target_modules == DEFAULT_TARGETS
    with pytest.raises(LoRAError):
        LoRAConfig.from_dict({"rank": 4})


def test_load_lora_state_dict_round_trip(tiny_model, batch, tiny_config):
    apply_lora(tiny_model, r=4, alpha=8, layers=[1])
    _randomize_b(tiny_model)
    state = {k: v.clone() for k, v in lora_state_dict(tiny_model).items()}
    assert set(state) == set(lora_state_shapes(lora_modules(tiny_model), 4))
    shapes = lora_state_shapes(lora_modules(tiny_model), 4)
    assert all(tuple(v.shape) == shapes[k] for k, v in state.items())
    ref = _out(tiny_model, batch)

    other = apply_lora(random_model(tiny_config, seed=1), r=4, alpha=8, layers=[1])
    base = {k: v for k, v in tiny_model.state_dict().items() if k not in state}
    other.load_state_dict(base, strict=False)  # same base weights; LoRA still fresh (B = 0)
    assert not torch.equal(_out(other, batch)[0], ref[0])
    load_lora_state_dict(other, {k: v.double() for k, v in state.items()})  # cast to the parameters' dtype
    got = lora_state_dict(other)
    assert all(got[k].dtype == torch.float32 and torch.equal(got[k], state[k]) for k in state)
    assert all(p.requires_grad for p in lora_parameters(other).values())
    assert lora_parameters(other).keys() == state.keys()
    out = _out(other, batch)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


def test_load_lora_state_dict_is_strict_and_atomic(tiny_model):
    apply_lora(tiny_model, r=4, alpha=8)
    _randomize_b(tiny_model)
    before = {k: v.clone() for k, v in lora_state_dict(tiny_model).items()}
    keys = sorted(before)
    a_key, b_key = keys[0], keys[1]

    def assert_untouched():
        now = lora_state_dict(tiny_model)
        assert all(torch.equal(now[k], before[k]) for k in before)

    zeros = {k: torch.zeros_like(v) for k, v in before.items()}
    missing = {k: v for k, v in zeros.items() if k != a_key}
    with pytest.raises(LoRAError, match=rf"missing keys: {re.escape(a_key)}"):
        load_lora_state_dict(tiny_model, missing)
    assert_untouched()
    with pytest.raises(LoRAError, match=r"unexpected keys: model\.layers\.0\.nope\.lora_A"):
        load_lora_state_dict(tiny_model, {**zeros, "model.layers.0.nope.lora_A": torch.zeros(4, 4)})
    assert_untouched()
    shape = list(before[b_key].shape)
    with pytest.raises(LoRAError, match=rf"wrong shapes: {re.escape(b_key)}: \[{shape[0]}, 2\] given, model has \[{shape[0]}, 4\]"):
        load_lora_state_dict(tiny_model, {**zeros, b_key: torch.zeros(shape[0], 2)})
    assert_untouched()
    with pytest.raises(LoRAError, match="non-floating dtype"):
        load_lora_state_dict(tiny_model, {**zeros, a_key: zeros[a_key].long()})
    assert_untouched()
    merge_lora(tiny_model)
    with pytest.raises(LoRAError, match="merged"):
        load_lora_state_dict(tiny_model, zeros)
    unmerge_lora(tiny_model)


def test_load_lora_state_dict_needs_lora_layers(tiny_model):
    with pytest.raises(LoRAError, match="no LoRA layers"):
        load_lora_state_dict(tiny_model, {})
