"""Blockwise (flash) causal attention in plain JAX: it never holds the [B, H, T, S] scores, and it
runs on every platform, CPU included.

Queries go in blocks of `block` positions, keys and values in blocks of `block` slots. For each
query block the forward pass walks the key blocks it can see and stops at the diagonal (the key
blocks past it are masked out entirely: about half of a long sequence's pairs are skipped). It keeps
a running maximum, normaliser and weighted sum per query (the online softmax) and saves only the
output and each query's log-sum-exp. The backward pass (a custom VJP) walks the same block pairs
key block by key block: it recomputes the probabilities from the saved log-sum-exp and accumulates
dK and dV per key block and dQ per query block. Scores, probabilities and accumulators are float32
whatever the input dtype; the matmuls take the input dtype.

Masking: query t sits at slot `offset + t`, key s at slot s, and query t of row b sees key s when
start_B[b] <= s <= offset + t (training: offset 0, start 0; decoding: the cache's index and each
row's first real slot). A masked score is a finite floor, so a query that sees nothing (a padding
slot of a left-padded batch) averages finitely instead of making NaN.

Shapes (docs/design.md): U query heads per key/value head (H = K x U), Z blocks, t and s one
block of query and key positions.
"""

from functools import partial

import jax
import jax.numpy as jnp

FLOOR = -1e30  # a masked score: far below any real one, finite
BLOCK = 512


def attention(q_BTKUJ, k_BSKJ, v_BSKD, offset, start_B, scale: float, block: int = BLOCK):
    """softmax(q k^T * scale, masked) v per head: [B, T, K, U, D]."""
    return _attention(q_BTKUJ, k_BSKJ, v_BSKD, jnp.asarray(offset, jnp.int32), start_B, scale, block)


def padded(x_BX, size: int):
    """[B, n, ...] zero-padded to a whole number of blocks of `size` (as it is when they divide n)."""
    extra = -x_BX.shape[1] % size
    return jnp.pad(x_BX, ((0, 0), (0, extra)) + ((0, 0),) * (x_BX.ndim - 2)) if extra else x_BX


def blocks(x_BX, size: int):
    """[B, n, ...] -> [Z, B, size, ...]: zero-padded to a whole number of blocks."""
    x_BX = padded(x_BX, size)
    return jnp.moveaxis(x_BX.reshape(x_BX.shape[0], -1, size, *x_BX.shape[2:]), 1, 0)


def unblock(x_ZBX, n: int):
    """The inverse of `blocks`, padding dropped: [Z, B, size, ...] -> [B, n, ...]."""
    x_BZX = jnp.moveaxis(x_ZBX, 0, 1)
    return x_BZX.reshape(x_BZX.shape[0], -1, *x_BZX.shape[3:])[:, :n]


def scores(q_BtKUJ, k_BsKJ, q_first, k_first, start_B, scale):
    """Masked float32 scores [B, K, U, t, s] of a query block (first slot q_first) against a key
    block (first slot k_first)."""
    t, s = q_BtKUJ.shape[1], k_BsKJ.shape[1]
    s_BKUts = jnp.einsum("btkuj,bskj->bkuts", q_BtKUJ, k_BsKJ, preferred_element_type=jnp.float32) * scale
    return jnp.where(seen(q_first + jnp.arange(t), k_first + jnp.arange(s), start_B)[:, None, None], s_BKUts, FLOOR)


def seen(query_slot_T, key_slot_S, start_B):
    """[B, T, S]: query t sees key s when start_B[b] <= slot s <= its own slot (causal, left padding)."""
    return ((key_slot_S[None, None, :] <= query_slot_T[None, :, None])
            & (key_slot_S[None, None, :] >= start_B[:, None, None]))


def sizes(q_BTKUJ, k_BSKJ, block):
    T, S = q_BTKUJ.shape[1], k_BSKJ.shape[1]
    return min(block, T), min(block, S)


