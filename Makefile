# Every target installs what it needs first: `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install test test-457 test-517 test-slow demo bench bench-scale bench-quality bench-heal bench-gpu lint clean

install: $(STAMP)

# constraints.txt pins what CI runs (transformers 5.x); torch's +cpu pin takes the local CPU
# wheel, not CUDA packages. pyproject.toml itself declares ranges.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q

# The transformers 4.57 leg, in its own venv (constraints-457.txt): the last 4.x, and the one set where
# optimum-onnx's ORTModelForCausalLM runs (it loads compressor's text exports). CI runs it after `make test`.
LEGACY_VENV ?= .venv-457
LEGACY_STAMP := $(LEGACY_VENV)/.installed

$(LEGACY_STAMP): pyproject.toml constraints-457.txt
	$(PYTHON) -m venv $(LEGACY_VENV)
	$(LEGACY_VENV)/bin/pip install --quiet --upgrade pip
	$(LEGACY_VENV)/bin/pip install --quiet -c constraints-457.txt -e ".[dev,legacy-onnx]"
	touch $(LEGACY_STAMP)

test-457: $(LEGACY_STAMP)
	$(LEGACY_VENV)/bin/python -m pytest -q

# The transformers 5.17 leg, in its own venv (constraints-517.txt): the release the project's GPU machines
# carry, without torchvision here (its registry wheel is CUDA-built), which exercises loading.py's 5.17 paths.
V517_VENV ?= .venv-517
V517_STAMP := $(V517_VENV)/.installed

$(V517_STAMP): pyproject.toml constraints-517.txt
	$(PYTHON) -m venv $(V517_VENV)
	$(V517_VENV)/bin/pip install --quiet --upgrade pip
	$(V517_VENV)/bin/pip install --quiet -c constraints-517.txt -e ".[dev]"
	touch $(V517_STAMP)

test-517: $(V517_STAMP)
	$(V517_VENV)/bin/python -m pytest -q

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

# Heals the demo models pruned by 1…L/2 blocks with every heal method (a tenth of the demo's training
# steps each) and scores them: ~2.5 min per task on 2 cores with COMPRESSOR_THREADS=1 (on a busy machine
# two threads were 15-50x slower), after training any demo model not cached (about 4 and 15-25 min).
# `make bench-heal ARGS="--tasks shapes"`; ARGS=--smoke (k=1, 2 steps per method) checks that it runs.
bench-heal: install
	$(BIN)/python -m compressor.bench_heal $(ARGS)

# Run-time visual-token reduction (compressor.runtime: SGL, FastV, random; SGL early exit; Skip-It bands)
# on the demo models, the pruned one as SGL's guide, vs block removal: ~8 min for both tasks on one thread
# (COMPRESSOR_THREADS=1) once the demo models are cached. ARGS=--smoke checks that it runs.
.PHONY: bench-runtime
bench-runtime: install
	$(BIN)/python -m compressor.bench_runtime $(ARGS)

# GPU figures in one table, < 8 min on one H200 (a random Qwen3-VL-8B in bf16): no venv and no install,
# the GPU machine's own python3 and CUDA torch; pydantic travels as wheels (compressor/bench_gpu.py).
# `make bench-gpu PYTHON=.venv/bin/python ARGS=--smoke`: the same code at tiny shapes on a CPU, in seconds.
bench-gpu:
	$(PYTHON) -m compressor.bench_gpu $(ARGS)

lint: install
	$(BIN)/ruff check compressor tests

clean:
	rm -rf $(VENV) $(LEGACY_VENV) $(V517_VENV) build *.egg-info
