"""Causal self-attention, two kinds, each with a decode path that reads and extends a cache.

- `Attention`: multi-head attention with RoPE; n_kv_heads < n_heads is grouped-query attention.
  The dense scales use it. Its cache holds every token's keys and values.
- `LatentAttention`: DeepSeek's multi-head latent attention (MLA) without query compression, the
  paper's scales (docs/paper_models.md). Keys and values come from a compressed latent
  c = RMSNorm(x W_kv_a) of kv_rank dims; a rope_dim-dim RoPE key, also from x W_kv_a, is shared by
  all heads. Scores use [q_nope; q_rope] . [k_nope; k_rope] over head_dim + rope_dim dims. Its cache
  holds only the latent and the RoPE key per token (kv_rank + rope_dim numbers): decoding folds
  W_kv_b's key half into the query and its value half into the output, so full keys and values are
  never formed.

Both compute attention through attention_kernels.attend, with the kernel `model.attention_kernel`
picks for this platform; MLA's decoding attends in the latent space as multi-query attention (one
key/value head of kv_rank + rope_dim dims).

A decoding batch is left-padded: row b's real tokens start at slot start_B[b], and position 0 is
that slot, so RoPE sees the positions an unpadded sequence would.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mhc_jax.model import attention_kernels
from mhc_jax.model.layers import RMSNorm, Rope, normal, param

KINDS = ("mha", "mla")


class LayerCache(NamedTuple):
    """One layer's cache for decoding: its attention's per-token entries and where rows start."""
    entries: tuple  # arrays [B, S, ...]: (keys, values) for Attention, (latent, rope key) for MLA
    start_B: jax.Array  # slot of each row's first real token; the slots before it are padding
    index: jax.Array  # the next slot to write


def make_attention(cfg, out_std: float, rngs: nnx.Rngs) -> nnx.Module:
    return LatentAttention(cfg, out_std, rngs) if cfg.attention == "mla" else Attention(cfg, out_std, rngs)


def cache_shapes(cfg) -> tuple[tuple[int, ...], ...]:
    """Per-token shapes of one layer's cache entries."""
    if cfg.attention == "mla":
        return (cfg.mla.kv_rank,), (cfg.mla.rope_dim,)
    return (cfg.n_kv_heads, head_dim(cfg)), (cfg.n_kv_heads, head_dim(cfg))


def head_dim(cfg) -> int:
    """'mha' per-head dims: model.head_dim, or d_model // n_heads where it is 0."""
    return cfg.head_dim or cfg.d_model // cfg.n_heads


def extend(cache: LayerCache, new_entries: tuple) -> LayerCache:
    """The cache with the new tokens' entries written at `index` (the index is moved by the caller,
    once per forward pass)."""
    return cache._replace(entries=tuple(
        jax.lax.dynamic_update_slice_in_dim(old, new.astype(old.dtype), cache.index, axis=1)
        for old, new in zip(cache.entries, new_entries)))


def kernel_for(cfg) -> str:
    """The attention kernel this config means on this machine ('auto' decided by platform)."""
    return attention_kernels.choose(cfg.attention_kernel, jax.default_backend(), cfg.dtype)


def decode_positions(cache: LayerCache, T: int) -> jax.Array:
    return cache.index + jnp.arange(T)[None, :] - cache.start_B[:, None]


def train_positions(x_BTC: jax.Array) -> jax.Array:
    return jnp.broadcast_to(jnp.arange(x_BTC.shape[1]), x_BTC.shape[:2])


