"""Adapter files in PEFT's layout: exact round trips, PEFT ``.default`` keys, modules_to_save, every strict-load
error, and atomic writes."""

import json
import os
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from e1min.adapters import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, AdapterError, load_adapter, save_adapter
from e1min.hub import load_model
from e1min.io import OutputError
from e1min.lora import apply_lora, lora_modules, merge_lora
from e1min.random_checkpoint import random_model
from e1min.tokenizer import prepare_batch

ROWS = ["MKTAYIAKQR,ACDEFGHIKL", "MKVLAAG"]
Q = "model.layers.0.norm_attn_norm.self_attn.q_proj"


def _out(model):
    with torch.no_grad():
        o = model(**prepare_batch(ROWS))
    return o.logits, o.embeddings


def _trained(config, seed=1, **kw):
    model = apply_lora(random_model(config, seed=seed), **{"r": 4, "alpha": 8, **kw})
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g) * 0.1)
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)
    return model


@pytest.fixture
def saved(tmp_path, tiny_config):
    model = _trained(tiny_config)
    d = save_adapter(model, tmp_path / "adapter", base_model_name_or_path="Profluent-Bio/E1-150m", revision="abc123")
    return model, d


def test_round_trip_exact_and_layout(saved, tiny_config):
    model, d = saved
    assert sorted(os.listdir(d)) == [ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME]
    with safe_open(str(d / ADAPTER_WEIGHTS_NAME), framework="pt") as fh:
        assert fh.metadata() == {"format": "pt"}
        keys = set(fh.keys())
        assert fh.get_slice(f"base_model.model.{Q}.lora_A.weight").get_shape() == [4, 64]
        assert fh.get_slice(f"base_model.model.{Q}.lora_B.weight").get_shape() == [64, 4]
    assert len(keys) == 2 * 7 * tiny_config.num_hidden_layers
    assert all(k.startswith("base_model.model.model.layers.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    cfg = json.loads((d / ADAPTER_CONFIG_NAME).read_text())
    required = {
        "peft_type": "LORA",
        "task_type": None,
        "r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "base_model_name_or_path": "Profluent-Bio/E1-150m",
        "revision": "abc123",
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    for k, v in required.items():
        assert cfg[k] == v, k
    assert cfg["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"]
    fresh = load_adapter(random_model(tiny_config, seed=1), d)
    a, b = _out(model), _out(fresh)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert fresh.lora_config == model.lora_config


def test_load_into_model_with_matching_lora(saved, tiny_config):
    model, d = saved
    target = apply_lora(random_model(tiny_config, seed=1), r=4, alpha=8)
    load_adapter(target, d)
    assert torch.equal(_out(model)[0], _out(target)[0])


def test_load_model_one_liner(tmp_path, tiny_checkpoint, tiny_config):
    model = _trained(tiny_config)
    model.name_or_path, model.revision = str(tiny_checkpoint), None
    save_adapter(model, tmp_path / "a")
    assert json.loads((tmp_path / "a" / ADAPTER_CONFIG_NAME).read_text())["base_model_name_or_path"] == str(tiny_checkpoint)
    loaded = load_model(tiny_checkpoint, dtype=torch.float32, adapter=tmp_path / "a")
    assert torch.equal(_out(loaded)[0], _out(model)[0])


def _peft_copy(src, dst, rename=lambda k: k, config_update=None, drop=(), add=None):
    dst.mkdir(parents=True, exist_ok=True)
    tensors = {rename(k): v for k, v in load_file(str(src / ADAPTER_WEIGHTS_NAME)).items() if not any(s in k for s in drop)}
    tensors.update(add or {})
    save_file(tensors, str(dst / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
    cfg = json.loads((src / ADAPTER_CONFIG_NAME).read_text())
    cfg.update(config_update or {})
    (dst / ADAPTER_CONFIG_NAME).write_text(json.dumps(cfg))
    return dst


def test_peft_default_keys_and_bf16_tensors_load(saved, tmp_path, tiny_config):
    model, d = saved
    peft = _peft_copy(
        d,
        tmp_path / "peft",
        rename=lambda k: k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight"),
        config_update={"lora_bias": False, "exclude_modules": None, "megatron_core": "megatron.core", "loftq_config": {}},
    )
    fresh = load_adapter(random_model(tiny_config, seed=1), peft)
    assert torch.equal(_out(model)[0], _out(fresh)[0])
    # PEFT on a bf16 base saves bf16 LoRA tensors; they load (exactly widened) into our float32 A/B.
    bf = tmp_path / "bf16"
    bf.mkdir()
    save_file({k: v.bfloat16() for k, v in load_file(str(d / ADAPTER_WEIGHTS_NAME)).items()}, str(bf / ADAPTER_WEIGHTS_NAME))
    (bf / ADAPTER_CONFIG_NAME).write_text((d / ADAPTER_CONFIG_NAME).read_text())
    m = load_adapter(random_model(tiny_config, seed=1), bf)
    assert lora_modules(m)[Q].lora_A.dtype == torch.float32


def test_mlm_head_modules_to_save(tmp_path, tiny_config):
    model = _trained(tiny_config, train_mlm_head=True)
    with torch.no_grad():
        model.mlm_head[0].weight.add_(0.01)
    d = save_adapter(model, tmp_path / "head")
    cfg = json.loads((d / ADAPTER_CONFIG_NAME).read_text())
    assert cfg["modules_to_save"] == ["mlm_head"]
    keys = set(load_file(str(d / ADAPTER_WEIGHTS_NAME)))
    assert {"base_model.model.mlm_head.0.weight", "base_model.model.mlm_head.3.bias", "base_model.model.mlm_head.2.weight"} <= keys
    fresh = load_adapter(random_model(tiny_config, seed=1), d)
    assert torch.equal(_out(model)[0], _out(fresh)[0])
    assert fresh.mlm_head[0].weight.requires_grad
    # PEFT's in-memory naming of modules_to_save also loads
    alt = _peft_copy(d, tmp_path / "alt", rename=lambda k: k.replace("model.mlm_head.", "model.mlm_head.modules_to_save.default."))
    assert torch.equal(_out(load_adapter(random_model(tiny_config, seed=1), alt))[0], _out(model)[0])


def test_layers_subset_round_trip(tmp_path, tiny_config):
    model = _trained(tiny_config, layers=[0, 3], target_modules=["q_proj", "v_proj"])
    d = save_adapter(model, tmp_path / "sub")
    cfg = json.loads((d / ADAPTER_CONFIG_NAME).read_text())
    assert cfg["layers_to_transform"] == [0, 3] and cfg["layers_pattern"] == "layers"
    fresh = load_adapter(random_model(tiny_config, seed=1), d)
    assert sorted(lora_modules(fresh)) == sorted(lora_modules(model))
    assert torch.equal(_out(model)[0], _out(fresh)[0])


def _tensor_key(layer=0, ab="A"):
    return f"base_model.model.model.layers.{layer}.norm_attn_norm.self_attn.q_proj.lora_{ab}.weight"


BAD = {
    "missing r": dict(config_update={"r": None}, match="r is missing"),
    "missing lora_alpha": dict(config_update={"lora_alpha": None}, match="lora_alpha is missing"),
    "not LORA": dict(config_update={"peft_type": "IA3"}, match="peft_type"),
    "regex targets": dict(config_update={"target_modules": ".*q_proj"}, match="regex"),
    "DoRA config": dict(config_update={"use_dora": True}, match="DoRA"),
    "rank_pattern": dict(config_update={"rank_pattern": {"q_proj": 8}}, match="rank_pattern"),
    "alpha_pattern": dict(config_update={"alpha_pattern": {"q_proj": 8}}, match="alpha_pattern"),
    "lora_bias config": dict(config_update={"lora_bias": True}, match="LoRA biases"),
    "bias all": dict(config_update={"bias": "all"}, match="bias"),
    "fan_in_fan_out": dict(config_update={"fan_in_fan_out": True}, match="fan_in_fan_out"),
    "pissa init": dict(config_update={"init_lora_weights": "pissa"}, match="modifies the base"),
    "other modules_to_save": dict(config_update={"modules_to_save": ["classifier"]}, match="modules_to_save"),
    "unknown target": dict(config_update={"target_modules": ["query", "value"]}, match="unknown target"),
    "layers out of range": dict(config_update={"layers_to_transform": [0, 40]}, match="do not exist"),
    "rank mismatch": dict(config_update={"r": 8}, match="wrong shapes"),
    "no prefix": dict(rename=lambda k: k.removeprefix("base_model.model."), match="without the 'base_model.model.' prefix"),
    "missing key": dict(drop=("layers.1.ffn.mlp.w2.lora_B",), match="missing keys"),
    "unexpected key": dict(add={"base_model.model.model.layers.0.ffn.mlp.w2.extra.weight": torch.zeros(2)}, match="unexpected keys"),
    "DoRA magnitude": dict(
        add={"base_model.model.model.layers.0.norm_attn_norm.self_attn.q_proj.lora_magnitude_vector": torch.ones(64)}, match="DoRA"
    ),
    "LoRA bias tensor": dict(
        add={"base_model.model.model.layers.0.norm_attn_norm.self_attn.q_proj.lora_B.bias": torch.zeros(64)}, match="LoRA biases"
    ),
    "head keys without modules_to_save": dict(add={"base_model.model.mlm_head.0.weight": torch.zeros(64, 64)}, match="unexpected keys"),
    "two adapter names": dict(
        rename=lambda k: k.replace(".lora_A.weight", ".lora_A.one.weight").replace(".lora_B.weight", ".lora_B.two.weight"),
        match="several adapters",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_strict_load_errors(case, saved, tmp_path, tiny_config):
    _, d = saved
    spec = dict(BAD[case])
    match = spec.pop("match")
    bad = _peft_copy(d, tmp_path / "bad", **spec)
    target = random_model(tiny_config, seed=1)
    before = _out(target)[0]
    with pytest.raises(AdapterError, match=match):
        load_adapter(target, bad)
    assert not lora_modules(target)  # untouched
    assert torch.equal(_out(target)[0], before)


def test_mismatch_with_existing_lora(saved, tiny_config):
    _, d = saved
    for kw, field in (
        (dict(r=8, alpha=8), "r:"),
        (dict(r=4, alpha=16), "lora_alpha"),
        (dict(r=4, alpha=8, target_modules=["q_proj"]), "target_modules"),
        (dict(r=4, alpha=8, use_rslora=True), "use_rslora"),
    ):
        with pytest.raises(AdapterError, match=field):
            load_adapter(apply_lora(random_model(tiny_config, seed=1), **kw), d)
    merged = merge_lora(apply_lora(random_model(tiny_config, seed=1), r=4, alpha=8))
    with pytest.raises(AdapterError, match="merged"):
        load_adapter(merged, d)


def test_file_errors(saved, tmp_path, tiny_config):
    _, d = saved
    with pytest.raises(AdapterError, match="not an adapter directory"):
        load_adapter(random_model(tiny_config), tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(AdapterError, match="adapter_config.json: not found"):
        load_adapter(random_model(tiny_config), empty)
    (empty / ADAPTER_CONFIG_NAME).write_text("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        load_adapter(random_model(tiny_config), empty)
    (empty / ADAPTER_CONFIG_NAME).write_text((d / ADAPTER_CONFIG_NAME).read_text())
    (empty / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(AdapterError, match="adapter_model.bin exists"):
        load_adapter(random_model(tiny_config), empty)
    data = (d / ADAPTER_WEIGHTS_NAME).read_bytes()
    (empty / ADAPTER_WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterError, match="truncated"):
        load_adapter(random_model(tiny_config), empty)


def test_save_errors_and_atomic_write(tmp_path, tiny_config, monkeypatch):
    with pytest.raises(AdapterError, match="no LoRA layers"):
        save_adapter(random_model(tiny_config), tmp_path / "none")
    assert not (tmp_path / "none").exists()
    model = _trained(tiny_config)
    d = save_adapter(model, tmp_path / "a")
    good = (d / ADAPTER_WEIGHTS_NAME).read_bytes()

    import safetensors.torch

    def failing_save(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    with pytest.raises(OutputError, match="adapter_model.safetensors: cannot write \\(disk full\\); the previous file"):
        save_adapter(_trained(tiny_config, seed=2), d)
    assert sorted(os.listdir(d)) == [ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME]  # no temporary left over
    assert (d / ADAPTER_WEIGHTS_NAME).read_bytes() == good  # previous adapter intact
    with pytest.raises(OutputError):
        save_adapter(model, tmp_path / "fresh")
    assert os.listdir(tmp_path / "fresh") == []


def _edited_copy(d, dst, edit):
    tensors = load_file(str(d / ADAPTER_WEIGHTS_NAME))
    edit(tensors)
    dst.mkdir()
    save_file(tensors, str(dst / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
    (dst / ADAPTER_CONFIG_NAME).write_text((d / ADAPTER_CONFIG_NAME).read_text())
    return dst


@pytest.mark.parametrize(
    "value, counts",
    [(float("nan"), r"1 NaN, 0 inf of 256"), (float("inf"), r"0 NaN, 1 inf of 256"), (-float("inf"), r"0 NaN, 1 inf of 256")],
)
def test_non_finite_adapter_tensor(saved, tmp_path, tiny_config, value, counts):
    _, d = saved
    key = _tensor_key(layer=2, ab="B")

    def edit(t):
        t[key][7, 2] = value

    bad = _edited_copy(d, tmp_path / "bad", edit)
    target = random_model(tiny_config, seed=1)
    with pytest.raises(
        AdapterError, match=rf"bad/{ADAPTER_WEIGHTS_NAME}: non-finite values \(NaN/inf\) in tensor\(s\) {re.escape(key)} \({counts}\)"
    ):
        load_adapter(target, bad)
    assert not lora_modules(target)  # untouched


def test_all_nan_adapter_is_one_line_naming_a_few_tensors(saved, tmp_path, tiny_config):
    _, d = saved
    bad = _edited_copy(d, tmp_path / "bad", lambda t: [v.fill_(float("nan")) for v in t.values()])
    with pytest.raises(AdapterError) as e:
        load_adapter(random_model(tiny_config, seed=1), bad)
    msg = str(e.value)
    assert "\n" not in msg and f"bad/{ADAPTER_WEIGHTS_NAME}: non-finite values" in msg
    assert "base_model.model.model.layers.0.ffn.mlp.w2.lora_B.weight (256 NaN, 0 inf of 256)" in msg and "(84 in all)" in msg


def test_integer_adapter_tensor(saved, tmp_path, tiny_config):
    _, d = saved
    key = _tensor_key(layer=1, ab="A")
    bad = _edited_copy(d, tmp_path / "bad", lambda t: t.update({key: t[key].to(torch.int32)}))
    with pytest.raises(AdapterError, match=rf"bad/{ADAPTER_WEIGHTS_NAME}: non-floating dtype in tensor\(s\) {re.escape(key)} \(int32\)"):
        load_adapter(random_model(tiny_config, seed=1), bad)


def test_fp16_adapter_still_loads(saved, tmp_path, tiny_config):
    _, d = saved
    half = _edited_copy(d, tmp_path / "half", lambda t: t.update({k: v.half() for k, v in t.items()}))
    m = load_adapter(random_model(tiny_config, seed=1), half)
    assert lora_modules(m)[Q].lora_A.dtype == torch.float32


def test_non_utf8_adapter_config(saved, tmp_path, tiny_config):
    _, d = saved
    bad = _edited_copy(d, tmp_path / "bad", lambda t: None)
    (bad / ADAPTER_CONFIG_NAME).write_bytes(b'{"peft_type": "LORA\xff"}')
    with pytest.raises(AdapterError, match=rf"bad/{ADAPTER_CONFIG_NAME}: not valid JSON"):
        load_adapter(random_model(tiny_config, seed=1), bad)
