"""Hugging Face folders in and out of workdirs (scripts/import_hf.py, scripts/export_hf.py).

Import writes a workdir that eval.py evaluates like any trained run: step 0's checkpoint (the
imported weights, a fresh optimizer state) and its metadata, the tokenizer.json, and every other
file of the folder but the weights, kept as they are under hf/ (config.json, the shard index,
generation_config.json, ...). The end-of-text token is the one config.json's eos_token_id names
(the first, if it lists several). The tokenizer may have fewer tokens than the embedding (padded
vocabularies), never more.

Export writes a residual workdir's newest checkpoint as a Hugging Face folder that transformers
loads: the weights in float32 safetensors, laid out in the shards of hf/'s index if the workdir
was imported (else one file), hf/'s files as they are if its model fields are still those of its
config.json (else a config.json made from them), and the tokenizer. Importing then exporting gives
the folder's files back byte for byte.
"""

import json
import shutil
from pathlib import Path

import jax
import ml_collections
import numpy as np

from mhc_jax import sharding, storage
from mhc_jax.data.tokenizer import file_sha256, load_tokenizer
from mhc_jax.errors import UserError
from mhc_jax.model import residual, transformer
from mhc_jax.pretrained import hf, safetensors_file
from mhc_jax.training import checkpoint, trainer
from mhc_jax.training.experiment import Experiment

KEPT = "hf"  # the workdir's copy of the folder's other files
FORMAT = {"format": "pt"}  # the metadata transformers writes into every safetensors file


def hf_config_into(config: ml_collections.ConfigDict, hf_dir: Path) -> dict:
    """Sets config.model to the Hugging Face model's fields; returns those fields."""
    fields = hf.model_fields(hf.read_config(hf_dir))
    config.model.rope_scaling.update(fields["rope_scaling"])
    config.model.update({k: v for k, v in fields.items() if k != "rope_scaling"})
    return fields


def eos_token(hf_dir: Path, tokenizer_file: Path) -> str:
    ids = hf.read_config(hf_dir).get("eos_token_id")
    ids = ids if isinstance(ids, list) else [ids]
    if ids[0] is None:
        return ""  # the tokenizer's own (tokenizer_config.json, or a usual name)
    token = load_tokenizer(tokenizer_file).backend.id_to_token(ids[0])
    if token is None:
        raise UserError(f"--hf_dir: config.json's eos_token_id {ids[0]} is not in {tokenizer_file}")
    return token


def import_hf(hf_dir: Path, workdir: Path, config: ml_collections.ConfigDict) -> dict:
    """Writes the workdir; returns its metadata. `config` is the run config the model fields go
    into (its training fields are what a later train.py run of the workdir would use)."""
    tokenizer_file = hf_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise UserError(f"--hf_dir: {hf_dir} has no tokenizer.json; every supported model ships one")
    if (workdir / "checkpoints").exists() and any((workdir / "checkpoints").iterdir()):
        raise UserError(f"--workdir: {workdir} already holds checkpoints; import into a new folder")
    fields = hf_config_into(config, hf_dir)
    tokenizer = load_tokenizer(tokenizer_file, eos_token(hf_dir, tokenizer_file))
    if tokenizer.vocab_size > fields["vocab_size"]:
        raise UserError(f"--hf_dir: {tokenizer_file} has {tokenizer.vocab_size} tokens but the weights embed only "
                        f"{fields['vocab_size']} (config.json's vocab_size); the tokenizer is another model's")
    params = hf.params_from_hf(hf.read_weights(hf_dir), fields)
    experiment = Experiment(config, sharding.make_mesh(config.mesh))
    state = experiment.init_state()
    placed = jax.tree.map(lambda new, old: jax.device_put(new.astype(old.dtype), old.sharding), params, state["params"])
    meta = trainer.run_meta(config, {"tokenizer": {"sha256": file_sha256(tokenizer_file),
                                                   "eos_token": tokenizer.eos_token}})
    (workdir / KEPT).mkdir(parents=True, exist_ok=True)
    for path in hf_dir.iterdir():
        if path.is_file() and path.suffix != ".safetensors":
            shutil.copyfile(path, workdir / KEPT / path.name)
    shutil.copyfile(tokenizer_file, workdir / "tokenizer.json")
    (workdir / "config.json").write_text(json.dumps(config.to_dict(), indent=1) + "\n")
    checkpoints = checkpoint.Checkpoints(storage.path(str(workdir)))
    checkpoints.save(0, {**state, "params": placed}, {**meta, "step": 0, "imported_from": str(hf_dir)})
    checkpoints.wait()
    checkpoints.close()
    return meta


