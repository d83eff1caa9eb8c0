"""``e1min verify-lora [CHECKPOINT]``: unit-level LoRA checks users can run on their own install.

Runs on a tiny random E1 by default, or on a checkpoint (local directory or Hub id). Prints one line per
check, ``[PASS] name: figure`` or ``[FAIL] ...``, and exits non-zero if any check fails. The same checks
run in the test suite (``tests/test_verify.py``).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from e1min.adapters import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, load_adapter, save_adapter
from e1min.lora import (
    DEFAULT_TARGETS,
    apply_lora,
    load_lora_state_dict,
    lora_modules,
    lora_parameter_count,
    lora_parameters,
    lora_state_dict,
    merge_lora,
    trainable_parameters,
    unmerge_lora,
)
from e1min.tokenizer import prepare_batch

# Two rows, one multi-sequence with padding in the other row, so masks and both layer kinds are exercised.
ROWS = ["MKTAYIAKQRQISFVKSHFSRQ,ACDEFGHIKLMNPQRSTVWY", "MKVLAAGIVGLLLA"]

CHECK_NAMES = (
    "fresh adapter is a no-op",
    "only A changed is a no-op",
    "A and B set change the output",
    "gradients at step 0 and 1",
    "frozen parameters unchanged by training",
    "merge / unmerge",
    "save / load round trip",
    "trainable count = closed form",
)


@dataclass
class CheckResult:
    name: str
    passed: bool
    figure: str

    def __str__(self) -> str:
        return f"[{'PASS' if self.passed else 'FAIL'}] {self.name}: {self.figure}"


def _outputs(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        out = model(**batch)
    return out.logits, out.embeddings


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def _loss(model, batch) -> torch.Tensor:
    """A small MLM-style objective: predict every real token from the (unmasked) sequence."""
    logits = model(**batch).logits
    valid = batch["sequence_ids"] >= 0
    return F.cross_entropy(logits[valid], batch["input_ids"][valid])


def _nonzero(t: torch.Tensor | None) -> bool:
    return t is not None and bool((t != 0).any())


def _peft_layout_copy(src: Path, dst: Path) -> int:
    """Rewrite our adapter as a PEFT run would leave it in memory: ``.lora_A.default.weight`` keys and a
    config with the extra fields recent PEFT versions write. Returns the number of tensors."""
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True, exist_ok=True)
    tensors = load_file(str(src / ADAPTER_WEIGHTS_NAME))
    renamed = {
        k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight"): v
        for k, v in tensors.items()
    }
    save_file(renamed, str(dst / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
    config = json.loads((src / ADAPTER_CONFIG_NAME).read_text())
    config.update(
        {
            "auto_mapping": None,
            "exclude_modules": None,
            "layer_replication": None,
            "loftq_config": {},
            "lora_bias": False,
            "megatron_config": None,
            "megatron_core": "megatron.core",
            "trainable_token_indices": None,
            "use_qalora": False,
            "qalora_group_size": 16,
            "target_parameters": None,
            "corda_config": None,
            "eva_config": None,
            "runtime_config": {"ephemeral_gpu_offload": False},
        }
    )
    (dst / ADAPTER_CONFIG_NAME).write_text(json.dumps(config, indent=2))
    return len(renamed)


def run_checks(
    checkpoint: str | None = None,
    *,
    model_factory: Callable[[], torch.nn.Module] | None = None,
    r: int = 4,
    alpha: float = 8,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    revision: str | None = None,
) -> list[CheckResult]:
    """Run the 8 checks; ``model_factory`` (each call a fresh, identical base model) overrides ``checkpoint``."""
    if model_factory is None:
        if checkpoint is None:
            from e1min.config import preset
            from e1min.random_checkpoint import random_model

            def model_factory():
                return random_model(preset("tiny"), seed=seed, dtype=dtype).to(device)

        else:
            from e1min.hub import load_model

            def model_factory():
                return load_model(checkpoint, dtype=dtype, device=device, revision=revision)

    results: list[CheckResult] = []
    state: dict = {}

    def run(name: str, fn: Callable[[], tuple[bool, str]]) -> None:
        try:
            passed, figure = fn()
        except Exception as e:  # a crashing check is a failed check, the others still run
            passed, figure = False, f"error: {type(e).__name__}: {e}"
        results.append(CheckResult(name, passed, figure))

    model = model_factory().eval()
    batch = {k: v.to(device) for k, v in prepare_batch(ROWS).items()}
    bf16 = model.model.embed_tokens.weight.dtype == torch.bfloat16
    base_logits, base_emb = _outputs(model, batch)
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.manual_seed(seed)
    apply_lora(model, r=r, alpha=alpha, target_modules=DEFAULT_TARGETS)
    mods = lora_modules(model)
    n = len(mods)
    params = lora_parameters(model)  # <module path>.lora_A / .lora_B -> parameter
    a_keys = [k for k in params if k.endswith(".lora_A")]
    b_keys = [k for k in params if k.endswith(".lora_B")]
    gen = torch.Generator().manual_seed(seed)

    def set_lora(which: str, std: float) -> None:
        """Random normal values (``std``) for every A (``which="A"``) or every B, through lora.py."""
        lora = lora_state_dict(model)
        keys = a_keys if which == "A" else b_keys
        lora.update({k: torch.randn(lora[k].shape, generator=gen) * std for k in keys})
        load_lora_state_dict(model, lora)

    def check_fresh():
        logits, emb = _outputs(model, batch)
        dl, de = _maxdiff(logits, base_logits), _maxdiff(emb, base_emb)
        ok = torch.equal(logits, base_logits) and torch.equal(emb, base_emb)
        return ok, f"max|Δlogits| = {dl:.1e}, max|Δhidden| = {de:.1e} with {n} LoRA layers (r={r}, alpha={alpha:g})"

    def check_only_a():
        set_lora("A", 1.0)
        lora = lora_state_dict(model)
        b_zero = all(not _nonzero(lora[k]) for k in b_keys)
        logits, emb = _outputs(model, batch)
        ok = b_zero and torch.equal(logits, base_logits) and torch.equal(emb, base_emb)
        return ok, f"max|Δlogits| = {_maxdiff(logits, base_logits):.1e}, max|Δhidden| = {_maxdiff(emb, base_emb):.1e} (A random, B = 0)"

    def check_a_and_b():
        set_lora("B", 0.02)
        _, emb = _outputs(model, batch)
        d = (emb.float() - base_emb.float()).abs()
        ok = bool(torch.isfinite(d).all()) and d.max().item() > 0
        return ok, f"hidden states max|Δ| = {d.max().item():.3e}, mean|Δ| = {d.mean().item():.3e}"

    def check_grads():
        for m in mods.values():
            m.reset_lora_parameters()
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=1e-3, weight_decay=0.0)
        state["opt"] = opt
        _loss(model, batch).backward()
        b0 = sum(_nonzero(params[k].grad) for k in b_keys)
        a0_zero = sum(params[k].grad is not None and not _nonzero(params[k].grad) for k in a_keys)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _loss(model, batch).backward()
        a1 = sum(_nonzero(params[k].grad) for k in a_keys)
        b1 = sum(_nonzero(params[k].grad) for k in b_keys)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ok = b0 == n and a0_zero == n and a1 == n and b1 == n
        return ok, f"step 0: B non-zero {b0}/{n}, A zero {a0_zero}/{n}; after 1 step: A non-zero {a1}/{n}, B non-zero {b1}/{n}"

    def check_frozen():
        opt = state.get("opt") or torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        lora_before = {k: v.clone() for k, v in lora_state_dict(model).items()}
        for _ in range(3):
            _loss(model, batch).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        model.eval()
        frozen = {k: v for k, v in model.named_parameters() if k not in params}
        same = [k for k, v in frozen.items() if k in snapshot and torch.equal(v, snapshot[k])]
        names_ok = set(frozen) == set(snapshot)
        moved = sum(not torch.equal(v, lora_before[k]) for k, v in model.named_parameters() if k in lora_before)
        n_params = sum(frozen[k].numel() for k in same)
        ok = names_ok and len(same) == len(snapshot) and moved == len(lora_before)
        return (
            ok,
            f"{len(same)}/{len(snapshot)} frozen tensors ({n_params:,} values) bit-identical after 5 AdamW steps; {moved}/{len(lora_before)} LoRA tensors moved",
        )

    def check_merge():
        model.eval()
        logits, emb = _outputs(model, batch)
        merge_lora(model)
        m_logits, m_emb = _outputs(model, batch)
        scale = 1.0 + logits.abs().max().item()
        tol = (3e-2 if bf16 else 1e-5) * scale
        dm = _maxdiff(m_logits, logits)
        moved = _maxdiff(m_logits, base_logits)
        unmerge_lora(model)
        wdiff = max(_maxdiff(m.weight, snapshot[f"{name}.weight"]) for name, m in mods.items())
        wscale = max(snapshot[f"{name}.weight"].abs().max().item() for name in mods)
        wtol = (1e-2 if bf16 else 1e-6) * wscale
        u_logits, _ = _outputs(model, batch)
        du = _maxdiff(u_logits, logits)
        # Put the exact base weights back so the round trip below compares against a clean base.
        with torch.no_grad():
            for name, m in mods.items():
                m.weight.copy_(snapshot[f"{name}.weight"])
        ok = dm <= tol and wdiff <= wtol and du <= tol and moved > 0
        return ok, (
            f"merged vs unmerged max|Δlogits| = {dm:.1e} (tol {tol:.0e}); after unmerge max|ΔW| = {wdiff:.1e} "
            f"(tol {wtol:.0e}), max|Δlogits| = {du:.1e}; adapter effect {moved:.1e}"
        )

    def check_save_load():
        model.eval()
        ref_logits, ref_emb = _outputs(model, batch)
        with tempfile.TemporaryDirectory(prefix="e1min-verify-") as tmp:
            ours, peft = Path(tmp) / "ours", Path(tmp) / "peft"
            save_adapter(model, ours)
            fresh = load_adapter(model_factory().eval(), ours)
            l1, e1 = _outputs(fresh, batch)
            del fresh
            n_tensors = _peft_layout_copy(ours, peft)
            fresh = load_adapter(model_factory().eval(), peft)
            l2, e2 = _outputs(fresh, batch)
            del fresh
        ok = all(torch.equal(a, b) for a, b in ((l1, ref_logits), (e1, ref_emb), (l2, ref_logits), (e2, ref_emb)))
        return ok, (
            f"fresh model + saved adapter: max|Δlogits| = {_maxdiff(l1, ref_logits):.1e}; "
            f"PEFT layout ({n_tensors} '.default' keys): max|Δlogits| = {_maxdiff(l2, ref_logits):.1e}"
        )

    def check_count():
        rep = trainable_parameters(model)
        closed = lora_parameter_count(model.config, r, DEFAULT_TARGETS, None)
        ok = rep["trainable"] == closed
        return ok, f"{rep['trainable']:,} trainable = closed form {closed:,} ({rep['percent']:.3f}% of {rep['total']:,})"

    for name, fn in zip(
        CHECK_NAMES, (check_fresh, check_only_a, check_a_and_b, check_grads, check_frozen, check_merge, check_save_load, check_count)
    ):
        run(name, fn)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """``e1min verify-lora ARGS`` (arguments are parsed in ``e1min.cli``)."""
    from e1min.cli import command

    return command("verify-lora")(argv)


if __name__ == "__main__":
    raise SystemExit(main())
