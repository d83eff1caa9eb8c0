"""LoRA for E1: a ``LoRALinear`` wrapper, injection by module-name suffix, merge/unmerge, parameter report.

Conventions follow Hugging Face PEFT (without importing it): ``lora_A`` (r x in) is initialised
Kaiming-uniform with a = sqrt(5), ``lora_B`` (out x r) with zeros, the update is scaled by
``alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``), and dropout acts on the LoRA branch's input only.
A fresh adapter therefore leaves every output bit-identical to the base model.

Dtypes: the frozen base weight keeps its dtype (bf16 for the released checkpoints) and is used in
place, never copied; ``lora_A``/``lora_B`` are float32. Outside autocast the LoRA branch runs in
float32 and is cast to the output dtype; under autocast its matmuls follow autocast like any Linear.

Memory and speed: the unmerged forward is one autograd node (``_LoRAFunction``) that saves the
branch input once (shared with whatever else saves it, e.g. q/k/v read the same normed input),
a boolean dropout mask and the rank-r activations, and recomputes the dropped input in backward.
Plain autograd would keep a float copy of the dropped input per module and run a full-size multiply
for ``scaling``; here ``scaling`` and the dropout's ``1 / keep`` act on the rank-r tensor and the
update is added by the GEMM itself (``addmm``). Same mathematics, float round-off apart.

Merging: ``merge()`` adds ``scaling * B @ A`` into the base weight in place (computed in float32, then
cast to the weight's dtype) and the forward then skips the LoRA branch, so a merged model runs at the
base model's speed. No copy of the original weight is kept: ``unmerge()`` subtracts the same update,
which restores a float32 base to round-off (~1e-7 relative) and a bf16 base to within bf16 round-off
of the update's magnitude. Keep the base checkpoint if you need the bf16 weights bit-exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from e1min.errors import E1minError

DEFAULT_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3")
MODULE_TYPES: tuple[str, ...] = DEFAULT_TARGETS
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


class LoRAError(E1minError, ValueError):
    """A LoRA request that cannot be honoured (unknown target, nothing matched, already applied, ...)."""


@dataclass
class LoRAConfig:
    """What ``apply_lora`` did; stored as ``model.lora_config`` and written into ``adapter_config.json``."""

    r: int = 16
    alpha: float = 32
    dropout: float = 0.0
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    layers: tuple[int, ...] | None = None
    use_rslora: bool = False
    train_mlm_head: bool = False

    @property
    def scaling(self) -> float:
        return lora_scaling(self.r, self.alpha, self.use_rslora)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["target_modules"] = list(self.target_modules)
        d["layers"] = None if self.layers is None else list(self.layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LoRAConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise LoRAError(f"unknown LoRA config field(s): {', '.join(unknown)}")
        d = dict(d)
        if "target_modules" in d:
            d["target_modules"] = tuple(d["target_modules"])
        if d.get("layers") is not None:
            d["layers"] = tuple(int(i) for i in d["layers"])
        return cls(**d)


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """PEFT's scaling: ``alpha / r``, or ``alpha / sqrt(r)`` for rank-stabilised LoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update: ``y = W x + b + scaling * B A dropout(x)``.

    ``self.weight`` / ``self.bias`` *are* the wrapped Linear's parameters (same objects, frozen), so the
    module's state-dict keys are ``<path>.weight`` (unchanged), ``<path>.lora_A`` and ``<path>.lora_B``.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise LoRAError(f"LoRALinear wraps nn.Linear, got {type(base).__name__}")
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise LoRAError(f"LoRA rank r must be a positive integer, got {r!r}")
        if not 0.0 <= dropout < 1.0:
            raise LoRAError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = lora_scaling(r, alpha, use_rslora)
        base.weight.requires_grad_(False)
        self.weight = base.weight
        if base.bias is not None:
            base.bias.requires_grad_(False)
        self.bias = base.bias
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, dtype=torch.float32, device=device))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, dtype=torch.float32, device=device))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """PEFT's default (``init_lora_weights=True``): A Kaiming-uniform (a = sqrt(5)), B zeros."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        p = self.lora_dropout.p if self.training and isinstance(self.lora_dropout, nn.Dropout) else 0.0
        if self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad) or torch.compiler.is_compiling():
            # An unfrozen base (not e1min's use), or torch.compile tracing: plain autograd ops (inductor fuses them)
            return self._forward_autograd(x, p)
        return _LoRAFunction.apply(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling, p)

    def _forward_autograd(self, x: torch.Tensor, p: float) -> torch.Tensor:
        """The reference formula in plain autograd ops (also the fused path's test oracle)."""
        out = F.linear(x, self.weight, self.bias)
        h = x if torch.is_autocast_enabled(x.device.type) else x.to(self.lora_A.dtype)
        if p > 0 and torch.compiler.is_compiling():
            h = h * (torch.rand_like(h, dtype=torch.float32) >= p) / (1.0 - p)  # inductor's own fused random numbers
        elif p > 0:
            h = h * dropout_mask(h, p) / dropout_keep_probability(p)
        delta = F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scaling
        # With B = 0 the update is exactly zero and out + 0 == out bit for bit.
        return out + delta.to(out.dtype)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A`` in float32, shape (out, in)."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight (in place); the forward then skips the LoRA branch."""
        if self.merged:
            return
        self._add_to_weight(self.delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update again (exact to float round-off; see the module docstring for bf16)."""
        if not self.merged:
            return
        self._add_to_weight(-self.delta_weight())
        self.merged = False

    def _add_to_weight(self, delta: torch.Tensor) -> None:
        w = self.weight
        if w.dtype == torch.float32:
            w.add_(delta.to(w.device))
        else:
            w.copy_((w.float() + delta.to(w.device)).to(w.dtype))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, alpha={self.alpha}, "
            f"scaling={self.scaling:g}, dropout={getattr(self.lora_dropout, 'p', 0.0)}, merged={self.merged}"
        )


# LoRA dropout draws 15-bit uniforms: p is rounded to a multiple of 2**-15 (0.2 -> 0.20001) and the kept
# inputs are scaled by 1 / dropout_keep_probability(p), so the expectation is exact.
_DROP_BITS = 32768


def dropout_keep_probability(p: float) -> float:
    """The keep probability ``dropout_mask`` realises for dropout rate ``p`` (1 - p to within 2**-16)."""
    return 1.0 - min(round(p * _DROP_BITS), _DROP_BITS - 1) / _DROP_BITS


def dropout_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """Boolean keep-mask of LoRA dropout shaped like ``x`` (True = kept), from torch's default generator.

    Two masks per 31-bit draw of ``random_()`` (its low 16 bits, and the 15 above them): about 3x
    cheaper on the CPU than ``bernoulli_``, whose random numbers were the largest non-matmul cost of a
    LoRA step. Both halves drop with the same probability ``1 - dropout_keep_probability(p)``.
    """
    k = min(round(p * _DROP_BITS), _DROP_BITS - 1)
    n = x.numel()
    bits = torch.empty((n + 1) // 2, dtype=torch.int32, device=x.device).random_()
    halves = bits.view(torch.int16).view(-1, 2)  # little-endian: [low 16 bits (signed), high 15 bits]
    return (halves >= _drop_thresholds(k, x.device)).view(-1)[:n].view(x.shape)


@functools.lru_cache(maxsize=32)
def _drop_thresholds(k: int, device: torch.device) -> torch.Tensor:
    # cached: building it on a GPU at every call would be a host-to-device copy (and a sync) per LoRA layer
    return torch.tensor([2 * k - _DROP_BITS, k], dtype=torch.int16, device=device)


def _as_float(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # via uint8: torch's bool -> float conversion is an order of magnitude slower on the CPU than uint8 -> float
    return mask.view(torch.uint8).to(dtype)


class _LoRAFunction(torch.autograd.Function):
    """``F.linear(x, W, b) + scaling * B A dropout(x)`` for a frozen W as one autograd node.

    Saved for backward: x itself (no copy), the boolean dropout mask, the rank-r activations and the
    weights; the dropped input is recomputed. Dtypes follow ``LoRALinear``'s rules: the base matmul in x's
    dtype and the branch in A's (float32), or everything in the autocast dtype when autocast is on, as
    ``F.linear`` would; the ops inside run with autocast off so these casts are the only ones.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float, p: float):
        device_type = x.device.type
        cast = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        base_dtype = cast or x.dtype
        lora_dtype = cast or lora_a.dtype
        with torch.autocast(device_type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1])
            # out is returned itself, not as a view of a 2-D product, so that callers may modify it in place
            out = torch.empty((*x.shape[:-1], weight.shape[0]), dtype=base_dtype, device=x.device)
            xb, wb = x2.to(base_dtype), weight.to(base_dtype).t()
            if bias is None:
                torch.mm(xb, wb, out=out.view(-1, out.shape[-1]))
            else:
                torch.addmm(bias.to(base_dtype), xb, wb, out=out.view(-1, out.shape[-1]))
            mask = dropout_mask(x2, p) if p > 0 else None
            h = x2.to(lora_dtype)
            if mask is not None:
                h = h * _as_float(mask, lora_dtype)
            a, b = lora_a.to(lora_dtype), lora_b.to(lora_dtype)
            # scaling and the dropout's 1/keep on the (N, r) activations, not on an (N, out) product
            coef = scaling / dropout_keep_probability(p)
            u = F.linear(h, a) * coef
            if out.dtype == lora_dtype:
                out.view(-1, out.shape[-1]).addmm_(u, b.t())  # added by the GEMM; B = 0 leaves out bit-identical
            else:
                out = out + F.linear(u, b).to(out.dtype).view(out.shape)
        ctx.save_for_backward(x, weight, lora_a, lora_b, mask, u)
        ctx.dtypes = (base_dtype, lora_dtype)
        ctx.coef = coef
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, lora_a, lora_b, mask, u = ctx.saved_tensors
        base_dtype, lora_dtype = ctx.dtypes
        grad_a = grad_b = grad_x = None
        with torch.autocast(grad_out.device.type, enabled=False):
            g = grad_out.reshape(-1, grad_out.shape[-1])
            gl = g.to(lora_dtype)
            a, b = lora_a.to(lora_dtype), lora_b.to(lora_dtype)
            du = (gl @ b) * ctx.coef  # d loss / d (h A^T), (N, r)
            if ctx.needs_input_grad[4]:
                grad_b = (gl.t() @ u).to(lora_b.dtype)
            # one conversion serves both uses of the mask below
            keep = None if mask is None else _as_float(mask, lora_dtype)
            if ctx.needs_input_grad[3]:
                x2 = x.reshape(-1, x.shape[-1]).to(lora_dtype)
                grad_a = (du.t() @ (x2 * keep if keep is not None else x2)).to(lora_a.dtype)
            if ctx.needs_input_grad[0]:
                dx = g.to(base_dtype) @ weight.to(base_dtype)
                if keep is None and dx.dtype == lora_dtype:
                    dx.addmm_(du, a)
                else:
                    dh = du @ a
                    if keep is not None:
                        dh.mul_(keep)
                    dx = dx.add_(dh) if dx.dtype == lora_dtype else dx + dh.to(dx.dtype)
                grad_x = dx.to(x.dtype).view(x.shape)
        return grad_x, None, None, grad_a, grad_b, None, None


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRALinear of the model by module path (e.g. ``model.layers.0.norm_attn_norm.self_attn.q_proj``)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _validate_targets(target_modules: Any) -> tuple[str, ...]:
    if isinstance(target_modules, str):
        raise LoRAError(
            f"target_modules={target_modules!r}: give a list of module names (suffix match, e.g. "
            f"{list(DEFAULT_TARGETS)}); a single string would be a regex in PEFT, which e1min does not implement"
        )
    targets = tuple(target_modules)
    if not targets:
        raise LoRAError("target_modules is empty")
    bad = [t for t in targets if not isinstance(t, str) or not t]
    if bad:
        raise LoRAError(f"target_modules must be non-empty strings, got {bad!r}")
    return targets


