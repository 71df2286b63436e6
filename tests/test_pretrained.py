"""Hugging Face models as ours: the tiny random models of tests/data/hf (written by
scripts/make_hf_reference.py with transformers) give the reference's logits and greedy tokens."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import (
    assert_user_error,
    corpus_documents,
    make_model,
    prepare_small_corpus,
    random_tokens,
    randomize,
    records,
    run_train,
    xla_flags,
)

from configs.pretrain import get_config
from mhc_jax import sharding
from mhc_jax.data import prepare
from mhc_jax.errors import UserError
from mhc_jax.evals.harness import LanguageModel
from mhc_jax.model import residual
from mhc_jax.model.transformer import abstract_variables_of
from mhc_jax.pretrained import hf, importer, safetensors_file, surgery
from mhc_jax.training import checkpoint, trainer
from mhc_jax.training.experiment import Experiment

ROOT = Path(__file__).parents[1]
REFERENCE = ROOT / "tests" / "data" / "hf"
ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")


def run_script(*args):
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "XLA_FLAGS": xla_flags(1, optimized=False)})


def imported(folder: Path):
    """Our model of a Hugging Face folder, and its config."""
    config = get_config("residual,debug")
    fields = importer.hf_config_into(config, folder)
    graphdef, state = abstract_variables_of(config.model)
    params = hf.params_from_hf(hf.read_weights(folder), fields)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    return nnx.merge(graphdef, state), config


def greedy(model, tokens_T: np.ndarray, count: int) -> list[int]:
    """Greedy new tokens through the KV cache: a prefill, then one token per step."""
    start_B = jnp.zeros((1,), jnp.int32)
    logits_B1V, cache = model.decode(jnp.asarray(tokens_T)[None], model.init_cache(start_B, len(tokens_T) + count),
                                     last_only=True)
    new = []
    for _ in range(count):
        new.append(int(jnp.argmax(logits_B1V[0, -1])))
        logits_B1V, cache = model.decode(jnp.asarray([[new[-1]]]), cache)
    return new


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_logits_and_greedy_tokens_match_the_reference(architecture):
    reference = np.load(REFERENCE / architecture / "reference.npz")
    model, _ = imported(REFERENCE / architecture)
    logits = np.asarray(model(jnp.asarray(reference["tokens"])), np.float64)
    expected = reference["logits"].astype(np.float64)
    assert np.abs(logits - expected).max() < 1e-4
    log_p, log_q = (x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)
                    for x in (expected, logits))
    assert (np.exp(log_p) * (log_p - log_q)).sum(-1).max() <= 1e-6  # KL(reference || ours) per position
    assert greedy(model, reference["tokens"][0], len(reference["greedy"])) == list(reference["greedy"])


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_weights_read_and_written_back_are_the_tensors_read(architecture):
    folder = REFERENCE / architecture
    tensors, fields = hf.read_weights(folder), hf.model_fields(hf.read_config(folder))
    written = hf.hf_from_params(hf.params_from_hf(tensors, fields), fields)
    assert sorted(written) == sorted(tensors)
    for name, value in tensors.items():
        assert written[name].shape == value.shape and written[name].tobytes() == value.tobytes(), name


def test_config_json_of_transformers_4_and_5_read_alike():
    new, old = (json.loads((REFERENCE / "llama" / name).read_text()) for name in ("config.json", "config_4x.json"))
    assert "rope_parameters" in new and "rope_scaling" in old and "rope_parameters" not in old
    assert hf.model_fields(new) == hf.model_fields(old)
    assert hf.model_fields(new)["rope_scaling"]["kind"] == "llama3"


def test_safetensors_files_read_and_write_back_byte_for_byte(tmp_path):
    for path in sorted(REFERENCE.glob("*/*.safetensors")):
        tensors, metadata = safetensors_file.read(path)
        safetensors_file.write(tmp_path / "copy.safetensors", tensors, metadata)
        assert (tmp_path / "copy.safetensors").read_bytes() == path.read_bytes(), path


def test_bad_folders_are_one_line(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    for path in (REFERENCE / "mistral").iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(UserError, match="model-00002-of-00003.safetensors is missing"):
        hf.read_weights(folder)
    config = json.loads((folder / "config.json").read_text())
    with pytest.raises(UserError, match="GPT2LMHeadModel; the architectures supported are LlamaForCausalLM"):
        (folder / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
        hf.read_config(folder)
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": 64}))
    with pytest.raises(UserError, match="tokenizer.json has 96 tokens but the weights embed only 64"):
        importer.import_hf(folder, tmp_path / "run", get_config("residual,debug"))
    assert not (tmp_path / "run").exists()
    tensors = safetensors_file.read(REFERENCE / "llama" / "model.safetensors")[0]
    fields = hf.model_fields(json.loads((REFERENCE / "llama" / "config.json").read_text()))
    with pytest.raises(UserError, match=r"model.layers.0.mlp.gate_proj.weight is \[48, 32\] where config.json implies "
                                        r"\[64, 32\]"):
        hf.params_from_hf(tensors, {**fields, "d_ff": 64})


@pytest.mark.slow
def test_an_imported_workdir_scores_as_the_reference(tmp_path):
    """scripts/import_hf.py writes a workdir whose log-likelihoods are the reference's;
    scripts/export_hf.py gives the folder back byte for byte; importing into it again is refused
    and changes nothing."""
    folder, workdir = REFERENCE / "mistral", tmp_path / "run"  # three shards
    result = run_script("scripts/import_hf.py", f"--hf_dir={folder}", f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr
    reference = np.load(folder / "reference.npz")
    tokens = [int(t) for t in reference["tokens"][0]]
    logits = reference["logits"][0].astype(np.float64)
    log_softmax = logits - logits.max(-1, keepdims=True)
    log_softmax -= np.log(np.exp(log_softmax).sum(-1, keepdims=True))
    expected = sum(log_softmax[i, tokens[i + 1]] for i in range(len(tokens) - 1))
    model = LanguageModel(workdir, batch_size=8)
    assert model.step == 0 and model.tokenizer.eos_token == "</s>"
    (logprob, _), = model.score_tokens([(tokens, len(tokens) - 1)])
    assert logprob == pytest.approx(expected, rel=1e-5)
    exported = tmp_path / "exported"
    result = run_script("scripts/export_hf.py", f"--workdir={workdir}", f"--out={exported}")
    assert result.returncode == 0, result.stderr
    originals = sorted(p.name for p in folder.iterdir())  # every file, reference.npz too (kept as any other)
    assert sorted(p.name for p in exported.iterdir()) == originals
    assert all((exported / name).read_bytes() == (folder / name).read_bytes() for name in originals)
    listing = sorted(p.name for p in workdir.rglob("*"))
    assert_user_error(run_script("scripts/import_hf.py", f"--hf_dir={folder}", f"--workdir={workdir}"),
                      "--workdir", "already holds checkpoints")
    assert sorted(p.name for p in workdir.rglob("*")) == listing


@pytest.mark.slow
def test_the_sites_learning_rate_scale_and_warmup_apply_to_the_sites_only():
    """One AdamW step from the same state: at train.site_lr_scale = 0.5 and site_warmup_steps = 4
    the site parameters move an eighth as far as at 1 and 0 (a half for the scale, a quarter for
    the first step of the ramp; either alone would give a half or a quarter), every other parameter
    as far. Distances are sums of float32 differences: within 1%."""
    tokens = np.random.default_rng(0).integers(0, 512, (8, 65), dtype=np.int32)
    moved = {}
    for scale, warmup in ((1.0, 0), (0.5, 4)):
        config = get_config("mhc,debug")
        config.train.site_lr_scale, config.train.site_warmup_steps = scale, warmup
        experiment = Experiment(config, sharding.make_mesh(config.mesh, jax.devices()[:1]))
        state = experiment.init_state()
        before = jax.device_get(state["params"])
        after = jax.device_get(experiment.train_step(state, tokens, experiment.hyper)[0]["params"])
        moved[scale, warmup] = jax.tree.map(lambda a, b: np.abs(a - b).sum(), after, before)
    flat = {key: dict(zip(surgery.paths(tree), jax.tree.leaves(tree))) for key, tree in moved.items()}
    sites = [path for path in flat[1.0, 0] if surgery.is_site(path) and flat[1.0, 0][path] > 0]
    others = [path for path in flat[1.0, 0] if not surgery.is_site(path) and flat[1.0, 0][path] > 0]
    assert sites and others
    for path in sites:
        assert flat[0.5, 4][path] == pytest.approx(0.125 * flat[1.0, 0][path], rel=1e-2), path
    for path in others:
        assert flat[0.5, 4][path] == flat[1.0, 0][path], path


def pure(model) -> dict:
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))


@pytest.mark.slow
@pytest.mark.parametrize("scale", ["debug", "moe_debug"])
def test_surgery_into_hc_and_mhc_keeps_the_function(scale):
    """A random residual model grafted into every other variant (dense), and into mhc (MoE + MLA):
    the same logits at step 0, within 1e-6 of the largest (the final norm's epsilon: surgery.py)."""
    source = make_model("residual", scale=scale)
    randomize(source, scale=0.2)
    tokens = random_tokens(source.embed.table.shape[0], batch=2, length=24)
    expected = np.asarray(source(tokens), np.float64)
    for variant in [v for v in residual.VARIANTS if v != "residual"] if scale == "debug" else ("mhc",):
        target = make_model(variant, scale=scale, seed=1)
        state = nnx.state(target)
        kind = get_config(f"{variant},{scale}").model.residual
        nnx.replace_by_pure_dict(state, surgery.graft(pure(source), pure(target), kind))
        nnx.update(target, state)
        logits = np.asarray(target(tokens), np.float64)
        # Beyond 1e-6: V4's eps of 1e-6 in H_pre and every Sinkhorn division; float32 rounding of mhc_lite's
        # 24-term sums of permutations.
        tolerance = {"mhc_v4": 5e-6, "mhc_lite": 2e-6}.get(variant, 1e-6)
        assert np.abs(logits - expected).max() <= tolerance * np.abs(expected).max(), variant
        alpha = [v for p, v in zip(surgery.paths(pure(target)), jax.tree.leaves(pure(target))) if p.endswith("['alpha']")]
        assert all((a == 0).all() for a in alpha) and (kind in residual.GATED) == bool(alpha)


def test_surgery_refuses_a_source_of_another_shape():
    target = pure(make_model("mhc"))
    source = pure(make_model("residual", {"d_ff": 96}))
    with pytest.raises(UserError, match=r"--init_from: \['blocks'\]\['mlp'\]\['w_down'\] is \[2, 96, 64\] in the source"):
        surgery.graft(source, target, "mhc")
    del source["final_norm"]
    with pytest.raises(UserError, match=r"--init_from: its parameters are not this model's .*missing \[\"\['final_norm'\]"):
        surgery.graft(source, target, "mhc")


@pytest.mark.slow
def test_train_continues_a_hugging_face_model_as_residual_and_after_surgery_into_mhc(tmp_path):
    """train.py --init_from=<Hugging Face folder> on data prepared with its tokenizer: as residual
    and as mHC, the first step's loss is the same (surgery keeps the function), both train on, and
    the run records its source. Refused in one line: another tokenizer's data, an mHC workdir."""
    folder = REFERENCE / "qwen3"
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in corpus_documents(200)))
    data = tmp_path / "data"
    prepare.prepare(data, prepare.Recipe(sources=(str(tmp_path / "docs.jsonl"),), tokenizer=str(folder / "tokenizer.json"),
                                         val_fraction=0.2), command="test")
    steps = ["--config.train.steps=2", "--config.train.log_every=1", f"--init_from={folder}"]
    (tmp_path / "other").mkdir()
    prepare_small_corpus(tmp_path / "other")  # another tokenizer's data
    first = {}
    for variant in ("residual", "mhc"):
        result = run_train(tmp_path / variant, *steps, variant=variant, data_dir=data, devices=1)
        assert result.returncode == 0, result.stderr
        lines = records(tmp_path / variant)
        assert [r["step"] for r in lines] == [1, 2] and lines[-1]["loss"] < lines[0]["loss"]
        first[variant] = lines[0]["loss"]
        config = json.loads((tmp_path / variant / "config.json").read_text())["model"]
        assert (config["d_model"], config["head_dim"], config["qk_norm"], config["residual"]) == (32, 16, True, variant)
        checkpoints = checkpoint.Checkpoints(tmp_path / variant, create=False)
        assert checkpoints.read_meta(checkpoints.steps()[0])["init_from"] == str(folder)
        checkpoints.close()
    assert first["mhc"] == pytest.approx(first["residual"], rel=1e-6)
    config = get_config("mhc,debug")
    config.data.dir = str(tmp_path / "other" / "data")
    with pytest.raises(UserError, match="--init_from: .*tokenizer .* prepare the data with the source's tokenizer"):
        trainer.open_data(config, True, surgery.open_source(str(folder)))
    with pytest.raises(UserError, match="--init_from: .*/mhc holds a mhc model; surgery starts from a residual one"):
        surgery.open_source(str(tmp_path / "mhc"))
    assert surgery.open_source(str(tmp_path / "residual")).model["qk_norm"]  # a residual workdir is a source too
