"""The recipe as frozen typed dataclasses: same keys and defaults as the YAML schema, documented, round-trippable."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest

from e1min.data.msa import TRAIN_SAMPLING, VALIDATION_SAMPLING, MSASampling
from e1min.lora import LoRAConfig, apply_lora
from e1min.recipe import Recipe, TrainConfigError, field_default, load_recipe, load_yaml
from e1min.train_config import SCHEMA, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
REQ = "required"
# The schema's keys and defaults before the recipe became dataclasses (users' YAML must keep working).
TODAY = {
    "general": {"seed": 42, "run_name": None, "log_every": 10, "device": None, "dist_timeout_seconds": 300, "check_replicas_every": 0},
    "data": {
        "fasta_path": REQ,
        "fasta_pattern": "{ION}_train.fasta",
        "msa_dir": None,
        "max_query_length": 1022,
        "max_example_tokens": 16384,
        "fold_grouping": "sequence",
        "split_min_seq_id": 0.3,
        "split_coverage": 0.8,
        "homology_report": True,
    },
    "model": {
        "checkpoint": REQ,
        "revision": None,
        "dropout": 0.3,
        "dtype": "float32",
        "gradient_checkpointing": False,
        "compile": False,
        "matmul_precision": "highest",
    },
    "lora": {
        "r": 16,
        "alpha": 32,
        "lora_dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"],
        "train_mlm_head": False,
        "use_rslora": False,
        "layers": None,
    },
    "training": {
        "ions": REQ,
        "epochs": 40,
        "warmup_epochs": 5,
        "batch_size": 2,
        "max_tokens_per_batch": None,
        "accum_steps": 1,
        "learning_rate": 1e-4,
        "min_lr": 1e-6,
        "weight_decay": 0.01,
        "max_grad_norm": 1.0,
        "mlm_weight": 1.0,
        "mlm_probability": 0.15,
        "mask_context": False,
        "label_smoothing": 0.0,
        "focal_gamma": 0.0,
        "pos_weight_mode": "sqrt",
        "num_folds": 5,
        "folds": None,
        "early_stop_patience": 5,
        "min_delta": 0.0,
        "selection_metric": "auprc",
        "threshold_method": "youden",
        "output_dir": "results/run",
        "bf16": False,
        "msa_sampling": TRAIN_SAMPLING,
        "validation_msa_sampling": VALIDATION_SAMPLING,
        "eval_max_tokens_per_batch": 16384,
    },
}
MINIMAL = {"data": {"fasta_path": "data"}, "model": {"checkpoint": "Profluent-Bio/E1-150m"}, "training": {"ions": ["ZN", "CA"]}}


def _fields():
    for section, kind in Recipe.sections().items():
        for f in dataclasses.fields(kind):
            yield section, f


def test_every_key_is_a_documented_field_with_todays_default():
    assert {s: [f.name for f in dataclasses.fields(k)] for s, k in Recipe.sections().items()} == {s: list(v) for s, v in TODAY.items()}
    for section, f in _fields():
        assert len(f.metadata["doc"].split()) >= 2, f"{section}.{f.name} has no doc"
        default = field_default(f)
        want = TODAY[section][f.name]
        if want == REQ:
            assert default is not None and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        else:
            got = list(default) if isinstance(default, tuple) else default
            assert got == want and type(got) is type(want), f"{section}.{f.name}: {got!r} != {want!r}"
    assert set(SCHEMA) == set(TODAY) and all(list(SCHEMA[s]) == list(TODAY[s]) for s in TODAY)


def test_head_dropout_is_documented_on_model_dropout():
    doc = {f.name: f for f in dataclasses.fields(Recipe.sections()["model"])}["dropout"].metadata["doc"]
    assert "head" in doc.lower() and "lora.lora_dropout" in doc
    recipe, _ = Recipe.from_dict({**MINIMAL, "model": {**MINIMAL["model"], "dropout": 0.25}}, check_files=False)
    assert recipe.model.head_dropout == recipe.model.dropout == 0.25


def test_ranges_and_choices_are_declared_on_the_fields():
    f = {f"{s}.{f.name}": f for s, f in _fields()}
    assert f["lora.lora_dropout"].metadata["range"] == "[0, 1)" and f["training.num_folds"].metadata["range"] == ">= 2"
    assert f["training.selection_metric"].metadata["choices"] == ("auprc", "hra")


def test_frozen():
    recipe, _ = Recipe.from_dict(MINIMAL, check_files=False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.training.accum_steps = 2  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.lora = None  # type: ignore[misc]
    assert isinstance(recipe.training.ions, tuple) and isinstance(recipe.lora.target_modules, tuple)


def test_msa_sampling_is_typed_with_the_data_module_defaults():
    recipe, _ = Recipe.from_dict(MINIMAL, check_files=False)
    t = recipe.training
    assert isinstance(t.msa_sampling, MSASampling) and t.msa_sampling == TRAIN_SAMPLING
    assert t.validation_msa_sampling == VALIDATION_SAMPLING
    assert t.msa_sampling is not TRAIN_SAMPLING  # a copy: the module-wide default cannot be changed through a recipe
    raw = {**MINIMAL, "training": {**MINIMAL["training"], "validation_msa_sampling": {"max_num_samples": 7}}}
    recipe, _ = Recipe.from_dict(raw, check_files=False)
    assert recipe.training.validation_msa_sampling == dataclasses.replace(VALIDATION_SAMPLING, max_num_samples=7)
    assert recipe.to_dict()["training"]["validation_msa_sampling"] == {**VALIDATION_SAMPLING.to_dict(), "max_num_samples": 7}


def test_msa_similarity_bounds_are_checked_after_filling_defaults():
    raw = {**MINIMAL, "training": {**MINIMAL["training"], "msa_sampling": {"min_query_similarity": 0.97}}}  # default max 0.95
    with pytest.raises(TrainConfigError, match="'training.msa_sampling.min_query_similarity' is larger than its max"):
        Recipe.from_dict(raw, check_files=False)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load_and_round_trip(path):
    recipe, notes = load_recipe(path, check_files=False)
    assert notes == []
    plain = recipe.to_dict()
    assert Recipe.from_dict(plain, check_files=False)[0] == recipe
    assert Recipe.from_dict(load_yaml(recipe.dump_yaml()), check_files=False)[0] == recipe
    assert isinstance(plain["training"]["ions"], list) and isinstance(plain["training"]["msa_sampling"], dict)
    assert load_config(path, check_files=False)[0] == plain
    raw = load_yaml(path.read_text())
    for section, values in raw.items():  # every key the user wrote is what the recipe holds
        for key, value in values.items():
            if not isinstance(value, dict):
                assert plain[section][key] == value, f"{section}.{key}"


def test_overrides_and_notes(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("data: {fasta_path: d}\nmodel: {checkpoint: Profluent-Bio/E1-150m}\ntraining:\n  ions: [ZN]\n  num_workers: 4\n")
    recipe, notes = load_recipe(path, ["training.learning_rate=2e-4", "lora.layers=[3, 1]", "training.folds=[2]"], check_files=False)
    assert recipe.training.learning_rate == 2e-4 and recipe.training.folds == (2,)
    assert notes == ["note: training.num_workers is ignored (batches are built in-process)"]
    assert recipe.lora.to_lora_config() == LoRAConfig(r=16, alpha=32, dropout=0.0, layers=(1, 3))
    assert set(recipe.lora.apply_kwargs()) <= set(inspect.signature(apply_lora).parameters)


def test_all_problems_in_one_error():
    raw = {
        "general": {"log_every": 0, "colour": "blue"},
        "model": {"checkpoint": 5, "dtype": "float16"},
        "lora": {"target_modules": ["q_proj", "q_proj"]},
        "training": {"ions": ["ZN"], "epochs": 1.5, "msa_sampling": {"max_num_samples": 600}},
        "extra": {},
    }
    with pytest.raises(TrainConfigError) as e:
        Recipe.from_dict(raw, source="r.yaml", check_files=False)
    message = str(e.value)
    assert message.startswith("r.yaml: ")
    for part in [
        "unknown section 'extra'",
        "unknown key 'general.colour'",
        "missing required key 'data.fasta_path'",
        "'model.checkpoint' must be str, got int 5",
        "'model.dtype' must be one of float32, bfloat16",
        "'training.epochs' must be int, got float 1.5",
    ]:
        assert part in message
    # Range and list checks run once the types are right, and are listed together too.
    raw = {
        **MINIMAL,
        "general": {"log_every": 0},
        "lora": {"target_modules": ["q_proj", "q_proj"]},
        "training": {"ions": ["ZN"], "msa_sampling": {"max_num_samples": 600}},
    }
    with pytest.raises(TrainConfigError) as e:
        Recipe.from_dict(raw, check_files=False)
    for part in [
        "'general.log_every' must be >= 1, got 0",
        "'lora.target_modules' lists q_proj more than once",
        "'training.msa_sampling.max_num_samples' must be in [0, 511]",
    ]:
        assert part in str(e.value)