def find_targets(
    model: nn.Module, target_modules: Sequence[str] = DEFAULT_TARGETS, layers: Iterable[int] | None = None
) -> dict[str, nn.Module]:
    """The Linear (or already wrapped) modules of the backbone that ``apply_lora`` would wrap, by path.

    A target matches a module path that equals it or ends with ``.<target>`` (PEFT's list semantics);
    only modules inside ``model.layers.<i>.`` are candidates. Errors name unknown targets, targets that
    match nothing in the selected layers, and layer indices that do not exist.
    """
    targets = _validate_targets(target_modules)
    n_layers = len(model.model.layers)
    if layers is not None:
        layers = tuple(int(i) for i in layers)
        if not layers:
            raise LoRAError("layers is empty: nothing to adapt (use None for all layers)")
        out_of_range = sorted({i for i in layers if not 0 <= i < n_layers})
        if out_of_range:
            raise LoRAError(f"layers {out_of_range} do not exist; the model has layers 0..{n_layers - 1}")
    candidates: dict[str, tuple[int, nn.Module]] = {}
    for name, module in model.named_modules():
        m = _LAYER_RE.match(name)
        if m and isinstance(module, (nn.Linear, LoRALinear)):
            candidates[name] = (int(m.group(1)), module)
    known = sorted({n.rsplit(".", 1)[-1] for n in candidates})

    def matches(name: str, t: str) -> bool:
        return name == t or name.endswith("." + t)

    unknown = [t for t in targets if not any(matches(n, t) for n in candidates)]
    if unknown:
        raise LoRAError(f"unknown target module(s) {unknown}: they match no Linear layer of the backbone; known: {known}")
    selected = {n: mod for n, (i, mod) in candidates.items() if (layers is None or i in layers) and any(matches(n, t) for t in targets)}
    empty = [t for t in targets if not any(matches(n, t) for n in selected)]
    if empty:
        raise LoRAError(f"target module(s) {empty} match nothing in layers {list(layers) if layers else 'all'}")
    return selected


