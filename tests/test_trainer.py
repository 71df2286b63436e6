"""The trainer end to end: the run's files, exact resume (after SIGTERM: test_buckets.py), restore onto other
meshes, the loss falling, NaN guard, schedules, weight decay, microbatches, and the bad inputs of
train.py (the MoE model: test_trainer_moe.py; failures and other process counts: test_failures.py)."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import (
    DEEPSEEK_EOS,
    STRAIGHT,
    assert_user_error,
    corpus_documents,
    debug_model_config,
    deepseek_style_tokenizer,
    losses,
    prepare_small_corpus,
    records,
    run_train,
)
from tensorboard.backend.event_processing import event_accumulator

from configs.pretrain import get_config
from mhc_jax import sharding
from mhc_jax.data import pipeline, prepare
from mhc_jax.errors import UserError
from mhc_jax.evals import harness
from mhc_jax.model.transformer import Transformer
from mhc_jax.training import checkpoint, optim, trainer
from mhc_jax.training.experiment import Experiment

ROOT = Path(__file__).parents[1]


@pytest.mark.slow
def test_a_run_writes_its_contract(straight_run):
    lines = records(straight_run)
    assert [r["step"] for r in lines] == list(range(1, 25))
    for key in ("loss", "lr", "grad_norm"):
        assert all(key in r for r in lines)
    assert all("tokens_per_sec" in r for r in lines[1:]) and "compile_seconds" in lines[0]
    diagnosed = [r for r in lines if "amax_forward" in r]
    assert diagnosed and all(len(r["amax_forward_per_site"]) == 4 for r in diagnosed)
    assert [r["step"] for r in lines if "eval_loss" in r] == [12, 24]
    assert np.mean([r["loss"] for r in lines[-5:]]) < np.mean([r["loss"] for r in lines[:5]]) - 1.0  # it learns
    config = json.loads((straight_run / "config.json").read_text())
    assert config["model"]["residual"] == "hc" and config["model"]["vocab_size"] == 32768
    assert sorted(int(p.name) for p in (straight_run / "checkpoints").iterdir() if p.name.isdigit()) == [15, 20, 24]
    meta = json.loads((straight_run / "checkpoints" / "24" / "meta" / "metadata").read_text())
    assert (meta["variant"], meta["n_streams"], meta["step"]) == ("hc", 4, 24)
    assert meta["tokenizer_sha256"] == pipeline.load_manifest(meta["config"]["data"]["dir"])["tokenizer"]["sha256"]
    assert (straight_run / "run.png").stat().st_size > 10_000
    events = event_accumulator.EventAccumulator(str(straight_run / "tensorboard"))
    events.Reload()
    for key in ("loss", "grad_norm", "eval_loss", "amax_forward"):  # TensorBoard holds metrics.jsonl's scalars
        logged = [(r["step"], r[key]) for r in lines if key in r]
        read = [(e.step, e.value) for e in events.Scalars(key)]
        assert [step for step, _ in read] == [step for step, _ in logged], key
        np.testing.assert_allclose([v for _, v in read], [v for _, v in logged], rtol=1e-6, err_msg=key)


def restored_eval_loss(workdir, data_dir, mesh_sizes, devices):
    config = get_config("hc,debug")
    config.data.dir = str(data_dir)
    config.update_from_flattened_dict({"log.progress": False, "train.steps": 24, "train.log_every": 1,
                                       "train.checkpoint_every": 5})
    manifest = trainer.open_data(config, vocab_overridden=False)
    mesh = jax.make_mesh(mesh_sizes, sharding.MESH_AXES, devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,) * 4)
    experiment = Experiment(config, mesh)
    step, state, _ = checkpoint.Checkpoints(workdir, keep=3).restore_latest(experiment.abstract_state,
                                                                             lambda meta: None)
    assert step == 24
    assert state["params"]["embed"]["table"].sharding.mesh.shape == mesh.shape
    evals = pipeline.eval_batches(data_dir, manifest, seq_len=64, global_batch_size=8, max_batches=8)
    return experiment.evaluate(state["params"], evals)


@pytest.mark.slow
def test_a_run_stopped_on_one_mesh_resumes_on_another_and_restores_onto_any(straight_run, default_data, tmp_path):
    """Stopped at step 11 on data=4 x fsdp=2 and resumed on fsdp=8: the straight run's losses (to
    float rounding: the meshes sum in other orders), the same wandb run continued (offline mode),
    and the last checkpoint restores onto one device with the logged validation loss. A resume on
    the same mesh repeats every loss bit for bit (test_buckets.py, test_failures.py)."""
    wandb = "--config.log.wandb=True"
    run = tmp_path / "run"
    first = run_train(run, *STRAIGHT, wandb, "--config.train.stop_at_step=11", "--config.train.eval_every=24",
                      "--config.mesh.data=4", "--config.mesh.fsdp=2", data_dir=default_data)
    assert first.returncode == 0, first.stderr
    assert losses(run)[-1][0] == 11
    second = run_train(run, *STRAIGHT, wandb, "--config.train.eval_every=24", data_dir=default_data)
    assert second.returncode == 0, second.stderr
    np.testing.assert_allclose([l for _, l in losses(run)], [l for _, l in losses(straight_run)], rtol=1e-5)
    run_id = (run / "wandb_run_id").read_text()
    offline_runs = sorted((run / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 2 and all(p.name.endswith(run_id) for p in offline_runs)
    logged = records(run)[-1]["eval_loss"]
    assert restored_eval_loss(run, default_data, (1, 1, 1, 1), jax.devices()[:1]) == pytest.approx(logged, abs=1e-6)


@pytest.mark.slow
def test_nan_guard_stops_without_a_bad_checkpoint(default_data, tmp_path):
    result = run_train(tmp_path / "run", "--config.train.lr=1e30", "--config.train.log_every=1",
                       "--config.train.checkpoint_every=1", data_dir=default_data)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: step 2: loss nan")
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()) == ["1"]


@pytest.mark.slow
def test_a_mesh_the_devices_or_the_batch_cannot_take_is_refused_before_anything_runs():
    """(The mesh's relation to model.moe.n_experts is a config rule: test_moe.py runs it through train.py.)"""
    config = get_config("hc,debug")
    config.mesh.data, config.mesh.fsdp = 3, 2
    with pytest.raises(UserError, match="mesh: .* there are 8 devices"):
        sharding.make_mesh(config.mesh)
    config = get_config("hc,debug")
    config.train.batch_size = 12
    with pytest.raises(UserError, match="train.batch_size: 12 .* data x fsdp x expert = 8"):
        trainer.check_mesh(config, sharding.make_mesh(config.mesh))


@pytest.mark.slow
def test_bad_inputs(straight_run, default_data, tmp_path):
    assert_user_error(run_train(tmp_path / "a", data_dir=tmp_path / "nowhere"),
                      "no manifest.json", "prepare_data.py")
    assert_user_error(run_train(straight_run, *STRAIGHT, variant="mhc", data_dir=default_data),
                      "different model", "model.residual: 'hc' -> 'mhc'", "delete")
    other = tmp_path / "other_data"
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in corpus_documents()))
    prepare.prepare(other, prepare.Recipe(sources=(str(tmp_path / "docs.jsonl"),), vocab_size=300, val_fraction=0.5),
                    command="test")
    result = run_train(straight_run, *STRAIGHT, data_dir=other)  # its vocab_size differs too: the data is named
    assert_user_error(result, f"data.dir: {other} was prepared with another tokenizer (300 tokens", "(32768 tokens",
                      "point data.dir at")
    assert "delete" not in result.stderr
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
    assert Experiment(config, mesh).replicated_fraction < 0.02
    monkeypatch.setitem(sharding.RULES, "embed", None)
    assert Experiment(config, mesh).replicated_fraction > 0.5