class Attention(nnx.Module):
    """Multi-head (or grouped-query) causal self-attention with RoPE on the whole head; optionally
    with query/key/value biases (model.qkv_bias, as Qwen2) and each query and key head
    RMS-normalized before RoPE (model.qk_norm, as Qwen3)."""

    def __init__(self, cfg, out_std: float, rngs: nnx.Rngs):
        C, H, K, D = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, head_dim(cfg)
        self.wq = param(normal(rngs, (C, H, D), C**-0.5), ("embed", "heads", "head_dim"))
        self.wk = param(normal(rngs, (C, K, D), C**-0.5), ("embed", "kv_heads", "head_dim"))
        self.wv = param(normal(rngs, (C, K, D), C**-0.5), ("embed", "kv_heads", "head_dim"))
        self.wo = param(normal(rngs, (H, D, C), out_std * (H * D) ** -0.5), ("heads", "head_dim", "embed"))
        self.bq, self.bk, self.bv = (param(jnp.zeros((n, D)), (axis, "head_dim"), weight_decay=False)
                                     if cfg.qkv_bias else None for n, axis in ((H, "heads"), (K, "kv_heads"), (K, "kv_heads")))
        self.q_norm, self.k_norm = (RMSNorm(D, cfg.norm_eps), RMSNorm(D, cfg.norm_eps)) if cfg.qk_norm else (None, None)
        self.rope = Rope.of(cfg)
        self.kernel, self.scale = kernel_for(cfg), D**-0.5

    def __call__(self, x_BTC: jax.Array) -> jax.Array:
        q_BTHD, k_BTKD, v_BTKD = self.project(x_BTC, train_positions(x_BTC))
        return self.output(attention_kernels.attend(q_BTHD, k_BTKD, v_BTKD, kernel=self.kernel, scale=self.scale))

    def decode(self, x_BTC: jax.Array, cache: LayerCache) -> tuple[jax.Array, LayerCache]:
        """T new tokens of left-padded rows: writes their keys and values into the cache and attends
        to every real token up to each."""
        q_BTHD, k_BTKD, v_BTKD = self.project(x_BTC, decode_positions(cache, x_BTC.shape[1]))
        cache = extend(cache, (k_BTKD, v_BTKD))
        k_BSKD, v_BSKD = cache.entries
        o_BTHD = attention_kernels.attend(q_BTHD, k_BSKD, v_BSKD, kernel=self.kernel, scale=self.scale,
                                          offset=cache.index, start_B=cache.start_B)
        return self.output(o_BTHD), cache

    def project(self, x_BTC, positions_BT):
        dtype = x_BTC.dtype
        q_BTHD = jnp.einsum("btc,chd->bthd", x_BTC, self.wq[...].astype(dtype))
        k_BTKD = jnp.einsum("btc,ckd->btkd", x_BTC, self.wk[...].astype(dtype))
        v_BTKD = jnp.einsum("btc,ckd->btkd", x_BTC, self.wv[...].astype(dtype))
        if self.bq is not None:
            q_BTHD, k_BTKD, v_BTKD = (x + b[...].astype(dtype) for x, b in zip((q_BTHD, k_BTKD, v_BTKD),
                                                                                (self.bq, self.bk, self.bv)))
        if self.q_norm is not None:
            q_BTHD, k_BTKD = self.q_norm(q_BTHD), self.k_norm(k_BTKD)
        return self.rope(q_BTHD, positions_BT), self.rope(k_BTKD, positions_BT), v_BTKD

    def output(self, o_BTHD):
        return jnp.einsum("bthd,hdc->btc", o_BTHD, self.wo[...].astype(o_BTHD.dtype))


