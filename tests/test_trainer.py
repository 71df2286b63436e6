"""The trainer end to end: first-use data, exact resume (also after SIGTERM), restore onto other
meshes, two processes, NaN guard, schedules, weight decay, and the bad inputs of train.py."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from configs.pretrain import get_config
from helpers import (QUIET, STRAIGHT, assert_user_error, corpus_documents, debug_model_config, losses, records,
                     run_train, stop_with_sigterm, xla_flags)
from mhc_jax import checkpoint, data, optim, prepare, sharding, trainer
from mhc_jax.errors import UserError
from mhc_jax.model import Transformer

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def straight_run(default_data, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight") / "run"
    result = run_train(workdir, *STRAIGHT, "--config.train.eval_every=12", data_dir=default_data)
    assert result.returncode == 0, result.stderr
    return workdir


def test_a_run_writes_its_contract(straight_run):
    lines = records(straight_run)
    assert [r["step"] for r in lines] == list(range(1, 25))
    for key in ("loss", "lr", "grad_norm"):
        assert all(key in r for r in lines)
    assert all("tokens_per_sec" in r for r in lines[1:]) and "compile_seconds" in lines[0]
    diagnosed = [r for r in lines if "amax_forward" in r]
    assert diagnosed and all(len(r["amax_forward_per_site"]) == 4 for r in diagnosed)
    assert [r["step"] for r in lines if "eval_loss" in r] == [12, 24]
    config = json.loads((straight_run / "config.json").read_text())
    assert config["model"]["residual"] == "hc" and config["model"]["vocab_size"] == 32768
    assert sorted(int(p.name) for p in (straight_run / "checkpoints").iterdir() if p.name.isdigit()) == [15, 20, 24]
    meta = json.loads((straight_run / "checkpoints" / "24" / "meta" / "metadata").read_text())
    assert (meta["variant"], meta["n_streams"], meta["step"]) == ("hc", 4, 24)
    assert meta["tokenizer_sha256"] == data.load_manifest(meta["config"]["data"]["dir"])["tokenizer"]["sha256"]
    assert (straight_run / "run.png").stat().st_size > 10_000


def test_stop_and_resume_repeats_every_loss_bit_for_bit(straight_run, default_data, tmp_path):
    """Also with wandb in offline mode: the resumed run continues the same wandb run."""
    wandb = "--config.log.wandb=True"
    first = run_train(tmp_path / "run", *STRAIGHT, wandb, "--config.train.stop_at_step=11", data_dir=default_data)
    assert first.returncode == 0, first.stderr
    assert losses(tmp_path / "run")[-1][0] == 11
    second = run_train(tmp_path / "run", *STRAIGHT, wandb, data_dir=default_data)
    assert second.returncode == 0, second.stderr
    assert losses(tmp_path / "run") == losses(straight_run)
    run_id = (tmp_path / "run" / "wandb_run_id").read_text()
    offline_runs = sorted((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 2 and all(p.name.endswith(run_id) for p in offline_runs)


def test_sigterm_saves_and_the_same_command_resumes(straight_run, default_data, tmp_path):
    process = run_train(tmp_path / "run", *STRAIGHT, data_dir=default_data, wait=False)
    stop_with_sigterm(process, tmp_path / "run", after_lines=8)
    stopped_at = losses(tmp_path / "run")[-1][0]
    assert 8 <= stopped_at < 24
    assert str(stopped_at) in os.listdir(tmp_path / "run" / "checkpoints")
    resumed = run_train(tmp_path / "run", *STRAIGHT, data_dir=default_data)
    assert resumed.returncode == 0, resumed.stderr
    assert losses(tmp_path / "run") == losses(straight_run)


MOE_RUN = ["--config.train.steps=16", "--config.train.log_every=1", "--config.train.checkpoint_every=4",
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
    values = [l for _, l in losses(moe_run)]  # 10.85 -> 9.72 over the first and last 4 steps on our CPU
    assert np.mean(values[-4:]) < np.mean(values[:4]) - 0.5, values
    process = run_train(tmp_path / "run", *MOE_RUN, variant="mhc", scale="moe_debug", data_dir=default_data,
                        wait=False)
    stop_with_sigterm(process, tmp_path / "run", after_lines=6)
    assert 6 <= losses(tmp_path / "run")[-1][0] < 16
    resumed = run_train(tmp_path / "run", *MOE_RUN, variant="mhc", scale="moe_debug", data_dir=default_data)
    assert resumed.returncode == 0, resumed.stderr
    assert untimed_records(tmp_path / "run") == untimed_records(moe_run)


def test_a_moe_run_evaluates(moe_run, fetched_eval_data):
    data_dir, _ = fetched_eval_data
    env = {**os.environ, "XLA_FLAGS": xla_flags(1)}
    result = subprocess.run([sys.executable, "eval.py", f"--workdir={moe_run}", "--tasks=perplexity,mmlu,gsm8k",
                             "--limit=2", f"--data_dir={data_dir}"], cwd=ROOT, capture_output=True, text=True,
                            timeout=600, env=env)
    assert result.returncode == 0, result.stderr
    tasks = json.loads((moe_run / "eval" / "16" / "results.json").read_text())["tasks"]
    assert tasks["perplexity"]["metrics"]["loss"] == pytest.approx(records(moe_run)[-1]["eval_loss"], rel=0.1)
    assert tasks["gsm8k"]["n"] == tasks["mmlu"]["n"] == 2


def restored_eval_loss(workdir, data_dir, mesh_sizes, devices):
    config = get_config("hc,debug")
    config.data.dir = str(data_dir)
    config.update_from_flattened_dict({"log.progress": False, "train.steps": 24, "train.log_every": 1,
                                       "train.checkpoint_every": 5})
    manifest = trainer.open_data(config, vocab_overridden=False)
    mesh = jax.make_mesh(mesh_sizes, sharding.MESH_AXES, devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,) * 4)
    experiment = trainer.Experiment(config, mesh)
    step, state, _ = checkpoint.Checkpoints(workdir, keep=3).restore_latest(experiment.abstract_state,
                                                                             lambda meta: None)
    assert step == 24
    assert state["params"]["embed"]["table"].sharding.mesh.shape == mesh.shape
    evals = data.eval_batches(data_dir, manifest, seq_len=64, global_batch_size=8, max_batches=8)
    return experiment.evaluate(state["params"], evals)


def test_checkpoints_restore_onto_other_meshes(straight_run, default_data, tmp_path):
    saved_on = tmp_path / "run"  # 8 devices as data=4 x fsdp=2
    result = run_train(saved_on, *STRAIGHT, "--config.train.eval_every=24", "--config.mesh.data=4",
                       "--config.mesh.fsdp=2", data_dir=default_data)
    assert result.returncode == 0, result.stderr
    logged = records(saved_on)[-1]["eval_loss"]
    np.testing.assert_allclose([l for _, l in losses(saved_on)], [l for _, l in losses(straight_run)], rtol=1e-5)
    for sizes, devices in (((1, 8, 1, 1), jax.devices()), ((1, 1, 1, 1), jax.devices()[:1])):
        assert restored_eval_loss(saved_on, default_data, sizes, devices) == pytest.approx(logged, abs=1e-6)


def test_two_slurm_processes_train_like_one_through_the_sweeps_sbatch_script(straight_run, default_data, tmp_path):
    """scripts/sweep.py --launcher=slurm writes the sbatch script; it runs as written, its srun a stand-in
    that starts 2 processes x 4 devices (data=2 x fsdp=4) on localhost with SLURM's variables, which
    train.py --distributed reads. Against the straight run's 1 process x 8 devices (fsdp=8)."""
    overrides = (*STRAIGHT, *QUIET, "--config.train.stop_at_step=6", "--config.mesh.data=2", "--config.mesh.fsdp=4",
                 f"--config.data.dir={default_data}")
    written = subprocess.run([sys.executable, "scripts/sweep.py", f"--root={tmp_path / 'sweep'}", "--variants=hc",
                              "--scales=debug", "--seeds=0", "--launcher=slurm", "--nodes=2", "--gpus_per_node=0",
                              *overrides], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert written.returncode == 0, written.stderr
    script = tmp_path / "sweep" / "hc-debug-seed0.sbatch"
    assert "#SBATCH --nodes=2" in script.read_text() and "srun " in script.read_text()
    job_id = 1000 + os.getpid() % 3000  # JAX's coordinator port comes from the job id
    env = {**os.environ, "XLA_FLAGS": xla_flags(4), "PATH": f"{ROOT / 'tests/fake_slurm'}:{os.environ['PATH']}",
           "SLURM_JOB_ID": str(job_id), "SLURM_NTASKS": "2"}
    result = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    workdir = tmp_path / "sweep" / "hc-debug-seed0"
    two, one = losses(workdir), losses(straight_run)[:6]
    assert [s for s, _ in two] == [s for s, _ in one] == list(range(1, 7))
    np.testing.assert_allclose([l for _, l in two], [l for _, l in one], rtol=1e-5)
    assert "6" in os.listdir(workdir / "checkpoints")
    # The run saved by 2 processes resumes on 1, then on 4, with the batches of the straight run.
    resumed = run_train(workdir, *STRAIGHT, "--config.train.stop_at_step=12", data_dir=default_data)
    assert resumed.returncode == 0, resumed.stderr
    srun = [str(ROOT / "tests/fake_slurm/srun"), sys.executable, str(ROOT / "train.py"), "--distributed",
            f"--config={ROOT / 'configs/pretrain.py'}:hc,debug", f"--workdir={workdir}", *STRAIGHT, *QUIET,
            "--config.train.stop_at_step=16", f"--config.data.dir={default_data}"]
    four = subprocess.run(srun, env={**env, "XLA_FLAGS": xla_flags(2), "SLURM_NTASKS": "4",
                                     "SLURM_JOB_ID": str(job_id + 1)}, capture_output=True, text=True, timeout=600)
    assert four.returncode == 0, four.stderr
    assert [s for s, _ in losses(workdir)] == list(range(1, 17))
    np.testing.assert_allclose([l for _, l in losses(workdir)], [l for _, l in losses(straight_run)[:16]], rtol=1e-5)


# Every variant at debug (residual and mhc in test_pods.py's sweep), one stream at moe_debug (four:
# the moe_run below; the residual connection treats the MoE block like any other).
@pytest.mark.parametrize("variant,scale", [("hc", "debug"), ("hc_static", "debug"), ("residual", "moe_debug")])
def test_loss_decreases_on_the_default_corpus(default_data, tmp_path, variant, scale):
    result = run_train(tmp_path / "run", "--config.train.steps=40", "--config.train.log_every=1",
                       variant=variant, scale=scale, devices=1, data_dir=default_data)
    assert result.returncode == 0, result.stderr
    values = [l for _, l in losses(tmp_path / "run")]
    assert np.mean(values[-5:]) < np.mean(values[:5]) - 1.0, values


def test_nan_guard_stops_without_a_bad_checkpoint(default_data, tmp_path):
    result = run_train(tmp_path / "run", "--config.train.lr=1e30", "--config.train.log_every=1",
                       "--config.train.checkpoint_every=1", data_dir=default_data)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: step 2: loss nan")
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()) == ["1"]


