"""Hugging Face models as ours: the tiny random models of tests/data/hf (written by
scripts/make_hf_reference.py with transformers) give the reference's logits and greedy tokens."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.pretrain import get_config
from mhc_jax.errors import UserError
from mhc_jax.model.transformer import abstract_variables_of
from mhc_jax.pretrained import hf, safetensors_file

REFERENCE = Path(__file__).parent / "data" / "hf"
ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")


def imported(folder: Path):
    """Our model of a Hugging Face folder, and its config."""
    config = get_config("residual,debug")
    fields = hf.model_fields(hf.read_config(folder))
    config.model.rope_scaling.update(fields.pop("rope_scaling"))
    config.model.update(fields)
    graphdef, state = abstract_variables_of(config.model)
    params = hf.params_from_hf(hf.read_weights(folder), fields | {"rope_scaling": None})
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
    tensors = safetensors_file.read(REFERENCE / "llama" / "model.safetensors")[0]
    fields = hf.model_fields(json.loads((REFERENCE / "llama" / "config.json").read_text()))
    with pytest.raises(UserError, match=r"model.layers.0.mlp.gate_proj.weight is \[48, 32\] where config.json implies "
                                        r"\[64, 32\]"):
        hf.params_from_hf(tensors, {**fields, "d_ff": 64})
