"""The paper's comparison at its own scales (Table 5): residual, HC and mHC at 3b, 9b and 27b, one
seed each. Check first that every run fits the slice, then start it there:

    python scripts/sweep.py --sweep=configs/sweeps/paper.py --root=gs://BUCKET/sweeps/paper \
        --dry_run_topology=v5p-256 --launcher=tpu --tpu_name=NAME --tpu_zone=ZONE
"""


def get_sweep():
    return {"variants": ["residual", "hc", "mhc"], "scales": ["3b", "9b", "27b"], "seeds": [0], "overrides": {}}