@pytest.mark.slow
def test_microbatches_accumulate_to_the_full_batch_update():
    mesh = jax.make_mesh((1, 4, 1, 1), sharding.MESH_AXES, devices=jax.devices()[:4],
                         axis_types=(jax.sharding.AxisType.Auto,) * 4)
    tokens = np.random.default_rng(0).integers(0, 512, (8, 33), dtype=np.int32)
    results = []
    for parts in (1, 2):
        config = get_config("mhc,debug")
        config.train.microbatches = parts
        experiment = Experiment(config, mesh)
        state, metrics = experiment.train_step(experiment.init_state(),
                                               jax.device_put(tokens, experiment.batch_sharding), experiment.hyper)
        results.append((jax.device_get(metrics), jax.device_get(state["params"])))
    (whole, whole_params), (split, split_params) = results
    assert split["loss"] == pytest.approx(whole["loss"], rel=1e-6)
    assert split["grad_norm"] == pytest.approx(whole["grad_norm"], rel=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=3e-6), split_params, whole_params)


TIMINGS = ("compile_seconds", "step_seconds", "tokens_per_sec", "mfu")


def train_in_process(workdir, data_dir, read_late: bool, **train_fields) -> None:
    """trainer.train's setup / loop / teardown here, with metrics read late (as on an accelerator) or
    at once (as on CPU)."""
    config = get_config("mhc,debug")
    config.data.dir, config.log.progress = str(data_dir), False
    config.train.update(train_fields)
    run = trainer.setup(config, workdir)
    run.read_late = read_late
    try:
        trainer.loop(run)
    finally:
        trainer.teardown(run)


