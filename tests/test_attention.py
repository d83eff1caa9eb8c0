"""Structured attention (only the blocks E1's masks allow) against the dense masked path, float32."""

import numpy as np
import pytest
import torch

import e1min.attention as attention_mod
from e1min.attention import BlockRanges, attention_masks, layer_masks, structured_ranges
from e1min.config import preset
from e1min.lora import apply_lora
from e1min.random_checkpoint import random_model
from e1min.tokenizer import prepare_batch

ATOL = 1e-5
AA = "ACDEFGHIKLMNPQRSTVWY"


def seq(n, shift=0):
    return "".join(AA[(i * 7 + shift) % 20] for i in range(n))


# Rows with context, padding and uneven sequence lengths; a mixed batch (context row, single sequences, padded).
BATCHES = {
    "context_uneven": [",".join([seq(5), seq(17, 1), seq(3, 2), seq(11, 3), seq(30, 4)])],
    "mixed_padded": [",".join([seq(9), seq(14, 1), seq(25, 2)]), seq(12, 5), ",".join([seq(4, 3), seq(6, 6)]), seq(40, 7)],
    "single_padded": [seq(31), seq(8, 1), seq(19, 2)],
    "many_short": [",".join(seq(2 + (i % 5), i) for i in range(40)), seq(7)],
}


def ids(batch):
    return {k: batch[k] for k in ("input_ids", "within_seq_position_ids", "global_position_ids", "sequence_ids")}


def run(model, batch, impl):
    model.set_attn_impl(impl)
    with torch.no_grad():
        return model(**ids(batch))


@pytest.fixture(params=[1, 16, 512], ids=lambda c: f"chunk{c}")
def chunk(request, monkeypatch):
    """Global-layer query chunk: 1 = one sequence per block (no mask), larger = masked multi-sequence blocks."""
    monkeypatch.setattr(attention_mod, "GLOBAL_QUERY_CHUNK", request.param)
    return request.param


def lora_model(config, seed=1):
    """A float32 model with LoRA on every target and non-zero B, so every LoRA matrix gets a gradient."""
    model = random_model(config, seed=seed, dtype=torch.float32)
    apply_lora(model, r=4, alpha=8)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model.train()


def lora_grads(model, batch, impl):
    model.set_attn_impl(impl)
    model.zero_grad(set_to_none=True)
    out = model(**ids(batch))
    valid = batch["sequence_ids"] >= 0
    # Weighted so that every position's logits and embeddings matter differently.
    w = torch.linspace(0.5, 1.5, out.logits.shape[-1])
    loss = (out.logits[valid] * w).sin().sum() + out.embeddings[valid].square().mean()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("name", BATCHES)
def test_forward_matches_dense(tiny_model, name, chunk):
    batch = prepare_batch(BATCHES[name])
    dense, structured = run(tiny_model, batch, "dense"), run(tiny_model, batch, "structured")
    valid = batch["sequence_ids"] >= 0
    assert structured.logits.dtype == torch.float32
    torch.testing.assert_close(structured.logits[valid], dense.logits[valid], atol=ATOL, rtol=0)
    torch.testing.assert_close(structured.embeddings[valid], dense.embeddings[valid], atol=ATOL, rtol=0)


def test_structured_path_is_used(tiny_model):
    """Multi-sequence and padded batches take the block path, one unpadded sequence per row plain SDPA."""
    within, glob = layer_masks(prepare_batch(BATCHES["mixed_padded"])["sequence_ids"])
    assert isinstance(within, BlockRanges) and isinstance(glob, BlockRanges)
    assert layer_masks(prepare_batch([seq(10), seq(10, 1)])["sequence_ids"]) == (None, None)
    within, glob = layer_masks(prepare_batch(BATCHES["mixed_padded"])["sequence_ids"], "dense")
    assert within.dtype == torch.bool and within.shape[-1] == within.shape[-2]


def test_blocks_follow_sequences():
    sid = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2, -1], [0, 0, 0, 0, 0, 0, -1, -1, -1, -1]])
    within, glob = structured_ranges(sid, chunk=1)
    assert within.blocks == ((0, 0, 3, 0, 3, False), (0, 3, 5, 3, 5, False), (0, 5, 9, 5, 9, False), (1, 0, 6, 0, 6, False))
    # Global: each sequence's queries see the prefix up to its own end; padding is in no block.
    assert glob.blocks == ((0, 0, 3, 0, 3, False), (0, 3, 5, 0, 5, False), (0, 5, 9, 0, 9, False), (1, 0, 6, 0, 6, False))
    _, glob = structured_ranges(sid, chunk=4)  # sequences 0+1 share a masked chunk (3 < 4 tokens before 1 joins)
    assert glob.blocks[0] == (0, 0, 5, 0, 5, True)
    mask = glob.block_mask(0, 0, 5, 0, 5, torch.float32)
    assert torch.isinf(mask[:3, 3:]).all() and (mask[3:] == 0).all() and (mask[:3, :3] == 0).all()


