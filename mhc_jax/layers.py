"""Transformer building blocks: RMSNorm, RoPE, attention (MHA/GQA), SwiGLU MLP, embedding.

Every parameter is made by `param`, which records its logical axis names (`vocab`, `embed`,
`heads`, `kv_heads`, `head_dim`, `mlp`, `norm`, ...; the block stack adds `layers`) for the
sharding rules, and whether AdamW decays it. Parameters are float32; each layer computes in the
dtype of its input.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx


def param(value: jax.Array, axes: tuple, weight_decay: bool = True) -> nnx.Param:
    """A parameter with logical axis names (sharded later from one rules table) and a weight-decay
    flag (off for norms, gates and the static HC/mHC coefficients)."""
    assert len(axes) == value.ndim, (axes, value.shape)
    value = jnp.asarray(value, jnp.float32)  # also drops weak types, which would make jit recompile
    return nnx.Param(value, out_sharding=axes, eager_sharding=False, weight_decay=weight_decay)


def normal(rngs: nnx.Rngs, shape: tuple, std: float) -> jax.Array:
    return std * jax.random.normal(rngs.params(), shape, jnp.float32)


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float):
        self.scale = param(jnp.ones((dim,)), ("norm",), weight_decay=False)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        y = rms_normalize(x.astype(jnp.float32), self.eps) * self.scale[...]
        return y.astype(x.dtype)


def apply_rope(x_BTHD: jax.Array, positions_BT: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding, rotating the two halves of each head (computed in float32)."""
    half = x_BTHD.shape[-1] // 2
    inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle_BTF = positions_BT[..., None].astype(jnp.float32) * inv_freq
    cos, sin = jnp.cos(angle_BTF)[:, :, None, :], jnp.sin(angle_BTF)[:, :, None, :]
    x1, x2 = jnp.split(x_BTHD.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x_BTHD.dtype)


class LayerCache(NamedTuple):
    """One layer's keys and values for decoding, and where each row's tokens start."""
    k_BSKD: jax.Array  # keys of every slot written so far (rows are left-padded)
    v_BSKD: jax.Array
    start_B: jax.Array  # slot of each row's first real token; the slots before it are padding
    index: jax.Array  # the next slot to write


class Attention(nnx.Module):
    """Causal self-attention with RoPE; n_kv_heads < n_heads gives grouped-query attention."""

    def __init__(self, cfg, out_std: float, rngs: nnx.Rngs):
        C, H, K = cfg.d_model, cfg.n_heads, cfg.n_kv_heads
        D = C // H
        self.wq = param(normal(rngs, (C, H, D), C**-0.5), ("embed", "heads", "head_dim"))
        self.wk = param(normal(rngs, (C, K, D), C**-0.5), ("embed", "kv_heads", "head_dim"))
        self.wv = param(normal(rngs, (C, K, D), C**-0.5), ("embed", "kv_heads", "head_dim"))
        self.wo = param(normal(rngs, (H, D, C), out_std * (H * D) ** -0.5), ("heads", "head_dim", "embed"))
        self.rope_theta = cfg.rope_theta

    def __call__(self, x_BTC: jax.Array) -> jax.Array:
        positions_BT = jnp.broadcast_to(jnp.arange(x_BTC.shape[1]), x_BTC.shape[:2])
        q_BTHD, k_BTKD, v_BTKD = self.project(x_BTC, positions_BT)
        return self.output(jax.nn.dot_product_attention(q_BTHD, k_BTKD, v_BTKD, is_causal=True))

    def decode(self, x_BTC: jax.Array, kv: LayerCache) -> tuple[jax.Array, LayerCache]:
        """Attention for T new tokens at positions index .. index + T - 1 of left-padded rows:
        writes their keys and values into the cache and attends to every real token up to each."""
        T, S = x_BTC.shape[1], kv.k_BSKD.shape[1]
        query_slots_T = kv.index + jnp.arange(T)
        q_BTHD, k_BTKD, v_BTKD = self.project(x_BTC, query_slots_T[None, :] - kv.start_B[:, None])
        k_BSKD = jax.lax.dynamic_update_slice_in_dim(kv.k_BSKD, k_BTKD, kv.index, axis=1)
        v_BSKD = jax.lax.dynamic_update_slice_in_dim(kv.v_BSKD, v_BTKD, kv.index, axis=1)
        key_slots_S = jnp.arange(S)
        mask_BTS = (key_slots_S[None, None, :] <= query_slots_T[None, :, None]) & \
                   (key_slots_S[None, None, :] >= kv.start_B[:, None, None])
        o_BTHD = jax.nn.dot_product_attention(q_BTHD, k_BSKD, v_BSKD, mask=mask_BTS[:, None])
        return self.output(o_BTHD), kv._replace(k_BSKD=k_BSKD, v_BSKD=v_BSKD)

    def project(self, x_BTC, positions_BT):
        dtype = x_BTC.dtype
        q_BTHD = jnp.einsum("btc,chd->bthd", x_BTC, self.wq[...].astype(dtype))
        k_BTKD = jnp.einsum("btc,ckd->btkd", x_BTC, self.wk[...].astype(dtype))
        v_BTKD = jnp.einsum("btc,ckd->btkd", x_BTC, self.wv[...].astype(dtype))
        return (apply_rope(q_BTHD, positions_BT, self.rope_theta), apply_rope(k_BTKD, positions_BT, self.rope_theta),
                v_BTKD)

    def output(self, o_BTHD):
        return jnp.einsum("bthd,hdc->btc", o_BTHD, self.wo[...].astype(o_BTHD.dtype))


class SwiGLU(nnx.Module):
    def __init__(self, cfg, out_std: float, rngs: nnx.Rngs):
        C, F = cfg.d_model, cfg.d_ff
        self.w_gate = param(normal(rngs, (C, F), C**-0.5), ("embed", "mlp"))
        self.w_up = param(normal(rngs, (C, F), C**-0.5), ("embed", "mlp"))
        self.w_down = param(normal(rngs, (F, C), out_std * F**-0.5), ("mlp", "embed"))

    def __call__(self, x_BTC: jax.Array) -> jax.Array:
        dtype = x_BTC.dtype
        gate_BTF = jax.nn.silu(x_BTC @ self.w_gate[...].astype(dtype))
        up_BTF = x_BTC @ self.w_up[...].astype(dtype)
        return (gate_BTF * up_BTF) @ self.w_down[...].astype(dtype)


class Embedding(nnx.Module):
    """Token embedding; `attend` is the tied unembedding."""

    def __init__(self, cfg, rngs: nnx.Rngs):
        C = cfg.d_model
        self.table = param(normal(rngs, (cfg.vocab_size, C), C**-0.5), ("vocab", "embed"))

    def __call__(self, tokens_BT: jax.Array, dtype) -> jax.Array:
        return self.table[...].astype(dtype)[tokens_BT]

    def attend(self, h_BTC: jax.Array) -> jax.Array:
        return h_BTC @ self.table[...].astype(h_BTC.dtype).T
