# e1min — common tasks. By default everything runs in a local virtualenv ($(VENV)) with a CPU torch.
#   make test                  install (first time), lint, and run the whole test suite
#   make lint                  ruff check + ruff format --check (make format rewrites)
#   make train                 demo run: tiny random E1 + generated demo data, CPU, a few minutes
#   make train NGPU=4 CONFIG=configs/e1_binding.yaml TORCH_SPEC=   real run on 4 GPUs with the box's own torch
#   make bench                 benchmark tables (model forward, training step, batching)
#   make gpu-check             the prepared GPU check (tools/gpu_check.py): installs nothing, runs $(PYTHON)
# Which torch:
#   TORCH_SPEC=torch==2.13.0   (default) the CPU wheel these machines carry, in .venv
#   TORCH_SPEC=                use the torch $(PYTHON) already has (a GPU box, a cluster module, a conda env, a
#                              container): .venv-system sees the system site-packages, and torch is pinned to the version
#                              found, so pip can never replace it (an incompatible one is an error, not a download)
#   VENV=                      no virtualenv at all: install e1min (editable) into $(PYTHON)'s environment, same pin

PYTHON     ?= python3
TORCH_SPEC ?= torch==2.13.0
# Separate virtualenvs for the two torch modes, so one never silently reuses the other's torch.
VENV       ?= $(if $(TORCH_SPEC),.venv,.venv-system)
EXTRAS     ?= test,plot,structure
NGPU       ?= 1
CONFIG     ?= configs/demo.yaml
ARGS       ?=
DEMO_DIR   ?= demo_data
# Real lengths for the batching/prediction benchmarks; the demo data stands in on a machine without it.
BENCH_FASTA ?= ../shared/data/metal/ZN_train.fasta

PY    := $(if $(VENV),$(VENV)/bin/python,$(PYTHON))
BENCH := $(if $(wildcard $(BENCH_FASTA)),$(BENCH_FASTA),$(DEMO_DIR)/data/ZN_train.fasta)
STAMP := $(if $(VENV),$(VENV)/.installed,.e1min-installed)
# Without TORCH_SPEC (or without a venv) the torch already there is pinned: pip may not touch it.
PIN   := $(if $(and $(VENV),$(TORCH_SPEC)),,-c .torch-pin.txt)

LINT_PATHS := e1min tests tools

.PHONY: install lint format test train demo-data bench clean gpu-check

$(STAMP): pyproject.toml
ifneq ($(VENV),)
	test -x $(PY) || $(PYTHON) -m venv $(if $(TORCH_SPEC),,--system-site-packages) $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
endif
ifneq ($(PIN),)
	@$(PY) -c "import torch; print('torch==' + torch.__version__)" > .torch-pin.txt \
	  || { echo "make: TORCH_SPEC= / VENV= use the torch $(PYTHON) already has, but 'import torch' fails there"; exit 2; }
	@echo "using $$(cat .torch-pin.txt) from $$($(PY) -c 'import torch, os; print(os.path.dirname(torch.__file__))')"
else
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
endif
	$(PY) -m pip install --quiet $(PIN) -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check $(LINT_PATHS)
	$(PY) -m ruff format --check $(LINT_PATHS)

format: $(STAMP)
	$(PY) -m ruff check --fix $(LINT_PATHS)
	$(PY) -m ruff format $(LINT_PATHS)

test: lint
	$(PY) -m pytest -q

# Demo inputs are generated, never downloaded: a synthetic dataset and a tiny random E1.
$(DEMO_DIR)/.done: $(STAMP) e1min/data/demo.py tools/make_demo_dataset.py
	$(PY) tools/make_demo_dataset.py --out $(DEMO_DIR)/data
	$(PY) tools/make_random_checkpoint.py $(DEMO_DIR)/tiny-e1 --preset tiny --seed 0
	touch $@

demo-data: $(DEMO_DIR)/.done

train: $(STAMP) $(if $(findstring demo,$(CONFIG)),$(DEMO_DIR)/.done)
	$(PY) -m torch.distributed.run --standalone --nproc_per_node=$(NGPU) -m e1min.train --config $(CONFIG) $(ARGS)

# Installs nothing and needs no network: the machine's own python3 and torch (e.g. a lent GPU box).
gpu-check:
	PYTHONPATH=. $(PYTHON) tools/gpu_check.py$(if $(ARGS), $(ARGS))

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
	rm -rf $(VENV) .venv-system $(DEMO_DIR) results/demo .pytest_cache .e1min-installed .torch-pin.txt