def test_other_layouts_fall_back_to_dense_masks(tiny_model):
    """Ids that are not non-decreasing runs followed by padding (not what the tokenizer makes) use dense masks."""
    batch = prepare_batch(["ACDE,FGHIK", "MKV"])
    batch["sequence_ids"] = batch["sequence_ids"].flip(1)  # padding first, ids decreasing
    within, glob = layer_masks(batch["sequence_ids"])
    assert isinstance(within, torch.Tensor) and isinstance(glob, torch.Tensor)
    dense, structured = run(tiny_model, batch, "dense"), run(tiny_model, batch, "structured")
    torch.testing.assert_close(structured.logits, dense.logits, atol=0, rtol=0)


def test_unknown_impl_rejected(tiny_model):
    with pytest.raises(ValueError, match="attn_impl"):
        tiny_model.set_attn_impl("sparse")


def test_gqa_matches_dense(chunk):
    model = random_model(preset("tiny", num_hidden_layers=6, num_key_value_heads=2), seed=3, dtype=torch.float32)
    batch = prepare_batch(BATCHES["mixed_padded"])
    dense, structured = run(model, batch, "dense"), run(model, batch, "structured")
    valid = batch["sequence_ids"] >= 0
    torch.testing.assert_close(structured.logits[valid], dense.logits[valid], atol=ATOL, rtol=0)
    torch.testing.assert_close(structured.embeddings[valid], dense.embeddings[valid], atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "name,kv_heads,chunk_size",
    [("context_uneven", 4, 1), ("mixed_padded", 4, 16), ("mixed_padded", 2, 512), ("many_short", 2, 16)],
)
def test_lora_gradients_match_dense(name, kv_heads, chunk_size, monkeypatch):
    monkeypatch.setattr(attention_mod, "GLOBAL_QUERY_CHUNK", chunk_size)
    config = preset("tiny", num_hidden_layers=6, num_key_value_heads=kv_heads)
    model = lora_model(config)
    batch = prepare_batch(BATCHES[name])
    dense, structured = lora_grads(model, batch, "dense"), lora_grads(model, batch, "structured")
    assert dense.keys() == structured.keys() and len(dense) == 7 * 2 * config.num_hidden_layers
    for n in dense:
        torch.testing.assert_close(structured[n], dense[n], atol=ATOL, rtol=1e-4, msg=n)


def test_gradient_checkpointing_structured(tiny_config):
    model = lora_model(tiny_config)
    batch = prepare_batch(BATCHES["mixed_padded"])
    plain = lora_grads(model, batch, "structured")
    model.set_gradient_checkpointing(True)
    ckpt = lora_grads(model, batch, "structured")
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], atol=1e-6, rtol=0)


def test_padding_has_no_effect(tiny_model):
    """Real positions do not change with the padding's length or content (ids, positions)."""
    row = ",".join([seq(6), seq(9, 1), seq(13, 2)])
    alone = run(tiny_model, prepare_batch([row]), "structured")
    n = alone.logits.shape[1]
    for other in (seq(60, 3), ",".join([seq(30), seq(40, 1)])):
        batch = prepare_batch([row, other])
        pad = batch["sequence_ids"] < 0
        assert pad[0].any()
        padded = run(tiny_model, batch, "structured")
        torch.testing.assert_close(padded.logits[0, :n], alone.logits[0], atol=ATOL, rtol=0)
        # Scribble over the padding: other tokens and positions (sequence id stays -1, that is what padding is).
        batch["input_ids"][pad] = 20
        batch["within_seq_position_ids"][pad] = 5
        batch["global_position_ids"][pad] = 7
        scribbled = run(tiny_model, batch, "structured")
        torch.testing.assert_close(scribbled.logits[0, :n], alone.logits[0], atol=ATOL, rtol=0)
        torch.testing.assert_close(scribbled.logits[1], padded.logits[1], atol=ATOL, rtol=0)


def test_no_quadratic_tensor_saved_for_backward(tiny_config):
    """Backward keeps O(L) tensors only: nothing of L x L size (no mask, no probabilities) is saved."""
    model = lora_model(tiny_config)
    batch = prepare_batch([",".join(seq(20 + i % 7, i) for i in range(24))])
    n = batch["input_ids"].shape[1]
    largest = {}
    for impl in ("dense", "structured"):
        model.set_attn_impl(impl)
        sizes = []

        def pack(t, sizes=sizes):
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(**ids(batch)).logits.sum()
        largest[impl] = max(sizes)
    assert largest["dense"] >= n * n  # the dense path does keep an L x L mask (the reason for this path)
    assert largest["structured"] < n * n / 4, (largest, n)


def test_attention_masks_still_importable():
    within, glob = attention_masks(prepare_batch(["AC,DE"])["sequence_ids"])
    assert within.shape == glob.shape == (1, 1, 12, 12)