@pytest.mark.slow
def test_reading_metrics_one_step_late_logs_the_same_and_still_guards(tmp_path):
    data_dir = prepare_small_corpus(tmp_path)
    cadences = dict(steps=7, log_every=1, eval_every=5, diag_every=4, checkpoint_every=3)
    logged = {}
    for late in (False, True):
        train_in_process(tmp_path / f"late-{late}", data_dir, late, **cadences)
        logged[late] = [{k: v for k, v in r.items() if k not in TIMINGS} for r in records(tmp_path / f"late-{late}")]
    assert [r["step"] for r in logged[True]] == list(range(1, 8))
    assert logged[True] == logged[False]
    # Step 2 diverges; read late, it is found while step 3 runs, and step 3 (a checkpoint step) is never saved.
    with pytest.raises(trainer.TrainingDiverged, match="step 2: loss nan"):
        train_in_process(tmp_path / "diverged", data_dir, True, steps=6, lr=1e30, checkpoint_every=3)
    assert not [p for p in (tmp_path / "diverged" / "checkpoints").iterdir() if p.name.isdigit()]


def test_a_resume_may_change_how_the_model_computes_but_not_what_it_is():
    """A checkpoint written before model.attention_kernel and model.moe.dispatch existed, or with
    other values of them, resumes; one of a model with another width does not."""
    config = get_config("mhc,moe_debug")
    manifest = {"tokenizer": {"sha256": "t"}}
    check = trainer.checker(config, manifest, "runs/x")
    older = config.model.to_dict()
    del older["attention_kernel"], older["moe"]["dispatch"]
    check({"config": {"model": older}, "tokenizer_sha256": "t"})
    check({"config": {"model": {**older, "attention_kernel": "xla", "moe": {**older["moe"], "dispatch": "capacity"}}},
           "tokenizer_sha256": "t"})
    with pytest.raises(UserError, match=r"model.moe.d_expert: 64 -> 32"):
        check({"config": {"model": {**older, "moe": {**older["moe"], "d_expert": 64}}}, "tokenizer_sha256": "t"})


