"""Sweeps: a local sweep interrupted and resumed, compare.py's table against the runs' own metrics
and its refusal of runs on other data, the TPU launcher's script against its recording, and the
sweep's bad inputs. (The SLURM launcher's script runs for real in test_failures.py, where a
2-process run is compared with a 1-process one.)"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT, assert_user_error, xla_flags

from mhc_jax.pods import launchers, sweep
from mhc_jax.training import checkpoint

SWEEP = ["--variants=residual,mhc", "--scales=debug", "--seeds=0", "--config.train.steps=24",
         "--config.train.eval_every=12", "--config.train.diag_every=8", "--config.train.log_every=2",
         "--config.train.checkpoint_every=8", "--config.log.progress=False"]


def run_sweep(root, *args, wait=True):
    env = {**os.environ, "XLA_FLAGS": xla_flags(1)}
    command = [sys.executable, "scripts/sweep.py", f"--root={root}", *SWEEP, *args]
    if not wait:
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory, default_data):
    """2 variants x 1 seed at debug: interrupted (SIGINT) during the first run, then the same command."""
    root = tmp_path_factory.mktemp("sweep") / "debug-sweep"
    data = f"--config.data.dir={default_data}"
    process = run_sweep(root, data, wait=False)
    metrics = root / "residual-debug-seed0" / "metrics.jsonl"
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 6):
        assert process.poll() is None, process.communicate()
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 1 and "the same command resumes" in stderr, stderr
    saved = checkpoint.Checkpoints(root / "residual-debug-seed0", create=False).steps()
    assert saved and saved[0] < 24 and not (root / "mhc-debug-seed0").exists()
    resumed = run_sweep(root, data)
    assert resumed.returncode == 0, resumed.stderr
    assert "2 runs, 0 finished, 2 to run" in resumed.stdout
    again = run_sweep(root, data)
    assert again.returncode == 0 and "2 runs, 2 finished, 0 to run" in again.stdout
    return root


def second_seed(run: Path, eval_shift: float) -> None:
    """A copy of `run` as its seed 1 (what compare reads: config, data, metrics), its validation
    losses moved by `eval_shift`: two seeds to average without training two more runs."""
    twin = run.parent / run.name.replace("seed0", "seed1")
    twin.mkdir(exist_ok=True)
    config = json.loads((run / "config.json").read_text())
    config["train"]["seed"] = 1
    (twin / "config.json").write_text(json.dumps(config))
    (twin / "data.json").write_bytes((run / "data.json").read_bytes())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    records = [{**r, "eval_loss": r["eval_loss"] + eval_shift} if "eval_loss" in r else r for r in records]
    (twin / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.mark.slow
def test_a_local_sweep_resumes_and_compare_reports_its_runs_own_numbers(finished_sweep, tmp_path):
    for variant, shift in (("residual", 0.25), ("mhc", -0.5)):
        second_seed(finished_sweep / f"{variant}-debug-seed0", shift)
    result = subprocess.run([sys.executable, "scripts/compare.py", str(finished_sweep)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "### debug" in result.stdout and "| mhc | 2 |" in result.stdout and "| residual | 2 |" in result.stdout
    out = finished_sweep / "compare"
    summary = json.loads((out / "summary.json").read_text())["debug"]
    for variant in ("residual", "mhc"):
        records = [[json.loads(line) for line in (finished_sweep / f"{variant}-debug-seed{seed}" / "metrics.jsonl")
                    .read_text().splitlines()] for seed in (0, 1)]
        evals = [[r["eval_loss"] for r in run if "eval_loss" in r][-1] for run in records]
        assert summary[variant]["final_eval_loss"]["mean"] == pytest.approx(np.mean(evals), abs=1e-12)
        assert summary[variant]["final_eval_loss"]["min"] == min(evals)
        assert summary[variant]["max_amax_forward"]["max"] == max(r["amax_forward"] for run in records for r in run
                                                                 if "amax_forward" in r)
        assert summary[variant]["tokens_seen"]["mean"] == 24 * 8 * 64
        assert [r["loss"] for r in records[0]][-1] < [r["loss"] for r in records[0]][0] - 1.0
    gap = summary["mhc"]["eval_loss_minus_residual"]
    assert gap == pytest.approx(summary["mhc"]["final_eval_loss"]["mean"] - summary["residual"]["final_eval_loss"]["mean"])
    assert all((out / name).stat().st_size > 1000 for name in ("loss_vs_tokens.png", "amax.png", "scaling.png"))


@pytest.mark.slow
def test_compare_refuses_runs_on_other_data(finished_sweep, tmp_path):
    other = tmp_path / "other"
    (other / "run").mkdir(parents=True)
    for name in ("config.json", "metrics.jsonl"):
        (other / "run" / name).write_bytes((finished_sweep / "mhc-debug-seed0" / name).read_bytes())
    (other / "run" / "data.json").write_text(json.dumps({"dir": "elsewhere", "fingerprint": "0", "tokenizer_sha256": "1"}))
    result = subprocess.run([sys.executable, "scripts/compare.py", str(finished_sweep), str(other),
                             f"--out={tmp_path / 'out'}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert_user_error(result, "different tokenizers", "compare runs on the same data only")


@pytest.mark.slow
def test_the_tpu_launchers_script_matches_its_recording(tmp_path):
    runs = sweep.grid(["residual", "mhc"], ["debug"], [0], ["--config.train.steps=30"], group="paper")
    script = launchers.tpu_script(runs, "gs://bucket/sweeps/paper", "my-v5p", "us-east5-a", "mhc-jax", "python3")
    assert script == (ROOT / "tests/expected/tpu_sweep.sh").read_text()
    (tmp_path / "tpu.sh").write_text(script)
    assert subprocess.run(["bash", "-n", str(tmp_path / "tpu.sh")]).returncode == 0


@pytest.mark.slow
def test_sweep_bad_inputs(tmp_path):
    assert_user_error(run_sweep(tmp_path / "s", "--launcher=tpu", "--tpu_name=a", "--tpu_zone=b"),
                      "--root:", "use a bucket")
    assert_user_error(run_sweep(tmp_path / "s", "--variants=resnet"), "--variants: resnet")
    assert_user_error(run_sweep(tmp_path / "s", "--config.train.nope=1"), "--config.train.nope", "no config field")