def apply_lora(
    model: nn.Module,
    r: int = 16,
    alpha: float = 32,
    dropout: float = 0.0,
    target_modules: Sequence[str] = DEFAULT_TARGETS,
    layers: Iterable[int] | None = None,
    use_rslora: bool = False,
    train_mlm_head: bool = False,
) -> nn.Module:
    """Wrap the backbone's matching Linear layers in LoRALinear and freeze everything else; returns ``model``.

    ``target_modules``: module-name suffixes (default: the 7 projections q/k/v/o_proj, w1/w2/w3).
    ``layers``: indices of the decoder layers to adapt (default all). ``train_mlm_head`` keeps the
    pretrained MLM head trainable (saved as PEFT ``modules_to_save``). The config is stored as
    ``model.lora_config``.
    """
    if lora_modules(model):
        raise LoRAError("the model already has LoRA layers; load a fresh base model to apply a new adapter")
    targets = _validate_targets(target_modules)
    layers_t = None if layers is None else tuple(sorted({int(i) for i in layers}))
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise LoRAError(f"LoRA rank r must be a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise LoRAError(f"LoRA alpha must be a positive number, got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise LoRAError(f"LoRA dropout must be in [0, 1), got {dropout}")
    # Everything is checked before the model is modified: a failed call leaves it untouched.
    selected = find_targets(model, targets, layers_t)
    for p in model.parameters():
        p.requires_grad_(False)
    for name, base in selected.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(base, r, alpha, dropout, use_rslora))
    if train_mlm_head:
        # Trainable weights are float32 (as LoRA's A/B) even on a bf16 base: bf16 master weights would
        # swallow most AdamW updates at fine-tuning learning rates (1e-4 * w is below bf16's resolution).
        model.mlm_head.float()
        for p in model.mlm_head.parameters():
            p.requires_grad_(True)
    model.lora_config = LoRAConfig(
        r=r, alpha=alpha, dropout=dropout, target_modules=targets, layers=layers_t, use_rslora=use_rslora, train_mlm_head=train_mlm_head
    )
    return model


