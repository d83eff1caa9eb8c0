"""E1, written out: embeddings, RMSNorm, RoPE, two kinds of attention, gated MLP, MLM head.

Module paths equal the checkpoint's tensor names (``model.layers.0.norm_attn_norm.self_attn.q_proj.weight``,
...), so a released ``model.safetensors`` loads as a plain state dict.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from e1min.config import E1Config
from e1min.runtime import release_free_memory


@dataclass
class E1Output:
    """``logits``: (B, L, vocab) float32 MLM logits, or None when not requested.
    ``embeddings``: (B, L, H) final-norm hidden states."""

    logits: torch.Tensor | None
    embeddings: torch.Tensor


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (B, 1, L, head_dim) for integer positions (B, L); padding (-1) maps to 0."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim))
    angles = positions.clamp(min=0).float()[..., None] * inv_freq
    emb = torch.cat((angles, angles), dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def attention_masks(sequence_ids: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Boolean SDPA masks (B, 1, L, L) for within-sequence and global layers, True = may attend.

    Within-sequence: same sequence id. Global: key's sequence id <= query's (block-causal).
    Padding (id -1) is never a key; a padding query attends only to itself so its row is not empty.
    Returns (None, None) when every row is one unpadded sequence: then both kinds attend everywhere.
    This is the dense reference path (``attn_impl="dense"``): O(L^2) memory per forward.
    """
    valid = sequence_ids >= 0
    if bool(valid.all()) and bool((sequence_ids == 0).all()):
        return None, None
    q, k = sequence_ids[:, :, None], sequence_ids[:, None, :]
    diag = torch.eye(sequence_ids.shape[1], dtype=torch.bool, device=sequence_ids.device)
    key_ok = valid[:, None, :]
    within = ((q == k) & key_ok) | diag
    glob = ((k <= q) & key_ok) | diag
    return within[:, None], glob[:, None]


# ---------------------------------------------------------------------------------------------
# Structured attention: compute only the blocks E1's masks allow.
#
# In a row built by the tokenizer, sequence ids run 0,0,..,1,1,..,s,s and padding (-1) comes last.
# Then a within-sequence layer is plain attention inside each sequence's token range, and a global
# layer lets sequence s attend to the row's prefix up to the end of s. Both are lists of
# (row, query range, key range) blocks; each block is an unmasked (or, for a global chunk of several
# short sequences, a small block-causal masked) flash-attention call. Cost is sum(len^2) for
# within-sequence layers and about half of L^2 for global ones, memory is linear in L: the CPU flash
# kernel keeps only the log-sum-exp per query for backward, never the probabilities.
# ---------------------------------------------------------------------------------------------
# Global-layer query chunks gather consecutive sequences up to this many tokens: bigger blocks run the
# flash kernel more efficiently; the price is the block-causal mask inside a chunk (a few % extra FLOPs).
GLOBAL_QUERY_CHUNK = 512
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_CPU_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


@dataclass(frozen=True)
class BlockRanges:
    """One layer kind's attention as blocks ``(row, q0, q1, k0, k1, masked)``: queries q0:q1 of ``row``
    attend to keys k0:k1; ``masked`` blocks (several sequences in one global chunk) also need key id <= query id.
    Query ranges are disjoint; padding queries are in no block (their output is 0)."""

    blocks: tuple[tuple[int, int, int, int, int, bool], ...]
    sequence_ids: torch.Tensor

    def block_mask(self, row: int, q0: int, q1: int, k0: int, k1: int, dtype: torch.dtype) -> torch.Tensor:
        """Additive float mask (q1-q0, k1-k0) of a masked global block: 0 where key id <= query id, else -inf."""
        sid = self.sequence_ids[row]
        ok = sid[k0:k1][None, :] <= sid[q0:q1][:, None]
        return torch.zeros(ok.shape, dtype=dtype, device=sid.device).masked_fill_(~ok, float("-inf"))


