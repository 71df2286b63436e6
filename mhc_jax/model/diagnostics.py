"""Stability diagnostics: the mHC paper's Amax gain magnitude of the stream-mixing maps.

For a map P acting as x' = P x (rows make the new streams):
  forward gain  = max_i |sum_j P_ij|   (largest absolute row sum: amplification of the forward signal)
  backward gain = max_j |sum_i P_ij|   (largest absolute column sum: amplification of the gradient)
computed per token, then averaged over the tokens (docs/math.md, "Amax gain"). Doubly stochastic maps give 1
and 1; mHC's truncated Sinkhorn keeps rows exact and lets columns drift, which `min_col_sum` and
`max_abs_log_col_sum` (attenuation as well as amplification) expose.
"""

import jax
import jax.numpy as jnp


def _gains(p_IXNN: jax.Array, prefix: str) -> dict[str, jax.Array]:
    row_sums, col_sums = p_IXNN.sum(-1), p_IXNN.sum(-2)
    token_axes = tuple(range(1, p_IXNN.ndim - 2))
    per_token = {
        "forward": jnp.abs(row_sums).max(-1),
        "backward": jnp.abs(col_sums).max(-1),
        "min_col_sum": col_sums.min(-1),
        "max_abs_log_col_sum": jnp.abs(jnp.log(jnp.abs(col_sums))).max(-1),
    }
    return {f"{prefix}_{name}": value.mean(axis=token_axes) for name, value in per_token.items()}


def composite_maps(h_res_IXNN: jax.Array) -> jax.Array:
    """P_l = H_{S-1} ... H_{l+1} H_l for every site l: the map from site l's input to the end."""
    def step(p_XNN, h_XNN):
        p_XNN = p_XNN @ h_XNN
        return p_XNN, p_XNN

    identity = jnp.broadcast_to(jnp.eye(h_res_IXNN.shape[-1]), h_res_IXNN.shape[1:])
    _, reversed_composites = jax.lax.scan(step, identity, h_res_IXNN[::-1])
    return reversed_composites[::-1]


def amax_gain(h_res_IXNN: jax.Array) -> dict[str, jax.Array]:
    """Per-site Amax gains of H_res [I, ..., n, n] (sites in forward order, any token axes between).

    Returns arrays of shape [I]: `single_*` for each site's own H_res and `composite_*` for the
    product from that site to the last one, each with forward, backward, min_col_sum and
    max_abs_log_col_sum.
    """
    h_res_IXNN = h_res_IXNN.astype(jnp.float32)
    return {**_gains(h_res_IXNN, "single"), **_gains(composite_maps(h_res_IXNN), "composite")}
