"""Golden numbers: the loss and gradient norm of the first three training steps of every variant at
the debug scale (and mHC at moe_debug, with each MoE dispatch), on a fixed batch, against
tests/expected/golden_steps.json.

Any change to the model, the residual connections, the optimizer or the step moves them. They were
written by this test (`MHC_WRITE_GOLDEN=1 pytest tests/test_golden.py`); rewrite them only for a
change that is meant to alter the numbers, and say why in the commit. XLA's float reduction order
differs between CPU types, hence the tolerance.
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from configs.pretrain import get_config
from mhc_jax import sharding
from mhc_jax.training.experiment import Experiment

GOLDEN = Path(__file__).parent / "expected" / "golden_steps.json"
# The case's name (its key in the file) -> dotted config overrides. "mhc,moe_debug" pins the capacity
# dispatch, the default before dropless: its numbers predate the dropless dispatch.
# The later variants (test_residual_variants.py) are pinned by their papers' transcriptions and V4's reference.
CASES = {**{f"{variant},debug": {} for variant in ("residual", "hc", "hc_static", "mhc")},
         "mhc,moe_debug": {"model.moe.dispatch": "capacity"},
         "mhc,moe_debug,dropless": {"model.moe.dispatch": "dropless"}}
STEPS = 3
RTOL = 1e-4


def first_steps(case: str) -> dict:
    config = get_config(",".join(case.split(",")[:2]))
    config.update_from_flattened_dict(CASES[case])
    config.train.warmup_steps = 0  # full learning rate from the first update: the steps move the parameters
    experiment = Experiment(config, sharding.make_mesh(config.mesh))
    t = config.train
    tokens = np.random.default_rng(0).integers(0, config.model.vocab_size, (t.batch_size, t.seq_len + 1), np.int32)
    batch = experiment.global_batch({"tokens": tokens})["tokens"]
    state, steps = experiment.init_state(), {"loss": [], "grad_norm": []}
    for _ in range(STEPS):
        state, metrics = experiment.train_step(state, batch, experiment.hyper)
        for key in steps:
            steps[key].append(float(metrics[key]))
    return steps


@pytest.mark.parametrize("case", [pytest.param(case, marks=pytest.mark.slow) if "moe_debug" in case else case
                                  for case in CASES])
def test_first_steps_match_the_golden_numbers(case):
    steps = first_steps(case)
    if os.environ.get("MHC_WRITE_GOLDEN"):
        golden = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
        GOLDEN.write_text(json.dumps({**golden, case: steps}, indent=1, sort_keys=True) + "\n")
        pytest.skip("wrote the golden numbers")
    expected = json.loads(GOLDEN.read_text())[case]
    for key, values in expected.items():
        np.testing.assert_allclose(steps[key], values, rtol=RTOL, err_msg=f"{case} {key}")
    assert steps["loss"][-1] < steps["loss"][0], "the updates should lower the loss on the batch they fit"
