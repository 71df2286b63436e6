"""Maps onto the doubly stochastic matrices (rows and columns summing to 1), as the mHC family of
residual connections builds H_res (residual.py chooses which):
- `sinkhorn`: the mHC paper's Sinkhorn-Knopp iterations (Eq. 9), approximate;
- `sinkhorn_v4`: DeepSeek-V4's variant (a row softmax first, eps in every division), approximate;
- `permutation_mix`: mHC-lite's convex combination of the n! permutation matrices, exact;
- `kronecker_mix`: KromHC's Kronecker product of 2x2 doubly stochastic factors, exact.
"""

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np


def sinkhorn(logits: jax.Array, iters: int, fast: bool) -> jax.Array:
    """Sinkhorn-Knopp on exp(logits) [..., n, n]: `iters` rounds of T_c (columns sum to 1) then
    T_r (rows sum to 1), the paper's Eq. 9. Rows are exact; columns carry the truncation error.

    The reference runs every round in the log domain (max-shifted logsumexps), which cannot underflow
    to 0/0 for logits far apart (e.g. +-50). The fast form runs only the first round there: after it
    every row and column holds an entry >= 1/n^2, so the other rounds divide by sums that cannot
    vanish and run in the linear domain, on [n, n, tokens] so that every sum adds whole slabs (a
    fori_loop: a Python-unrolled loop compiled 4x slower and ran 3x slower on CPU); its backward
    recomputes the rounds from the logits instead of saving 2 * iters matrices per token.
    """
    return _sinkhorn_fast(logits, iters) if fast else _sinkhorn_log_domain(logits, iters)


def _sinkhorn_log_domain(logits: jax.Array, iters: int) -> jax.Array:
    def normalize(z, _):
        z = z - jax.nn.logsumexp(z, axis=-2, keepdims=True)  # T_c
        z = z - jax.nn.logsumexp(z, axis=-1, keepdims=True)  # T_r
        return z, None

    z, _ = jax.lax.scan(normalize, logits.astype(jnp.float32), length=iters)
    return jnp.exp(z)


def _sinkhorn_linear(logits: jax.Array, iters: int) -> jax.Array:
    z_NNX = jnp.moveaxis(logits.astype(jnp.float32), (-2, -1), (0, 1))  # sums over n run over whole slabs
    z_NNX = z_NNX - jax.nn.logsumexp(z_NNX, axis=0, keepdims=True)  # T_c
    m_NNX = jnp.exp(z_NNX - jax.nn.logsumexp(z_NNX, axis=1, keepdims=True))  # T_r

    def normalize(_, m_NNX):
        m_NNX = m_NNX / m_NNX.sum(axis=0, keepdims=True)  # T_c
        return m_NNX / m_NNX.sum(axis=1, keepdims=True)  # T_r

    m_NNX = jax.lax.fori_loop(0, iters - 1, normalize, m_NNX)
    return jnp.moveaxis(m_NNX, (0, 1), (-2, -1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _sinkhorn_fast(logits: jax.Array, iters: int) -> jax.Array:
    return _sinkhorn_linear(logits, iters)


def _sinkhorn_fast_forward(logits, iters):
    return _sinkhorn_linear(logits, iters), logits


def _sinkhorn_fast_backward(iters, logits, grad):
    _, pullback = jax.vjp(lambda z: _sinkhorn_linear(z, iters), logits)
    return pullback(grad)


_sinkhorn_fast.defvjp(_sinkhorn_fast_forward, _sinkhorn_fast_backward)


def sinkhorn_v4(logits: jax.Array, iters: int, eps: float, fast: bool) -> jax.Array:
    """DeepSeek-V4's projection of `logits` [..., n, n] (transformers' DeepseekV4HyperConnection):
    M = softmax over each row + eps, then the columns normalized, then iters - 1 rounds of rows then
    columns, each a division by (sum + eps). Its M multiplies the streams transposed (new stream j
    = sum_i M[i, j] x_i), so the H_res of x' = H x is M^T, whose rows are the last normalized.

    The fast form is the same arithmetic on [n, n, tokens] slabs, as `sinkhorn`'s, and its backward
    recomputes the rounds from the logits (jax.checkpoint) instead of saving 2 * iters matrices
    per token; the reference form runs on [..., n, n] and is differentiated through."""
    if fast:
        return _sinkhorn_v4_slabs(logits, iters, eps)
    return jnp.swapaxes(_v4_rounds(logits, iters, eps, row_sum_axis=-1, column_sum_axis=-2), -1, -2)


def _v4_rounds(logits: jax.Array, iters: int, eps: float, row_sum_axis: int, column_sum_axis: int) -> jax.Array:
    m = jax.nn.softmax(logits.astype(jnp.float32), axis=row_sum_axis) + eps
    m = m / (m.sum(axis=column_sum_axis, keepdims=True) + eps)

    def normalize(_, m):
        m = m / (m.sum(axis=row_sum_axis, keepdims=True) + eps)
        return m / (m.sum(axis=column_sum_axis, keepdims=True) + eps)

    return jax.lax.fori_loop(0, iters - 1, normalize, m)


@functools.partial(jax.checkpoint, static_argnums=(1, 2))
def _sinkhorn_v4_slabs(logits: jax.Array, iters: int, eps: float) -> jax.Array:
    m_NNX = _v4_rounds(jnp.moveaxis(logits, (-2, -1), (0, 1)), iters, eps, row_sum_axis=1, column_sum_axis=0)
    return jnp.moveaxis(m_NNX, (0, 1), (-1, -2))  # back to [..., n, n], transposed


# mHC-lite enumerates n! permutations; 6! = 720 matrices of 36 entries is where that stops being small.
MAX_PERMUTED_STREAMS = 6


@functools.cache
def permutation_matrices(n: int) -> np.ndarray:
    """The n! permutation matrices [n!, n, n] in lexicographic order of their permutations (the
    identity first); P_r[i, r(i)] = 1, so P_r x puts stream r(i) in place i."""
    return np.stack([np.eye(n, dtype=np.float32)[list(order)] for order in itertools.permutations(range(n))])


def permutation_mix(logits: jax.Array) -> jax.Array:
    """sum_r softmax(logits)_r P_r [..., n, n] from logits [..., n!]: a convex combination of
    permutation matrices is doubly stochastic with no iteration (Birkhoff-von Neumann)."""
    n = next(k for k in range(1, MAX_PERMUTED_STREAMS + 1) if math.factorial(k) == logits.shape[-1])
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.einsum("...r,rij->...ij", weights, permutation_matrices(n))


@functools.cache
def _same_bits(n: int) -> np.ndarray:
    """[K, n, n], K = log2 n: whether i and j agree in bit k (factor k is the most significant first)."""
    bits = np.array([[(i >> (n.bit_length() - 2 - k)) & 1 for i in range(n)] for k in range(n.bit_length() - 1)])
    return bits[:, :, None] == bits[:, None, :]


def kronecker_mix(logits: jax.Array) -> jax.Array:
    """U_1 (x) ... (x) U_K [..., n, n] from logits [..., K, 2], n = 2^K: U_k = p_k I + (1 - p_k) S
    with S the 2x2 swap and (p_k, 1 - p_k) = softmax(logits[k]); a Kronecker product of doubly
    stochastic factors is doubly stochastic. Entry (i, j) is the product over k of p_k where i and
    j agree in bit k, else 1 - p_k."""
    p_K = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[..., 0]
    same_KNN = _same_bits(2 ** logits.shape[-2])
    factors = jnp.where(same_KNN, p_K[..., None, None], 1.0 - p_K[..., None, None])
    return jnp.prod(factors, axis=-3)
