"""Regional compilation: torch.compile (inductor) fuses the elementwise work of every E1 decoder layer.

Each ``DecoderLayer`` is two tensor-only regions around its attention kernel: ``attention_inputs`` (RMSNorm,
q/k/v projections with LoRA, clip + RoPE) and ``attention_output`` (o_proj, residual, RMSNorm, gated MLP,
residual). ``compile_model`` compiles each region once, with dynamic shapes, and every layer shares those
graphs; attention stays a kernel call between them (the CPU block kernel, FlexAttention, SDPA), so a batch's
mask never becomes part of a graph. While torch.compile traces, e1min's hand-written autograd nodes
(LoRA, clip + RoPE, the SiLU gate) give way to their plain formulas, which inductor fuses and differentiates
itself. LoRA dropout then draws inductor's own random numbers: seeded per micro-batch like eager ones (so
world-size invariant and resume-exact), but not the same numbers as eager.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from e1min.errors import E1minError, first_line
from e1min.runtime import strict_recompiles

log = logging.getLogger("e1min")

# Graphs per region: (batch of 1 or more) x (grad or not) x (float32 or autocast) x (first layer or not) is 16.
RECOMPILE_LIMIT = 64


class CompileError(E1minError, RuntimeError):
    """Compiled layers that hit the recompile limit (never a silent fallback to eager)."""


_regions: tuple | None = None


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    from e1min.model import DecoderLayer

    return [m for m in model.modules() if isinstance(m, DecoderLayer)]


def _guarded(compiled, name: str):
    def call(*args):
        try:
            return compiled(*args)
        except Exception as e:
            if type(e).__name__ == "FailOnRecompileLimitHit":
                raise CompileError(
                    f"compiled {name} hit torch.compile's recompile limit ({RECOMPILE_LIMIT} graphs): {first_line(e)}"
                ) from e
            raise

    return call


def compiled_regions() -> tuple:
    """The two compiled region functions (created once per process; graphs are built on first use per shape)."""
    global _regions
    if _regions is None:
        from e1min.model import DecoderLayer

        strict_recompiles(RECOMPILE_LIMIT)
        _regions = (
            _guarded(torch.compile(DecoderLayer.attention_inputs, dynamic=True), "attention_inputs"),
            _guarded(torch.compile(DecoderLayer.attention_output, dynamic=True), "attention_output"),
        )
    return _regions


def compile_model(model: nn.Module) -> nn.Module:
    """Compile every decoder layer of ``model`` (E1Model, E1ForMaskedLM or BindingModel) in place; returns it.

    The same model runs eager again after ``uncompile_model``. Compiling happens lazily, on the first forward
    of each new kind of input (a few tens of seconds on a CPU, said in the log).
    """
    layers = _decoder_layers(model)
    if not layers:
        raise CompileError(f"compile_model: {type(model).__name__} has no E1 decoder layers")
    regions = compiled_regions()
    for layer in layers:
        layer.regions = regions
    log.info("compiled layers: %d decoder layers share 2 compiled regions (graphs are built on first use)", len(layers))
    return model


def uncompile_model(model: nn.Module) -> nn.Module:
    """Back to eager layers (the compiled graphs stay cached for the next ``compile_model``)."""
    for layer in _decoder_layers(model):
        layer.regions = None
    return model


def is_compiled(model: nn.Module) -> bool:
    layers = _decoder_layers(model)
    return bool(layers) and all(layer.regions is not None for layer in layers)


def graph_count() -> int:
    """Graphs torch.compile holds for the two regions in this process."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    from e1min.model import DecoderLayer

    return sum(len(_debug_get_cache_entry_list(f.__code__)) for f in (DecoderLayer.attention_inputs, DecoderLayer.attention_output))
