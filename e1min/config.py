"""E1Config: the model's shape, read from and written to a checkpoint's ``config.json``."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from e1min.errors import E1minError


class ConfigError(E1minError, ValueError):
    """A config.json that does not describe an E1 model."""


@dataclass
class E1Config:
    """Field names equal the released ``config.json`` keys."""

    hidden_size: int
    num_attention_heads: int
    intermediate_size: int
    num_hidden_layers: int
    num_key_value_heads: int | None = None
    global_attention_every_n_layers: int = 3
    rope_theta_within_seq: float = 10000.0
    rope_theta_global: float = 500000.0
    clip_qkv: float | None = 8.0
    rms_norm_eps: float = 1e-5
    max_num_sequences: int = 512
    max_num_positions_within_seq: int = 8192
    max_num_positions_global: int = 131072
    vocab_size: int = 34
    gated_mlp: bool = True
    hidden_act: str = "silu"
    model_type: str = "E1"
    torch_dtype: str = "bfloat16"
    # Unknown fields of a released config.json are kept so that writing it back loses nothing.
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        problems = _type_problems(self)
        if problems:  # the shape checks below need well-typed values
            raise ConfigError("; ".join(problems))
        if self.hidden_size % self.num_attention_heads:
            problems.append(f"hidden_size {self.hidden_size} not divisible by num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append("num_attention_heads not divisible by num_key_value_heads")
        if (self.hidden_size // self.num_attention_heads) % 2:
            problems.append("head dimension must be even for RoPE")
        if not self.gated_mlp or self.hidden_act != "silu":
            problems.append("only the gated SiLU MLP of the released models is implemented")
        if problems:
            raise ConfigError("; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def is_global_layer(self, i: int) -> bool:
        n = self.global_attention_every_n_layers
        return n > 0 and (i + 1) % n == 0

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**self.extra, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "E1Config":
        """Build from a config.json dict; unknown keys are kept in ``extra``, missing required keys are an error."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object of config fields, got {show(d)}")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        required = {
            f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        }
        missing = sorted(required - d.keys())
        if missing:
            raise ConfigError(f"{source}: missing required field(s) {', '.join(missing)}")
        if d.get("model_type", "E1") != "E1":
            raise ConfigError(f"{source}: model_type is {d.get('model_type')!r}, expected 'E1'")
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names}
        try:
            return cls(**known, extra=extra)
        except (TypeError, ConfigError) as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "E1Config":
        from e1min.io import read_json_object

        d = read_json_object(path, ConfigError, missing="config.json not found")
        return cls.from_dict(d, source=str(path))

    def to_json(self, path: str | os.PathLike) -> None:
        from e1min.io import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")


def show(value: Any, limit: int = 80) -> str:
    """``str '64'``: a value's JSON-ish type and repr, cut to ``limit`` characters, for error messages."""
    if value is None:
        return "null"
    text = repr(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(value).__name__} {text}"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# field -> (check, description); each field of config.json with the type and range E1 needs.
_FIELD_CHECKS: dict[str, tuple[Any, str]] = {
    **{
        k: (lambda v: _is_int(v) and v >= 1, "an integer >= 1")
        for k in (
            "hidden_size",
            "num_attention_heads",
            "intermediate_size",
            "num_hidden_layers",
            "num_key_value_heads",
            "max_num_sequences",
            "max_num_positions_within_seq",
            "max_num_positions_global",
            "vocab_size",
        )
    },
    "global_attention_every_n_layers": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "rope_theta_within_seq": (lambda v: _is_number(v) and v > 0, "a number > 0"),
    "rope_theta_global": (lambda v: _is_number(v) and v > 0, "a number > 0"),
    "clip_qkv": (lambda v: v is None or (_is_number(v) and v > 0), "a number > 0 or null"),
    "rms_norm_eps": (lambda v: _is_number(v) and v > 0, "a number > 0"),
    "gated_mlp": (lambda v: isinstance(v, bool), "true or false"),
    "hidden_act": (lambda v: isinstance(v, str), "a string"),
    "model_type": (lambda v: isinstance(v, str), "a string"),
    "torch_dtype": (lambda v: v is None or isinstance(v, str), "a string or null"),
}


def _type_problems(config: "E1Config") -> list[str]:
    """One message per field of the wrong type or out of range (``'hidden_size' must be ..., got str '64'``)."""
    problems = []
    for name, (ok, what) in _FIELD_CHECKS.items():
        value = getattr(config, name)
        if not ok(value):
            problems.append(f"{name!r} must be {what}, got {show(value)}")
    if not isinstance(config.extra, dict):
        problems.append(f"extra must be a dict, got {show(config.extra)}")
    return problems


_RELEASED = dict(global_attention_every_n_layers=3, rope_theta_within_seq=10000.0, rope_theta_global=500000.0, clip_qkv=8.0)
PRESETS: dict[str, dict[str, Any]] = {
    "e1-150m": dict(hidden_size=768, num_attention_heads=12, intermediate_size=2304, num_hidden_layers=20, **_RELEASED),
    "e1-300m": dict(hidden_size=1024, num_attention_heads=16, intermediate_size=3072, num_hidden_layers=20, **_RELEASED),
    "e1-600m": dict(hidden_size=1280, num_attention_heads=20, intermediate_size=3840, num_hidden_layers=30, **_RELEASED),
    # Small enough for tests and the CPU demo; still has both layer types.
    "tiny": dict(hidden_size=64, num_attention_heads=4, intermediate_size=128, num_hidden_layers=3, **_RELEASED),
}


def preset(name: str, **overrides: Any) -> E1Config:
    """A released shape (``e1-150m``, ``e1-300m``, ``e1-600m``) or ``tiny``, with optional overrides."""
    key = name.lower()
    if key not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return E1Config(**{**PRESETS[key], **overrides})
