# Two commands a newcomer types: `make demo` and `make test`. Both build .venv when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test demo organism lint format bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# Install the local CPU wheel first when no torch is present, so an unpinned
	# requirement never pulls a multi-GB CUDA build. GPU users bring their own torch.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# One pytest-xdist worker per core; a test file stays on one worker (its module fixtures, such as
# the golden organism runs, are built once).
test: install
	$(BIN)/python -m pytest -n auto --dist loadfile

demo: install
	$(BIN)/seglens demo

# Retrain the shipped organism from scratch (3.5 minutes on 2 quiet CPU cores; seeded: bit-identical).
organism: install
	$(BIN)/seglens organism train --out src/seglens/organism/weights --seed 0 --overwrite

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: install
	$(BIN)/python bench/run_all.py

# LLaVA-1.5-7B widths at full depth (32 LLM layers, bf16) on one CUDA GPU, with numeric checks and
# a 1-process torchrun (nccl) run; refuses without CUDA. Not yet run on a GPU (bench/README.md).
.PHONY: bench-gpu
bench-gpu: install
	$(BIN)/python bench/realsize.py --require-cuda --llm-layers 32 --dtype bfloat16 --check \
		--torchrun --json runs/bench-gpu.json

clean:
	rm -rf $(VENV) runs .pytest_cache