def sequence_spans(sequence_ids: torch.Tensor) -> list[tuple[int, int, int]] | None:
    """(row, start, end) of every sequence, row-major; None unless each row is runs of non-decreasing ids
    followed by padding (the layout ``prepare_batch`` and ``collate`` produce)."""
    sid = sequence_ids
    valid = sid >= 0
    padding_last = bool((valid[:, 1:] <= valid[:, :-1]).all())
    non_decreasing = bool(((sid[:, 1:] >= sid[:, :-1]) | ~valid[:, 1:]).all())
    if not (padding_last and non_decreasing):
        return None
    b, n = sid.shape
    # One flat run key per (row, id); padding gets a per-row negative key so runs never cross rows.
    rows = torch.arange(b, device=sid.device)[:, None]
    key = torch.where(valid, rows * (int(sid.max()) + 2) + sid, -1 - rows).flatten()
    values, counts = torch.unique_consecutive(key, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    keep = values >= 0
    row = starts[keep] // n
    start = starts[keep] - row * n
    return list(zip(row.tolist(), start.tolist(), (start + counts[keep]).tolist()))


def structured_ranges(sequence_ids: torch.Tensor, chunk: int = GLOBAL_QUERY_CHUNK) -> tuple[BlockRanges, BlockRanges] | None:
    """Within-sequence and global ``BlockRanges`` of a batch, or None when its layout is not the tokenizer's."""
    spans = sequence_spans(sequence_ids)
    if spans is None:
        return None
    within = tuple((r, s, e, s, e, False) for r, s, e in spans)
    glob = []
    for r, s, e in spans:  # one step per sequence, not per token
        # Extend the previous chunk of the same row while it is short; keys are always the prefix [0, end).
        if glob and glob[-1][0] == r and glob[-1][2] == s and glob[-1][2] - glob[-1][1] < chunk:
            glob[-1] = (r, glob[-1][1], e, 0, e, True)
        else:
            glob.append((r, s, e, 0, e, False))
    return BlockRanges(within, sequence_ids), BlockRanges(tuple(glob), sequence_ids)


class _BlockAttention(torch.autograd.Function):
    """Flash attention (CPU kernel) over disjoint query blocks, each with its own key range.

    One autograd node for all blocks: backward writes each block's dq into place and adds its dk/dv into
    the key range, instead of autograd materialising a full-size zero gradient per slice. Saved for
    backward: q, k, v, output and one log-sum-exp per query (no L x L tensor; masks are rebuilt).
    """

    @staticmethod
    def forward(ctx, q, k, v, ranges: BlockRanges):
        b, h, n, d = q.shape
        out = q.new_zeros(b, n, h, d).transpose(1, 2)  # (B, L, H, D) memory: o_proj's reshape is then free
        lse = None
        for r, q0, q1, k0, k1, masked in ranges.blocks:
            mask = ranges.block_mask(r, q0, q1, k0, k1, q.dtype) if masked else None
            o, block_lse = _FLASH_CPU(q[r : r + 1, :, q0:q1], k[r : r + 1, :, k0:k1], v[r : r + 1, :, k0:k1], attn_mask=mask)
            if lse is None:
                lse = block_lse.new_zeros(b, h, n)
            out[r : r + 1, :, q0:q1] = o
            lse[r : r + 1, :, q0:q1] = block_lse
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.ranges = ranges
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for r, q0, q1, k0, k1, masked in ctx.ranges.blocks:
            mask = ctx.ranges.block_mask(r, q0, q1, k0, k1, q.dtype) if masked else None
            qs, ks = (r, slice(None), slice(q0, q1)), (r, slice(None), slice(k0, k1))
            gq, gk, gv = _FLASH_CPU_BACKWARD(
                grad_out[r : r + 1, :, q0:q1],
                q[r : r + 1, :, q0:q1],
                k[r : r + 1, :, k0:k1],
                v[r : r + 1, :, k0:k1],
                out[r : r + 1, :, q0:q1],
                lse[r : r + 1, :, q0:q1],
                0.0,
                False,
                attn_mask=mask,
            )
            dq[qs] = gq[0]
            dk[ks] += gk[0]
            dv[ks] += gv[0]
        return dq, dk, dv, None


def flex_block_masks(sequence_ids: torch.Tensor):
    """CUDA: FlexAttention BlockMasks (within, global) from ``sequence_ids``; fully masked tiles are skipped."""
    from torch.nn.attention.flex_attention import create_block_mask

    sid = sequence_ids
    b, n = sid.shape

    def within(bi, hi, qi, ki):
        return (sid[bi, ki] >= 0) & (sid[bi, ki] == sid[bi, qi])

    def glob(bi, hi, qi, ki):
        return (sid[bi, ki] >= 0) & (sid[bi, ki] <= sid[bi, qi])

    return (create_block_mask(within, b, None, n, n, device=sid.device), create_block_mask(glob, b, None, n, n, device=sid.device))


_compiled_flex = None


def flex_attention(q, k, v, block_mask):
    """torch.compile'd FlexAttention (compiled once per process; uncompiled flex is a slow reference)."""
    global _compiled_flex
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention as fa

        _compiled_flex = torch.compile(fa)
    return _compiled_flex(q, k, v, block_mask=block_mask)


ATTN_IMPLS = ("structured", "dense")


def layer_masks(sequence_ids: torch.Tensor, impl: str = "structured"):
    """What the within-sequence and global layers attend with, built once per forward.

    Each is None (one unpadded sequence per row: plain SDPA), a dense boolean mask (``impl="dense"``,
    or layouts the structured path does not handle), ``BlockRanges`` (CPU) or a FlexAttention BlockMask (CUDA).
    """
    if impl not in ATTN_IMPLS:
        raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {impl!r}")
    valid = sequence_ids >= 0
    if bool(valid.all()) and bool((sequence_ids == 0).all()):
        return None, None  # today's fast path: every row one unpadded sequence
    if impl == "structured":
        if sequence_ids.device.type == "cpu" and _FLASH_CPU is not None:
            ranges = structured_ranges(sequence_ids)
            if ranges is not None:
                return ranges
        elif sequence_ids.device.type == "cuda" and hasattr(torch.nn.attention, "flex_attention"):
            return flex_block_masks(sequence_ids)
    return attention_masks(sequence_ids)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v for (B, H, L, D) inputs and any ``layer_masks`` mask kind."""
    if mask is None or isinstance(mask, torch.Tensor):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if isinstance(mask, BlockRanges):
        return _BlockAttention.apply(q, k, v, mask)
    return flex_attention(q, k, v, mask)


def clip(x: torch.Tensor, c: float) -> torch.Tensor:
    """``x.clamp(-c, c)``; its backward keeps a boolean mask of the clipped entries, and none at all when
    nothing was clipped (the usual case), instead of a float copy of ``x``."""
    return clip_rope(x, c, None, None)


def clip_rope(x: torch.Tensor, c: float | None, cos: torch.Tensor | None, sin: torch.Tensor | None) -> torch.Tensor:
    """RoPE of ``x.clamp(-c, c)``: ``y * cos + rotate_half(y) * sin`` (``c`` None: no clamp; ``cos`` None: no RoPE).

    The forward is the textbook formula op for op; with grad, one autograd node whose backward is
    ``g * cos - rotate_half(g * sin)`` zeroed where ``x`` was clipped.
    """
    if x.requires_grad and torch.is_grad_enabled():
        return _ClipRope.apply(x, c, cos, sin)
    return _clip_rope_forward(x, c, cos, sin)


def _clip_rope_forward(x, c, cos, sin):
    y = x if c is None else x.clamp(-c, c)
    return y if cos is None else y * cos + rotate_half(y) * sin


class _ClipRope(torch.autograd.Function):
    """``clip_rope`` with grad: saves the shared cos/sin tables and, if anything was clipped, a bool mask."""

    @staticmethod
    def forward(ctx, x, c, cos, sin):
        out = _clip_rope_forward(x, c, cos, sin)
        clipped = None
        if c is not None:
            clipped = x.abs() > c  # True where the clamp cut: its gradient is 0 there
            # On the CPU, skip the mask when nothing was cut; on a GPU that test would be a device sync per call.
            if x.device.type == "cpu" and not bool(clipped.any()):
                clipped = None
        ctx.save_for_backward(cos, sin, clipped)
        return out

    @staticmethod
    def backward(ctx, grad):
        cos, sin, clipped = ctx.saved_tensors
        g = grad if cos is None else grad * cos - rotate_half(grad * sin)
        if clipped is not None:
            g = g.masked_fill(clipped, 0.0)
        return g, None, None, None


class _SiluGate(torch.autograd.Function):
    """``silu(a) * b`` saving only a and b for backward (silu(a) is recomputed): one L x I tensor less per layer."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return F.silu(a) * b

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        # aten's fused silu_backward: grad * s * (1 + a * (1 - s)) in one pass (s = sigmoid(a))
        return torch.ops.aten.silu_backward(grad * b, a), grad * F.silu(a)


class Attention(nn.Module):
    def __init__(self, config: E1Config):
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.clip_qkv = config.clip_qkv
        h, kv = config.hidden_size, self.n_kv * self.head_dim
        self.q_proj = nn.Linear(h, h, bias=False)
        self.k_proj = nn.Linear(h, kv, bias=False)
        self.v_proj = nn.Linear(h, kv, bias=False)
        self.o_proj = nn.Linear(h, h, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.n_kv, self.head_dim).transpose(1, 2)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q, k = clip_rope(q, self.clip_qkv, cos, sin), clip_rope(k, self.clip_qkv, cos, sin)
        if self.clip_qkv is not None:
            v = clip(v, self.clip_qkv)
        if self.n_kv != self.n_heads:
            k = k.repeat_interleave(self.n_heads // self.n_kv, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv, dim=1)
        a = attend(q, k, v, mask)
        return self.o_proj(a.transpose(1, 2).reshape(b, n, -1))


class NormAttentionNorm(nn.Module):
    """Pre-norm attention with its residual, then the post-attention norm that feeds the MLP."""

    def __init__(self, config: E1Config):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, h, cos, sin, mask) -> tuple[torch.Tensor, torch.Tensor]:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask)
        return h, self.post_attention_layernorm(h)


