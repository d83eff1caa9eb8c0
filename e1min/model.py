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
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if self.n_kv != self.n_heads:
            k = k.repeat_interleave(self.n_heads // self.n_kv, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv, dim=1)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
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
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


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

    def __init__(self, config: E1Config):
        super().__init__()
        self.config = config
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
        within_mask, global_mask = attention_masks(sequence_ids)
        rope_within = rope_cos_sin(within_seq_position_ids, cfg.head_dim, cfg.rope_theta_within_seq, dtype)
        rope_global = rope_cos_sin(global_position_ids, cfg.head_dim, cfg.rope_theta_global, dtype)
        for layer in self.layers:
            cos, sin = rope_global if layer.is_global else rope_within
            mask = global_mask if layer.is_global else within_mask
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(layer, h, cos, sin, mask, use_reentrant=False)
            else:
                h = layer(h, cos, sin, mask)
        return self.norm(h)


class E1ForMaskedLM(nn.Module):
    """E1Model plus the pretrained 4-layer MLM head. ``model(**batch)`` -> E1Output."""

    def __init__(self, config: E1Config):
        super().__init__()
        self.config = config
        self.model = E1Model(config)
        h = config.hidden_size
        self.mlm_head = nn.Sequential(
            nn.Linear(h, h), nn.GELU(), nn.LayerNorm(h, eps=config.rms_norm_eps), nn.Linear(h, config.vocab_size)
        )

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

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each layer in backward (non-reentrant) to save activation memory."""
        self.model.gradient_checkpointing = enabled
