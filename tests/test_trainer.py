"""The trainer: loss normalisation, what trains, the output tree, resume, fold skipping, config errors."""

import json
import math
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from e1min.checkpoint import load_state
from e1min.data.collate import MaskingConfig, collate
from e1min.data.dataset import Example
from e1min.dist import DistContext
from e1min.scoring import score_examples
from e1min.train import LossSpec, backward_window, build_model, build_optimizer, main
from e1min.train_config import TrainConfigError, load_config
from tests.helpers import toy_binding_model, toy_config, toy_examples


@pytest.mark.parametrize("train_mlm_head", [False, True])
def test_only_lora_heads_and_optionally_mlm_head_change(tiny_model, train_mlm_head):
    model = toy_binding_model(tiny_model, train_mlm_head=train_mlm_head)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, 1e-2, 0.1)
    for step in range(3):
        batch = collate(toy_examples(4, seed=step), masking=MaskingConfig(probability=0.3), seed=0, epoch=step)
        backward_window(model, [(batch, "ZN")], DistContext(), LossSpec({}, 1.0))
        opt.step()
        opt.zero_grad(set_to_none=True)
    for n, p in model.named_parameters():
        changed = not torch.equal(before[n], p.detach())
        should = "lora_" in n or n.startswith("heads.ZN") or (train_mlm_head and "mlm_head" in n)
        assert changed == should, n


