"""KV-cache decoding against step-by-step full recomputation, for every variant, with ordinary
attention (debug) and with MLA + MoE (moe_debug, whose cache holds only the latent and RoPE key)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import corpus_documents, make_model

from mhc_jax.data.tokenizer import train_bpe
from mhc_jax.model.generate import Generator, bucket, first_stop, prompt_tail

PROMPTS = ["The stream", "Sinkhorn keeps the gain near one and", "a", corpus_documents()[0][:300]]


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(corpus_documents(), 400)


def generator(model, tokenizer):
    graphdef, params = nnx.split(model)
    return Generator(graphdef, nnx.to_pure_dict(params), tokenizer, max_length=256)


def recompute_greedy(model, tokenizer, prompt, max_new_tokens, width=128):
    """Greedy decoding without a cache: the whole sequence through the model at every step (padded
    on the right to one width, which a causal model cannot see, so that it compiles once)."""
    forward = jax.jit(lambda tokens: model(tokens)[0])
    ids, new = list(tokenizer.encode_batch([prompt])[0]), []
    for _ in range(max_new_tokens):
        sequence = ids + new
        logits = forward(jnp.asarray([sequence + [0] * (width - len(sequence))]))
        token = int(jnp.argmax(logits[len(sequence) - 1]))
        if token == tokenizer.eos_id:
            break
        new.append(token)
    return tokenizer.decode(new)


# The paper's variants, and the two whose streams begin and end their own way (V4's learned collapse,
# LAuReL-PA's history); the others' sites are per-token maps like mhc's.
@pytest.mark.parametrize("variant", ["residual", "hc", "hc_static", "mhc", "mhc_v4", "laurel_pa"])
def test_cached_decoding_repeats_full_recomputation(variant, tokenizer):
    model = make_model(variant, {"vocab_size": 400})
    outputs = generator(model, tokenizer).generate(PROMPTS, until=[], max_new_tokens=12, rows=4)
    assert outputs == [recompute_greedy(model, tokenizer, prompt, 12) for prompt in PROMPTS]
    assert all(outputs)


@pytest.mark.slow
def test_latent_attention_decoding_repeats_full_recomputation(stream_variant, tokenizer):
    model = make_model(stream_variant, {"vocab_size": 400}, scale="moe_debug")
    decode = generator(model, tokenizer)
    outputs = decode.generate(PROMPTS, until=[], max_new_tokens=12, rows=4)
    assert outputs == [recompute_greedy(model, tokenizer, prompt, 12) for prompt in PROMPTS]
    assert all(outputs)
    cache = model.init_cache(jnp.zeros((2,), jnp.int32), slots=32)
    assert [tuple(a.shape) for stack in cache.stacks for a in stack] == [
        (1, 2, 32, 32), (1, 2, 32, 8), (2, 2, 32, 32), (2, 2, 32, 8)]  # [layers, B, slots, kv_rank | rope_dim]


@pytest.mark.slow
@pytest.mark.parametrize("scale", ("debug", "moe_debug"))
def test_decoding_through_the_blockwise_kernel_repeats_full_recomputation(scale, tokenizer):
    model = make_model("mhc", {"vocab_size": 400, "attention_kernel": "blockwise"},
                       scale=scale)
    outputs = generator(model, tokenizer).generate(PROMPTS, until=[], max_new_tokens=12, rows=4)
    assert outputs == [recompute_greedy(model, tokenizer, prompt, 12) for prompt in PROMPTS]


@pytest.mark.slow
def test_batches_of_any_size_give_the_same_text(tokenizer):
    model = make_model("mhc", {"vocab_size": 400})
    together = generator(model, tokenizer).generate(PROMPTS, until=[], max_new_tokens=10, rows=4)
    apart = generator(model, tokenizer).generate(PROMPTS, until=[], max_new_tokens=10, rows=1)
    assert together == apart


def test_stop_sequences_and_sampling(tokenizer):
    model = make_model("hc", {"vocab_size": 400})
    decode = generator(model, tokenizer)
    full = decode.generate(PROMPTS[:2], until=[], max_new_tokens=16, rows=4)
    stop = full[0][len(full[0]) // 2:][:2]
    cut = decode.generate(PROMPTS[:2], until=[stop], max_new_tokens=16, rows=4)
    assert cut[0] == full[0][:full[0].index(stop)] and stop not in cut[0]
    sampled = [decode.generate(PROMPTS, until=[], max_new_tokens=8, rows=4, temperature=1.0, seed=seed) for seed in (0, 0, 1)]
    assert sampled[0] == sampled[1] != sampled[2]


def test_helpers():
    assert [bucket(n) for n in (0, 1, 16, 17, 100)] == [16, 16, 16, 32, 128]
    assert first_stop("abc Q: next", ["Q:", "c"]) == 2 and first_stop("abc", ["x"]) is None
    np.testing.assert_array_equal(bucket(300, smallest=512), 512)


@pytest.mark.parametrize("budget", [100, 256, 1000])
def test_prompts_are_cut_by_lm_evals_rule(budget):
    """lm-eval's HFLM keeps the last max_length - max_gen_toks context tokens (left_truncate_len), whatever
    power of two the compiled budget is rounded to."""
    ids, max_length = list(range(5000)), 2048
    assert prompt_tail(ids, max_length, budget) == ids[-(max_length - budget):]
    assert prompt_tail(ids[:10], max_length, budget) == ids[:10]
    with pytest.raises(ValueError, match="no room"):
        prompt_tail(ids, budget, budget)
