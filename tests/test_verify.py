"""``e1min verify-lora``: all checks pass on a tiny model and on a checkpoint, and broken LoRA is caught."""

import torch

import e1min.verify
from e1min.lora import LoRALinear
from e1min.verify import CHECK_NAMES, main, run_checks


def _by_name(results):
    return {r.name: r for r in results}


def test_all_checks_pass_and_cli_output(capsys):
    assert main([]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    checks = [line for line in lines if line.startswith("[")]
    assert len(checks) == len(CHECK_NAMES) == 8
    assert all(line.startswith("[PASS] ") for line in checks), "\n".join(checks)
    assert "max|Δlogits| = 0.0e+00" in checks[0]
    assert lines[-1] == "8/8 checks passed"


def test_checkpoint_argument(tiny_checkpoint, capsys):
    assert main([str(tiny_checkpoint), "--r", "2", "--alpha", "4"]) == 0
    assert "8/8 checks passed" in capsys.readouterr().out


def test_nonzero_b_init_is_caught(monkeypatch, capsys):
    def bad_init(self):
        with torch.no_grad():
            torch.nn.init.kaiming_uniform_(self.lora_A, a=5**0.5)
            self.lora_B.fill_(1e-3)

    monkeypatch.setattr(LoRALinear, "reset_lora_parameters", bad_init)
    assert main([]) == 1
    out = capsys.readouterr().out
    assert "[FAIL] fresh adapter is a no-op" in out
    assert "[FAIL] gradients at step 0 and 1" in out


def test_unfrozen_base_is_caught(monkeypatch):
    real_apply = e1min.verify.apply_lora

    def leaky_apply(model, **kw):
        real_apply(model, **kw)
        model.model.norm.weight.requires_grad_(True)
        return model

    monkeypatch.setattr(e1min.verify, "apply_lora", leaky_apply)
    res = _by_name(run_checks())
    assert not res["frozen parameters unchanged by training"].passed
    assert not res["trainable count = closed form"].passed
    assert res["fresh adapter is a no-op"].passed


def test_wrong_merge_is_caught(monkeypatch):
    real = LoRALinear.delta_weight
    monkeypatch.setattr(LoRALinear, "delta_weight", lambda self: 2 * real(self))
    res = _by_name(run_checks())
    assert not res["merge / unmerge"].passed
    assert res["save / load round trip"].passed


def test_lossy_save_is_caught(monkeypatch):
    import e1min.adapters

    real = e1min.adapters.adapter_tensors
    monkeypatch.setattr(e1min.adapters, "adapter_tensors", lambda m: {k: v.bfloat16() for k, v in real(m).items()})
    res = _by_name(run_checks())
    assert not res["save / load round trip"].passed
