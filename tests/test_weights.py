"""Checkpoint loading: round trips, sharding, bf16, offline Hub cache, and every bad-checkpoint error.

Also: the old import paths (``e1min.hub``, ``e1min.random_checkpoint``) still work, and every e1min
module imports on its own in a fresh interpreter (no import cycle).
"""

import ast
import importlib.util
import json
import os
import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import e1min
from e1min.tokenizer import prepare_batch
from e1min.weights import CheckpointError, load_model, write_random_checkpoint

ROWS = ["ACDEFG,MKTAYIAKQR", "MKV"]


def _outputs(model):
    with torch.no_grad():
        return model(**prepare_batch(ROWS))


def test_round_trip_identical(tiny_checkpoint, tiny_model):
    loaded = load_model(tiny_checkpoint, dtype=torch.float32)
    assert not loaded.training
    a, b = _outputs(tiny_model), _outputs(loaded)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.embeddings, b.embeddings)


def test_sharded_round_trip(tmp_path, tiny_config, tiny_model):
    write_random_checkpoint(tmp_path, tiny_config, seed=1, max_shard_bytes=50_000)
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert torch.equal(_outputs(load_model(tmp_path, dtype=torch.float32)).logits, _outputs(tiny_model).logits)


def test_bf16_checkpoint_cast_to_requested_dtype(tmp_path, tiny_config, tiny_model):
    write_random_checkpoint(tmp_path, tiny_config, seed=1, dtype=torch.bfloat16)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    default = load_model(tmp_path)
    assert default.model.embed_tokens.weight.dtype == torch.bfloat16
    as_f32 = load_model(tmp_path, dtype=torch.float32)
    assert as_f32.model.embed_tokens.weight.dtype == torch.float32
    assert torch.equal(as_f32.model.embed_tokens.weight, tiny_model.model.embed_tokens.weight.bfloat16().float())


