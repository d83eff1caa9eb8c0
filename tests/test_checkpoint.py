"""Run state directories: round trip, and every malformed or suspicious file is a one-line error naming it."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from e1min.adapters import ADAPTER_WEIGHTS_NAME, AdapterError
from e1min.checkpoint import (
    HEADS_FILE,
    META_FILE,
    OPTIMIZER_FILE,
    RunCheckpointError,
    check_resume_state,
    load_heads,
    load_state,
    read_meta,
    save_state,
)
from e1min.config import preset
from e1min.heads import BindingModel
from e1min.lora import apply_lora, lora_modules
from e1min.random_checkpoint import random_model

IONS = ["ZN", "CA"]


def _model(seed: int = 0) -> BindingModel:
    torch.manual_seed(seed)
    backbone = apply_lora(random_model(preset("tiny"), seed=1), r=2, alpha=4)
    return BindingModel(backbone, IONS)


def _optimizer(model: BindingModel) -> torch.optim.Optimizer:
    from e1min.train import build_optimizer

    return build_optimizer(model, 1e-3, 0.01)


def _meta(model: BindingModel) -> dict:
    """What FoldTrainer.meta writes (plus trainer_state for last/)."""
    return {
        "fold": 1,
        "epoch": 1,
        "ions": IONS,
        "seed": 0,
        "base_model": "tiny-e1",
        "base_revision": None,
        "base_config": model.backbone.config.to_dict(),
        "lora": {  # what the model's LoRA is (checkpoint.check_adapter_agrees compares it with adapter_config.json)
            "r": model.backbone.lora_config.r,
            "alpha": model.backbone.lora_config.alpha,
            "lora_dropout": model.backbone.lora_config.dropout,
            "target_modules": list(model.backbone.lora_config.target_modules),
            "train_mlm_head": False,
            "use_rslora": False,
            "layers": None,
        },
        "head_dropout": 0.0,
        "max_query_length": 64,
        "max_example_tokens": 1024,
        "validation_msa_sampling": {"max_num_samples": 8},
        "metrics": {"ZN": {"auprc": float("nan")}},
        "runtime": {"precision": "float32", "device": "cpu"},
        "trainer_state": {"epoch": 1, "step": 1, "best_metric": -math.inf, "best_epoch": -1, "bad_epochs": 1, "history": [{"epoch": 1}]},
    }


@pytest.fixture
def last(tmp_path):
    """A resumable last/ state of a tiny BindingModel after one AdamW step."""
    model = _model()
    opt = _optimizer(model)
    with torch.no_grad():
        for m in lora_modules(model.backbone).values():
            m.lora_B.normal_(0, 0.1)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p)
    opt.step()
    d = tmp_path / "fold_1" / "last"
    save_state(d, model, _meta(model), opt)
    return d, model, opt


def _edit_meta(d, edit):
    meta = json.loads((d / META_FILE).read_text())
    edit(meta)
    (d / META_FILE).write_text(json.dumps(meta))


def _edit_tensors(path, edit, metadata=None):
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    edit(tensors)
    save_file(tensors, str(path), metadata=meta if metadata is None else metadata)


def _resume(d):
    model = _model(seed=5)
    return load_state(d, model, _optimizer(model))


# --------------------------------------------------------------------------------------- round trip


def test_round_trip_restores_everything(last):
    d, model, opt = last
    fresh = _model(seed=5)
    fresh_opt = _optimizer(fresh)
    meta = check_resume_state(d, fresh, fresh_opt)
    assert not fresh_opt.state  # checking changes nothing
    meta = load_state(d, fresh, fresh_opt)
    assert meta["trainer_state"]["best_metric"] is None  # -inf written as null by strict JSON, accepted
    for (n, a), b in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(a, b), n
    for p, q in zip(model.parameters(), fresh.parameters()):
        if p.requires_grad:
            s, t = opt.state[p], fresh_opt.state[q]
            assert set(s) == set(t) and all(torch.equal(s[k].float(), t[k].float()) for k in s)
    assert fresh_opt.param_groups[0]["betas"] == opt.param_groups[0]["betas"]


def test_older_checkpoint_without_optional_fields_loads(last):
    d, _, _ = last
    _edit_meta(d, lambda m: [m.pop(k) for k in ("runtime", "seed", "e1min_version", "max_example_tokens")])
    meta = read_meta(d)
    assert "runtime" not in meta and meta["ions"] == IONS


# --------------------------------------------------------------------------------- 1. tensor values


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_head_tensor(last, value):
    d, _, _ = last

    def edit(t):
        t["CA.proj.weight"][0, 3] = value

    _edit_tensors(d / HEADS_FILE, edit)
    with pytest.raises(RunCheckpointError, match=rf"{HEADS_FILE}: tensor 'CA.proj.weight' has non-finite values \(\d NaN, \d inf of 64\)"):
        load_heads(d, _model())
    with pytest.raises(RunCheckpointError, match=rf"fold_1/last/{HEADS_FILE}: tensor 'CA.proj.weight'"):
        _resume(d)


def test_all_nan_heads(last):
    d, _, _ = last
    _edit_tensors(d / HEADS_FILE, lambda t: [v.fill_(float("nan")) for v in t.values()])
    with pytest.raises(RunCheckpointError, match=rf"{HEADS_FILE}: tensor '\w+\.\w+\.\w+' has non-finite values"):
        load_heads(d, _model())


def test_integer_head_tensor(last):
    d, _, _ = last

    def edit(t):
        t["ZN.proj.weight"] = t["ZN.proj.weight"].to(torch.int32)

    _edit_tensors(d / HEADS_FILE, edit)
    with pytest.raises(RunCheckpointError, match=rf"{HEADS_FILE}: tensor 'ZN.proj.weight' has non-floating dtype int32"):
        load_heads(d, _model())


def test_bf16_heads_still_load(last):
    d, model, _ = last
    _edit_tensors(d / HEADS_FILE, lambda t: t.update({k: v.bfloat16() for k, v in t.items()}))
    fresh = _model(seed=5)
    load_heads(d, fresh)
    assert torch.equal(fresh.heads["ZN"].proj.weight, model.heads["ZN"].proj.weight.bfloat16().float())


def test_nan_adapter_tensor_through_load_state(last):
    d, _, _ = last
    key = "base_model.model.model.layers.1.norm_attn_norm.self_attn.v_proj.lora_B.weight"

    def edit(t):
        t[key][5, 1] = float("nan")

    _edit_tensors(d / ADAPTER_WEIGHTS_NAME, edit)
    model = _model(seed=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterError, match=rf"{ADAPTER_WEIGHTS_NAME}: .*{re.escape(key)} \(1 NaN, 0 inf of 128\)"):
        load_state(d, model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing half-loaded


# ----------------------------------------------------------------------------- 2. checkpoint.json


def test_checkpoint_json_list(last):
    d, _, _ = last
    (d / META_FILE).write_text("[1, 2]")
    with pytest.raises(RunCheckpointError, match=rf"fold_1/last/{META_FILE}: expected a JSON object, got list \[1, 2\]"):
        read_meta(d)


def test_checkpoint_json_non_utf8(last):
    d, _, _ = last
    (d / META_FILE).write_bytes(b'{"format_version": 1, "ions": ["Z\xffN"]}')
    with pytest.raises(RunCheckpointError, match=rf"{META_FILE}: not valid JSON \(UnicodeDecodeError: 'utf-8' codec"):
        read_meta(d)


def test_string_max_query_length_exact_message(last):
    d, _, _ = last
    _edit_meta(d, lambda m: m.update(max_query_length="64"))
    with pytest.raises(RunCheckpointError) as e:
        read_meta(d)
    assert str(e.value) == f"{d / META_FILE}: 'max_query_length' must be an integer >= 2 or null, got str '64'"


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("base_config", [64, 4], r"'base_config' must be an object, got list \[64, 4\]"),
        ("base_config", "tiny", r"'base_config' must be an object, got str 'tiny'"),
        ("ions", [], r"'ions' must be a non-empty list"),
        ("ions", ["ZN", 3], r"'ions' must be a non-empty list .*got list \['ZN', 3\]"),
        ("ions", "ZN", r"'ions' must be a non-empty list"),
        ("fold", "1", r"'fold' must be an integer >= 1, got str '1'"),
        ("epoch", 1.5, r"'epoch' must be an integer >= 0, got float 1.5"),
        ("seed", True, r"'seed' must be an integer, got bool True"),
        ("base_model", None, r"'base_model' must be a non-empty string, got null"),
        ("base_revision", 7, r"'base_revision' must be a non-empty string or null, got int 7"),
        ("lora", None, r"'lora' must be an object"),
        ("head_dropout", "0.1", r"'head_dropout' must be a number in \[0, 1\), got str '0.1'"),
        ("max_query_length", 1, r"'max_query_length' must be an integer >= 2 or null, got int 1"),
        ("max_example_tokens", 0, r"'max_example_tokens' must be an integer >= 1 or null, got int 0"),
        ("validation_msa_sampling", [], r"'validation_msa_sampling' must be an object or null"),
        ("metrics", None, r"'metrics' must be an object"),
        ("trainer_state", [], r"'trainer_state' must be an object"),
        ("runtime", "cpu", r"'runtime' must be an object, got str 'cpu'"),
    ],
)
def test_wrong_field_types(last, field, value, message):
    d, _, _ = last
    _edit_meta(d, lambda m: m.update({field: value}))
    with pytest.raises(RunCheckpointError, match=rf"fold_1/last/{META_FILE}: {message}"):
        read_meta(d)


def test_long_values_are_cut(last):
    d, _, _ = last
    _edit_meta(d, lambda m: m.update(base_model=["x" * 500]))
    with pytest.raises(RunCheckpointError) as e:
        read_meta(d)
    assert "'base_model' must be a non-empty string" in str(e.value) and len(str(e.value)) < len(str(d)) + 200


@pytest.mark.parametrize("field", ["ions", "base_config", "fold", "metrics"])
def test_missing_required_field(last, field):
    d, _, _ = last
    _edit_meta(d, lambda m: m.pop(field))
    with pytest.raises(RunCheckpointError, match=rf"{META_FILE}: missing field '{field}'"):
        read_meta(d)


def test_bad_base_config_field_names_dotted_path(last):
    d, _, _ = last
    _edit_meta(d, lambda m: m["base_config"].update(hidden_size="64"))
    with pytest.raises(RunCheckpointError, match=rf"{META_FILE}: 'base_config': 'hidden_size' must be an integer >= 1, got str '64'"):
        read_meta(d)


def test_format_version_checked_first(last):
    d, _, _ = last
    _edit_meta(d, lambda m: m.update(format_version="1", ions=None))
    with pytest.raises(RunCheckpointError, match="checkpoint format version '1'"):
        read_meta(d)


# --------------------------------------------------------------------------------- 3. resume state


def test_resume_without_trainer_state(last):
    d, _, _ = last
    _edit_meta(d, lambda m: m.pop("trainer_state"))
    read_meta(d)  # fine for prediction
    with pytest.raises(RunCheckpointError, match=rf"fold_1/last/{META_FILE}: missing field 'trainer_state'"):
        _resume(d)
    model = _model()
    with pytest.raises(RunCheckpointError, match="missing field 'trainer_state'"):
        check_resume_state(d, model, _optimizer(model))


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("epoch", "1", "'trainer_state.epoch' must be an integer >= 0, got str '1'"),
        ("step", 1.5, "'trainer_state.step' must be an integer >= 0, got float 1.5"),
        ("best_epoch", None, "'trainer_state.best_epoch' must be an integer >= -1, got null"),
        ("bad_epochs", True, "'trainer_state.bad_epochs' must be an integer >= 0, got bool True"),
        ("best_metric", "0.5", "'trainer_state.best_metric' must be a number or null, got str '0.5'"),
        ("history", {}, "'trainer_state.history' must be a list of objects, got dict {}"),
        ("history", [1], "'trainer_state.history' must be a list of objects, got list [1]"),
    ],
)
def test_wrong_trainer_state_types(last, field, value, message):
    d, _, _ = last
    _edit_meta(d, lambda m: m["trainer_state"].update({field: value}))
    with pytest.raises(RunCheckpointError) as e:
        _resume(d)
    assert str(e.value) == f"{d / META_FILE}: {message}"


def test_trainer_state_missing_and_unknown_fields(last):
    d, _, _ = last
    _edit_meta(d, lambda m: m["trainer_state"].pop("step"))
    with pytest.raises(RunCheckpointError, match=rf"{META_FILE}: missing field 'trainer_state.step'"):
        _resume(d)
    _edit_meta(d, lambda m: m["trainer_state"].update(step=3, colour="red"))
    with pytest.raises(RunCheckpointError, match=rf"{META_FILE}: unknown field\(s\) trainer_state.colour"):
        _resume(d)


def test_trainer_state_builds_a_fold_state(last):
    from e1min.train import FoldState

    d, _, _ = last
    state = FoldState(**_resume(d)["trainer_state"])
    assert state.epoch == 1 and state.step == 1 and state.best_metric is None


@pytest.mark.parametrize("how", ["truncated", "garbage", "empty"])
def test_unreadable_optimizer_state(last, how):
    d, _, _ = last
    path = d / OPTIMIZER_FILE
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x00\xff" * 100, "empty": b""}[how])
    with pytest.raises(RunCheckpointError, match=rf"fold_1/last/{OPTIMIZER_FILE}: unreadable or truncated safetensors file"):
        _resume(d)


def test_missing_optimizer_state(last):
    d, _, _ = last
    (d / OPTIMIZER_FILE).unlink()
    with pytest.raises(RunCheckpointError, match=rf"{OPTIMIZER_FILE}: missing optimizer state"):
        _resume(d)


A = "heads.ZN.proj.weight"


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda t: t.update({"heads.FE.proj.weight::exp_avg": torch.zeros(1, 64)}),
            r"tensor 'heads.FE.proj.weight::exp_avg' does not name a parameter",
        ),
        (lambda t: t.update({"no_separator": torch.zeros(1)}), r"tensor 'no_separator' does not name a parameter"),
        (
            lambda t: t.update({f"{A}::exp_avg": torch.zeros(64, 1)}),
            rf"tensor '{A}::exp_avg' has shape \[64, 1\], the parameter has \[1, 64\]",
        ),
        (
            lambda t: t.update({f"{A}::exp_avg_sq": torch.full((1, 64), float("nan"))}),
            rf"tensor '{A}::exp_avg_sq' has non-finite values \(64 NaN",
        ),
        (lambda t: t.update({f"{A}::step": torch.tensor(float("inf"))}), rf"tensor '{A}::step' has non-finite values"),
        (lambda t: t.update({f"{A}::step": torch.zeros(2)}), rf"tensor '{A}::step' must be a scalar step count"),
        (
            lambda t: t.update({f"{A}::exp_avg": torch.zeros(1, 64, dtype=torch.int32)}),
            rf"tensor '{A}::exp_avg' has non-floating dtype int32",
        ),
        (lambda t: t.update({f"{A}::momentum": torch.zeros(1, 64)}), rf"tensor '{A}::momentum': unknown optimizer state 'momentum'"),
        (lambda t: t.pop(f"{A}::exp_avg_sq"), rf"incomplete state of parameter '{A}': missing {A}::exp_avg_sq"),
    ],
)
def test_optimizer_tensors_checked_against_parameters(last, edit, message):
    d, _, _ = last
    _edit_tensors(d / OPTIMIZER_FILE, edit)
    model = _model(seed=5)
    opt = _optimizer(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RunCheckpointError, match=rf"fold_1/last/{OPTIMIZER_FILE}: {message}"):
        load_state(d, model, opt)
    assert not opt.state and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "metadata, message",
    [
        ({"format": "pt"}, "no 'param_groups' in the safetensors metadata"),
        ({"format": "pt", "param_groups": "[{"}, "metadata 'param_groups' is not valid JSON"),
        ({"format": "pt", "param_groups": '{"lr": 1}'}, "metadata 'param_groups' must be a list of objects, got dict"),
        ({"format": "pt", "param_groups": '[{"lr": 0.1}]'}, r"metadata 'param_groups' has 1 group\(s\), the optimizer has 2"),
        (
            {"format": "pt", "param_groups": '[{"lr": "fast"}, {}]'},
            r"metadata 'param_groups\[0\].lr' must be like float 0.001, got str 'fast'",
        ),
        ({"format": "pt", "param_groups": '[{"betas": [0.9]}, {}]'}, r"metadata 'param_groups\[0\].betas' must be like tuple"),
    ],
)
def test_optimizer_param_groups_metadata(last, metadata, message):
    d, _, _ = last
    _edit_tensors(d / OPTIMIZER_FILE, lambda t: None, metadata=metadata)
    with pytest.raises(RunCheckpointError, match=rf"{OPTIMIZER_FILE}: {message}"):
        _resume(d)


@pytest.mark.parametrize("version", [1.0, True, 2, None])
def test_format_version_must_be_the_integer_1(last, version):
    d, _, _ = last
    _edit_meta(d, lambda m: m.update(format_version=version))
    with pytest.raises(
        RunCheckpointError, match=rf"{META_FILE}: checkpoint format version {re.escape(repr(version))}; this e1min reads version 1"
    ):
        read_meta(d)


def test_trainer_resume_reports_a_garbage_optimizer_state(tmp_path, tiny_checkpoint, monkeypatch):
    """The trainer's own resume path (FoldTrainer.run -> load_state) fails before the first step, naming the file."""
    import e1min.train as train
    from tests.helpers import toy_config

    cfg = toy_config(tmp_path, tiny_checkpoint, training={"epochs": 2, "early_stop_patience": 10})
    original = train.FoldTrainer.end_epoch

    def crash_after_first_epoch(self, epoch, *a):
        original(self, epoch, *a)
        raise KeyboardInterrupt

    monkeypatch.setattr(train.FoldTrainer, "end_epoch", crash_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        train.main(["--config", str(cfg)])
    monkeypatch.setattr(train.FoldTrainer, "end_epoch", original)
    last = tmp_path / "out/fold_1/last"
    (last / OPTIMIZER_FILE).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    steps = []
    monkeypatch.setattr(train.FoldTrainer, "optimizer_step", lambda self: steps.append(1))
    with pytest.raises(RunCheckpointError, match=rf"fold_1/last/{OPTIMIZER_FILE}: unreadable or truncated safetensors file"):
        train.main(["--config", str(cfg), "--resume"])
    assert not steps
