# pipeq's commands. Each one sets up its own virtual environment first (Python 3.11+).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.pipeq-installed
TORCH  := torch==2.13.0

.PHONY: setup demo test lint bench clean browser gpu-check gpu-site gpu-bundle

setup: $(STAMP)

# torch is installed first and pinned: an unpinned torch makes pip fetch a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[worker,monitor,gateway,test,demo]" "$(TORCH)"
	touch $@

demo: setup
	HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(BIN)/python examples/demo.py

# mypy checks the installed names (pipeq, pipeq.worker): .typecheck/ holds a view of the
# folders as they install (setuptools' package-dir mapping), rebuilt on every run.
lint: setup
	$(BIN)/ruff check producer worker tests benchmarks examples
	rm -rf .typecheck && mkdir -p .typecheck/pipeq
	for entry in producer/*; do ln -s ../../$$entry .typecheck/pipeq/; done
	ln -s ../../worker .typecheck/pipeq/worker
	MYPYPATH=.typecheck $(BIN)/mypy -p pipeq

# Headless Chromium for the Flower browser test (tests/e2e): installed from Debian when
# missing and we may (root with apt-get); otherwise that test skips. Never fails the target.
browser:
	-@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && \
	      DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1; }; \
	  fi; \
	  command -v chromium >/dev/null 2>&1 || \
	    echo "chromium not installed: the browser test will be skipped"; }

test: lint browser
	HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: setup
	HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(BIN)/python benchmarks/bench.py $(BENCH_ARGS)

# pipeq's GPU path on a real NVIDIA GPU: GPU tests, then bench rows on cuda:0, written to
# benchmarks/results-gpu-<card>.json (README, "GPU"). Without a GPU it says so and skips (0).
# GPU_BUNDLE=DIR (a GPU machine without network): set up from `make gpu-bundle`'s folder
# instead: its wheels go to .gpu-site, beside the CUDA torch of that machine's GPU_PYTHON.
GPU_BUNDLE ?=
GPU_PYTHON ?= python3
GPU_CHECK_ARGS ?=
GPU_SITE := .gpu-site

gpu-check: $(if $(GPU_BUNDLE),gpu-site,setup)
	@if [ -n "$(GPU_BUNDLE)" ]; then py=$(GPU_PYTHON); \
	  export PYTHONPATH="$(CURDIR)/$(GPU_SITE)" PIPEQ_TEST_MINILM="$(abspath $(GPU_BUNDLE))/minilm"; \
	else py=$(BIN)/python; fi; \
	HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 \
	  $$py benchmarks/gpu_check.py $(GPU_CHECK_ARGS); rc=$$?; \
	if [ $$rc -eq 77 ]; then echo "gpu-check: SKIPPED - no GPU found on this machine, nothing measured"; exit 0; fi; \
	exit $$rc

gpu-site:
	@test -f "$(GPU_BUNDLE)/BUNDLE.json" || { echo "GPU_BUNDLE=$(GPU_BUNDLE) is no gpu-bundle folder (make gpu-bundle makes one)"; exit 2; }
	rm -rf $(GPU_SITE)
	$(GPU_PYTHON) -m pip install -q --no-index --no-deps --no-compile --target $(GPU_SITE) $(GPU_BUNDLE)/wheels/*.whl
	PYTHONPATH="$(CURDIR)/$(GPU_SITE)" $(GPU_PYTHON) -m pip install -q --no-index --no-deps \
	  --no-build-isolation --no-compile --target $(GPU_SITE) .

# The folder `make gpu-check GPU_BUNDLE=.gpu-bundle` sets up from, offline (< 60 MiB).
gpu-bundle: setup
	$(BIN)/python benchmarks/gpu_bundle.py --out .gpu-bundle

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .artifacts .typecheck $(GPU_SITE)