def test_offline_hub_cache(tmp_path, tiny_checkpoint, tiny_model, monkeypatch):
    """A pre-populated HF cache with HF_HUB_OFFLINE=1: the repo id resolves without network."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--Profluent-Bio--E1-150m"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in ("config.json", "model.safetensors"):
        shutil.copy(tiny_checkpoint / f, snap / f)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    model = load_model("Profluent-Bio/E1-150m", dtype=torch.float32)
    assert torch.equal(_outputs(model).logits, _outputs(tiny_model).logits)
    with pytest.raises(CheckpointError, match="Profluent-Bio/E1-300m"):
        load_model("Profluent-Bio/E1-300m")


def test_repackaged_key_prefix(tmp_path, tiny_checkpoint, tiny_model):
    state = load_file(tiny_checkpoint / "model.safetensors")
    save_file({"e1." + k: v for k, v in state.items()}, tmp_path / "model.safetensors")
    shutil.copy(tiny_checkpoint / "config.json", tmp_path / "config.json")
    assert torch.equal(_outputs(load_model(tmp_path, dtype=torch.float32)).logits, _outputs(tiny_model).logits)


def _corrupt(tmp_path, tiny_checkpoint, edit):
    d = tmp_path / "bad"
    shutil.copytree(tiny_checkpoint, d)
    state = load_file(d / "model.safetensors")
    edit(state)
    save_file(state, d / "model.safetensors")
    return d


def test_missing_unexpected_and_wrong_shape_listed_together(tmp_path, tiny_checkpoint):
    def edit(state):
        del state["model.norm.weight"]
        state["model.extra.weight"] = torch.zeros(3)
        state["mlm_head.3.bias"] = torch.zeros(7)

    d = _corrupt(tmp_path, tiny_checkpoint, edit)
    with pytest.raises(CheckpointError) as e:
        load_model(d)
    msg = str(e.value)
    assert "missing tensors: model.norm.weight" in msg
    assert "unexpected tensors: model.extra.weight" in msg
    assert "mlm_head.3.bias: [7] in file, model expects [34]" in msg


def test_truncated_file(tmp_path, tiny_checkpoint):
    d = tmp_path / "trunc"
    shutil.copytree(tiny_checkpoint, d)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unreadable or truncated"):
        load_model(d)


def test_missing_config_and_weights(tmp_path, tiny_checkpoint):
    d = tmp_path / "noconf"
    shutil.copytree(tiny_checkpoint, d)
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json not found"):
        load_model(d)
    d2 = tmp_path / "noweights"
    shutil.copytree(tiny_checkpoint, d2)
    (d2 / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(d2)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.update(model_type="esm"), "model_type is 'esm'"),
        (lambda c: c.pop("hidden_size"), "missing required field.*hidden_size"),
        (lambda c: c.update(hidden_size=65), "not divisible"),
    ],
)
def test_bad_config(tmp_path, tiny_checkpoint, edit, message):
    d = tmp_path / "badconf"
    shutil.copytree(tiny_checkpoint, d)
    conf = json.loads((d / "config.json").read_text())
    edit(conf)
    (d / "config.json").write_text(json.dumps(conf))
    with pytest.raises(CheckpointError, match=message):
        load_model(d)


def test_unknown_config_fields_tolerated(tmp_path, tiny_checkpoint):
    conf = json.loads((tiny_checkpoint / "config.json").read_text())
    conf["architectures"] = ["E1ForMaskedLM"]
    (tiny_checkpoint / "config.json").write_text(json.dumps(conf))
    model = load_model(tiny_checkpoint)
    assert model.config.extra["architectures"] == ["E1ForMaskedLM"]


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        load_model(tmp_path / "nope" / "deeper")


def _with_config(tmp_path, tiny_checkpoint, edit=None, raw=None):
    d = tmp_path / "conf"
    shutil.copytree(tiny_checkpoint, d)
    if raw is not None:
        (d / "config.json").write_bytes(raw)
    else:
        conf = json.loads((d / "config.json").read_text())
        edit(conf)
        (d / "config.json").write_text(json.dumps(conf))
    return d


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("hidden_size", "64", "'hidden_size' must be an integer >= 1, got str '64'"),
        ("num_attention_heads", 0, "'num_attention_heads' must be an integer >= 1, got int 0"),
        ("num_hidden_layers", 2.0, "'num_hidden_layers' must be an integer >= 1, got float 2.0"),
        ("rms_norm_eps", "1e-5", "'rms_norm_eps' must be a number > 0, got str '1e-5'"),
        ("clip_qkv", [8], r"'clip_qkv' must be a number > 0 or null, got list \[8\]"),
        ("gated_mlp", "yes", "'gated_mlp' must be true or false, got str 'yes'"),
        ("torch_dtype", 16, "'torch_dtype' must be a string or null, got int 16"),
    ],
)
def test_config_field_types(tmp_path, tiny_checkpoint, field, value, message):
    d = _with_config(tmp_path, tiny_checkpoint, lambda c: c.update({field: value}))
    with pytest.raises(CheckpointError, match=rf"conf/config.json: {message}"):
        load_model(d)


@pytest.mark.parametrize(
    "raw, message",
    [
        (b'{"hidden_size": 64, "model_type": "E1\xff"}', r"config.json: not valid JSON \('utf-8' codec"),
        (b"[64, 4, 128, 3]", "config.json: expected a JSON object"),
    ],
)
def test_config_not_utf8_or_not_an_object(tmp_path, tiny_checkpoint, raw, message):
    d = _with_config(tmp_path, tiny_checkpoint, raw=raw)
    with pytest.raises(CheckpointError, match=rf"conf/{message}"):
        load_model(d)


def test_config_torch_dtype_must_be_floating(tmp_path, tiny_checkpoint):
    d = _with_config(tmp_path, tiny_checkpoint, lambda c: c.update(torch_dtype="int32"))
    with pytest.raises(CheckpointError, match="conf/config.json: 'torch_dtype' must name a floating-point dtype, got str 'int32'"):
        load_model(d)
    d2 = _with_config(tmp_path / "x", tiny_checkpoint, lambda c: c.update(torch_dtype="auto"))
    assert load_model(d2).model.norm.weight.dtype == torch.float32  # unknown names: the model's default


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_base_weight(tmp_path, tiny_checkpoint, value):
    def edit(state):
        state["model.layers.1.ffn.mlp.w2.weight"][3, 5] = value

    d = _corrupt(tmp_path, tiny_checkpoint, edit)
    with pytest.raises(
        CheckpointError, match=r"bad/model\.safetensors: tensor 'model\.layers\.1\.ffn\.mlp\.w2\.weight' has non-finite values"
    ):
        load_model(d)


def test_all_nan_base_weight_in_a_shard(tmp_path, tiny_config):
    write_random_checkpoint(tmp_path, tiny_config, seed=1, max_shard_bytes=50_000)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    state = load_file(shard)
    key = sorted(state)[0]
    state[key].fill_(float("nan"))
    save_file(state, shard, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"{shard.name}: tensor '{key}' has non-finite values \(\d+ NaN, 0 inf"):
        load_model(tmp_path, dtype=torch.float32)


def test_overflow_when_cast_is_named(tmp_path, tiny_checkpoint):
    d = _corrupt(tmp_path, tiny_checkpoint, lambda s: s["model.norm.weight"].fill_(1e6))
    assert load_model(d, dtype=torch.float32) is not None  # finite in float32
    with pytest.raises(CheckpointError, match=r"tensor 'model\.norm\.weight' has non-finite values after the cast from float32 to float16"):
        load_model(d, dtype=torch.float16)


def test_large_but_finite_sums_are_not_flagged(tmp_path, tiny_checkpoint):
    """A float16 sum that overflows is re-checked element-wise, not reported."""
    d = _corrupt(tmp_path, tiny_checkpoint, lambda s: s["model.embed_tokens.weight"].fill_(60000.0))
    assert load_model(d, dtype=torch.float16).model.embed_tokens.weight.dtype == torch.float16


def test_integer_base_weight(tmp_path, tiny_checkpoint):
    d = _corrupt(tmp_path, tiny_checkpoint, lambda s: s.update({"model.norm.weight": s["model.norm.weight"].to(torch.int32)}))
    with pytest.raises(CheckpointError, match=r"bad/model\.safetensors: tensor 'model\.norm\.weight' has non-floating dtype I32"):
        load_model(d)


def test_bad_index(tmp_path, tiny_config):
    write_random_checkpoint(tmp_path, tiny_config, seed=1, max_shard_bytes=50_000)
    index = tmp_path / "model.safetensors.index.json"
    index.write_bytes(b'{"weight_map": {"a": "\xff"}}')
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: not a valid safetensors index \(UnicodeDecodeError"):
        load_model(tmp_path)
    index.write_text(json.dumps({"weight_map": {"model.norm.weight": "../elsewhere.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"index\.json: 'weight_map' must be an object tensor name -> shard file name"):
        load_model(tmp_path)


def test_old_import_paths_still_work():
    import e1min.hub as hub
    import e1min.random_checkpoint as rc
    import e1min.weights as w

    for name in (
        "CONFIG_NAME",
        "INDEX_NAME",
        "WEIGHTS_NAME",
        "CheckpointError",
        "load_state_dict",
        "normalize_key",
        "resolve_checkpoint",
        "resolve_directory",
        "save_model",
        "weight_files",
    ):
        assert getattr(hub, name) is getattr(w, name), name
    assert rc.random_model is w.random_model and rc.write_random_checkpoint is w.write_random_checkpoint
    assert e1min.load_model is hub.load_model  # the public one also takes adapter=


def test_hub_load_model_applies_adapter(tmp_path, tiny_checkpoint):
    from e1min.adapters import save_adapter
    from e1min.hub import load_model as load_with_adapter
    from e1min.lora import apply_lora, lora_modules, lora_state_dict

    model = apply_lora(load_model(tiny_checkpoint, dtype=torch.float32), r=2, alpha=4)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.fill_(0.01)
    save_adapter(model, tmp_path / "a")
    loaded = load_with_adapter(tiny_checkpoint, dtype=torch.float32, adapter=tmp_path / "a")
    want, got = lora_state_dict(model), lora_state_dict(loaded)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert not lora_modules(load_model(tiny_checkpoint))  # weights.load_model: base only


def _e1min_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(e1min.__path__, "e1min."))


def _imported_e1min_modules(module: str) -> set[str]:
    """Every e1min module ``module`` imports, at the top or inside a function."""
    spec = importlib.util.find_spec(module)
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m.startswith("e1min.")}


def test_weights_does_not_import_adapters_or_hub():
    assert not _imported_e1min_modules("e1min.weights") & {"e1min.adapters", "e1min.hub", "e1min.random_checkpoint"}


# Runs in one subprocess: third-party packages are imported once, then each e1min module is imported in
# a forked child that has no e1min module loaded yet (what matters for import cycles).
_IMPORT_EACH = """
import os, sys, traceback
import numpy, torch, safetensors.torch, yaml  # third-party only: forked children start without e1min
assert not [m for m in sys.modules if m == "e1min" or m.startswith("e1min.")]
failed = 0
for module in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        try:
            __import__(module)
        except BaseException:
            print(module + ": " + traceback.format_exc().strip().splitlines()[-1], flush=True)
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    failed += status != 0
sys.exit(1 if failed else 0)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_every_module_imports_alone_in_a_fresh_interpreter():
    modules = _e1min_modules()
    assert {"e1min.weights", "e1min.hub", "e1min.adapters", "e1min.lora", "e1min.data.fasta"} <= set(modules)
    out = subprocess.run([sys.executable, "-c", _IMPORT_EACH, *modules], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr[-2000:]
