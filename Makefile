# Two commands for a fresh machine: `make train` and `make test`. Both create .venv and install when needed.
# On a CUDA machine pick a CUDA wheel: make TORCH_SPEC="torch==2.13.0" TORCH_INDEX="https://download.pytorch.org/whl/cu128" install
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
PIP_TORCH_ARGS ?= $(if $(wildcard /usr/local/nvidia),,--extra-index-url $(TORCH_INDEX))
PY := $(VENV)/bin/python
export MUJOCO_GL ?= egl

.PHONY: install train test test-fast lint tensorboard benchmark clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned, so resolving the project never pulls a multi-GB CUDA build on a CPU machine.
	$(PY) -m pip install -q "$(TORCH_SPEC)" || $(PY) -m pip install -q $(PIP_TORCH_ARGS) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]" "$(TORCH_SPEC)"
	touch $@

install: $(VENV)/.installed

train: install
	$(PY) -m experiments.train --preset cartpole-balance-pixels

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

tensorboard: install
	$(PY) -m tensorboard.main --logdir runs --bind_all

benchmark: install
	$(PY) -m experiments.benchmark all --quick

clean:
	rm -rf $(VENV) runs .pytest_cache