class LatentAttention(nnx.Module):
    """Multi-head latent attention (DeepSeek-V2/V3) without query compression."""

    def __init__(self, cfg, out_std: float, rngs: nnx.Rngs):
        C, H = cfg.d_model, cfg.n_heads
        D, R, r = cfg.mla.head_dim, cfg.mla.rope_dim, cfg.mla.kv_rank
        self.wq = param(normal(rngs, (C, H, D + R), C**-0.5), ("embed", "heads", "head_dim"))  # [q_nope | q_rope]
        self.wkv_a = param(normal(rngs, (C, r + R), C**-0.5), ("embed", "kv_latent"))  # [latent | k_rope]
        self.kv_norm = RMSNorm(r, cfg.norm_eps)
        self.wkv_b = param(normal(rngs, (r, H, 2 * D), r**-0.5), ("kv_latent", "heads", "head_dim"))  # [k_nope | v]
        self.wo = param(normal(rngs, (H, D, C), out_std * (H * D) ** -0.5), ("heads", "head_dim", "embed"))
        self.head_dim, self.rope_dim, self.kv_rank = D, R, r
        self.rope = Rope.of(cfg)
        self.kernel, self.scale = kernel_for(cfg), (D + R) ** -0.5

    def __call__(self, x_BTC: jax.Array) -> jax.Array:
        """Training and scoring: keys and values expanded per head from the latent."""
        q_BTHJ, latent_BTr, k_rope_BTR = self.project(x_BTC, train_positions(x_BTC))
        k_nope_BTHD, v_BTHD = jnp.split(self.expand_latent(latent_BTr), 2, axis=-1)
        k_rope_BTHR = jnp.broadcast_to(k_rope_BTR[:, :, None, :], (*k_nope_BTHD.shape[:3], self.rope_dim))
        k_BTHJ = jnp.concatenate([k_nope_BTHD, k_rope_BTHR], axis=-1)
        return self.output(attention_kernels.attend(q_BTHJ, k_BTHJ, v_BTHD, kernel=self.kernel, scale=self.scale))

    def decode(self, x_BTC: jax.Array, cache: LayerCache) -> tuple[jax.Array, LayerCache]:
        """T new tokens: caches their latent and RoPE key, then attends in the latent space as
        multi-query attention: W_kv_b's key half folded into the query ([q_latent; q_rope] against
        the one key [latent; k_rope]), its value half applied after the weighted sum of latents."""
        T, D = x_BTC.shape[1], self.head_dim
        q_BTHJ, latent_BTr, k_rope_BTR = self.project(x_BTC, decode_positions(cache, T))
        cache = extend(cache, (latent_BTr, k_rope_BTR))
        latent_BSr, k_rope_BSR = cache.entries
        w_k_rHD, w_v_rHD = jnp.split(self.wkv_b[...].astype(x_BTC.dtype), 2, axis=-1)
        q_latent_BTHr = jnp.einsum("bthd,rhd->bthr", q_BTHJ[..., :D], w_k_rHD)
        q_BTHX = jnp.concatenate([q_latent_BTHr, q_BTHJ[..., D:]], axis=-1)  # X: r + R, one key head (K = 1)
        k_BSKX = jnp.concatenate([latent_BSr, k_rope_BSR.astype(latent_BSr.dtype)], axis=-1)[:, :, None, :]
        o_latent_BTHr = attention_kernels.attend(q_BTHX.astype(k_BSKX.dtype), k_BSKX, latent_BSr[:, :, None, :],
                                                 kernel=self.kernel, scale=self.scale, offset=cache.index,
                                                 start_B=cache.start_B)
        return self.output(jnp.einsum("bthr,rhd->bthd", o_latent_BTHr.astype(x_BTC.dtype), w_v_rHD)), cache

    def project(self, x_BTC, positions_BT):
        """The query [q_nope; rope(q_rope)] per head, the normalized latent and the RoPE key."""
        dtype, D = x_BTC.dtype, self.head_dim
        q_BTHJ = jnp.einsum("btc,chj->bthj", x_BTC, self.wq[...].astype(dtype))
        q_BTHJ = jnp.concatenate([q_BTHJ[..., :D], self.rope(q_BTHJ[..., D:], positions_BT)], -1)
        kv_BTa = x_BTC @ self.wkv_a[...].astype(dtype)
        latent_BTr = self.kv_norm(kv_BTa[..., :self.kv_rank])
        k_rope_BTR = self.rope(kv_BTa[..., None, self.kv_rank:], positions_BT)[..., 0, :]
        return q_BTHJ, latent_BTr, k_rope_BTR

    def expand_latent(self, latent_BTr):
        return jnp.einsum("btr,rhe->bthe", latent_BTr, self.wkv_b[...].astype(latent_BTr.dtype))

    def output(self, o_BTHD):
        return jnp.einsum("bthd,hdc->btc", o_BTHD, self.wo[...].astype(o_BTHD.dtype))
