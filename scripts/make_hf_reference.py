"""Writes tests/data/hf/: tiny random Hugging Face models, one per architecture the importer reads,
with the reference implementation's float32 logits and greedy continuation for each.

The suite compares our import of these folders against those numbers without torch or
transformers. This script needs both, in an environment of its own (they are not project
dependencies); with a CPU build of torch:

    python3 -m venv /tmp/hf-reference
    /tmp/hf-reference/bin/pip install torch transformers safetensors tokenizers
    /tmp/hf-reference/bin/python scripts/make_hf_reference.py

Each folder holds what `save_pretrained` writes (config.json, safetensors, sharded for Mistral),
a tokenizer.json (a small BPE trained here, its vocabulary the models' size) and reference.npz:
`tokens` [1, T] (the prompt), `logits` [1, T, V] float32, `greedy` [N] (greedy new tokens).
Each architecture exercises one thing the others do not: Llama the llama3 RoPE scaling (and its
config.json as transformers 4.x wrote it, config_4x.json), Mistral shards, Qwen2 tied embeddings,
attention biases and linear RoPE scaling, Qwen3 q/k norms and a head size that is not
hidden / heads.
"""

import json
import os
from pathlib import Path

import numpy as np

os.environ["HF_HUB_OFFLINE"] = "1"

import torch  # noqa: E402
import transformers  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "hf"
VOCAB = 96
SHAPE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
             intermediate_size=48, max_position_embeddings=128, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
             initializer_range=0.3)  # wide weights: peaked logits, so the greedy tokens are no near-ties
TEXT = ("The residual stream is widened into parallel streams mixed by learned matrices. Sinkhorn keeps the "
        "mixing matrix doubly stochastic, so the signal neither grows nor fades through depth.")
ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=32))),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(
        sliding_window=None, rope_parameters=dict(rope_type="default", rope_theta=1e6))),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        tie_word_embeddings=True, rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0))),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16, rope_parameters=dict(rope_theta=1e6))),
}
PROMPT_TOKENS = 12
NEW_TOKENS = 8


def tokenizer() -> Tokenizer:
    """A BPE over TEXT's characters with VOCAB entries, <unk> <s> </s> first."""
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace()
    bpe.decoder = decoders.Metaspace()
    bpe.train_from_iterator([TEXT] * 4, trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"]))
    assert bpe.get_vocab_size() == VOCAB, bpe.get_vocab_size()
    return bpe


def legacy_config(config: dict) -> dict:
    """config.json as transformers 4.x wrote it: rope_theta and rope_scaling at the top level."""
    legacy = {k: v for k, v in config.items() if k != "rope_parameters"}
    rope = dict(config["rope_parameters"])
    legacy["rope_theta"] = rope.pop("rope_theta")
    legacy["rope_scaling"] = rope if rope.get("rope_type", "default") != "default" else None
    return legacy


def main() -> None:
    torch.manual_seed(0)
    bpe = tokenizer()
    prompt = bpe.encode(TEXT).ids[:PROMPT_TOKENS]
    for name, (config_class, model_class, extra) in ARCHITECTURES.items():
        config = getattr(transformers, config_class)(**SHAPE, **extra)
        model = getattr(transformers, model_class)(config).eval()
        with torch.no_grad():  # norms start at 1 and biases at 0: move them, so that the import must read them
            for parameter_name, value in model.named_parameters():
                if parameter_name.endswith("bias") or "norm" in parameter_name:
                    value.add_(0.2 * torch.randn_like(value))
        folder = OUT / name
        folder.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(folder, max_shard_size="40KB" if name == "mistral" else "50GB")
        bpe.save(str(folder / "tokenizer.json"))
        tokens = torch.tensor([prompt])
        with torch.no_grad():
            logits = model(tokens).logits.float().numpy()
            greedy = model.generate(tokens, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                                    pad_token_id=0)[0, PROMPT_TOKENS:].numpy()
        np.savez(folder / "reference.npz", tokens=tokens.numpy(), logits=logits, greedy=greedy)
        if name == "llama":
            written = json.loads((folder / "config.json").read_text())
            (folder / "config_4x.json").write_text(json.dumps(legacy_config(written), indent=2, sort_keys=True) + "\n")
        print(name, sorted(p.name for p in folder.iterdir()), f"{sum(p.stat().st_size for p in folder.iterdir()):,} bytes")


if __name__ == "__main__":
    main()
