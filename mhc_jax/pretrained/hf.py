"""Hugging Face causal LMs (Llama, Mistral, Qwen2, Qwen3) as our residual Transformer.

A Hugging Face folder is config.json, the weights in safetensors (one file, or shards listed by
model.safetensors.index.json) and tokenizer.json. These four architectures are the same pre-norm
decoder: RMSNorm, grouped-query attention with half-split RoPE, a SwiGLU MLP, a final RMSNorm and
a head (tied to the embedding or not). They differ only in what our model.* fields say:

| config.json                                   | ours                                        |
|---|---|
| hidden_size, num_hidden_layers                | d_model, n_layers                           |
| num_attention_heads, num_key_value_heads      | n_heads, n_kv_heads                         |
| head_dim (Qwen3: may differ from hidden/heads) | head_dim                                    |
| intermediate_size                             | d_ff                                        |
| rms_norm_eps, tie_word_embeddings, vocab_size | norm_eps, tie_embeddings, vocab_size        |
| rope_parameters (5.x) or rope_theta + rope_scaling (4.x) | rope_theta, rope_scaling.*       |
| Qwen2's q/k/v biases, Qwen3's q_norm/k_norm   | qkv_bias, qk_norm                           |

Weights: Hugging Face's Linear layers hold [out, in]; ours are [in, out] with heads split out
([C, H, D] for queries), stacked over layers ([L, ...]) for the scanned blocks.
"""

import json
from pathlib import Path

import numpy as np

from mhc_jax.errors import UserError
from mhc_jax.model.layers import Rope
from mhc_jax.pretrained import safetensors_file

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
                 "Qwen3ForCausalLM": "qwen3"}
INDEX = "model.safetensors.index.json"
FIELDS = ("residual", "n_streams", "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff",
          "attention", "tie_embeddings", "rope_theta", "rope_scaling", "norm_eps", "qkv_bias", "qk_norm")  # model_fields's


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.exists():
        raise UserError(f"--hf_dir: {folder} has no config.json; point it at a Hugging Face model folder")
    config = json.loads(path.read_text())
    architecture = (config.get("architectures") or ["(none)"])[0]
    if architecture not in ARCHITECTURES:
        raise UserError(f"--hf_dir: {path} is a {architecture}; the architectures supported are "
                        f"{', '.join(ARCHITECTURES)}")
    return config


def rope_settings(config: dict) -> tuple[float, dict]:
    """(rope_theta, our rope_scaling fields, all of them) from config.json as transformers 5.x
    writes it (rope_parameters) or 4.x (rope_theta, rope_scaling with 'type' or 'rope_type')."""
    parameters = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = float(parameters.pop("rope_theta", config.get("rope_theta", 10000.0)))
    kind = parameters.get("rope_type", parameters.get("type", "default"))
    if kind == "default":
        return theta, Rope(theta).scaling_fields()
    if kind == "linear":
        return theta, Rope(theta, "linear", float(parameters["factor"])).scaling_fields()
    if kind == "llama3":
        return theta, Rope(theta, "llama3", float(parameters["factor"]), float(parameters["low_freq_factor"]),
                           float(parameters["high_freq_factor"]),
                           int(parameters["original_max_position_embeddings"])).scaling_fields()
    raise UserError(f"config.json: RoPE scaling {kind!r} is not supported; the kinds supported are default, "
                    "linear and llama3")


def model_fields(config: dict) -> dict:
    """Our model.* fields (a residual Transformer) for a Hugging Face config.json."""
    architecture = ARCHITECTURES[config["architectures"][0]]
    unsupported = [key for key in ("attention_bias", "mlp_bias") if config.get(key) and architecture != "qwen2"]
    if config.get("hidden_act", "silu") != "silu":
        unsupported.append(f"hidden_act={config['hidden_act']}")
    if architecture == "mistral" and config.get("sliding_window"):
        unsupported.append(f"sliding_window={config['sliding_window']}")
    if architecture == "qwen2" and config.get("use_sliding_window"):
        unsupported.append("use_sliding_window")
    if unsupported:
        raise UserError(f"config.json: {', '.join(unsupported)} is not supported for {architecture} "
                        "(our decoder has no such layer)")
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    theta, scaling = rope_settings(config)
    return {"residual": "residual", "n_streams": 1, "vocab_size": config["vocab_size"], "d_model": hidden,
            "n_layers": config["num_hidden_layers"], "n_heads": heads,
            "n_kv_heads": config.get("num_key_value_heads") or heads,
            "head_dim": 0 if head_dim * heads == hidden else head_dim, "d_ff": config["intermediate_size"],
            "attention": "mha", "tie_embeddings": bool(config.get("tie_word_embeddings", False)),
            "rope_theta": theta, "rope_scaling": scaling, "norm_eps": float(config["rms_norm_eps"]),
            "qkv_bias": architecture == "qwen2", "qk_norm": architecture == "qwen3"}


