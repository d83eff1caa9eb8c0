"""Checkpoint loading: round trips, sharding, bf16, offline Hub cache, and every bad-checkpoint error."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from e1min.hub import CheckpointError, load_model
from e1min.random_checkpoint import write_random_checkpoint
from e1min.tokenizer import prepare_batch

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
