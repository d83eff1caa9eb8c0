"""E1, written out: embeddings, RMSNorm, RoPE, two kinds of attention (kernels in ``attention.py``), gated MLP, MLM head.

Module paths equal the checkpoint's tensor names (``model.layers.0.norm_attn_norm.self_attn.q_proj.weight``,
...), so a released ``model.safetensors`` loads as a plain state dict.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from e1min.attention import ATTN_IMPLS, attend, layer_masks
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


def clip(x: torch.Tensor, c: float) -> torch.Tensor:
    """``x.clamp(-c, c)``; its backward keeps a boolean mask of the clipped entries, and none at all when
    nothing was clipped (the usual case), instead of a float copy of ``x``."""
    return clip_rope(x, c, None, None)


def clip_rope(x: torch.Tensor, c: float | None, cos: torch.Tensor | None, sin: torch.Tensor | None) -> torch.Tensor:
    """RoPE of ``x.clamp(-c, c)``: ``y * cos + rotate_half(y) * sin`` (``c`` None: no clamp; ``cos`` None: no RoPE).

    The forward is the textbook formula op for op; with grad, one autograd node whose backward is
    ``g * cos - rotate_half(g * sin)`` zeroed where ``x`` was clipped.
    """
    if x.requires_grad and torch.is_grad_enabled() and not torch.compiler.is_compiling():
        return _ClipRope.apply(x, c, cos, sin)
    return _clip_rope_forward(x, c, cos, sin)  # also what torch.compile traces: inductor fuses it and derives the backward


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
        return self.out(attend(*self.qkv(x, cos, sin), mask))  # grouped-query heads are shared inside the kernel

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, H, L, D) queries and (B, H_kv, L, D) keys and values: projected, clipped, RoPE applied."""
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.n_kv, self.head_dim).transpose(1, 2)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q, k = clip_rope(q, self.clip_qkv, cos, sin), clip_rope(k, self.clip_qkv, cos, sin)
        if self.clip_qkv is not None:
            v = clip(v, self.clip_qkv)
        return q, k, v

    def out(self, a: torch.Tensor) -> torch.Tensor:
        b, _, n, _ = a.shape
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
        if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad) and not torch.compiler.is_compiling():
            return self.w2(_SiluGate.apply(a, b))
        return self.w2(F.silu(a) * b)


class FFN(nn.Module):
    def __init__(self, config: E1Config):
        super().__init__()
        self.mlp = GatedMLP(config)


class DecoderLayer(nn.Module):
    """Two tensor-only regions around the attention kernel; ``e1min.compile_model`` compiles the regions."""

    def __init__(self, config: E1Config, is_global: bool):
        super().__init__()
        self.is_global = is_global
        self.norm_attn_norm = NormAttentionNorm(config)
        self.ffn = FFN(config)
        self.regions = None  # (attention_inputs, attention_output) compiled by e1min.compile_model, shared by all layers

    def forward(self, h, cos, sin, mask) -> torch.Tensor:
        before, after = self.regions or (DecoderLayer.attention_inputs, DecoderLayer.attention_output)
        q, k, v = before(self, h, cos, sin)
        return after(self, h, attend(q, k, v, mask))

    def attention_inputs(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Input norm, q/k/v projections (LoRA), clip + RoPE."""
        return self.norm_attn_norm.self_attn.qkv(self.norm_attn_norm.input_layernorm(h), cos, sin)

    def attention_output(self, h: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """o_proj and the residual, the post-attention norm, the gated MLP and its residual."""
        h = h + self.norm_attn_norm.self_attn.out(a)
        return h + self.ffn.mlp(self.norm_attn_norm.post_attention_layernorm(h))


class E1Model(nn.Module):
    """The E1 encoder: ids + positions + sequence ids -> final-norm hidden states (B, L, H)."""

    def __init__(self, config: E1Config, attn_impl: str = "structured"):
        super().__init__()
        self.config = config
        # "structured": only the blocks the masks allow (CPU blocks, CUDA FlexAttention); "flex"; "dense": L x L masks.
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
        """``"structured"`` (default: only the allowed blocks, memory linear in L; FlexAttention on CUDA), ``"flex"``
        (FlexAttention on any device; the CPU only for inference) or ``"dense"`` (reference masks). See ``e1min.attention``."""
        if impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {impl!r}")
        self.model.attn_impl = impl

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each layer in backward (non-reentrant) to save activation memory."""
        self.model.gradient_checkpointing = enabled
