"""Attention by device: E1's two masks, built once per forward from the batch's sequence ids, and the kernel that
applies them. ``model.py`` calls ``layer_masks`` once per forward and ``attend`` in every layer.

Sequence ids run 0,0,..,1,1,..,s,s per row with padding (-1) last (``prepare_batch`` / ``collate``).
Within-sequence layers let a token attend to its own sequence; global layers to every sequence up to its own
(block-causal). Three ways to compute that (``E1ForMaskedLM.set_attn_impl``):

- ``"structured"`` (default): the fastest exact path for the device. CPU: ``BlockRanges``, the CPU flash kernel
  over just the allowed (row, query range, key range) blocks. CUDA: FlexAttention (below).
- ``"flex"``: FlexAttention with ``BlockMask``s built from the sequence spans in O((L/128)^2) (never an L x L
  evaluation), one mask function for both layer kinds, compiled once with dynamic shapes. Runs on CUDA for
  training and inference, and on the CPU for inference (torch has no CPU flex backward).
- ``"dense"``: boolean (B, 1, L, L) masks and SDPA, the reference the others are tested against.

A row that is one unpadded sequence needs no mask at all: then every path is plain SDPA.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from e1min.errors import E1minError, first_line
from e1min.runtime import strict_recompiles

try:
    from torch.nn.attention.flex_attention import BlockMask
    from torch.nn.attention.flex_attention import flex_attention as _flex_attention
except ImportError:  # torch without FlexAttention: "structured" on CUDA falls back to dense (said once)
    BlockMask, _flex_attention = None, None

log = logging.getLogger("e1min")

ATTN_IMPLS = ("structured", "flex", "dense")


class AttentionError(E1minError, RuntimeError):
    """An attention path that cannot run here (flex backward on the CPU, a recompile-limit hit)."""


# ---------------------------------------------------------------------------------------------
# Dense reference
# ---------------------------------------------------------------------------------------------
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
# Structured attention (CPU): compute only the blocks E1's masks allow.
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


# ---------------------------------------------------------------------------------------------
# FlexAttention: the same structure as BlockMasks of 128 x 128 tiles. A tile is skipped (no mask in it
# allows anything), full (everything allowed: no mask function evaluated) or partial (mask function per
# element). Tiles are classified from each tile's min/max sequence id, so building both masks costs
# O(B * (L/128)^2) whatever L is; the kernel never sees a skipped tile.
# ---------------------------------------------------------------------------------------------
FLEX_BLOCK = 128
# Dynamic shapes keep this to a few graphs (B = 1 vs B > 1, grad vs no grad); a run that still exceeds it
# raises instead of silently falling back to unfused flex, which materialises the L x L scores.
FLEX_RECOMPILE_LIMIT = 64
FLEX_GRAPHS_EXPECTED = 8  # B = 1 or more, one query tile or more, grad or not: more is logged once


def _flex_mask_mod(padded_ids: torch.Tensor, is_global: torch.Tensor):
    """The mask function of both layer kinds (one code object, so one compiled graph serves both)."""

    def mask_mod(b, h, q, k):
        sq, sk = padded_ids[b, q], padded_ids[b, k]
        return (sk >= 0) & torch.where(is_global, sk <= sq, sk == sq)

    return mask_mod


def _tile_lists(allowed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, nq, nk) bool tiles -> BlockMask's (B, 1, nq) counts and (B, 1, nq, nk) indices (listed tiles first)."""
    counts = allowed.sum(-1, dtype=torch.int32)[:, None]
    order = torch.argsort(allowed.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)[:, None]
    return counts, order


