# Two entry points: `make serve` (install, then start the server on the demo checkpoint) and
# `make test` (install, then lint and run the tests). Both work on a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: install test serve lint bench gpu-check load soak clean

$(INSTALLED): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, from its own pin: nothing installed after it can pull a different build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(INSTALLED)

install: $(INSTALLED)

lint: $(INSTALLED)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/codespell lightvlm test benchmark docs README.md

test: lint
	$(PY) -m pytest -q test

serve: $(INSTALLED)
	$(PY) -m lightvlm.server.api_server --enable_multimodal $(ARGS)

bench: $(INSTALLED)
	$(PY) -m pip install -q -e '.[test,bench]'
	$(PY) -m benchmark.run_all

# loopback load (256 clients at once, some leaving early or mid-stream) and a soak (mixed traffic for
# SOAK_SECONDS, RSS and /dev/shm sampled); both check that nothing is lost or leaked (benchmark/load_soak.py)
SOAK_SECONDS ?= 1800
load: $(INSTALLED)
	$(PY) -m benchmark.load_soak load --out load_out
soak: $(INSTALLED)
	$(PY) -m benchmark.load_soak soak --seconds $(SOAK_SECONDS) --out soak_out

# on a CUDA machine: kernels, parity, a short served load, GPU memory -> $(OUT)/report.md (benchmark/gpu_check.py)
OUT ?= gpu_report
gpu-check: $(INSTALLED)
	$(PY) -m benchmark.gpu_check $(OUT)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