def _require_lora(model: nn.Module) -> dict[str, LoRALinear]:
    mods = lora_modules(model)
    if not mods:
        raise LoRAError("the model has no LoRA layers (call apply_lora or load_adapter first)")
    return mods


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (inference at base speed); ``unmerge_lora`` undoes it."""
    for m in _require_lora(model).values():
        m.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    for m in _require_lora(model).values():
        m.unmerge()
    return model


# The LoRA tensors are read and written only through the functions below; their keys are
# ``<module path>.lora_A`` / ``.lora_B`` (the parameter names in ``model.named_parameters()``).


def lora_state_shapes(targets: dict[str, nn.Module], r: int) -> dict[str, tuple[int, int]]:
    """The keys and shapes ``lora_state_dict`` has once ``targets`` (path -> Linear or LoRALinear) carry rank ``r``."""
    shapes: dict[str, tuple[int, int]] = {}
    for name, mod in targets.items():
        shapes[f"{name}.lora_A"] = (r, mod.in_features)
        shapes[f"{name}.lora_B"] = (mod.out_features, r)
    return shapes


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The LoRA parameters themselves (for optimisers and gradient checks), keyed as in ``lora_state_dict``."""
    out: dict[str, nn.Parameter] = {}
    for name, m in _require_lora(model).items():
        out[f"{name}.lora_A"] = m.lora_A
        out[f"{name}.lora_B"] = m.lora_B
    return out


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{<module path>.lora_A: (r, in), <module path>.lora_B: (out, r)}``, detached (the LoRA parameters only)."""
    return {k: p.detach() for k, p in lora_parameters(model).items()}


def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` (keys and shapes as ``lora_state_dict``) into the model's existing LoRALinear modules.

    Strict: missing or unexpected keys, wrong shapes, non-floating tensors and merged LoRA layers are one
    LoRAError listing every problem, raised before anything is copied. Values are cast to each
    parameter's dtype and device; autograd does not see the copy.
    """
    mods = _require_lora(model)
    merged = sorted(name for name, m in mods.items() if m.merged)
    if merged:
        raise LoRAError(f"LoRA layers are merged ({_few(merged)}); call unmerge_lora(model) before loading LoRA weights")
    params = lora_parameters(model)
    problems = []
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    if missing:
        problems.append(f"missing keys: {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_few(unexpected)}")
    common = sorted(set(params) & set(state))
    not_tensor = [k for k in common if not isinstance(state[k], torch.Tensor)]
    if not_tensor:
        problems.append(f"not tensors: {_few(not_tensor)}")
    tensors = [k for k in common if k not in not_tensor]
    wrong = [f"{k}: {list(state[k].shape)} given, model has {list(params[k].shape)}" for k in tensors if state[k].shape != params[k].shape]
    if wrong:
        problems.append("wrong shapes: " + "; ".join(wrong[:4]) + (f" ... ({len(wrong)} in all)" if len(wrong) > 4 else ""))
    not_float = [f"{k} ({str(state[k].dtype).removeprefix('torch.')})" for k in tensors if not state[k].is_floating_point()]
    if not_float:
        problems.append(f"non-floating dtype: {_few(not_float)}")
    if problems:
        raise LoRAError("LoRA state does not fit the model's LoRA layers: " + " | ".join(problems))
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(state[k].to(device=p.device, dtype=p.dtype))


