"""Stability-study config: `get_config("<scale>")`, used by scripts/stability.py.

It is `configs/pretrain.py:mhc,<scale>` with the study's training settings below. The study runs
`residual`, `hc` and `mhc`, the later variants and HC's two controls from it (each variant with its own
n_streams unless model.n_streams is overridden), with the same data order, seeds, optimizer and schedule. Override any field as `--config.a.b=value`.
"""

from configs.pretrain import get_config as pretrain_config


def get_config(scale: str = "10m"):
    config = pretrain_config(f"mhc,{scale}")
    t = config.train
    t.steps = 0  # 0: as many steps as --budget_minutes allows (calibrated on this machine); > 0 fixes it
    t.batch_size = 8  # sequences per step: small, so that a CPU budget buys many optimizer steps
    t.seq_len = 128  # tokens per sequence
    t.warmup_steps = 0  # 0: a tenth of the steps
    t.eval_batches = 8  # validation batches per evaluation
    t.keep_checkpoints = 1  # the newest checkpoint holds the final parameters (for the H_res heat maps)
    config.log.progress = False  # the study prints one line per run instead
    return config
