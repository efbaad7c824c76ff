# Every target installs what it needs first: `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install test test-v5 test-slow demo bench bench-scale bench-quality lint clean

install: $(STAMP)

# torch==2.13.0 is pinned in pyproject.toml: pip takes the local CPU wheel, not CUDA packages.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q

# The suite on transformers 5 (issue 15) in its own venv, pinned by constraints-v5.txt; compressor itself
# without its dependencies (pyproject.toml pins the 4.57 set). Tests that export through optimum-onnx skip.
V5_VENV ?= .venv-v5
V5_STAMP := $(V5_VENV)/.installed

$(V5_STAMP): pyproject.toml constraints-v5.txt
	$(PYTHON) -m venv $(V5_VENV)
	$(V5_VENV)/bin/pip install --quiet --upgrade pip
	$(V5_VENV)/bin/pip install --quiet -r constraints-v5.txt
	$(V5_VENV)/bin/pip install --quiet --no-deps -e .
	touch $(V5_STAMP)

test-v5: $(V5_STAMP)
	$(V5_VENV)/bin/python -m pytest -q

test-slow: install
	$(BIN)/python -m pytest -q -m slow

demo: install
	$(BIN)/compressor demo

bench: install
	$(BIN)/python -m compressor.bench
	$(BIN)/python -m compressor.bench_checkpoint
	$(BIN)/python -m compressor.bench_latency
	$(BIN)/python -m compressor.bench_scale

# Calibration overhead, token-budget batching, peak memory at 64 vs 1024 samples (~3 min on 2 cores;
# on a GPU: a random 7B VLM text decoder in bf16).
bench-scale: install
	$(BIN)/python -m compressor.bench_scale

# Trains two demo models on first use (cached), then ~10 minutes of evaluations on 2 cores.
bench-quality: install
	$(BIN)/python -m compressor.bench_quality

lint: install
	$(BIN)/ruff check compressor tests

clean:
	rm -rf $(VENV) $(V5_VENV) build *.egg-info
