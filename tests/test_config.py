"""E1Config: config.json round trip, presets, layer kinds, and field checks that name the field."""

from __future__ import annotations

import json

import pytest

from e1min.config import ConfigError, E1Config, preset


def test_round_trip_and_layer_kinds(tmp_path):
    cfg = preset("e1-150m")
    cfg.to_json(tmp_path / "config.json")
    back = E1Config.from_json(tmp_path / "config.json")
    assert back.to_dict() == cfg.to_dict()
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (768, 20, 12)
    assert [i for i in range(cfg.num_hidden_layers) if cfg.is_global_layer(i)] == [2, 5, 8, 11, 14, 17]
    assert cfg.head_dim == 64


def test_bad_field_is_named(tmp_path):
    d = preset("tiny").to_dict()
    d["hidden_size"] = "64"
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="config.json: 'hidden_size' must be an integer >= 1, got str '64'"):
        E1Config.from_json(tmp_path / "config.json")
