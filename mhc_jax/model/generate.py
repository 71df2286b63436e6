"""Batched decoding with a KV cache: greedy or sampled, stop sequences and a token budget.

Prompts keep their last max_length - max_new_tokens tokens (lm-evaluation-harness's rule), are
left-padded into a batch of fixed size whose width is rounded up to a power of two, and the
new-token budget is rounded the same way, so one compiled prefill and one compiled step serve
every batch of a benchmark instead of recompiling per example. Rows that finish early keep
decoding (their tokens are discarded): the batch stops when every row has met a stop sequence or
the end-of-text token, checked on the host every few steps.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mhc_jax import sharding
from mhc_jax.data.tokenizer import Tokenizer

STOP_CHECK_EVERY = 8  # steps between looking for stop sequences on the host


def bucket(n: int, smallest: int = 16) -> int:
    return max(smallest, 1 << (max(n, 1) - 1).bit_length())


def prompt_tail(ids: list[int], max_length: int, max_new_tokens: int) -> list[int]:
    """The prompt tokens a generation conditions on: the last max_length - max_new_tokens, as
    lm-evaluation-harness truncates (its HFLM's max_ctx_len); at least one token of room is needed."""
    if max_new_tokens >= max_length:
        raise ValueError(f"a budget of {max_new_tokens} new tokens leaves no room for the prompt in "
                         f"max_length={max_length}; raise max_length or lower the budget")
    return ids[-(max_length - max_new_tokens):]


def first_stop(text: str, until: list[str]) -> int | None:
    """Index where the first stop sequence begins in `text`, or None."""
    hits = [text.find(stop) for stop in until if stop and stop in text]
    return min(hits) if hits else None


class Generator:
    """Decodes with a model given as (graphdef, params); `batch_size` rows at a time."""

    def __init__(self, graphdef, params, tokenizer: Tokenizer, batch_size: int, max_length: int):
        self.graphdef, self.params, self.tokenizer = graphdef, params, tokenizer
        self.batch_size, self.max_length = batch_size, max_length
        self.mesh = sharding.abstract_mesh_of(params)  # the steps trace under it

    @functools.partial(jax.jit, static_argnums=(0, 4))
    def _prefill(self, params, tokens_BT, start_B, slots):
        with jax.sharding.use_abstract_mesh(self.mesh):
            model = nnx.merge(self.graphdef, params)
            logits_BTV, cache = model.decode(tokens_BT, model.init_cache(start_B, slots))
        return logits_BTV[:, -1], cache

    @functools.partial(jax.jit, static_argnums=(0,))
    def _step(self, params, logits_BV, cache, key, temperature):
        greedy = jnp.argmax(logits_BV, axis=-1)
        sampled = jax.random.categorical(key, logits_BV / jnp.maximum(temperature, 1e-6), axis=-1)
        token_B = jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)
        with jax.sharding.use_abstract_mesh(self.mesh):
            logits_B1V, cache = nnx.merge(self.graphdef, params).decode(token_B[:, None], cache)
        return token_B, logits_B1V[:, 0], cache

    def generate(self, prompts: list[str], until: list[str], max_new_tokens: int,
                 temperature: float = 0.0, seed: int = 0) -> list[str]:
        """The continuation of each prompt, cut before its first stop sequence."""
        outputs = []
        for first in range(0, len(prompts), self.batch_size):
            outputs += self._generate_batch(prompts[first:first + self.batch_size], until, max_new_tokens,
                                            temperature, seed + first)
        return outputs

    def _generate_batch(self, prompts, until, max_new_tokens, temperature, seed):
        budget = bucket(max_new_tokens)  # compiled sizes are powers of two; the prompt's cut is exact
        encoded = [prompt_tail(ids, self.max_length, max_new_tokens) for ids in self.tokenizer.encode_batch(prompts)]
        width = bucket(max(len(ids) for ids in encoded))
        tokens_BT = np.zeros((self.batch_size, width), np.int32)
        start_B = np.full((self.batch_size,), width - 1, np.int32)  # padding rows hold one token
        for row, ids in enumerate(encoded):
            tokens_BT[row, width - len(ids):] = ids
            start_B[row] = width - len(ids)
        logits_BV, cache = self._prefill(self.params, tokens_BT, start_B, width + budget)
        key = jax.random.PRNGKey(seed)
        tokens_BT, recent, done = np.zeros((len(prompts), 0), np.int32), [], set()
        for step in range(max_new_tokens):
            key, subkey = jax.random.split(key)
            token_B, logits_BV, cache = self._step(self.params, logits_BV, cache, subkey, temperature)
            recent.append(token_B)
            if (step + 1) % STOP_CHECK_EVERY == 0 or step + 1 == max_new_tokens:
                tokens_BT = np.concatenate([tokens_BT, np.asarray(jnp.stack(recent, 1))[:len(prompts)]], axis=1)
                recent = []
                done |= {row for row in range(len(prompts)) if row not in done and self._row_done(tokens_BT[row], until)}
                if len(done) == len(prompts):
                    break
        return [self._finish(row_tokens, until) for row_tokens in tokens_BT]

    def _finish(self, tokens, until) -> str:
        eos = np.flatnonzero(tokens == self.tokenizer.eos_id)
        text = self.tokenizer.decode(tokens[:eos[0]] if len(eos) else tokens)
        cut = first_stop(text, until)
        return text if cut is None else text[:cut]

    def _row_done(self, tokens, until) -> bool:
        return bool((tokens == self.tokenizer.eos_id).any()) or first_stop(self.tokenizer.decode(tokens), until) is not None