def read_weights(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of the folder's safetensors, by name (shards through their index)."""
    index = folder / INDEX
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise UserError(f"--hf_dir: {folder} has neither model.safetensors nor {INDEX}")
    tensors = {}
    for name in files:
        if not (folder / name).exists():
            raise UserError(f"--hf_dir: {folder / name} is missing ({INDEX} lists it); download every shard")
        try:
            tensors.update(safetensors_file.read(folder / name)[0])
        except safetensors_file.FormatError as e:
            raise UserError(f"--hf_dir: {e}") from None
    return tensors


def params_from_hf(tensors: dict[str, np.ndarray], fields: dict) -> dict:
    """Our parameters (a pure dict as nnx.to_pure_dict gives, float32) from Hugging Face tensors."""
    L, C, H, K = fields["n_layers"], fields["d_model"], fields["n_heads"], fields["n_kv_heads"]
    D = fields["head_dim"] or C // H

    def take(name: str, shape: tuple) -> np.ndarray:
        if name not in tensors:
            raise UserError(f"--hf_dir: the weights lack {name}, which config.json implies")
        value = np.asarray(tensors[name], np.float32)
        if value.shape != shape:
            raise UserError(f"--hf_dir: {name} is {list(value.shape)} where config.json implies {list(shape)}")
        return value

    def layers(suffix: str, shape: tuple, to_ours) -> np.ndarray:
        return np.stack([to_ours(take(f"model.layers.{i}.{suffix}", shape)) for i in range(L)])

    def split_heads(heads: int):  # [heads * D, C] -> [C, heads, D]
        return lambda w: w.reshape(heads, D, C).transpose(2, 0, 1)

    attn = {"wq": layers("self_attn.q_proj.weight", (H * D, C), split_heads(H)),
            "wk": layers("self_attn.k_proj.weight", (K * D, C), split_heads(K)),
            "wv": layers("self_attn.v_proj.weight", (K * D, C), split_heads(K)),
            "wo": layers("self_attn.o_proj.weight", (C, H * D), lambda w: w.reshape(C, H, D).transpose(1, 2, 0))}
    if fields["qkv_bias"]:
        for ours, theirs, heads in (("bq", "q", H), ("bk", "k", K), ("bv", "v", K)):
            attn[ours] = layers(f"self_attn.{theirs}_proj.bias", (heads * D,), lambda b, n=heads: b.reshape(n, D))
    if fields["qk_norm"]:
        for name in ("q_norm", "k_norm"):
            attn[name] = {"scale": layers(f"self_attn.{name}.weight", (D,), lambda w: w)}
    F, V = fields["d_ff"], fields["vocab_size"]
    params = {
        "embed": {"table": take("model.embed_tokens.weight", (V, C))},
        "blocks": {"attn": attn,
                   "attn_norm": {"scale": layers("input_layernorm.weight", (C,), lambda w: w)},
                   "mlp": {"w_gate": layers("mlp.gate_proj.weight", (F, C), np.transpose),
                           "w_up": layers("mlp.up_proj.weight", (F, C), np.transpose),
                           "w_down": layers("mlp.down_proj.weight", (C, F), np.transpose)},
                   "mlp_norm": {"scale": layers("post_attention_layernorm.weight", (C,), lambda w: w)}},
        "final_norm": {"scale": take("model.norm.weight", (C,))}}
    if not fields["tie_embeddings"]:
        params["unembed"] = take("lm_head.weight", (V, C)).T
    return params


def hf_from_params(params: dict, fields: dict) -> dict[str, np.ndarray]:
    """The inverse of params_from_hf: Hugging Face's tensors (float32) from our parameters."""
    C, H, K = fields["d_model"], fields["n_heads"], fields["n_kv_heads"]
    D = fields["head_dim"] or C // H
    blocks, attn = params["blocks"], params["blocks"]["attn"]
    per_layer = {"self_attn.q_proj.weight": (attn["wq"], lambda w: w.transpose(1, 2, 0).reshape(H * D, C)),
                 "self_attn.k_proj.weight": (attn["wk"], lambda w: w.transpose(1, 2, 0).reshape(K * D, C)),
                 "self_attn.v_proj.weight": (attn["wv"], lambda w: w.transpose(1, 2, 0).reshape(K * D, C)),
                 "self_attn.o_proj.weight": (attn["wo"], lambda w: w.transpose(2, 0, 1).reshape(C, H * D)),
                 "input_layernorm.weight": (blocks["attn_norm"]["scale"], lambda w: w),
                 "post_attention_layernorm.weight": (blocks["mlp_norm"]["scale"], lambda w: w),
                 "mlp.gate_proj.weight": (blocks["mlp"]["w_gate"], np.transpose),
                 "mlp.up_proj.weight": (blocks["mlp"]["w_up"], np.transpose),
                 "mlp.down_proj.weight": (blocks["mlp"]["w_down"], np.transpose)}
    if fields["qkv_bias"]:
        per_layer.update({f"self_attn.{n}_proj.bias": (attn[f"b{n}"], lambda b: b.reshape(-1)) for n in "qkv"})
    if fields["qk_norm"]:
        per_layer.update({f"self_attn.{n}.weight": (attn[n]["scale"], lambda w: w) for n in ("q_norm", "k_norm")})
    tensors = {"model.embed_tokens.weight": params["embed"]["table"], "model.norm.weight": params["final_norm"]["scale"]}
    for suffix, (stacked, to_theirs) in per_layer.items():
        for layer, value in enumerate(np.asarray(stacked, np.float32)):
            tensors[f"model.layers.{layer}.{suffix}"] = to_theirs(value)
    if not fields["tie_embeddings"]:
        tensors["lm_head.weight"] = np.asarray(params["unembed"]).T
    return {name: np.ascontiguousarray(value, np.float32) for name, value in tensors.items()}
