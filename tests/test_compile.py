"""Compiled decoder layers (e1min.compile_model) against eager: same numbers, bounded graphs, exact resume."""

import json

import pytest
import torch

from e1min.compile import CompileError, compile_model, graph_count, is_compiled, uncompile_model
from e1min.config import preset
from e1min.heads import BindingModel
from e1min.tokenizer import prepare_batch
from tests.helpers import toy_config
from tests.test_attention import BATCHES, ids, lora_grads, lora_model, run, seq


@pytest.fixture
def model():
    m = lora_model(preset("tiny", num_hidden_layers=6))
    yield m
    uncompile_model(m)


@pytest.mark.parametrize("name", ["context_uneven", "mixed_padded"])
def test_compiled_float32_equals_eager(model, name):
    batch = prepare_batch(BATCHES[name])
    valid = batch["sequence_ids"] >= 0
    eager_grads = lora_grads(model, batch, "structured")
    model.eval()
    eager = run(model, batch, "structured")
    compile_model(model)
    assert is_compiled(model)
    compiled = run(model, batch, "structured")
    torch.testing.assert_close(compiled.embeddings[valid], eager.embeddings[valid], atol=1e-5, rtol=0)
    torch.testing.assert_close(compiled.logits[valid], eager.logits[valid], atol=1e-5, rtol=0)
    model.train()
    compiled_grads = lora_grads(model, batch, "structured")
    assert compiled_grads.keys() == eager_grads.keys()
    for n in eager_grads:
        torch.testing.assert_close(compiled_grads[n], eager_grads[n], atol=1e-5, rtol=1e-4, msg=n)


def test_compiled_bf16_autocast_within_round_off(model):
    batch = prepare_batch(BATCHES["mixed_padded"])
    valid = batch["sequence_ids"] >= 0
    model.eval()
    ref = run(model, batch, "structured").embeddings[valid]
    compile_model(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(model, batch, "structured").embeddings[valid].float()
    cos = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0)
    assert cos > 0.999 and (out - ref).abs().max() < 0.1 * ref.abs().max()


def test_graphs_are_bounded_over_many_shapes(model):
    """12 batch shapes, training and inference: one set of graphs serves every layer and length."""
    compile_model(model)
    before = graph_count()
    for i in range(12):
        rows = [",".join(seq(5 + (7 * i + j) % 40, j) for j in range(1 + i % 3)) for _ in range(1 + i % 4)]
        lora_grads(model, prepare_batch(rows), "structured")
    with torch.no_grad():
        model.eval()
        run(model, prepare_batch([seq(33), seq(12, 1)]), "structured")
    # per region: batch of 1 or more x first layer (no grad into h) or not x grad or not
    assert graph_count() - before <= 2 * 8


def test_recompile_limit_is_an_error(model):
    compile_model(model)
    lora_grads(model, prepare_batch(BATCHES["mixed_padded"]), "structured")
    # compile_model set the limit process-wide; one graph fewer than exist makes the next new graph hit it
    with torch._dynamo.config.patch(recompile_limit=1), pytest.raises(CompileError, match="recompile limit"):
        with torch.no_grad():
            run(model.double(), prepare_batch(BATCHES["mixed_padded"]), "structured")


def test_compiled_dropout_depends_only_on_the_seed(model):
    """LoRA dropout under compile draws inductor's random numbers from the seed set before the micro-batch:
    whatever ran before (another rank's history, a resumed run), the same seed gives the same gradients."""
    for m in model.modules():
        if hasattr(m, "lora_dropout"):
            m.lora_dropout = torch.nn.Dropout(0.3)
    compile_model(model)
    batch = prepare_batch(BATCHES["context_uneven"])
    torch.manual_seed(123)
    first = lora_grads(model, batch, "structured")
    torch.manual_seed(7)
    lora_grads(model, prepare_batch([seq(20), seq(9)]), "structured")  # other draws in between
    torch.manual_seed(123)
    again = lora_grads(model, batch, "structured")
    torch.manual_seed(124)
    other = lora_grads(model, batch, "structured")
    for n in first:
        assert torch.equal(first[n], again[n]), n
    assert any(not torch.equal(first[n], other[n]) for n in first)  # dropout is really on