def export_hf(workdir: Path, out: Path) -> list[str]:
    """Writes the Hugging Face folder; returns the names of the files written."""
    checkpoints = checkpoint.Checkpoints(workdir, create=False) if (workdir / "checkpoints").is_dir() else None
    if checkpoints is None or not checkpoints.steps():
        raise UserError(f"--workdir: {workdir} has no checkpoints to export")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out: {out} is not empty; export into a new folder")
    step = checkpoints.steps()[0]
    meta = checkpoints.read_meta(step)
    model = ml_collections.ConfigDict(meta["config"]["model"])
    if model.residual != "residual" or model.attention != "mha" or model.moe.n_experts:
        raise UserError(f"--workdir: {workdir} holds a {residual.variant_name(model)} model with {model.attention} "
                        f"attention and {model.moe.n_experts} experts; only residual dense models with ordinary "
                        "attention have a Hugging Face form here")
    _, _, sharded = transformer.abstract_model(model, sharding.make_mesh(ml_collections.ConfigDict(
        {"data": 1, "fsdp": 1, "expert": 1, "tensor": 1}), jax.devices()[:1]))
    params = jax.tree.map(np.asarray, jax.device_get(checkpoints.restore_params(step, sharded)))
    checkpoints.close()
    fields = hf_fields(model)
    tensors = hf.hf_from_params(params, fields)
    kept = workdir / KEPT
    same_model = (kept / "config.json").is_file() and hf.model_fields(json.loads((kept / "config.json").read_text())) \
        == fields
    out.mkdir(parents=True, exist_ok=True)
    if same_model:
        for path in kept.iterdir():
            shutil.copyfile(path, out / path.name)
    else:
        (out / "config.json").write_text(json.dumps(made_config(fields), indent=2, sort_keys=True) + "\n")
    shutil.copyfile(workdir / "tokenizer.json", out / "tokenizer.json")
    index = out / hf.INDEX
    shards = json.loads(index.read_text())["weight_map"] if index.exists() else dict.fromkeys(tensors, "model.safetensors")
    for shard in sorted(set(shards.values())):
        safetensors_file.write(out / shard, {name: tensors[name] for name, file in shards.items() if file == shard},
                               FORMAT)
    return sorted(p.name for p in out.iterdir())


def hf_fields(model: ml_collections.ConfigDict) -> dict:
    """hf.model_fields's form of our model config (what export compares and writes)."""
    return {name: model.to_dict()[name] for name in hf.FIELDS}


def made_config(fields: dict) -> dict:
    """A transformers 5.x config.json for a model of ours: Qwen3 with q/k norms, Qwen2 with biases,
    else Llama."""
    architecture = "Qwen3" if fields["qk_norm"] else "Qwen2" if fields["qkv_bias"] else "Llama"
    if fields["qk_norm"] and fields["qkv_bias"]:
        raise UserError("--workdir: its model has both q/k norms and attention biases, which no supported "
                        "Hugging Face architecture has")
    scaling = fields["rope_scaling"]
    rope = {"rope_type": "default" if scaling["kind"] == "none" else scaling["kind"], "rope_theta": fields["rope_theta"]}
    if scaling["kind"] == "linear":
        rope["factor"] = scaling["factor"]
    elif scaling["kind"] == "llama3":
        rope.update(factor=scaling["factor"], low_freq_factor=scaling["low_freq_factor"],
                    high_freq_factor=scaling["high_freq_factor"],
                    original_max_position_embeddings=scaling["original_max_position"])
    return {"architectures": [f"{architecture}ForCausalLM"], "model_type": architecture.lower(),
            "hidden_size": fields["d_model"], "num_hidden_layers": fields["n_layers"],
            "num_attention_heads": fields["n_heads"], "num_key_value_heads": fields["n_kv_heads"],
            "head_dim": fields["head_dim"] or fields["d_model"] // fields["n_heads"],
            "intermediate_size": fields["d_ff"], "vocab_size": fields["vocab_size"], "hidden_act": "silu",
            "rms_norm_eps": fields["norm_eps"], "tie_word_embeddings": fields["tie_embeddings"],
            "rope_parameters": rope, "max_position_embeddings": 4096, "dtype": "float32"}