def flex_block_masks(sequence_ids: torch.Tensor, min_batch: int = 1) -> tuple["BlockMask", "BlockMask"]:
    """(within, global) FlexAttention BlockMasks from sequence ids, in O(B * (L/128)^2) time and memory.

    ``min_batch``: pad the batch with all-padding rows up to this size (``attend`` pads q, k, v to match).
    """
    if BlockMask is None:
        raise AttentionError(f"this torch ({torch.__version__}) has no FlexAttention; use attn_impl 'structured' or 'dense'")
    b, n = sequence_ids.shape
    nb = -(-n // FLEX_BLOCK)
    padded = torch.full((max(b, min_batch), nb * FLEX_BLOCK), -1, dtype=sequence_ids.dtype, device=sequence_ids.device)
    padded[:b, :n] = sequence_ids
    tiles = padded.view(padded.shape[0], nb, FLEX_BLOCK)
    valid = tiles >= 0
    some, every = valid.any(-1), valid.all(-1)
    lo = torch.where(valid, tiles, torch.iinfo(tiles.dtype).max).amin(-1)
    hi = torch.where(valid, tiles, -1).amax(-1)
    q = (slice(None), slice(None), None)  # query tile i on dim 1, key tile j on dim 2
    k = (slice(None), None, slice(None))
    both = some[q] & some[k]
    # Within: the tiles' id ranges overlap; full when both tiles are all one and the same sequence.
    within_any = both & (lo[q] <= hi[k]) & (lo[k] <= hi[q])
    within_full = every[q] & every[k] & (lo[q] == hi[q]) & (lo[k] == hi[k]) & (lo[q] == lo[k])
    # Global: some key id <= some query id; full when every key id <= every query id.
    global_any = both & (lo[k] <= hi[q])
    global_full = every[q] & every[k] & (hi[k] <= lo[q])
    masks = []
    for any_, full, is_global in ((within_any, within_full, False), (global_any, global_full, True)):
        # A fill, not a host-to-device copy (which would wait for the GPU's queue).
        flag = torch.full((), is_global, dtype=torch.bool, device=sequence_ids.device)
        masks.append(
            BlockMask.from_kv_blocks(
                *_tile_lists(any_ & ~full),
                *_tile_lists(full),
                BLOCK_SIZE=FLEX_BLOCK,
                mask_mod=_flex_mask_mod(padded, flag),
                seq_lengths=(n, n),
            )
        )
    return masks[0], masks[1]


_compiled_flex = None


def compiled_flex():
    """FlexAttention compiled once per process with dynamic shapes (uncompiled flex is a slow reference)."""
    global _compiled_flex
    if _compiled_flex is None:
        strict_recompiles(FLEX_RECOMPILE_LIMIT)
        _compiled_flex = torch.compile(_flex_attention, dynamic=True)
    return _compiled_flex


def flex_graph_count() -> int:
    """How many graphs torch.compile holds for FlexAttention in this process (bounded by FLEX_RECOMPILE_LIMIT)."""
    if _flex_attention is None:
        return 0
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    return len(_debug_get_cache_entry_list(_flex_attention.__code__))


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: "BlockMask") -> torch.Tensor:
    if q.device.type == "cpu" and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        raise AttentionError("attn_impl 'flex' has no backward on the CPU in torch; train on the CPU with 'structured' (the default)")
    b = q.shape[0]
    if q.device.type == "cpu":
        # Inductor's CPU flex kernel (torch 2.13) fails to build (C++ codegen) for a batch of 1, for transposed
        # inputs, and when a size equals another one (a batch of 4 with 4 heads: "duck shaping" gives both one
        # symbol). So: contiguous (B, H, L, D) inputs, padded to the mask's padding rows (see layer_masks), and no
        # duck shaping (process-wide; it only means fewer shared size symbols). Inference only.
        import torch.fx.experimental._config as fx_config

        fx_config.use_duck_shape = False
        pad = (0, 0, 0, 0, 0, 0, 0, mask.kv_num_blocks.shape[0] - b)
        q, k, v = (F.pad(t, pad).contiguous() for t in (q, k, v))
    try:
        out = compiled_flex()(q, k, v, block_mask=mask, enable_gqa=k.shape[1] != q.shape[1])
    except Exception as e:
        if type(e).__name__ == "FailOnRecompileLimitHit":
            raise AttentionError(
                f"FlexAttention hit torch.compile's recompile limit ({FLEX_RECOMPILE_LIMIT} graphs); refusing to fall back to "
                f"unfused flex (it materialises the L x L scores): {first_line(e)}"
            ) from e
        raise
    global _warned_graphs
    if not _warned_graphs and flex_graph_count() > FLEX_GRAPHS_EXPECTED:
        _warned_graphs = True
        log.warning(
            "FlexAttention: %d compiled graphs (more than the %d expected); recompiles cost time", flex_graph_count(), FLEX_GRAPHS_EXPECTED
        )
    return out[:b]


_warned_graphs = False


# ---------------------------------------------------------------------------------------------
# Choosing and applying
# ---------------------------------------------------------------------------------------------
_announced: set[tuple[str, str]] = set()


def _announce(path: str, device: torch.device) -> None:
    if (path, device.type) not in _announced:
        _announced.add((path, device.type))
        log.info("attention on %s: %s", device.type, path)


def layer_masks(sequence_ids: torch.Tensor, impl: str = "structured"):
    """What the within-sequence and global layers attend with, built once per forward.

    Each is None (one unpadded sequence per row: plain SDPA), ``BlockRanges`` (CPU structured), a
    FlexAttention ``BlockMask`` (CUDA structured, or ``impl="flex"``) or a dense boolean mask (``impl="dense"``,
    or layouts the structured path does not handle).
    """
    if impl not in ATTN_IMPLS:
        raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {impl!r}")
    device = sequence_ids.device
    if not bool((sequence_ids != 0).any()):  # one host sync per forward (not per layer)
        return None, None  # every row one unpadded sequence
    if impl == "structured" and device.type == "cpu" and _FLASH_CPU is not None:
        ranges = structured_ranges(sequence_ids)
        if ranges is not None:
            _announce("structured blocks (CPU flash kernel)", device)
            return ranges
    elif impl == "flex" or (impl == "structured" and device.type == "cuda"):
        if BlockMask is not None:  # tiles are classified from id ranges: exact for any id layout
            _announce("FlexAttention block masks (compiled, dynamic shapes)", device)
            # Inductor's CPU flex kernel fails to build for a batch of 1 (torch 2.13): pad to 2 rows there.
            return flex_block_masks(sequence_ids, min_batch=2 if device.type == "cpu" else 1)
        if BlockMask is None:
            _announce(f"dense masks (this torch {torch.__version__} has no FlexAttention)", device)
    _announce("dense masks (reference)", device)
    return attention_masks(sequence_ids)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v for (B, H, L, D) queries and (B, H_kv, L, D) keys/values, any mask kind."""
    gqa = k.shape[1] != q.shape[1]
    if mask is None or isinstance(mask, torch.Tensor):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    if isinstance(mask, BlockRanges):
        if gqa:  # the CPU flash kernel has no grouped-query mode
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        return _BlockAttention.apply(q, k, v, mask)
    return _flex(q, k, v, mask)
