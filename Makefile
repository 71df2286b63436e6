# `make test` sets up .venv from nothing (needs python3 >= 3.11 and pip) and runs the test suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup tpu-compiler test train stability

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-test.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements.txt -r requirements-test.txt
	touch $@

# The TPU compiler for scripts/dry_run.py, in its own folder (see requirements-tpu.txt).
tpu-compiler: $(VENV)/libtpu/.installed

$(VENV)/libtpu/.installed: requirements-tpu.txt | $(VENV)/.installed
	$(BIN)/python -m pip install --quiet --no-deps --target $(VENV)/libtpu -r requirements-tpu.txt
	touch $@

test: setup tpu-compiler
	$(BIN)/python -m pytest -q

# The main job: mHC at the 10m scale on the default corpus (prepared on first use), sized to finish
# in about 8 minutes on 2 CPU cores; then DIR/run.png. On a GPU/TPU host the same command uses it.
MAIN_JOB := --config=configs/pretrain.py:mhc,10m --workdir=runs/mhc-10m \
	--config.train.steps=150 --config.train.batch_size=8 --config.train.seq_len=128 \
	--config.train.warmup_steps=15 --config.train.eval_every=50 --config.train.diag_every=25 \
	--config.train.checkpoint_every=50 --config.train.log_every=5

train: setup
	$(BIN)/python train.py $(MAIN_JOB)

# The stability study: residual vs hc vs mhc at 10m, 3 seeds and a 3x-learning-rate stress run, in
# about 60 minutes on 2 CPU cores; its report, plots and numbers are then copied to docs/results/.
stability: setup
	$(BIN)/python scripts/stability.py --out=runs/stability
	mkdir -p docs/results/stability
	cp runs/stability/report.md runs/stability/summary.json runs/stability/*.png docs/results/stability/
