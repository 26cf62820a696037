# Two commands for a fresh machine: `make train` and `make test`. Both create .venv and install when needed.
# torch is installed first and pinned, so resolving the project never swaps it for another build. To choose the
# wheel, pass pip arguments, e.g. CPU-only from PyTorch's index:
#   make TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu" install
# or CUDA 12.8: TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
PY := $(VENV)/bin/python
export MUJOCO_GL ?= egl

.PHONY: install install-train train test test-fast lint tensorboard benchmark clean

# What training needs (the package and its dependencies); `install` adds the dev extra (tests, lint, ONNX export,
# rliable reports, Ray / Optuna sweeps, peft).
$(VENV)/.installed-train: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e . "$(TORCH_SPEC)"
	touch $@

$(VENV)/.installed: $(VENV)/.installed-train
	$(PY) -m pip install -q -e ".[dev]" "$(TORCH_SPEC)"
	touch $@

install-train: $(VENV)/.installed-train

install: $(VENV)/.installed

train: install-train
	$(PY) -m experiments.train --preset cartpole-balance-pixels

# Two pytest-xdist workers: the suite is mostly one-core subprocess runs, so 2 cores halve its wall time.
test: install
	$(PY) -m pytest -q -n 2 --durations=20

test-fast: install
	$(PY) -m pytest -q -n 2 -m "not slow"

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# Served on localhost only; `make tensorboard TB_ARGS=--bind_all` serves every interface.
TB_ARGS ?=
tensorboard: install-train
	$(PY) -m tensorboard.main --logdir runs $(TB_ARGS)

benchmark: install
	$(PY) -m experiments.benchmark all --quick

clean:
	rm -rf $(VENV) runs .pytest_cache