class GatedMLP(nn.Module):
    def __init__(self, config: E1Config):
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w3 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w1(x), self.w3(x)
        if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
            return self.w2(_SiluGate.apply(a, b))
        return self.w2(F.silu(a) * b)


class FFN(nn.Module):
    def __init__(self, config: E1Config):
        super().__init__()
        self.mlp = GatedMLP(config)


class DecoderLayer(nn.Module):
    def __init__(self, config: E1Config, is_global: bool):
        super().__init__()
        self.is_global = is_global
        self.norm_attn_norm = NormAttentionNorm(config)
        self.ffn = FFN(config)

    def forward(self, h, cos, sin, mask) -> torch.Tensor:
        h, x = self.norm_attn_norm(h, cos, sin, mask)
        return h + self.ffn.mlp(x)


class E1Model(nn.Module):
    """The E1 encoder: ids + positions + sequence ids -> final-norm hidden states (B, L, H)."""

    def __init__(self, config: E1Config, attn_impl: str = "structured"):
        super().__init__()
        self.config = config
        # "structured": compute only the blocks the masks allow (linear memory); "dense": B x L x L masks.
        self.attn_impl = attn_impl
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_seq_id = nn.Embedding(config.max_num_sequences, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, config.is_global_layer(i)) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False

    def forward(
        self,
        input_ids: torch.Tensor,
        within_seq_position_ids: torch.Tensor,
        global_position_ids: torch.Tensor,
        sequence_ids: torch.Tensor,
    ) -> torch.Tensor:
        cfg = self.config
        h = self.embed_tokens(input_ids) + self.embed_seq_id(sequence_ids.clamp(min=0))
        dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype
        # Masks and RoPE tables are built once per forward, not once per layer.
        within_mask, global_mask = layer_masks(sequence_ids, self.attn_impl)
        rope_within = rope_cos_sin(within_seq_position_ids, cfg.head_dim, cfg.rope_theta_within_seq, dtype)
        rope_global = rope_cos_sin(global_position_ids, cfg.head_dim, cfg.rope_theta_global, dtype)
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            cos, sin = rope_global if layer.is_global else rope_within
            mask = global_mask if layer.is_global else within_mask
            if recompute:
                h = checkpoint(layer, h, cos, sin, mask, use_reentrant=False)
                if h.device.type == "cpu":
                    # A checkpointed layer frees all its activations on return; without this glibc keeps them
                    # (fragmented, mostly never reused): 64 context rows, E1-150m: 10.4 -> 5.7-6.5 GB peak RSS.
                    release_free_memory()
            else:
                h = layer(h, cos, sin, mask)
        return self.norm(h)


