"""Transformer building blocks: RMSNorm, RoPE, SwiGLU MLP, embedding (attention.py and moe.py hold the rest).

Every parameter is made by `param`, which records its logical axis names (`vocab`, `embed`,
`heads`, `kv_heads`, `head_dim`, `mlp`, `norm`, ...; the block stack adds `layers`) for the
sharding rules, and whether AdamW decays it. Parameters are float32; each layer computes in the
dtype of its input.
"""

import dataclasses

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


ROPE_SCALINGS = ("none", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class Rope:
    """Rotary position embedding: each head's two halves rotated together by angles position x
    frequency, the frequencies theta^(-i / half) (i < half), optionally rescaled for contexts longer
    than pretraining's (model.rope_scaling): 'linear' divides them all by `factor`; 'llama3'
    (Llama 3.1) divides those of wavelengths above original_max_position / low_freq_factor, keeps
    those below original_max_position / high_freq_factor, and blends the two in between."""
    theta: float
    kind: str = "none"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192

    @classmethod
    def of(cls, cfg) -> "Rope":
        scaling = cfg.rope_scaling
        return cls(cfg.rope_theta, scaling.kind, scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor,
                   scaling.original_max_position)

    def scaling_fields(self) -> dict:
        """model.rope_scaling's fields for these frequencies."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "theta"}

    def frequencies(self, half: int) -> jax.Array:
        inv_freq = self.theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
        if self.kind == "linear":
            return inv_freq / self.factor
        if self.kind == "llama3":
            wavelength = 2 * jnp.pi / inv_freq
            smooth = (self.original_max_position / wavelength - self.low_freq_factor) / (
                self.high_freq_factor - self.low_freq_factor)
            scaled = jnp.where(wavelength > self.original_max_position / self.low_freq_factor, inv_freq / self.factor,
                               inv_freq)
            blended = (1 - smooth) * scaled / self.factor + smooth * scaled
            middle = (wavelength >= self.original_max_position / self.high_freq_factor) & (
                wavelength <= self.original_max_position / self.low_freq_factor)
            return jnp.where(middle, blended, scaled)
        return inv_freq

    def __call__(self, x_BTHD: jax.Array, positions_BT: jax.Array) -> jax.Array:
        """x rotated (computed in float32)."""
        angle_BTR = positions_BT[..., None].astype(jnp.float32) * self.frequencies(x_BTHD.shape[-1] // 2)
        cos, sin = jnp.cos(angle_BTR)[:, :, None, :], jnp.sin(angle_BTR)[:, :, None, :]
        x1, x2 = jnp.split(x_BTHD.astype(jnp.float32), 2, axis=-1)
        rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
        return rotated.astype(x_BTHD.dtype)


class SwiGLU(nnx.Module):
    def __init__(self, C: int, F: int, out_std: float, rngs: nnx.Rngs):
        self.w_gate = param(normal(rngs, (C, F), C**-0.5), ("embed", "mlp"))
        self.w_up = param(normal(rngs, (C, F), C**-0.5), ("embed", "mlp"))
        self.w_down = param(normal(rngs, (F, C), out_std * F**-0.5), ("mlp", "embed"))

    def __call__(self, x_BTC: jax.Array) -> jax.Array:
        dtype = x_BTC.dtype
        gate_BTF = jax.nn.silu(x_BTC @ self.w_gate[...].astype(dtype))
        up_BTF = x_BTC @ self.w_up[...].astype(dtype)
        return (gate_BTF * up_BTF) @ self.w_down[...].astype(dtype)


class Embedding(nnx.Module):
    """Token embedding; with tied embeddings its table is also the head (Transformer.unembedding)."""

    def __init__(self, cfg, rngs: nnx.Rngs):
        C = cfg.d_model
        self.table = param(normal(rngs, (cfg.vocab_size, C), C**-0.5), ("vocab", "embed"))

    def __call__(self, tokens_BT: jax.Array, dtype) -> jax.Array:
        return self.table[...].astype(dtype)[tokens_BT]
