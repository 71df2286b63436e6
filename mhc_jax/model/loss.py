"""Next-token cross-entropy without [B, T, V] float32 logits at once.

The final hidden states are unembedded `chunk` positions at a time inside a scan; each chunk's
logits are recomputed in the backward pass instead of saved, so the loss holds one chunk's logits
[B, chunk, V] at a time, split over the `tensor` axis along the vocabulary. With chunk >= T (or 0)
it is the plain computation over the whole sequence.
"""

import jax
import jax.numpy as jnp
import optax

from mhc_jax import sharding


def token_losses(h_BTC: jax.Array, w_CV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    """Cross-entropy of each position [B, T]: logits h @ w in float32."""
    logits_BTV = sharding.constrain((h_BTC @ w_CV.astype(h_BTC.dtype)).astype(jnp.float32), ("batch", None, "vocab"))
    return optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT)


@jax.named_scope("loss")  # the dry run attributes the logits' memory by this name (pods/memory_sources.py)
def mean_cross_entropy(h_BTC: jax.Array, w_CV: jax.Array, targets_BT: jax.Array, chunk: int) -> jax.Array:
    """Mean next-token cross-entropy of each sequence [B], the logits made `chunk` positions at a time."""
    B, T, C = h_BTC.shape
    if chunk <= 0 or chunk >= T:
        return token_losses(h_BTC, w_CV, targets_BT).mean(axis=-1)
    chunks = -(-T // chunk)
    padding = chunks * chunk - T  # the last chunk is padded and its padding masked out
    h_QBTC = jnp.pad(h_BTC, ((0, 0), (0, padding), (0, 0))).reshape(B, chunks, chunk, C).swapaxes(0, 1)
    targets_QBT = jnp.pad(targets_BT, ((0, 0), (0, padding))).reshape(B, chunks, chunk).swapaxes(0, 1)
    real_QBT = (jnp.arange(chunks * chunk) < T).reshape(1, chunks, chunk).swapaxes(0, 1)

    @jax.checkpoint  # the backward pass makes each chunk's logits again instead of saving them
    def chunk_sum(h_BTC, targets_BT, real_BT):
        return jnp.where(real_BT, token_losses(h_BTC, w_CV, targets_BT), 0.0).sum(axis=-1)

    def add(total_B, chunk_inputs):
        return total_B + chunk_sum(*chunk_inputs), None

    total_B, _ = jax.lax.scan(add, jnp.zeros((B,), jnp.float32), (h_QBTC, targets_QBT, real_QBT))
    return total_B / T
