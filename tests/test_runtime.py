"""Precision and device choices: explicit, never taken from CPU flags, recorded; both bf16-detection outcomes.

The host's own CPU flags never decide a result here: every test that cares forces the "native bf16"
detection one way or the other with monkeypatch, so an AVX2-only host exercises the bf16 code and a
host with AVX512-BF16/AMX exercises the float32 code.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

import e1min.runtime as runtime
from e1min.data.dataset import Example
from e1min.dist import DistContext
from e1min.heads import BindingModel
from e1min.lora import apply_lora
from e1min.scoring import score_examples

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture(params=[False, True], ids=["avx2-only", "native-bf16"])
def native_bf16(request, monkeypatch):
    """Run the test as on a CPU without and with native bf16, whatever this host has."""
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: request.param)
    monkeypatch.setattr(runtime, "_warned", set())
    return request.param


def test_inference_defaults_never_follow_cpu_flags(native_bf16):
    assert runtime.inference_precision(CPU) == "float32"
    assert runtime.inference_precision(CUDA) == "bf16"  # bf16 autocast is the norm on GPUs
    assert runtime.inference_precision(CUDA, "float32") == "float32"
    assert runtime.inference_precision(CPU, "bfloat16") == "bf16"  # asked for: honoured on every CPU


def test_bf16_request_on_slow_cpu_is_honoured_with_one_note(native_bf16, caplog):
    with caplog.at_level(logging.WARNING, logger="e1min"):
        for _ in range(3):
            assert runtime.inference_precision(CPU, "bf16") == "bf16"
    notes = [r for r in caplog.records if "slower" in r.getMessage()]
    assert len(notes) == (0 if native_bf16 else 1)


def test_training_precision_ignores_bf16_only_where_it_is_emulated(native_bf16, caplog):
    with caplog.at_level(logging.WARNING, logger="e1min"):
        assert runtime.training_precision(CPU, False) == "float32"
        assert runtime.training_precision(CPU, True) == ("bf16" if native_bf16 else "float32")
        assert runtime.training_precision(CUDA, True) == "bf16"
    assert any("ignored" in r.getMessage() for r in caplog.records) == (not native_bf16)


@pytest.mark.parametrize("value", ["fp16", "half", "", "bf16 "])
def test_parse_precision(value):
    if value.strip() in ("bf16",):
        assert runtime.parse_precision(value) == "bf16"
    else:
        with pytest.raises(ValueError, match="precision must be one of float32, bf16"):
            runtime.parse_precision(value)


def test_autocast_follows_the_precision():
    x = torch.randn(4, 8)
    w = torch.randn(8, 8)
    with runtime.autocast(CPU, "bf16"):
        assert (x @ w).dtype == torch.bfloat16
        with runtime.float32_island("cpu"):
            assert (x @ w).dtype == torch.float32
    with runtime.autocast(CPU, "float32"):
        assert (x @ w).dtype == torch.float32


@pytest.mark.parametrize(
    "device,error", [("gpu0", "cpu, cuda or cuda:N"), ("cuda:x", "cpu, cuda or cuda:N"), ("cpu:0", "cpu, cuda or cuda:N")]
)
def test_bad_device_names(device, error):
    with pytest.raises(ValueError, match=error):
        runtime.resolve_device(device)


def test_cuda_without_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available"):
        runtime.resolve_device("cuda")
    assert runtime.resolve_device(None) == CPU


def test_matmul_precision_is_explicit():
    before = torch.get_float32_matmul_precision()
    try:
        runtime.set_matmul_precision("high")
        assert runtime.describe(CPU, "float32") == {"precision": "float32", "device": "cpu", "matmul_precision": "high", "compiled": False}
        with pytest.raises(ValueError, match="highest, high, medium"):
            runtime.set_matmul_precision("low")
    finally:
        torch.set_float32_matmul_precision(before)


# --------------------------------------------------------------------------- bf16 paths, any host


def _examples(n: int = 12) -> list[Example]:
    rng = np.random.default_rng(3)
    out = []
    for i in range(n):
        seq = "".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), int(rng.integers(20, 60))))
        out.append(Example(f"p{i}", "ZN", seq, None, context=[]))
    return out


def _binding_model(tiny_model) -> BindingModel:
    apply_lora(tiny_model, r=4, alpha=8)
    torch.manual_seed(0)
    model = BindingModel(tiny_model, ["ZN"], head_dropout=0.0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model


def test_bf16_probabilities_are_float32_and_not_quantised(tiny_model, native_bf16):
    model = _binding_model(tiny_model)
    exs = _examples()
    ref = np.concatenate(score_examples(model, exs, "ZN", CPU, 4096, "float32"))
    bf = np.concatenate(score_examples(model, exs, "ZN", CPU, 4096, "bf16"))
    assert bf.dtype == np.float32 and ref.dtype == np.float32
    # A bf16 head would round every logit to 8 mantissa bits: a few hundred distinct values at most.
    # The float32 head on bf16 hidden states keeps (nearly) every residue's value distinct.
    assert len(np.unique(bf)) > 0.9 * len(bf)
    # bf16 hidden states carry ~3 significant digits (relative error 2^-8 per rounding, a few roundings
    # per layer over 6 layers): probabilities agree with float32 to ~1e-2, not to round-off.
    assert np.abs(bf - ref).max() < 2e-2
    assert np.abs(bf - ref).max() > 0  # and the bf16 path really ran


def test_ion_head_runs_float32_under_autocast(tiny_model):
    model = _binding_model(tiny_model)
    seen = {}
    model.heads["ZN"].proj.register_forward_hook(lambda m, i, o: seen.update(inp=i[0].dtype, out=o.dtype))
    h = torch.randn(2, 9, tiny_model.config.hidden_size).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = model.heads["ZN"](h)
    assert seen == {"inp": torch.float32, "out": torch.float32}
    assert torch.equal(under, model.heads["ZN"](h))  # bit-identical to the head outside autocast


def test_training_step_under_bf16_keeps_loss_and_trainables_float32(tiny_model, native_bf16):
    from e1min.data.collate import MaskingConfig, collate
    from e1min.heads import loss_sums
    from e1min.train import LossSpec, backward_window

    model = _binding_model(tiny_model)
    exs = [
        Example(e.protein_id, "ZN", e.query, (np.arange(len(e.query)) % 5 == 0).astype(np.uint8), context=["MKVL"]) for e in _examples(4)
    ]
    batch = collate(exs, masking=MaskingConfig(probability=0.3), seed=0, epoch=0, label_smoothing=0.1)
    mlm_pos = batch["mlm_labels"] != -100
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch, "ZN", mlm_pos)
        terms = loss_sums(out, batch, pos_weight=3.0)
    assert out.binding_logits.dtype == torch.float32 and out.mlm_logits.dtype == torch.float32
    assert terms.bce_sum.dtype == torch.float32 and terms.mlm_sum.dtype == torch.float32
    # The loss on the same logits is bit-identical with and without autocast around it.
    plain = loss_sums(out, batch, pos_weight=3.0)
    assert torch.equal(terms.bce_sum, plain.bce_sum) and torch.equal(terms.mlm_sum, plain.mlm_sum)
    stats = backward_window(model, [(batch, "ZN")], DistContext(), LossSpec({"ZN": 3.0}, 1.0), "bf16")
    assert torch.isfinite(stats).all()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and g.dtype == torch.float32 for g in grads.values())


def test_predictor_and_trainer_record_what_ran(tmp_path, tiny_checkpoint, native_bf16):
    """checkpoint.json and the predictor carry precision and device; the default stays float32 on CPU."""
    import json

    from e1min.predict import load_checkpoint
    from e1min.train import main as train_main
    from tests.helpers import toy_config

    cfg = toy_config(tmp_path, tiny_checkpoint, training={"epochs": 1, "bf16": True})
    assert train_main(["--config", str(cfg)]) == 0
    meta = json.loads((tmp_path / "out/fold_1/best/checkpoint.json").read_text())
    assert meta["runtime"]["device"] == "cpu"
    assert meta["runtime"]["precision"] == ("bf16" if native_bf16 else "float32")
    assert load_checkpoint(tmp_path / "out/fold_1").precision == "float32"
    assert load_checkpoint(tmp_path / "out/fold_1", precision="bf16").precision == "bf16"
    assert load_checkpoint(tmp_path / "out/fold_1", bf16=False).precision == "float32"


def test_release_free_memory_trims_on_glibc():
    import platform

    from e1min.runtime import release_free_memory

    done = release_free_memory()
    assert isinstance(done, bool)
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert done  # malloc_trim found and called


def test_checkpointed_forward_releases_memory_after_each_layer(tiny_model, monkeypatch):
    """Only a checkpointed training forward trims (once per layer): inference and the plain step never do."""
    import e1min.model as model_module
    from e1min.tokenizer import prepare_batch

    calls = []
    monkeypatch.setattr(model_module, "release_free_memory", lambda: calls.append(1) or True)
    batch = prepare_batch(["MKTAYIAK,ACDEFG", "MKV"])
    tiny_model.train()
    tiny_model(**batch).logits.sum().backward()
    assert calls == []
    tiny_model.set_gradient_checkpointing(True)
    tiny_model(**batch).logits.sum().backward()
    assert len(calls) == len(tiny_model.model.layers)
    with torch.no_grad():
        tiny_model(**batch)
    assert len(calls) == len(tiny_model.model.layers)


def test_describe_records_the_gpu_and_its_peak_memory(monkeypatch):
    from e1min.runtime import describe

    cpu = describe(torch.device("cpu"), "float32")
    assert cpu == {"precision": "float32", "device": "cpu", "matmul_precision": torch.get_float32_matmul_precision(), "compiled": False}
    assert describe(torch.device("cpu"), "bf16", compiled=True)["compiled"] is True
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: 12_345_678_901)
    gpu = describe(torch.device("cuda:0"), "bf16")
    assert gpu["gpu"] == "NVIDIA H100 80GB HBM3" and gpu["peak_gpu_memory_gb"] == 12.346 and gpu["device"] == "cuda:0"
