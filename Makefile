# `make train` and `make test` each create .venv if missing and install into it first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
WORKDIR ?= runs/quickstart
PYTEST_ARGS ?=

LIBTPU := $(VENV)/libtpu/.installed

.PHONY: train test lint clean libtpu

$(INSTALLED): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(INSTALLED)

# libtpu (the TPU compiler) for AOT-compiling against TPU topologies on this machine; kept
# in its own folder, found by `manifold compile` and the TPU lowering tests only.
$(LIBTPU): $(INSTALLED)
	$(BIN)/python -m pip install -q --target $(VENV)/libtpu --no-deps \
	  "$$($(BIN)/python -c 'import importlib.metadata as m; print(next(r.split(";")[0] for r in m.requires("jax") if r.startswith("libtpu")))')"
	touch $(LIBTPU)

libtpu: $(LIBTPU)

train: $(INSTALLED)
	$(BIN)/manifold train --config experiments/quickstart.py --workdir $(WORKDIR)

test: $(INSTALLED) $(LIBTPU)
	$(BIN)/python -m pytest -q -n 2 --durations=8 $(PYTEST_ARGS)

lint: $(INSTALLED)
	$(BIN)/python -m ruff check src tests experiments kernels benchmarks
	$(BIN)/python -m ruff format --check src tests experiments kernels benchmarks

clean:
	rm -rf $(VENV) runs
