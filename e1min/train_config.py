"""Compatibility layer: the training recipe as a validated dict of dicts (``cfg["training"]["accum_steps"]``).

The schema, defaults, ranges, docs and checks live in :mod:`e1min.recipe` (frozen typed dataclasses);
this module keeps the dict API: ``load_config`` returns ``(recipe.to_dict(), notes)``, and ``SCHEMA``,
``CHOICES`` and ``RANGES`` are derived tables of the same recipe fields.
"""

from __future__ import annotations

import os
import typing
from dataclasses import fields
from typing import Any

import yaml

from e1min.recipe import (  # noqa: F401 - re-exported
    IGNORED,
    MSA_SAMPLING_KEYS,
    REQUIRED,
    Recipe,
    TrainConfigError,
    _plain,
    apply_overrides,
    field_default,
    field_types,
    load_recipe,
    load_yaml,
    msa_sampling_problems,
    parse_range,
    short,
)


def _table() -> list[tuple[str, str, Any, Any]]:
    """(section, key, field, annotation) of every recipe field, in YAML order."""
    return [(s, f.name, f, typing.get_type_hints(kind)[f.name]) for s, kind in Recipe.sections().items() for f in fields(kind)]


# section -> key -> (accepted YAML types, default as plain data or REQUIRED).
SCHEMA: dict[str, dict[str, tuple[tuple[type, ...], Any]]] = {s: {} for s in Recipe.sections()}
for _s, _k, _f, _hint in _table():
    _d = field_default(_f)
    SCHEMA[_s][_k] = (field_types(_hint), _d if _d is REQUIRED else _plain(_d))
CHOICES = {(s, k): f.metadata["choices"] for s, k, f, _ in _table() if f.metadata["choices"]}
# Ranges of numeric keys: (low, high, low inclusive, high inclusive); None = unbounded.
RANGES = {(s, k): parse_range(f.metadata["range"]) for s, k, f, _ in _table() if f.metadata["range"]}


def validate(raw: dict, source: str = "config", check_files: bool = True) -> tuple[dict, list[str]]:
    """Fill defaults and check types/choices/ranges/files. Returns (config, notes about ignored keys)."""
    recipe, notes = Recipe.from_dict(raw, source=source, check_files=check_files)
    return recipe.to_dict(), notes


def load_config(path: str | os.PathLike, overrides: list[str] | None = None, check_files: bool = True) -> tuple[dict, list[str]]:
    """Read a YAML recipe, apply overrides, validate. Returns (config, notes)."""
    recipe, notes = load_recipe(path, overrides or (), check_files=check_files)
    return recipe.to_dict(), notes


def dump_config(cfg: dict | Recipe) -> str:
    """The resolved config as YAML (what ``config.yaml`` in a run directory holds)."""
    return cfg.dump_yaml() if isinstance(cfg, Recipe) else yaml.safe_dump(cfg, sort_keys=False)
