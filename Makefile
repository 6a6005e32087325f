# The two commands in the README: `make demo` and `make test`. Each sets up .venv on first use.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements.lock | cksum | cut -d' ' -f1)
# llama-cpp-python ships as source only: its wheel is built once (about 8 minutes on 2 cores) into WHEELS
# and reused by every later set-up. Portable x86-64 build (AVX2), no multimodal, no tools.
LLAMA_CPP := 0.3.36
WHEELS ?= $(HOME)/.cache/appliance/wheels
LLAMA_CMAKE := -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
# With a CUDA toolkit (nvcc on PATH or in /usr/local/cuda) and a GPU (nvidia-smi lists one) llama.cpp is built
# with CUDA, so `serve` offloads layers to the GPU; its wheel is cached apart (WHEELS/cuda: the same file name
# as the CPU build's). LLAMA_CUDA=1 forces the CUDA build (a toolkit without a GPU, e.g. a build host),
# LLAMA_CUDA=0 the CPU one. A toolkit alone does not choose it: the CUDA build takes far longer to compile.
LLAMA_CUDA ?= auto
NVCC := $(shell command -v nvcc 2>/dev/null || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
ifeq ($(LLAMA_CUDA),auto)
override LLAMA_CUDA := $(if $(and $(NVCC),$(shell nvidia-smi -L 2>/dev/null | grep -m1 GPU)),1,0)
endif
ifeq ($(LLAMA_CUDA),1)
LLAMA_CMAKE += -DGGML_CUDA=ON -DCMAKE_CUDA_COMPILER=$(NVCC)
LLAMA_WHEELS := $(WHEELS)/cuda
else
LLAMA_WHEELS := $(WHEELS)
endif
# llama.cpp's tokenizer test vectors (vocabulary-only GGUFs + .inp/.out) from the same version's sdist,
# kept in VOCAB for tests/test_gguf_vocab.py (APPLIANCE_VOCAB_DIR overrides where the tests look).
VOCAB ?= $(WHEELS)/../vocab
VOCAB_FAMILIES := llama-bpe qwen2 qwen35 gpt-2 llama-spm starcoder phi-3
VOCAB_STAMP := $(VOCAB)/.llama-cpp-$(LLAMA_CPP)-$(shell echo $(VOCAB_FAMILIES) | cksum | cut -d' ' -f1)

.PHONY: setup demo test bench lint

setup: $(STAMP) $(VOCAB_STAMP)

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	@ls $(LLAMA_WHEELS)/llama_cpp_python-$(LLAMA_CPP)-*.whl >/dev/null 2>&1 || { \
	  echo "building llama.cpp$(if $(filter 1,$(LLAMA_CUDA)), with CUDA,) once into $(LLAMA_WHEELS) (about 8 minutes on 2 cores)"; \
	  CMAKE_ARGS="$(LLAMA_CMAKE)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(VENV)/bin/python -m pip wheel -q \
	    --no-deps llama-cpp-python==$(LLAMA_CPP) -w $(LLAMA_WHEELS); }
	$(VENV)/bin/python -m pip install -q --find-links $(LLAMA_WHEELS) -c requirements.lock -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

$(VOCAB_STAMP): | $(STAMP)
	@ls $(WHEELS)/llama_cpp_python-$(LLAMA_CPP).tar.gz >/dev/null 2>&1 || \
	  $(VENV)/bin/python -m pip download -q --no-deps --no-binary :all: llama-cpp-python==$(LLAMA_CPP) -d $(WHEELS)
	mkdir -p $(VOCAB)
	tar xzf $(WHEELS)/llama_cpp_python-$(LLAMA_CPP).tar.gz -C $(VOCAB) --strip-components=4 --wildcards \
	  $(foreach f,$(VOCAB_FAMILIES),'llama_cpp_python-$(LLAMA_CPP)/vendor/llama.cpp/models/ggml-vocab-$(f).gguf*')
	touch $@

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/appliance demo --home .demo-home

test: $(STAMP) $(VOCAB_STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest -q -n 2 --dist loadfile --durations=25

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/python benchmarks/vault_ingest.py --mb 20 --big-gb 2 --write docs/BENCHMARKS.md
	$(VENV)/bin/python -m pip install -q -c requirements.lock -e '.[bench]' || echo "scrubadub not installed: the PII benchmark runs without its reference"
	HF_HUB_OFFLINE=1 $(VENV)/bin/python benchmarks/pii_recall.py --docs 1200 --write docs/BENCHMARKS.md
	HF_HUB_OFFLINE=1 $(VENV)/bin/python benchmarks/train_throughput.py --steps 30 --write docs/BENCHMARKS.md
	HF_HUB_OFFLINE=1 $(VENV)/bin/python benchmarks/edge_inference.py --steps 30 --write docs/BENCHMARKS.md
	HF_HUB_OFFLINE=1 $(VENV)/bin/python benchmarks/bundle_throughput.py --gib 1 --write docs/BENCHMARKS.md
	HF_HUB_OFFLINE=1 $(VENV)/bin/python benchmarks/sealed_io.py --gib 1 --write docs/BENCHMARKS.md
	HF_HUB_OFFLINE=1 $(VENV)/bin/python benchmarks/eval_throughput.py --steps 20 --write docs/BENCHMARKS.md
	HF_HUB_OFFLINE=1 $(VENV)/bin/python benchmarks/agentic_task.py --write docs/BENCHMARKS.md
	HF_HUB_OFFLINE=1 $(VENV)/bin/python benchmarks/byo_bases.py --write docs/BENCHMARKS.md

lint: $(STAMP)
	$(VENV)/bin/ruff check appliance bundles tests benchmarks
