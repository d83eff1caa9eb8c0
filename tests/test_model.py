"""E1 against an independent, deliberately naive re-implementation, plus invariances."""

import math

import pytest
import torch
import torch.nn.functional as F

from e1min.tokenizer import prepare_batch


def naive_rope(x, pos, theta):
    """x: (L, d) one head; pos: (L,) ints. Rotate-half RoPE written out."""
    d = x.shape[-1]
    inv = torch.tensor([theta ** (-(2 * j) / d) for j in range(d // 2)], dtype=torch.float64)
    ang = pos.clamp(min=0).double()[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
    x1, x2 = x[:, : d // 2], x[:, d // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def naive_forward(model, batch):
    """float64, one row and one query at a time, masks from the rule in the facts file."""
    cfg = model.config
    p = {k: v.double() for k, v in model.state_dict().items()}
    out = []
    for b in range(batch["input_ids"].shape[0]):
        ids, sid = batch["input_ids"][b], batch["sequence_ids"][b]
        wpos, gpos = batch["within_seq_position_ids"][b], batch["global_position_ids"][b]
        h = p["model.embed_tokens.weight"][ids] + p["model.embed_seq_id.weight"][sid.clamp(min=0)]
        L = len(ids)

        def rms(x, w):
            return x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.rms_norm_eps) * w

        for i in range(cfg.num_hidden_layers):
            pre = f"model.layers.{i}."
            is_global = (i + 1) % cfg.global_attention_every_n_layers == 0
            x = rms(h, p[pre + "norm_attn_norm.input_layernorm.weight"])
            a = pre + "norm_attn_norm.self_attn."
            q, k, v = (x @ p[a + n + "_proj.weight"].T for n in "qkv")
            c = cfg.clip_qkv
            q, k, v = q.clamp(-c, c), k.clamp(-c, c), v.clamp(-c, c)
            dh = cfg.head_dim
            heads = []
            for hd in range(cfg.num_attention_heads):
                kvh = hd // (cfg.num_attention_heads // cfg.num_key_value_heads)
                pos = gpos if is_global else wpos
                theta = cfg.rope_theta_global if is_global else cfg.rope_theta_within_seq
                qh = naive_rope(q[:, hd * dh : (hd + 1) * dh], pos, theta)
                kh = naive_rope(k[:, kvh * dh : (kvh + 1) * dh], pos, theta)
                vh = v[:, kvh * dh : (kvh + 1) * dh]
                o = torch.zeros(L, dh, dtype=torch.float64)
                for t in range(L):
                    if sid[t] < 0:
                        continue  # padding queries are not compared
                    allowed = [j for j in range(L) if sid[j] >= 0 and (sid[j] <= sid[t] if is_global else sid[j] == sid[t])]
                    s = torch.stack([qh[t] @ kh[j] for j in allowed]) / math.sqrt(dh)
                    o[t] = torch.softmax(s, 0) @ vh[allowed]
                heads.append(o)
            h = h + torch.cat(heads, -1) @ p[a + "o_proj.weight"].T
            x = rms(h, p[pre + "norm_attn_norm.post_attention_layernorm.weight"])
            m = pre + "ffn.mlp."
            h = h + (F.silu(x @ p[m + "w1.weight"].T) * (x @ p[m + "w3.weight"].T)) @ p[m + "w2.weight"].T
        emb = rms(h, p["model.norm.weight"])
        y = F.gelu(emb @ p["mlm_head.0.weight"].T + p["mlm_head.0.bias"])
        y = F.layer_norm(y, (y.shape[-1],), p["mlm_head.2.weight"], p["mlm_head.2.bias"], eps=cfg.rms_norm_eps)
        out.append((emb, y @ p["mlm_head.3.weight"].T + p["mlm_head.3.bias"]))
    return out


@pytest.mark.parametrize("rows", [["MKTAYIAKQR"], ["MKTAYIAKQR", "ACD"], ["ACDE,FGHIK,MKTAYI", "WY"], ["QQ,MKLV"]])
def test_matches_naive_reference(tiny_model, rows):
    batch = prepare_batch(rows)
    with torch.no_grad():
        out = tiny_model(**batch)
    for b, (emb, logits) in enumerate(naive_forward(tiny_model, batch)):
        valid = batch["sequence_ids"][b] >= 0
        assert torch.allclose(out.embeddings[b][valid].double(), emb[valid], atol=1e-4)
        assert torch.allclose(out.logits[b][valid].double(), logits[valid], atol=1e-4)


def test_grouped_query_attention_matches_naive():
    from e1min.config import preset
    from e1min.random_checkpoint import random_model

    model = random_model(preset("tiny", num_key_value_heads=2), seed=3)
    batch = prepare_batch(["AC,MKLVW", "MK"])
    with torch.no_grad():
        out = model(**batch)
    for b, (emb, _) in enumerate(naive_forward(model, batch)):
        valid = batch["sequence_ids"][b] >= 0
        assert torch.allclose(out.embeddings[b][valid].double(), emb[valid], atol=1e-4)


def _run(model, rows):
    with torch.no_grad():
        return model(**prepare_batch(rows))


def test_row_independent_of_batch_and_padding(tiny_model):
    alone = _run(tiny_model, ["CTXAAA,MKTAYIAK"])
    with_others = _run(tiny_model, ["CTXAAA,MKTAYIAK", "W" * 40, "AC,DE,FG"])
    n = alone.logits.shape[1]
    assert torch.allclose(alone.logits[0], with_others.logits[0, :n], atol=1e-5)
    assert torch.allclose(alone.embeddings[0], with_others.embeddings[0, :n], atol=1e-5)


def test_context_unaffected_by_query(tiny_model):
    a = _run(tiny_model, ["ACDEFG,HIKLMN,PQRST"])
    b = _run(tiny_model, ["ACDEFG,HIKLMN,WWYYVVWW"])
    n_ctx = 2 * 4 + 6 + 6
    assert torch.allclose(a.embeddings[0, :n_ctx], b.embeddings[0, :n_ctx], atol=1e-6)
    # ... but the query does see the context.
    c = _run(tiny_model, ["AAAAAA,HIKLMN,PQRST"])
    assert not torch.allclose(a.embeddings[0, -9:], c.embeddings[0, -9:], atol=1e-3)


def test_within_seq_layer_ignores_other_sequences(tiny_model):
    """Up to the first global layer, a token's state depends on its own sequence only."""
    first_global = next(i for i, layer in enumerate(tiny_model.model.layers) if layer.is_global)
    captured = []
    hook = tiny_model.model.layers[first_global - 1].register_forward_hook(lambda m, i, o: captured.append(o))
    _run(tiny_model, ["ACDEFG,MKTAYI"])
    _run(tiny_model, ["WWWWWWWWWWWW,MKTAYI"])
    hook.remove()
    assert torch.allclose(captured[0][0, -10:], captured[1][0, -10:], atol=1e-6)


def test_float32_vs_bfloat16(tiny_model):
    batch = prepare_batch(["ACDEFGHIK,MKTAYIAKQRQISFVKSHFSRQ", "MKV"])
    with torch.no_grad():
        ref = tiny_model(**batch)
        bf = tiny_model.to(torch.bfloat16)(**batch)
        tiny_model.float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = tiny_model(**batch)
    valid = batch["sequence_ids"] >= 0
    for out in (bf, auto):
        assert out.logits.dtype == torch.float32
        err = (out.logits - ref.logits)[valid].abs().max()
        scale = ref.logits[valid].abs().max()
        assert err / scale < 0.05, float(err / scale)
        cos = F.cosine_similarity(out.embeddings[valid].float(), ref.embeddings[valid], dim=-1)
        assert cos.min() > 0.99


def test_gradient_checkpointing_same_gradients(tiny_model):
    batch = prepare_batch(["ACDEFG,MKTAYIAK", "MKV"])
    tiny_model.train()
    grads = []
    for flag in (False, True):
        tiny_model.zero_grad()
        tiny_model.set_gradient_checkpointing(flag)
        tiny_model(**batch).logits.square().mean().backward()
        grads.append(tiny_model.model.layers[0].ffn.mlp.w1.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_clip_rope_forward_is_the_formula_and_backward_passes_gradcheck():
    """clip_rope = RoPE(clamp(x)) op for op; its hand-written backward agrees with finite differences,
    with some entries clipped (zero gradient) and none clipped (no mask kept)."""
    from e1min.model import _ClipRope, clip_rope, rope_cos_sin, rotate_half

    torch.manual_seed(0)
    cos, sin = rope_cos_sin(torch.arange(7)[None], 8, 10000.0, torch.float64)
    x = (torch.randn(1, 2, 7, 8, dtype=torch.float64) * 3).requires_grad_(True)
    y = x.detach().clamp(-4.0, 4.0)
    assert torch.equal(clip_rope(x, 4.0, cos, sin), y * cos + rotate_half(y) * sin)
    assert bool((x.abs() > 4.0).any())  # the check below covers clipped entries
    assert torch.autograd.gradcheck(lambda t: _ClipRope.apply(t, 4.0, cos, sin), (x,))
    assert torch.autograd.gradcheck(lambda t: _ClipRope.apply(t, 100.0, cos, sin), (x,))
    assert torch.autograd.gradcheck(lambda t: _ClipRope.apply(t, 4.0, None, None), (x,))
    (g,) = torch.autograd.grad(clip_rope(x, 4.0, None, None).sum(), x)
    assert torch.equal(g, (x.abs() <= 4.0).double())


def test_silu_gate_backward_passes_gradcheck():
    from e1min.model import _SiluGate

    torch.manual_seed(0)
    a, b = (torch.randn(3, 5, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.equal(_SiluGate.apply(a, b), F.silu(a) * b)
    assert torch.autograd.gradcheck(_SiluGate.apply, (a, b))
