"""A minute-scale sweep to try the tools: residual vs mHC at the debug scale, two seeds.

    python scripts/sweep.py --root=runs/sweep-debug --sweep=configs/sweeps/debug.py
    python scripts/compare.py runs/sweep-debug
"""


def get_sweep():
    return {
        "variants": ["residual", "mhc"],
        "scales": ["debug"],
        "seeds": [0, 1],
        "overrides": {"train.steps": 60, "train.eval_every": 20, "train.diag_every": 10, "train.log_every": 5,
                      "train.checkpoint_every": 20, "log.progress": False},
    }
