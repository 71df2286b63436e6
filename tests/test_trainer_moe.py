"""The trainer on the paper's architecture in miniature (moe_debug: MLA + MoE) with expert parallelism:
load-balance metrics, the loss falling, an exact resume after SIGTERM, and evaluation."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
from helpers import losses, records, run_train, stop_with_sigterm, xla_flags

from mhc_jax import sharding
from mhc_jax.evals.harness import LanguageModel
from mhc_jax.training import checkpoint
from mhc_jax.training.experiment import Experiment

pytestmark = pytest.mark.slow  # every test here trains in a subprocess

ROOT = Path(__file__).parents[1]


MOE_RUN = ["--config.train.steps=10", "--config.train.warmup_steps=2", "--config.train.log_every=1",
           "--config.train.checkpoint_every=3",
           "--config.mesh.expert=4"]  # 8 devices: fsdp = 2 x expert = 4
UNTIMED = ("step_seconds", "tokens_per_sec", "mfu", "compile_seconds")


def untimed_records(workdir):
    return [{k: v for k, v in r.items() if k not in UNTIMED} for r in records(workdir)]


@pytest.fixture(scope="module")
def moe_run(default_data, tmp_path_factory):
    """mhc at moe_debug (MLA + MoE) with expert parallelism, straight through."""
    workdir = tmp_path_factory.mktemp("moe") / "run"
    result = run_train(workdir, *MOE_RUN, variant="mhc", scale="moe_debug", data_dir=default_data)
    assert result.returncode == 0, result.stderr
    return workdir


def test_a_moe_run_logs_load_balance_and_resumes_after_sigterm_bit_for_bit(moe_run, default_data, tmp_path):
    """Every logged number after the resume, the router bias's range included, equals the straight run's."""
    lines = records(moe_run)
    assert all({"expert_load_max", "expert_load_min", "router_bias_min", "router_bias_max", "dropped_fraction"}
               <= set(r) for r in lines)
    assert lines[-1]["router_bias_max"] > 0 > lines[-1]["router_bias_min"]
    assert lines[-1]["expert_load_min"] <= 1 <= lines[-1]["expert_load_max"] and "amax_forward" in lines[-1]
    values = [l for _, l in losses(moe_run)]  # 10.66 -> 9.56 over the first and last 4 steps on our CPU
    assert np.mean(values[-4:]) < np.mean(values[:4]) - 0.5, values
    process = run_train(tmp_path / "run", *MOE_RUN, variant="mhc", scale="moe_debug", data_dir=default_data,
                        wait=False)
    stop_with_sigterm(process, tmp_path / "run", after_lines=6)
    assert 6 <= losses(tmp_path / "run")[-1][0] < 10
    resumed = run_train(tmp_path / "run", *MOE_RUN, variant="mhc", scale="moe_debug", data_dir=default_data)
    assert resumed.returncode == 0, resumed.stderr
    assert untimed_records(tmp_path / "run") == untimed_records(moe_run)


def test_moe_evaluation_scores_as_the_training_forward_pass(moe_run):
    """eval.py's serving layout (the whole model on each of 8 devices, dropless experts) gives each
    sequence the loss of the training step's forward pass on its own mesh (fsdp=2 x expert=4)."""
    model = LanguageModel(moe_run, batch_size=8)
    assert dict(model.mesh.shape)["data"] == 8 and model.config.model.moe.dispatch == "dropless"
    config = ml_collections.ConfigDict(json.loads((moe_run / "config.json").read_text()))
    experiment = Experiment(config, sharding.make_mesh(config.mesh))
    checkpoints = checkpoint.Checkpoints(moe_run, create=False)
    params = checkpoints.restore_params(model.step, experiment.abstract_state["params"])
    tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(0), (8, 65), 0, config.model.vocab_size))
    trained = jax.jit(experiment.on_mesh(experiment.loss))(params, tokens)
    scored = model.score_tokens([(row.tolist(), 64) for row in tokens])
    np.testing.assert_allclose([-logprob / 64 for logprob, _ in scored], trained, rtol=1e-5)


def test_a_moe_run_evaluates(moe_run, fetched_eval_data):
    data_dir, _ = fetched_eval_data
    env = {**os.environ, "XLA_FLAGS": xla_flags(1)}
    result = subprocess.run([sys.executable, "eval.py", f"--workdir={moe_run}", "--tasks=perplexity,mmlu,drop",
                             "--limit=2", f"--data_dir={data_dir}"], cwd=ROOT, capture_output=True, text=True,
                            timeout=600, env=env)
    assert result.returncode == 0, result.stderr
    tasks = json.loads((moe_run / "eval" / "10" / "results.json").read_text())["tasks"]
    assert tasks["perplexity"]["metrics"]["loss"] == pytest.approx(records(moe_run)[-1]["eval_loss"], rel=0.1)
    assert tasks["drop"]["n"] == tasks["mmlu"]["n"] == 2