@pytest.mark.slow
def test_a_deepseek_style_tokenizer_trains_over_epochs_and_evaluates(tmp_path, capsys):
    """Data made with a tokenizer whose end of text only its tokenizer_config.json names, trained in
    batches of 16 windows of 64 tokens over a train split of 32 to 95 of them: an epoch ends every 2
    to 6 steps, and the record of every step that starts one is written (log_every 100) and
    announced; the evaluation harness reads the workdir's tokenizer with that end of text."""
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in corpus_documents(100)))
    recipe = prepare.Recipe(sources=(str(tmp_path / "docs.jsonl"),), val_fraction=0.2,
                            tokenizer=str(deepseek_style_tokenizer(tmp_path / "deepseek")))
    manifest, _ = prepare.prepare(tmp_path / "data", recipe, command="test")
    examples = pipeline.train_examples(manifest, 64)
    assert 32 < examples < 96
    train_in_process(tmp_path / "run", tmp_path / "data", False, steps=12, seq_len=64, batch_size=16, log_every=100,
                     eval_every=100, diag_every=100, checkpoint_every=12)
    starts = [s for s in range(1, 13) if pipeline.epoch_of(s * 16, examples) > pipeline.epoch_of((s - 1) * 16, examples)]
    logged = {r["step"]: r["epoch"] for r in records(tmp_path / "run")}
    assert len(starts) >= 2 and set(starts) <= set(logged)
    assert [logged[s] for s in starts] == list(range(2, 2 + len(starts)))
    err = capsys.readouterr().err
    for step in starts:
        assert (f"step {step}: epoch {logged[step]} of {tmp_path / 'data'} begins: its {examples:,} training examples "
                "are read again") in err
    meta = checkpoint.Checkpoints(tmp_path / "run", create=False).read_meta(12)
    tokenizer = harness.load_workdir_tokenizer(tmp_path / "run", meta)
    assert tokenizer.eos_token == DEEPSEEK_EOS and tokenizer.eos_id == 1


@pytest.mark.slow
def test_a_mixture_trains_on_its_folders_and_logs_their_shares(tmp_path):
    """Two folders sharing a tokenizer (the second prepared with the first's), 0.75 and 0.25: each
    record has both shares (summing to 1) and epochs; a folder of another tokenizer is refused,
    naming it and data.dir."""
    for name, documents in (("web", corpus_documents(100, seed=1)), ("code", corpus_documents(100, seed=2))):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    prepare.prepare(tmp_path / "web", prepare.Recipe(sources=(str(tmp_path / "web.jsonl"),), val_fraction=0.2,
                                                     vocab_size=400), command="test")
    prepare.prepare(tmp_path / "code", prepare.Recipe(sources=(str(tmp_path / "code.jsonl"),), val_fraction=0.2,
                                                      tokenizer=str(tmp_path / "web" / "tokenizer.json")), command="test")
    mixture = f"{tmp_path / 'web'}:0.75,{tmp_path / 'code'}:0.25"
    config = get_config("mhc,debug")
    config.data.update(dir=str(tmp_path / "web"), mixture=mixture)
    config.log.progress = False
    config.train.update(steps=3, seq_len=64, batch_size=16, log_every=1, eval_every=3, checkpoint_every=3)
    trainer.train(config, tmp_path / "run")
    logged = records(tmp_path / "run")
    assert [r["step"] for r in logged] == [1, 2, 3]
    for record in logged:
        assert record["share/web"] + record["share/code"] == pytest.approx(1.0) and record["share/code"] > 0
        assert record["epoch/web"] >= 1 and record["epoch"] == max(record["epoch/web"], record["epoch/code"])
    assert json.loads((tmp_path / "run" / "data.json").read_text())["mixture"] == mixture
    prepare.prepare(tmp_path / "other", prepare.Recipe(sources=(str(tmp_path / "code.jsonl"),), val_fraction=0.2,
                                                       vocab_size=300), command="test")
    config.data.mixture = f"{tmp_path / 'web'}:1,{tmp_path / 'other'}:1"
    with pytest.raises(UserError, match=f"^data.mixture: {tmp_path / 'other'} was prepared with another tokenizer "
                                        rf"\(300 tokens.* than data.dir {tmp_path / 'web'} \(400 tokens"):
        trainer.training_sources(config, pipeline.load_manifest(tmp_path / "web"))
