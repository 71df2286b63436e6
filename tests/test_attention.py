"""Multi-head latent attention against a NumPy transcription of docs/paper_models.md, and at full
rank against ordinary multi-head attention (decoding from the latent cache: test_generate.py)."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs.pretrain import get_config
from mhc_jax.model.attention import LatentAttention
from mhc_jax.model.layers import Rope


def latent_attention(overrides: dict | None = None) -> LatentAttention:
    cfg = get_config("residual,moe_debug").model
    cfg.mla.update(overrides or {})
    return LatentAttention(cfg, out_std=1.0, rngs=nnx.Rngs(0))


def numpy_rope(x_TD, theta=10_000.0):
    half = x_TD.shape[-1] // 2
    angle = np.arange(len(x_TD))[:, None] * theta ** (-np.arange(half) / half)
    x1, x2 = x_TD[:, :half], x_TD[:, half:]
    return np.concatenate([x1 * np.cos(angle) - x2 * np.sin(angle), x2 * np.cos(angle) + x1 * np.sin(angle)], -1)


def test_latent_attention_matches_the_spec_transcribed_in_numpy():
    layer = latent_attention()
    D, R, r = layer.head_dim, layer.rope_dim, layer.kv_rank
    wq, wkv_a, wkv_b, wo = (np.asarray(w[...], np.float64) for w in (layer.wq, layer.wkv_a, layer.wkv_b, layer.wo))
    x_TC = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (10, wq.shape[0])), np.float64)
    T, H = len(x_TC), wq.shape[1]
    kv = x_TC @ wkv_a
    latent = kv[:, :r] / np.sqrt(np.mean(kv[:, :r] ** 2, -1, keepdims=True) + 1e-6)  # RMSNorm, unit scale
    k_rope = numpy_rope(kv[:, r:])  # one RoPE key for every head
    out = np.zeros((T, H, D))
    for h in range(H):
        q = x_TC @ wq[:, h]
        q = np.concatenate([q[:, :D], numpy_rope(q[:, D:])], -1)
        k = np.concatenate([latent @ wkv_b[:, h, :D], k_rope], -1)
        v = latent @ wkv_b[:, h, D:]
        scores = q @ k.T / np.sqrt(D + R) + np.triu(np.full((T, T), -np.inf), 1)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        out[:, h] = (weights / weights.sum(-1, keepdims=True)) @ v
    expected = np.einsum("thd,hdc->tc", out, wo)
    np.testing.assert_allclose(layer(jnp.asarray(x_TC[None], jnp.float32))[0], expected, rtol=1e-4, atol=1e-5)


def test_at_full_rank_latent_attention_is_uncompressed_multi_head_attention():
    """With kv_rank = d_model, W_kv_a's latent block the identity and inputs of unit RMS (as the
    block's pre-norm gives), the normalized latent is the input itself: keys and values are then
    per-head projections of x, i.e. ordinary multi-head attention with a shared RoPE key part."""
    C = get_config("residual,moe_debug").model.d_model
    layer = latent_attention({"kv_rank": C})
    D, R = layer.head_dim, layer.rope_dim
    layer.wkv_a[...] = layer.wkv_a[...].at[:, :C].set(jnp.eye(C))
    x_BTC = jax.random.normal(jax.random.PRNGKey(2), (2, 12, C))
    x_BTC = x_BTC / jnp.sqrt(jnp.mean(x_BTC**2, -1, keepdims=True))
    positions_BT = jnp.broadcast_to(jnp.arange(12), (2, 12))
    q_BTHJ = jnp.einsum("btc,chj->bthj", x_BTC, layer.wq[...])
    q_BTHJ = jnp.concatenate([q_BTHJ[..., :D], Rope(10_000.0)(q_BTHJ[..., D:], positions_BT)], -1)
    w_k, w_v = layer.wkv_b[...][..., :D], layer.wkv_b[...][..., D:]  # [C, H, D] each: plain per-head weights
    k_rope_BT1R = Rope(10_000.0)((x_BTC @ layer.wkv_a[...][:, C:])[:, :, None], positions_BT)
    k_BTHJ = jnp.concatenate([jnp.einsum("btc,chd->bthd", x_BTC, w_k),
                              jnp.broadcast_to(k_rope_BT1R, (2, 12, w_k.shape[1], R))], -1)
    v_BTHJ = jnp.pad(jnp.einsum("btc,chd->bthd", x_BTC, w_v), ((0, 0),) * 3 + ((0, R),))
    o_BTHD = jax.nn.dot_product_attention(q_BTHJ, k_BTHJ, v_BTHJ, is_causal=True)[..., :D]
    expected = jnp.einsum("bthd,hdc->btc", o_BTHD, layer.wo[...])
    np.testing.assert_allclose(layer(x_BTC), expected, rtol=1e-4, atol=1e-5)