def _few(keys: list[str], n: int = 4) -> str:
    return ", ".join(keys[:n]) + (f" ... ({len(keys)} in all)" if len(keys) > n else "")


def _module_type(name: str, lora_paths: set[str]) -> str:
    if name.startswith("mlm_head."):
        return "mlm_head"
    module, _, _ = name.rpartition(".")
    if module in lora_paths:
        return module.rsplit(".", 1)[-1]
    return "other"


def trainable_parameters(model: nn.Module) -> dict[str, Any]:
    """Trainable / total parameter counts by module type (q_proj .. w3, mlm_head, other), overall and in percent.

    Returns ``{"by_type": {type: {"trainable": n, "total": n}}, "trainable": n, "total": n, "percent": x}``.
    The LoRA-wrapped projections count their frozen base weight in ``total`` and A + B in ``trainable``.
    """
    lora_paths = set(lora_modules(model))
    by_type: dict[str, dict[str, int]] = {t: {"trainable": 0, "total": 0} for t in (*MODULE_TYPES, "mlm_head", "other")}
    for name, p in model.named_parameters():
        t = _module_type(name, lora_paths)
        if t not in by_type:
            by_type[t] = {"trainable": 0, "total": 0}
        by_type[t]["total"] += p.numel()
        if p.requires_grad:
            by_type[t]["trainable"] += p.numel()
    trainable = sum(v["trainable"] for v in by_type.values())
    total = sum(v["total"] for v in by_type.values())
    return {"by_type": by_type, "trainable": trainable, "total": total, "percent": 100.0 * trainable / max(total, 1)}


def format_trainable_parameters(report: dict[str, Any]) -> str:
    """A fixed-width table of ``trainable_parameters(model)``."""
    lines = [f"{'module':<10} {'trainable':>14} {'total':>16}"]
    for t, v in report["by_type"].items():
        if v["total"]:
            lines.append(f"{t:<10} {v['trainable']:>14,} {v['total']:>16,}")
    lines.append(f"{'all':<10} {report['trainable']:>14,} {report['total']:>16,}  ({report['percent']:.3f}% trainable)")
    return "\n".join(lines)


def lora_parameter_count(
    config: Any, r: int = 16, target_modules: Sequence[str] = DEFAULT_TARGETS, layers: Iterable[int] | None = None
) -> int:
    """Closed form: sum of r * (in + out) over the wrapped layers of an E1 with ``config`` (an E1Config)."""
    h, inter, kv = config.hidden_size, config.intermediate_size, config.num_key_value_heads * config.head_dim
    shapes = {
        "q_proj": (h, h),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (h, h),
        "w1": (h, inter),
        "w3": (h, inter),
        "w2": (inter, h),
    }
    targets = _validate_targets(target_modules)
    unknown = [t for t in targets if t.rsplit(".", 1)[-1] not in shapes]
    if unknown:
        raise LoRAError(f"unknown target module(s) {unknown}; known: {sorted(shapes)}")
    n_layers = config.num_hidden_layers if layers is None else len(set(layers))
    per_layer = sum(r * sum(shapes[t]) for t in dict.fromkeys(t.rsplit(".", 1)[-1] for t in targets))
    return per_layer * n_layers
