#!/usr/bin/env bash
# Sweep of 2 runs on the TPU VM slice my-v5p; checkpoints under gs://bucket/sweeps/paper.
# Rerunning it resumes interrupted runs; `python scripts/sweep.py` with the same flags drops finished ones.
set -euo pipefail
TPU=my-v5p
ZONE=us-east5-a
on_every_worker() { gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="$1"; }
echo '== residual-debug-seed0'
on_every_worker 'cd mhc-jax && python3 train.py --distributed --config=configs/pretrain.py:residual,debug --workdir=gs://bucket/sweeps/paper/residual-debug-seed0 --config.train.steps=30 --config.train.seed=0 --config.log.wandb_group=paper'
echo '== mhc-debug-seed0'
on_every_worker 'cd mhc-jax && python3 train.py --distributed --config=configs/pretrain.py:mhc,debug --workdir=gs://bucket/sweeps/paper/mhc-debug-seed0 --config.train.steps=30 --config.train.seed=0 --config.log.wandb_group=paper'
