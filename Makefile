# Two commands on a fresh machine: `make demo` and `make test`. Everything else is installed here.
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
EXTRAS     ?= hf,tb,dev
BIN        := $(VENV)/bin
STAMP      := $(VENV)/.normlab-installed
DEMO_OUT   ?= runs/demo

.PHONY: install test demo lint bench clean

install: $(STAMP)

# Torch first, from TORCH_SPEC, so the package's own `torch>=2.4` is already satisfied
# (GPU users: make install TORCH_SPEC="torch --index-url ...").
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

test: $(STAMP)
	$(BIN)/python -m pytest tests

# Re-running continues (or reuses) the same run instead of overwriting it.
demo: $(STAMP)
	$(BIN)/normlab train --config configs/tiny.yaml --out $(DEMO_OUT) --resume
	@echo "demo run: $(DEMO_OUT) (metrics.jsonl, status.json, checkpoints/)"

lint: $(STAMP)
	$(BIN)/ruff check src tests

bench: $(STAMP)
	$(BIN)/normlab bench

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