class E1ForMaskedLM(nn.Module):
    """E1Model plus the pretrained 4-layer MLM head. ``model(**batch)`` -> E1Output."""

    def __init__(self, config: E1Config, attn_impl: str = "structured"):
        super().__init__()
        self.config = config
        self.model = E1Model(config, attn_impl)
        h = config.hidden_size
        self.mlm_head = nn.Sequential(nn.Linear(h, h), nn.GELU(), nn.LayerNorm(h, eps=config.rms_norm_eps), nn.Linear(h, config.vocab_size))

    def forward(
        self,
        input_ids: torch.Tensor,
        within_seq_position_ids: torch.Tensor,
        global_position_ids: torch.Tensor,
        sequence_ids: torch.Tensor,
        query_residue_mask: torch.Tensor | None = None,
        compute_logits: bool = True,
    ) -> E1Output:
        """``query_residue_mask`` (from ``prepare_batch``) is accepted and ignored, so ``model(**batch)`` works."""
        emb = self.model(input_ids, within_seq_position_ids, global_position_ids, sequence_ids)
        logits = self.mlm_head(emb).float() if compute_logits else None
        return E1Output(logits=logits, embeddings=emb)

    def set_attn_impl(self, impl: str) -> None:
        """``"structured"`` (default: only allowed blocks, memory linear in L) or ``"dense"`` (reference masks)."""
        if impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {impl!r}")
        self.model.attn_impl = impl

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each layer in backward (non-reentrant) to save activation memory."""
        self.model.gradient_checkpointing = enabled
