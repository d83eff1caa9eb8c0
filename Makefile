# e1min — common tasks. Everything runs in a local virtualenv ($(VENV)).
#   make test                  install (first time), lint, and run the whole test suite
#   make lint                  ruff check + ruff format --check (make format rewrites)
#   make train                 demo run: tiny random E1 + generated demo data, CPU, a few minutes
#   make train NGPU=4 CONFIG=configs/e1_binding.yaml   real run on 4 GPUs (torchrun)
#   make bench                 benchmark tables (model forward, training step, batching)
# TORCH_SPEC picks the torch build. The default pins the CPU wheel these machines carry;
# on a GPU box use e.g. `make install TORCH_SPEC=torch` (PyPI's Linux wheel is the CUDA build).

PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
EXTRAS     ?= test,plot,structure
NGPU       ?= 1
CONFIG     ?= configs/demo.yaml
ARGS       ?=
DEMO_DIR   ?= demo_data
# Real lengths for the batching/prediction benchmarks; the demo data stands in on a machine without it.
BENCH_FASTA ?= ../shared/data/metal/ZN_train.fasta

PY    := $(VENV)/bin/python
BENCH := $(if $(wildcard $(BENCH_FASTA)),$(BENCH_FASTA),$(DEMO_DIR)/data/ZN_train.fasta)
STAMP := $(VENV)/.installed

LINT_PATHS := e1min tests tools

.PHONY: install lint format test train demo-data bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)

format: $(STAMP)
	$(VENV)/bin/ruff check --fix $(LINT_PATHS)
	$(VENV)/bin/ruff format $(LINT_PATHS)

test: lint
	$(PY) -m pytest -q

# Demo inputs are generated, never downloaded: a synthetic dataset and a tiny random E1.
$(DEMO_DIR)/.done: $(STAMP) e1min/data/demo.py tools/make_demo_dataset.py
	$(PY) tools/make_demo_dataset.py --out $(DEMO_DIR)/data
	$(PY) tools/make_random_checkpoint.py $(DEMO_DIR)/tiny-e1 --preset tiny --seed 0
	touch $@

demo-data: $(DEMO_DIR)/.done

train: $(STAMP) $(if $(findstring demo,$(CONFIG)),$(DEMO_DIR)/.done)
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NGPU) -m e1min.train --config $(CONFIG) $(ARGS)

bench: $(STAMP) $(DEMO_DIR)/.done
	$(PY) tools/bench_model.py
	$(PY) tools/bench_load.py
	$(PY) tools/bench_train.py
	$(PY) tools/bench_batching.py $(BENCH)
	$(PY) tools/bench_predict.py --fasta $(BENCH)
	$(PY) tools/bench_context.py
	$(PY) tools/bench_matmul.py
	$(PY) tools/bench_epoch.py --fasta $(BENCH)
	$(PY) tools/bench_msa.py

clean:
	rm -rf $(VENV) $(DEMO_DIR) results/demo .pytest_cache
