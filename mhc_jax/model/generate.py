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
    """Decodes with a model given as (graphdef, params), `rows` prompts at a time. Batches are global
    arrays over the parameters' mesh, split over its data-parallel axes; the new tokens come back
    whole to every process, which all take the same stop decisions (multi-process evaluation)."""

    def __init__(self, graphdef, params, tokenizer: Tokenizer, max_length: int):
        self.graphdef, self.params, self.tokenizer, self.max_length = graphdef, params, tokenizer, max_length
        self.mesh = sharding.mesh_of(params)
        self.abstract_mesh = sharding.abstract_mesh_of(params)  # the steps trace under it

    @functools.partial(jax.jit, static_argnums=(0, 4))
    def _prefill(self, params, tokens_BT, start_B, slots):
        with jax.sharding.use_abstract_mesh(self.abstract_mesh):
            model = nnx.merge(self.graphdef, params)
            logits_B1V, cache = model.decode(tokens_BT, model.init_cache(start_B, slots), last_only=True)
        return logits_B1V[:, 0], cache

    @functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(2, 3))  # the cache is updated in place
    def _step(self, params, logits_BV, cache, seed, step, temperature):
        key = jax.random.fold_in(jax.random.PRNGKey(seed), step)
        greedy = jnp.argmax(logits_BV, axis=-1)
        sampled = jax.random.categorical(key, logits_BV / jnp.maximum(temperature, 1e-6), axis=-1)
        token_B = jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)
        with jax.sharding.use_abstract_mesh(self.abstract_mesh):
            logits_B1V, cache = nnx.merge(self.graphdef, params).decode(token_B[:, None], cache)
            return sharding.everywhere(token_B), logits_B1V[:, 0], cache

    def prompt_ids(self, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
        return [prompt_tail(ids, self.max_length, max_new_tokens) for ids in self.tokenizer.encode_batch(prompts)]

    def compiled_prefill(self, rows: int, width: int, max_new_tokens: int):
        """The prefill of `rows` prompts `width` tokens wide, compiled (its memory analysis includes
        the cache it makes, which the steps then carry)."""
        shapes = [jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding.batch_layout(shape, self.mesh))
                  for shape in ((rows, width), (rows,))]
        return self._prefill.lower(self, self.params, *shapes, width + bucket(max_new_tokens)).compile()

    def generate(self, prompts: list[str], until: list[str], max_new_tokens: int, rows: int,
                 temperature: float = 0.0, seed: int = 0) -> list[str]:
        """The continuation of each prompt, cut before its first stop sequence; `rows` per batch."""
        outputs = []
        for first in range(0, len(prompts), rows):
            outputs += self._generate_batch(prompts[first:first + rows], rows, until, max_new_tokens,
                                            temperature, seed + first)
        return outputs

    def _generate_batch(self, prompts, rows, until, max_new_tokens, temperature, seed):
        budget = bucket(max_new_tokens)  # compiled sizes are powers of two; the prompt's cut is exact
        encoded = self.prompt_ids(prompts, max_new_tokens)
        width = bucket(max(len(ids) for ids in encoded))
        tokens_BT = np.zeros((rows, width), np.int32)
        start_B = np.full((rows,), width - 1, np.int32)  # padding rows hold one token
        for row, ids in enumerate(encoded):
            tokens_BT[row, width - len(ids):] = ids
            start_B[row] = width - len(ids)
        batch = [sharding.global_batch(a, self.mesh) for a in (tokens_BT, start_B)]
        logits_BV, cache = self._prefill(self.params, *batch, width + budget)
        scalars = [sharding.global_batch(np.asarray(v, dtype), self.mesh)
                   for v, dtype in ((seed, np.uint32), (temperature, np.float32))]
        tokens_BT, recent, done = np.zeros((len(prompts), 0), np.int32), [], set()
        for step in range(max_new_tokens):
            step_index = sharding.global_batch(np.asarray(step, np.int32), self.mesh)
            token_B, logits_BV, cache = self._step(self.params, logits_BV, cache, scalars[0], step_index, scalars[1])
            recent.append(token_B)
            if (step + 1) % STOP_CHECK_EVERY == 0 or step + 1 == max_new_tokens:
                tokens_BT = np.concatenate([tokens_BT, np.stack([np.asarray(t) for t in recent], 1)[:len(prompts)]],
                                           axis=1)
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
