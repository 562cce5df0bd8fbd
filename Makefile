# Two commands on a fresh machine: `make demo` and `make test`. Everything else is installed here.
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
EXTRAS     ?= hf,tb,eval,dev
BIN        := $(VENV)/bin
STAMP      := $(VENV)/.normlab-installed
DEMO_OUT   ?= runs/demo
DEMO_STRATEGIES ?= pre_norm,post_norm,mixln,hybridnorm,hybridnorm_star,dyt,bhyt

.PHONY: install test demo lint bench gpu-check clean

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

DEMO_SEEDS ?= 0,1,2
DEMO_JOBS  ?= 2

# The main job: a controlled comparison on the embedded corpus, 7 strategies x 3 seeds, two runs
# at a time (4 min 40 s on 2 idle cores at 202 GFLOP/s, 5 min 24 s at 138). Re-running skips finished runs and resumes the others.
demo: $(STAMP)
	$(BIN)/normlab compare --config configs/tiny.yaml --strategies $(DEMO_STRATEGIES) \
	    --seeds $(DEMO_SEEDS) --jobs $(DEMO_JOBS) --out $(DEMO_OUT)

lint: $(STAMP)
	$(BIN)/ruff check src tests

BENCH_OUT ?= bench

# Speed ratios side by side; the table (bench.md) and bench.json go to BENCH_OUT. 7 rounds took
# 36 min on 2 cores shared with other jobs (load ~10, matmul 25 GFLOP/s); the default 5 rounds
# take about 3/4 of the time. Shorter: BENCH_ARGS="--sections norms,strategies --rounds 3".
BENCH_ARGS ?=
bench: $(STAMP)
	$(BIN)/normlab bench --out $(BENCH_OUT) $(BENCH_ARGS)

# On a CUDA machine whose python3 already holds torch, triton and transformers (no install, no
# network: normlab runs from src/): the Triton kernel tests (on the GPU and under Triton's
# interpreter), a short bf16 training run and the GPU bench, everything under GPU_OUT (the run
# is made afresh each time). Add liger-kernel to that python for the 'liger' norm path.
GPU_PYTHON ?= python3
GPU_OUT    ?= gpu-check
gpu-check:
	PYTHONPATH=src $(GPU_PYTHON) -m pytest -q -p no:cacheprovider tests/test_triton_norms.py
	rm -rf $(GPU_OUT)/run
	PYTHONPATH=src $(GPU_PYTHON) -m normlab.cli train --config configs/tiny.yaml --out $(GPU_OUT)/run -q \
	    train.device=cuda train.precision=bf16 train.max_steps=60
	PYTHONPATH=src $(GPU_PYTHON) -m normlab.cli bench --device cuda --sections norms,transformers,strategies,memory \
	    --out $(GPU_OUT)/bench

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