def test_compile_model_accepts_the_public_models(tiny_model):
    bm = BindingModel(tiny_model, ["ZN"])
    assert compile_model(bm) is bm and is_compiled(bm.backbone)
    uncompile_model(bm)
    assert not is_compiled(tiny_model)
    with pytest.raises(CompileError, match="no E1 decoder layers"):
        compile_model(torch.nn.Linear(2, 2))


def test_training_with_compile_resumes_exactly(tmp_path, tiny_checkpoint):
    """model.compile: true end to end, with a stop mid-epoch and --resume: equal to an uninterrupted compiled run."""
    from e1min.crossval import run_cross_validation, setup_logging
    from e1min.dist import DistContext
    from e1min.recipe import load_recipe
    from e1min.stop import StopRequested
    from e1min.train import main as train_main
    from tests.test_stop import DROPOUT, StopAfter, assert_same_run

    sections = dict(DROPOUT, model={**DROPOUT["model"], "compile": True}, training={"epochs": 2})
    ref = toy_config(tmp_path / "ref", tiny_checkpoint, **sections)
    assert train_main(["--config", str(ref)]) == 0
    cfg = toy_config(tmp_path / "stop", tiny_checkpoint, **sections)
    setup_logging(tmp_path / "stop/out", True)
    with pytest.raises(StopRequested):
        run_cross_validation(load_recipe(str(cfg), [])[0], DistContext(), stop=StopAfter(2))
    assert train_main(["--config", str(cfg), "--resume"]) == 0
    assert_same_run(tmp_path / "ref/out", tmp_path / "stop/out")
    meta = json.loads((tmp_path / "ref/out/fold_1/best/checkpoint.json").read_text())
    assert meta["runtime"]["compiled"] is True


def test_compiled_forward_of_ids_only(model):
    """model(**batch) through the compiled layers, no grad, B = 1: the path predict --compile takes."""
    model.eval()
    batch = prepare_batch([",".join([seq(12), seq(30, 1)])])
    eager = model(**ids(batch)).embeddings
    compile_model(model)
    with torch.no_grad():
        torch.testing.assert_close(model(**ids(batch)).embeddings, eager.detach(), atol=1e-5, rtol=0)


def test_predict_and_embed_with_compile(run_dir, query_fasta, tmp_path):
    """--compile gives the eager probabilities (float32, 1e-5) and says so in what it writes."""
    import numpy as np

    from e1min.cli import main

    plain, compiled = tmp_path / "plain.tsv", tmp_path / "compiled.tsv"
    base = ["predict", "--checkpoint", str(run_dir), "--fasta", str(query_fasta), "--quiet"]
    assert main([*base, "--out", str(plain)]) == 0
    assert main([*base, "--out", str(compiled), "--compile"]) == 0
    a = np.loadtxt(plain, delimiter="\t", skiprows=1, usecols=4)
    b = np.loadtxt(compiled, delimiter="\t", skiprows=1, usecols=4)
    assert a.shape == b.shape and np.abs(a - b).max() < 1e-5
    out = tmp_path / "emb"
    assert main(["embed", "--checkpoint", str(run_dir), "--fasta", str(query_fasta), "--out", str(out), "--compile", "--quiet"]) == 0
    assert json.loads((out / "index.json").read_text())["runtime"]["compiled"] is True
    labelled = run_dir.parent / "data" / "ZN_train.fasta"  # build_run's training data
    ev = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", str(run_dir), "--fasta", str(labelled), "--out-dir", str(ev), "--compile", "--quiet"]) == 0
    assert json.loads((ev / "evaluation.json").read_text())["runtime"]["compiled"] is True
