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
    ("e1min.metrics", "MetricsError", ValueError),
    ("e1min.structures", "StructureError", ValueError),
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


def test_bad_settings_are_e1min_errors():
    import numpy as np

    from e1min.data.batching import token_budget_batches
    from e1min.data.collate import MaskingConfig
    from e1min.data.folds import assign_folds
    from e1min.data.msa import MSASampling
    from e1min.data.windows import sliding_windows
    from e1min.metrics import best_threshold, binary_metrics

    cases = [
        (lambda: MSASampling.from_dict({"max_rows": 3}), "max_rows"),
        (lambda: MSASampling(max_query_similarity=1.5), "'max_query_similarity' must be in"),
        (lambda: MaskingConfig(probability=2.0), "'probability' must be in"),
        (lambda: token_budget_batches([3, 4], 0), "'max_tokens'"),
        (lambda: sliding_windows(100, 10, overlap=10), "'overlap'"),
        (lambda: assign_folds({}, num_folds=1, seed=0), "'num_folds'"),
        (lambda: best_threshold([0, 1], [0.1, 0.9], criterion="auc"), "criterion"),
        (lambda: binary_metrics([0, 1], [0.1, np.nan]), "NaN"),
    ]
    for fn, match in cases:
        with pytest.raises(E1minError, match=match):
            fn()


def test_programming_errors_stay_plain():
    from e1min.data.windows import sliding_windows
    from e1min.metrics import binary_metrics

    with pytest.raises(ValueError) as e:
        binary_metrics([0, 1, 1], [0.1, 0.9])  # shapes differ: only code can do that
    assert not isinstance(e.value, E1minError)
    with pytest.raises(ValueError) as e:
        sliding_windows(0, 10)
    assert not isinstance(e.value, E1minError)


def test_first_line_of_an_error():
    from e1min.errors import first_line

    assert first_line(RuntimeError("connectFullMesh failed\n  at pair.cc:152")) == "connectFullMesh failed"
    assert first_line(RuntimeError()) == "RuntimeError" and first_line(ValueError("\n")) == "ValueError"
