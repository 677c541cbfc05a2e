# Entry points: `make demo`, `make test` and `make test-fast`. Each builds .venv/ when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
export OMP_NUM_THREADS ?= 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1
# DeepSpeed compiles a CPU op on first use (minutes): keep it outside the clone so every checkout reuses it
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/xcft/torch_extensions

.PHONY: setup demo test test-fast lint web clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first and alone, so pip never resolves a multi-GB CUDA build on a CPU machine
	if command -v nvidia-smi >/dev/null 2>&1; then \
		$(PIP) install -q torch==2.13.0; \
	else \
		$(PIP) install -q "torch==2.13.0+cpu" || $(PIP) install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu; \
	fi
	$(PIP) install -q -c constraints.txt -e ".[test,deepspeed,qlora]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/xcft demo

# the browser UI on http://127.0.0.1:7860 (runs started from it are kept in ./xcft-web)
web: $(STAMP)
	$(VENV)/bin/xcft web

test: $(STAMP)
	$(PY) -m pytest -q tests

# everything but the multi-process, demo, fresh-process and long training tests (about 2.5 minutes on 2 cores)
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .cache