# -- FlexAttention (CUDA's path; its forward also runs on the CPU, compiled) ---------------------------------
FLEX_BATCHES = {**BATCHES, "one_context_row": [",".join([seq(7), seq(21, 1), seq(4, 2), seq(150, 3)])]}


@pytest.mark.parametrize("name", FLEX_BATCHES)
def test_flex_forward_matches_structured_and_dense(tiny_model, name):
    batch = prepare_batch(FLEX_BATCHES[name])
    valid = batch["sequence_ids"] >= 0
    dense, structured, flex = (run(tiny_model, batch, impl) for impl in ("dense", "structured", "flex"))
    for other in (dense, structured):
        torch.testing.assert_close(flex.logits[valid], other.logits[valid], atol=ATOL, rtol=0)
        torch.testing.assert_close(flex.embeddings[valid], other.embeddings[valid], atol=ATOL, rtol=0)


def test_flex_gqa_matches_dense():
    model = random_model(preset("tiny", num_hidden_layers=6, num_key_value_heads=2), seed=3, dtype=torch.float32)
    batch = prepare_batch(BATCHES["mixed_padded"])
    dense, flex = run(model, batch, "dense"), run(model, batch, "flex")
    valid = batch["sequence_ids"] >= 0
    torch.testing.assert_close(flex.embeddings[valid], dense.embeddings[valid], atol=ATOL, rtol=0)


def _random_rows(rng, rows, max_len):
    return [
        ",".join(seq(int(rng.integers(3, max_len)), int(rng.integers(20))) for _ in range(int(rng.integers(1, 6)))) for _ in range(rows)
    ]


def test_flex_tiles_equal_torchs_own_block_mask():
    """Tiles classified from id ranges (O((L/128)^2)) = create_block_mask's element-wise evaluation."""
    from torch.nn.attention.flex_attention import create_block_mask

    from e1min.attention import flex_block_masks

    rng = np.random.default_rng(0)
    for _ in range(4):
        sid = prepare_batch(_random_rows(rng, 3, 120))["sequence_ids"]
        b, n = sid.shape
        ours = flex_block_masks(sid)
        for mask, rule in zip(ours, ("within", "global")):

            def mod(bi, hi, qi, ki, rule=rule, sid=sid):
                ok = sid[bi, ki] == sid[bi, qi] if rule == "within" else sid[bi, ki] <= sid[bi, qi]
                return ok & (sid[bi, ki] >= 0)

            ref = create_block_mask(mod, b, None, n, n, device="cpu")
            assert torch.equal(mask.to_dense(), ref.to_dense()), rule
            assert torch.equal(mask.full_kv_num_blocks, ref.full_kv_num_blocks), rule


def test_flex_compiles_a_bounded_number_of_graphs():
    """15 batch shapes (B = 1..5, lengths 20..600): a handful of graphs, no recompile-limit fallback."""
    import warnings

    from e1min.attention import FLEX_RECOMPILE_LIMIT, flex_graph_count

    torch._dynamo.reset()  # count from zero, whatever earlier tests compiled
    model = random_model(preset("tiny", num_hidden_layers=3), seed=2, dtype=torch.float32)
    rng = np.random.default_rng(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # flex's unfused fallback warns that it materialises the scores
        for i in range(15):
            batch = prepare_batch(_random_rows(rng, 1 + i % 5, 20 + 40 * i))
            run(model, batch, "flex")
    assert 1 <= flex_graph_count() <= 4 < FLEX_RECOMPILE_LIMIT


def test_flex_recompile_limit_is_an_error_not_a_silent_fallback(tiny_model):
    import e1min.attention as att

    batch = prepare_batch(BATCHES["mixed_padded"])
    run(tiny_model, batch, "flex")  # float32 graph exists
    # flex's first use set the limit process-wide; capped at the graphs there are, one more is an error
    with torch._dynamo.config.patch(recompile_limit=att.flex_graph_count()), pytest.raises(att.AttentionError, match="recompile limit"):
        run(tiny_model.double(), batch, "flex")  # float64 needs one more graph


def test_flex_training_on_the_cpu_is_a_clear_error(tiny_config):
    from e1min.attention import AttentionError

    model = lora_model(tiny_config)
    with pytest.raises(AttentionError, match="no backward on the CPU"):
        lora_grads(model, prepare_batch(BATCHES["mixed_padded"]), "flex")


def test_flex_mask_memory_is_linear_in_length():
    """Both BlockMasks of a 32k-token context row: kilobytes of tiles, never an L x L evaluation (1 GB here)."""
    import subprocess
    import sys

    code = """
import resource, torch
from e1min.attention import flex_block_masks
n = 32768
sid = torch.repeat_interleave(torch.arange(n // 256), 256)[None]
sid[0, -100:] = -1
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
w, g = flex_block_masks(sid)
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
assert w.kv_num_blocks.shape == (1, 1, 256) and int(g.full_kv_num_blocks.sum()) > 0
print(grown)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert int(r.stdout.strip()) < 64 * 1024, r.stdout  # KiB: under 64 MB
