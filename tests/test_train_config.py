"""The recipe schema: every harmful or malformed value is one clear error naming its dotted key, at load time."""

from __future__ import annotations

import pytest
import torch
import yaml

from e1min.cli import main as cli_main
from e1min.train_config import TrainConfigError, load_config
from tests.helpers import toy_config


@pytest.mark.parametrize(
    "override,message",
    [
        ("training.min_lr=-1e-6", "'training.min_lr' must be >= 0, got -1e-06"),
        ("training.min_lr=0.1", "'training.min_lr' \\(0.1\\) must be <= 'training.learning_rate'"),
        ("training.learning_rate=-0.001", "'training.learning_rate' must be >= 0"),
        ("training.max_grad_norm=-1", "'training.max_grad_norm' must be > 0, got -1"),
        ("training.mlm_weight=-0.5", "'training.mlm_weight' must be >= 0"),
        ("training.weight_decay=-0.01", "'training.weight_decay' must be >= 0"),
        ("training.ions=[ZN,CA,ZN]", "'training.ions' lists ZN more than once"),
        ("training.folds=[1,1]", "'training.folds' lists 1 more than once"),
        ("general.device=gpu0", "'general.device': device must be cpu, cuda or cuda:N, got 'gpu0'"),
        ("general.log_every=0", "'general.log_every' must be >= 1, got 0"),
        ("lora.target_modules=[[q_proj]]", "'lora.target_modules' must be a flat list of names"),
        ("lora.target_modules=[q_proj,q_proj]", "'lora.target_modules' lists q_proj more than once"),
        ("training.msa_sampling={max_num_samples: many}", "'training.msa_sampling.max_num_samples' must be an integer, got 'many'"),
        ("training.msa_sampling={neighbour_bound: 0.8}", "unknown key 'training.msa_sampling.neighbour_bound'"),
        ("data.max_query_length=0", "'data.max_query_length' must be >= 2, got 0"),
        ("training.max_tokens_per_batch=0", "'training.max_tokens_per_batch' must be >= 1"),
        ("training.eval_max_tokens_per_batch=0", "'training.eval_max_tokens_per_batch' must be >= 1"),
        ("model.matmul_precision=low", "'model.matmul_precision' must be one of highest, high, medium"),
        ("lora.lora_dropout=1.0", "'lora.lora_dropout' must be in \\[0, 1\\), got 1.0"),
    ],
)
def test_out_of_range_values_name_their_key(tmp_path, tiny_checkpoint, override, message):
    cfg = toy_config(tmp_path, tiny_checkpoint)
    with pytest.raises(TrainConfigError, match=message):
        load_config(cfg, [override])


def test_cuda_asked_for_without_a_gpu(tmp_path, tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(TrainConfigError, match="'general.device': device 'cuda' asked for, but CUDA is not available"):
        load_config(toy_config(tmp_path, tiny_checkpoint), ["general.device=cuda"])


def test_duplicate_yaml_keys_are_errors(tmp_path, tiny_checkpoint):
    path = toy_config(tmp_path, tiny_checkpoint)
    path.write_text(path.read_text() + "training:\n  epochs: 3\n")
    with pytest.raises(TrainConfigError, match="duplicate key 'training' \\(lines \\d+ and \\d+\\)"):
        load_config(path)


@pytest.mark.parametrize(
    "value,message",
    [
        ("[1, 2", "--set 'training.ions=\\[1, 2': not a valid YAML value"),
        ("!!python/object/apply:os.system [echo hi]", "not a valid YAML value"),
    ],
)
def test_set_values_go_through_safe_yaml(tmp_path, tiny_checkpoint, value, message):
    with pytest.raises(TrainConfigError, match=message):
        load_config(toy_config(tmp_path, tiny_checkpoint), [f"training.ions={value}"])


def test_messages_stay_short_for_huge_values_and_alias_bombs(tmp_path, tiny_checkpoint):
    path = toy_config(tmp_path, tiny_checkpoint)
    raw = yaml.safe_load(path.read_text())
    raw["general"]["run_name"] = ["x" * 10_000_000]
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(TrainConfigError) as e:
        load_config(path)
    assert "'general.run_name' must be str or null" in str(e.value) and len(str(e.value)) < 1000
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefgh", "bcdefghi")
    )
    path.write_text(bomb + "training:\n  ions: *i\n")
    with pytest.raises(TrainConfigError) as e:
        load_config(path)
    assert len(str(e.value)) < 2000


def test_non_utf8_config_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"general:\n  seed: \xff\xfe\n")
    with pytest.raises(TrainConfigError, match="bad.yaml: not UTF-8 text"):
        load_config(path)


def test_cli_shows_one_line_and_exit_code_2(tmp_path, tiny_checkpoint, capsys):
    cfg = toy_config(tmp_path, tiny_checkpoint)
    assert cli_main(["train", "--config", str(cfg), "--set", "training.min_lr=-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("e1min train: error:") and "training.min_lr" in err
    # check-data runs the same validation; its documented exit code for "problems found" is 1.
    assert cli_main(["check-data", "--config", str(cfg), "--set", "training.ions=[ZN,ZN]"]) == 1
    assert "'training.ions' lists ZN more than once" in capsys.readouterr().err