def test_end_to_end_output_tree_and_reload(tmp_path, tiny_checkpoint):
    cfg_path = toy_config(tmp_path, tiny_checkpoint, data={"homology_report": True}, training={"mlm_weight": 0.5, "label_smoothing": 0.05})
    assert main(["--config", str(cfg_path)]) == 0
    out = tmp_path / "out"
    for f in [
        "config.yaml",
        "folds.json",
        "data_stats.json",
        "summary.json",
        "summary.md",
        "thresholds.json",
        "training.log",
        "fold_1/metrics.jsonl",
        "fold_1/oof_predictions.tsv",
        "fold_1/fold_result.json",
        "fold_1/best/adapter_config.json",
        "fold_1/best/adapter_model.safetensors",
        "fold_1/best/heads.safetensors",
        "fold_1/best/checkpoint.json",
        "fold_1/last/optimizer.safetensors",
        "plots/curves_fold_1.csv",
    ]:
        assert (out / f).is_file(), f
    assert not list(out.rglob("*.tmp")) and not list(out.rglob(".*"))  # no temporary leftovers
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib not installed" in (out / "training.log").read_text()
    else:
        assert (out / "plots/loss_fold_1_ZN.png").stat().st_size > 0 and (out / "plots/auprc_fold_1_CA.png").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"] == "config.yaml"
    stats = json.loads((out / "data_stats.json").read_text())
    if stats["homology"] is not None or os.environ.get("CI"):  # MMseqs2 installed (always in CI): the report reaches the summary
        assert summary["homology"]["with_homolog"] == stats["homology"]["with_homolog"]
        assert "homology across folds" in (out / "summary.md").read_text()
    for ion in ("ZN", "CA"):
        entry = summary["ions"][ion]
        assert 0 < entry["positive_rate"] < 1
        for key in ("auprc", "auroc", "hra", "f1", "mcc"):
            assert set(entry[key]) >= {"mean", "std", "folds"} and len(entry[key]["folds"]) == 1
    epochs = [json.loads(line) for line in (out / "fold_1/metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [1, 2]
    # The best checkpoint reloads into a fresh model and reproduces the saved OOF predictions.
    cfg, _ = load_config(cfg_path)
    model = build_model(cfg, DistContext())
    meta = load_state(out / "fold_1/best", model)
    oof = [line.split("\t") for line in (out / "fold_1/oof_predictions.tsv").read_text().splitlines()[1:]]
    zn = [r for r in oof if r[3] == "ZN"]
    first_id = zn[0][0]
    seq = "".join(r[2] for r in zn if r[0] == first_id)
    probs = score_examples(model, [Example(first_id, "ZN", seq, None)], "ZN", torch.device("cpu"), 4096)[0]
    saved = np.array([float(r[4]) for r in zn if r[0] == first_id])
    np.testing.assert_allclose(probs, saved, rtol=1e-4, atol=1e-6)
    assert meta["ions"] == ["ZN", "CA"] and meta["format_version"] == 1


def test_completed_fold_skipped(tmp_path, tiny_checkpoint, caplog):
    cfg_path = toy_config(tmp_path, tiny_checkpoint, training={"epochs": 1})
    main(["--config", str(cfg_path)])
    stamp = (tmp_path / "out/fold_1/best/heads.safetensors").stat().st_mtime_ns
    main(["--config", str(cfg_path)])
    assert (tmp_path / "out/fold_1/best/heads.safetensors").stat().st_mtime_ns == stamp
    assert "fold 1 already complete" in (tmp_path / "out/training.log").read_text()


def test_resume_matches_uninterrupted(tmp_path, tiny_checkpoint, monkeypatch):
    import e1min.train as train

    full = toy_config(
        tmp_path / "a",
        tiny_checkpoint,
        training={"epochs": 3, "early_stop_patience": 10},
        model={"dropout": 0.2},
        lora={"r": 4, "alpha": 8, "lora_dropout": 0.1},
    )
    main(["--config", str(full)])
    part = toy_config(
        tmp_path / "b",
        tiny_checkpoint,
        training={"epochs": 3, "early_stop_patience": 10},
        model={"dropout": 0.2},
        lora={"r": 4, "alpha": 8, "lora_dropout": 0.1},
    )
    original = train.FoldTrainer.end_epoch

    def crash_after_second_epoch(self, epoch, *a):
        original(self, epoch, *a)
        if epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(train.FoldTrainer, "end_epoch", crash_after_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        main(["--config", str(part)])
    assert not (tmp_path / "b/out/fold_1/fold_result.json").exists()
    monkeypatch.setattr(train.FoldTrainer, "end_epoch", original)
    main(["--config", str(part), "--resume"])
    a = load_file(tmp_path / "a/out/fold_1/last/adapter_model.safetensors")
    b = load_file(tmp_path / "b/out/fold_1/last/adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    ha, hb = (load_file(tmp_path / f"{x}/out/fold_1/last/heads.safetensors") for x in "ab")
    assert all(torch.allclose(ha[k], hb[k], atol=1e-6) for k in ha)
    ma = [json.loads(line)["val"] for line in (tmp_path / "a/out/fold_1/metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(line)["val"] for line in (tmp_path / "b/out/fold_1/metrics.jsonl").read_text().splitlines()]
    assert len(ma) == len(mb) == 3
    assert math.isclose(ma[-1]["ZN"]["auprc"], mb[-1]["ZN"]["auprc"], rel_tol=1e-5)


def test_pure_bce_configuration(tmp_path, tiny_checkpoint):
    cfg_path = toy_config(tmp_path, tiny_checkpoint, training={"epochs": 1, "mlm_weight": 0.0})
    assert main(["--config", str(cfg_path)]) == 0
    epochs = [json.loads(line) for line in (tmp_path / "out/fold_1/metrics.jsonl").read_text().splitlines()]
    assert epochs[0]["train_mlm"] == 0.0 and all(math.isfinite(v) for v in epochs[0]["train_bce"].values())


def test_model_build_keeps_trainables_float32(tmp_path, tiny_checkpoint):
    cfg, _ = load_config(toy_config(tmp_path, tiny_checkpoint, model={"dtype": "bfloat16"}))
    model = build_model(cfg, DistContext())
    assert model.backbone.model.layers[0].ffn.mlp.w1.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize(
    "override, message",
    [
        ("training.epochs=zero", "'training.epochs' must be int"),
        ("training.bogus=1", "unknown key 'training.bogus'"),
        ("lora.target_modules=[q_proj,qkv]", "unknown module"),
        ("model.checkpoint=/nonexistent/dir", "no such directory"),
        ("training.pos_weight_mode=cubic", "must be one of none, linear, sqrt"),
        ("training.num_folds=1", "num_folds' must be >= 2"),
    ],
)
def test_bad_config_errors(tmp_path, tiny_checkpoint, override, message):
    cfg_path = toy_config(tmp_path, tiny_checkpoint)
    with pytest.raises(TrainConfigError, match=message):
        load_config(cfg_path, [override])


def test_bad_config_lists_all_problems_and_notes_ignored_keys(tmp_path, tiny_checkpoint):
    cfg_path = toy_config(tmp_path, tiny_checkpoint)
    with pytest.raises(TrainConfigError) as e:
        load_config(cfg_path, ["training.bogus=1", "data.nope=2", "training.epochs=1.5"])
    assert "training.bogus" in str(e.value) and "data.nope" in str(e.value) and "training.epochs" in str(e.value)
    _, notes = load_config(cfg_path, ["training.ddp_find_unused_parameters=true", "general.gpu_id=0"])
    assert len(notes) == 2 and all("ignored" in n for n in notes)


def test_cli_reports_config_error_without_traceback(tmp_path, tiny_checkpoint, capsys):
    from e1min.cli import main as cli_main

    cfg_path = toy_config(tmp_path, tiny_checkpoint)
    assert cli_main(["train", "--config", str(cfg_path), "--set", "training.bogus=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'training.bogus'" in err and "Traceback" not in err