def last_key_block(i, offset, bq, bk, n_key_blocks):
    """One past the last key block that query block i sees (causal: up to its last query's slot)."""
    return jnp.minimum(n_key_blocks, (offset + (i + 1) * bq - 1) // bk + 1)


def forward(q_BTKUJ, k_BSKJ, v_BSKD, offset, start_B, scale, block):
    B, T, K, U, _ = q_BTKUJ.shape
    D = v_BSKD.shape[-1]
    bq, bk = sizes(q_BTKUJ, k_BSKJ, block)
    # Key blocks are sliced out of the keys in place: a decoding step's keys are the whole cache,
    # and a blocked copy of it per layer cost more than the attention itself.
    q_ZBtKUJ, k_BSKJ, v_BSKD = blocks(q_BTKUJ, bq), padded(k_BSKJ, bk), padded(v_BSKD, bk)
    n_key_blocks = k_BSKJ.shape[1] // bk

    def query_block(i):
        q_BtKUJ = q_ZBtKUJ[i]

        def step(j, carry):
            max_BKUt, norm_BKUt, acc_BKUtD = carry
            k_BsKJ, v_BsKD = (jax.lax.dynamic_slice_in_dim(x, j * bk, bk, axis=1) for x in (k_BSKJ, v_BSKD))
            s_BKUts = scores(q_BtKUJ, k_BsKJ, offset + i * bq, j * bk, start_B, scale)
            new_max_BKUt = jnp.maximum(max_BKUt, s_BKUts.max(-1))
            p_BKUts = jnp.exp(s_BKUts - new_max_BKUt[..., None])
            rescale_BKUt = jnp.exp(max_BKUt - new_max_BKUt)
            acc_BKUtD = acc_BKUtD * rescale_BKUt[..., None] + jnp.einsum(
                "bkuts,bskd->bkutd", p_BKUts.astype(v_BSKD.dtype), v_BsKD, preferred_element_type=jnp.float32)
            return new_max_BKUt, norm_BKUt * rescale_BKUt + p_BKUts.sum(-1), acc_BKUtD

        init = (jnp.full((B, K, U, bq), FLOOR), jnp.zeros((B, K, U, bq)), jnp.zeros((B, K, U, bq, D)))
        max_BKUt, norm_BKUt, acc_BKUtD = jax.lax.fori_loop(
            0, last_key_block(i, offset, bq, bk, n_key_blocks), step, init)
        out_BtKUD = jnp.einsum("bkutd->btkud", acc_BKUtD / norm_BKUt[..., None])
        return out_BtKUD.astype(q_BTKUJ.dtype), max_BKUt + jnp.log(norm_BKUt)

    out_ZBtKUD, lse_ZBKUt = jax.lax.map(query_block, jnp.arange(q_ZBtKUJ.shape[0]))
    return unblock(out_ZBtKUD, T), lse_ZBKUt


@partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _attention(q_BTKUJ, k_BSKJ, v_BSKD, offset, start_B, scale, block):
    return forward(q_BTKUJ, k_BSKJ, v_BSKD, offset, start_B, scale, block)[0]


def _attention_forward(q_BTKUJ, k_BSKJ, v_BSKD, offset, start_B, scale, block):
    out_BTKUD, lse_ZBKUt = forward(q_BTKUJ, k_BSKJ, v_BSKD, offset, start_B, scale, block)
    return out_BTKUD, (q_BTKUJ, k_BSKJ, v_BSKD, offset, start_B, out_BTKUD, lse_ZBKUt)


def _attention_backward(scale, block, saved, dout_BTKUD):
    q_BTKUJ, k_BSKJ, v_BSKD, offset, start_B, out_BTKUD, lse_ZBKUt = saved
    S = k_BSKJ.shape[1]
    bq, bk = sizes(q_BTKUJ, k_BSKJ, block)
    q_ZBtKUJ, k_ZBsKJ, v_ZBsKD = blocks(q_BTKUJ, bq), blocks(k_BSKJ, bk), blocks(v_BSKD, bk)
    dout_ZBtKUD = blocks(dout_BTKUD, bq)
    # D_i = sum_d dO_id O_id: the softmax backward's row term, per query.
    delta_ZBKUt = jnp.einsum("zbtkud,zbtkud->zbkut", dout_ZBtKUD.astype(jnp.float32),
                             blocks(out_BTKUD, bq).astype(jnp.float32))
    n_query_blocks = q_ZBtKUJ.shape[0]

    def key_block(dq_ZBtKUJ, j):
        k_BsKJ, v_BsKD = k_ZBsKJ[j], v_ZBsKD[j]

        def step(i, carry):
            dk_BsKJ, dv_BsKD, dq_ZBtKUJ = carry
            s_BKUts = scores(q_ZBtKUJ[i], k_BsKJ, offset + i * bq, j * bk, start_B, scale)
            p_BKUts = jnp.exp(s_BKUts - lse_ZBKUt[i][..., None])
            dout_BtKUD = dout_ZBtKUD[i]
            dv_BsKD += jnp.einsum("bkuts,btkud->bskd", p_BKUts.astype(dout_BtKUD.dtype), dout_BtKUD,
                                  preferred_element_type=jnp.float32)
            dp_BKUts = jnp.einsum("btkud,bskd->bkuts", dout_BtKUD, v_BsKD, preferred_element_type=jnp.float32)
            ds_BKUts = (p_BKUts * (dp_BKUts - delta_ZBKUt[i][..., None]) * scale).astype(q_BTKUJ.dtype)
            dq_BtKUJ = jnp.einsum("bkuts,bskj->btkuj", ds_BKUts, k_BsKJ, preferred_element_type=jnp.float32)
            dk_BsKJ += jnp.einsum("bkuts,btkuj->bskj", ds_BKUts, q_ZBtKUJ[i], preferred_element_type=jnp.float32)
            return dk_BsKJ, dv_BsKD, dq_ZBtKUJ.at[i].add(dq_BtKUJ)

        # The first query block whose last query's slot reaches this key block's first slot.
        first = jnp.clip((j * bk - offset) // bq, 0, n_query_blocks)
        init = (jnp.zeros(k_BsKJ.shape, jnp.float32), jnp.zeros(v_BsKD.shape, jnp.float32), dq_ZBtKUJ)
        dk_BsKJ, dv_BsKD, dq_ZBtKUJ = jax.lax.fori_loop(first, n_query_blocks, step, init)
        return dq_ZBtKUJ, (dk_BsKJ, dv_BsKD)

    dq_ZBtKUJ, (dk_ZBsKJ, dv_ZBsKD) = jax.lax.scan(
        key_block, jnp.zeros(q_ZBtKUJ.shape, jnp.float32), jnp.arange(k_ZBsKJ.shape[0]))
    return (unblock(dq_ZBtKUJ, q_BTKUJ.shape[1]).astype(q_BTKUJ.dtype), unblock(dk_ZBsKJ, S).astype(k_BSKJ.dtype),
            unblock(dv_ZBsKD, S).astype(v_BSKD.dtype), None, None)


_attention.defvjp(_attention_forward, _attention_backward)