def test_bad_inputs(straight_run, default_data, tmp_path):
    assert_user_error(run_train(tmp_path / "a", "--config.mesh.data=3", "--config.mesh.fsdp=2",
                                data_dir=default_data), "mesh:", "there are 8 devices")
    assert_user_error(run_train(tmp_path / "a", "--config.train.batch_size=12", data_dir=default_data),
                      "train.batch_size: 12", "data x fsdp x expert = 8")
    assert_user_error(run_train(tmp_path / "a", "--config.mesh.expert=8", scale="moe_debug", data_dir=default_data,
                                extra=["--config.model.moe.n_experts=12"]), "mesh.expert: 8", "n_experts=12")
    assert_user_error(run_train(tmp_path / "a", data_dir=tmp_path / "nowhere"),
                      "no manifest.json", "prepare_data.py")
    assert_user_error(run_train(straight_run, *STRAIGHT, variant="mhc", data_dir=default_data),
                      "different model", "model.residual: 'hc' -> 'mhc'", "delete")
    other = tmp_path / "other_data"
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in corpus_documents()))
    prepare.prepare(other, prepare.Recipe(sources=(str(tmp_path / "docs.jsonl"),), vocab_size=300, val_fraction=0.5),
                    command="test")
    assert_user_error(run_train(straight_run, *STRAIGHT, "--config.model.vocab_size=32768", data_dir=other),
                      "different tokenizer")
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").glob("checkpoints/*"))


def test_schedules_match_their_formulas():
    t = get_config("mhc,debug").train
    t.update_from_flattened_dict({"steps": 1000, "warmup_steps": 100, "lr": 1.0, "min_lr_ratio": 0.1})
    assert float(optim.learning_rate(0, t)) == pytest.approx(0.01)
    assert float(optim.learning_rate(49, t)) == pytest.approx(0.5)
    expected = {"step": {100: 1.0, 799: 1.0, 800: 0.316, 899: 0.316, 900: 0.1, 999: 0.1},
                "cosine": {100: 1.0, 550: 0.55, 999: 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 899 / 900))},
                "wsd": {100: 1.0, 800: 1.0, 900: 0.55, 1000: 0.1}}
    for schedule, points in expected.items():
        t.schedule = schedule
        for step, value in points.items():
            assert float(optim.learning_rate(step, t)) == pytest.approx(value, rel=1e-5), (schedule, step)


def test_weight_decay_skips_norms_gates_and_static_coefficients():
    for variant in ("hc", "mhc"):
        abstract = nnx.state(nnx.eval_shape(lambda: Transformer(debug_model_config(variant), nnx.Rngs(0))), nnx.Param)
        flat = {"/".join(map(str, path)): bool(decay) for path, decay in
                nnx.to_flat_state(nnx.State(optim.weight_decay_mask(abstract)))}
        decayed = sorted(k for k, v in flat.items() if v)
        assert decayed == sorted(k for k in flat if k.split("/")[-1] in (
            "table", "wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down", "phi", "dynamic_alpha", "dynamic_beta"))


def test_fsdp_leaves_almost_nothing_replicated(monkeypatch):
    mesh = jax.make_mesh((1, 8, 1, 1), sharding.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4)
    config = get_config("mhc,10m")
    assert trainer.Experiment(config, mesh).replicated_fraction < 0.02
    monkeypatch.setitem(sharding.RULES, "embed", None)
    assert trainer.Experiment(config, mesh).replicated_fraction > 0.5


def test_microbatches_accumulate_to_the_full_batch_update():
    mesh = jax.make_mesh((1, 4, 1, 1), sharding.MESH_AXES, devices=jax.devices()[:4],
                         axis_types=(jax.sharding.AxisType.Auto,) * 4)
    tokens = np.random.default_rng(0).integers(0, 512, (8, 33), dtype=np.int32)
    results = []
    for parts in (1, 2):
        config = get_config("mhc,debug")
        config.train.microbatches = parts
        experiment = trainer.Experiment(config, mesh)
        state, metrics = experiment.train_step(experiment.init_state(),
                                               jax.device_put(tokens, experiment.batch_sharding))
        results.append((jax.device_get(metrics), jax.device_get(state["params"])))
    (whole, whole_params), (split, split_params) = results
    assert split["loss"] == pytest.approx(whole["loss"], rel=1e-6)
    assert split["grad_norm"] == pytest.approx(whole["grad_norm"], rel=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), split_params, whole_params)


def test_an_unreadable_checkpoint_is_set_aside_and_its_step_saved_again(tmp_path, caplog):
    mesh = jax.make_mesh((1, 1, 1, 1), sharding.MESH_AXES, devices=jax.devices()[:1],
                         axis_types=(jax.sharding.AxisType.Auto,) * 4)
    experiment = trainer.Experiment(get_config("residual,debug"), mesh)
    checkpoints = checkpoint.Checkpoints(tmp_path, keep=3)
    state = experiment.init_state()
    for step in (1, 2, 3):
        checkpoints.save(step, state, {"step": step})
        checkpoints.wait()
    (tmp_path / "checkpoints" / "3" / "state" / "_METADATA").write_text("{garbled")  # the state's tree
    for path in (tmp_path / "checkpoints" / "2" / "state").rglob("*"):  # every file of the state truncated
        if path.is_file():
            path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    step, restored, meta = checkpoints.restore_latest(experiment.abstract_state, lambda meta: None)
    assert (step, meta["step"]) == (1, 1)
    assert "3: state unreadable" in caplog.text and "2: state unreadable" in caplog.text
    np.testing.assert_array_equal(restored["params"]["embed"]["table"], state["params"]["embed"]["table"])
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names[0] == "1" and [n.split("-")[0] for n in names[1:]] == ["2.damaged", "3.damaged"]
    checkpoints.save(2, state, {"step": 2})  # the step of a damaged checkpoint is saved again
    checkpoints.wait()
    assert checkpoints.steps() == [2, 1]


def test_a_checkpoint_of_another_structure_is_refused_not_set_aside(tmp_path):
    mesh = jax.make_mesh((1, 1, 1, 1), sharding.MESH_AXES, devices=jax.devices()[:1],
                         axis_types=(jax.sharding.AxisType.Auto,) * 4)
    experiment = trainer.Experiment(get_config("residual,debug"), mesh)
    checkpoints = checkpoint.Checkpoints(tmp_path)
    state = experiment.init_state()
    checkpoints.save(1, {**state, "extra": state["step"]}, {"step": 1})
    checkpoints.wait()
    with pytest.raises(UserError, match="another structure .unexpected extra"):
        checkpoints.restore_latest(experiment.abstract_state, lambda meta: None)
    assert checkpoints.steps() == [1]


def test_damaged_newest_checkpoints_are_survived_to_the_end(straight_run, default_data, tmp_path):
    """The newest checkpoint without its metadata, the one before with its state truncated: both are
    set aside, the run resumes from the third, saves their steps again and ends like the straight run."""
    workdir = tmp_path / "run"
    shutil.copytree(straight_run, workdir)
    shutil.rmtree(workdir / "checkpoints" / "24" / "meta")
    for path in (workdir / "checkpoints" / "20" / "state").rglob("*"):
        if path.is_file():
            path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    result = run_train(workdir, *STRAIGHT, data_dir=default_data)
    assert result.returncode == 0, result.stderr
    assert "24: metadata unreadable" in result.stderr and "20: state unreadable" in result.stderr
    names = [p.name for p in (workdir / "checkpoints").iterdir()]
    assert sorted(int(n) for n in names if n.isdigit()) == [15, 20, 24]
    assert sorted(n.split("-")[0] for n in names if not n.isdigit()) == ["20.damaged", "24.damaged"]
    assert losses(workdir) == losses(straight_run)
