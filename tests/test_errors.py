"""Every error a user can cause is an E1minError and still the ValueError/RuntimeError it always was."""

import importlib
import json
from pathlib import Path

import pytest

from e1min.errors import E1minError

# (module, class name, historical base)
USER_ERRORS = [
    ("e1min.data.fasta", "DataError", ValueError),
    ("e1min.tokenizer", "EncodingError", ValueError),
    ("e1min.config", "ConfigError", ValueError),
    ("e1min.weights", "CheckpointError", ValueError),
    ("e1min.adapters", "AdapterError", ValueError),
    ("e1min.lora", "LoRAError", ValueError),
    ("e1min.checkpoint", "RunCheckpointError", ValueError),
    ("e1min.dist", "DistributedError", RuntimeError),
    ("e1min.io", "OutputError", ValueError),
    ("e1min.run", "RunLockError", RuntimeError),
    ("e1min.run", "RunStateError", ValueError),
]


@pytest.mark.parametrize("module, name, base", USER_ERRORS, ids=[n for _, n, _ in USER_ERRORS])
def test_user_error_classes(module, name, base):
    cls = getattr(importlib.import_module(module), name)
    assert issubclass(cls, E1minError) and issubclass(cls, base)
    with pytest.raises(base):  # existing ``except ValueError`` / ``except RuntimeError`` still catch it
        raise cls("x")


def test_errors_module_imports_nothing_from_e1min():
    import ast

    import e1min.errors as m

    tree = ast.parse(Path(m.__file__).read_text(encoding="utf-8"))
    imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [name for name in imported if name.split(".")[0] == "e1min"]


def test_bad_fasta_is_e1min_error(tmp_path):
    from e1min.data.fasta import read_fasta

    with pytest.raises(E1minError, match="nope.fasta"):
        read_fasta(tmp_path / "nope.fasta")


def test_bad_sequence_is_e1min_error():
    from e1min.tokenizer import prepare_batch

    with pytest.raises(E1minError):
        prepare_batch(["MK1V"])


def test_bad_model_config_is_e1min_error(tmp_path):
    from e1min.config import E1Config

    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "esm"}))
    with pytest.raises(E1minError, match="config.json"):
        E1Config.from_json(path)


def test_bad_checkpoint_is_e1min_error(tmp_path):
    from e1min.hub import load_model

    with pytest.raises(E1minError, match="not a checkpoint directory"):
        load_model(tmp_path / "nope" / "deeper")


def test_bad_lora_argument_is_e1min_error(tiny_model):
    from e1min.lora import apply_lora

    with pytest.raises(E1minError, match="unknown target"):
        apply_lora(tiny_model, target_modules=["nope_proj"])
    with pytest.raises(E1minError, match="rank"):
        apply_lora(tiny_model, r=0)


def test_bad_adapter_dir_is_e1min_error(tmp_path, tiny_model):
    from e1min.adapters import load_adapter

    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(E1minError, match="adapter_config.json"):
        load_adapter(tiny_model, tmp_path)
