"""The FLOP count behind the MFU figure.

FLOPs per trained token = 3 x the forward pass's (the backward costs twice the forward):
  forward = 2 x the active parameters (transformer.param_counts: every weight a token is multiplied
            by, unembedding included, in MoE layers only its top_k routed experts)
          + 2 x seq_len x heads x (query-key dims + value dims) per layer (QK^T and AV, counted in
            full as in PaLM's formula, not halved for causality)
          + the residual connection's own FLOPs at each of the 2L sites (residual.site_flops:
            stream mixing and, for HC/mHC, the coefficients)
MFU = FLOPs per token x tokens per second / (devices x peak FLOP/s per device).
"""

import jax

from mhc_jax.model import attention, residual
from mhc_jax.model.transformer import param_counts

# Dense bf16 peak FLOP/s per device, by a substring of jax's device_kind (first match wins).
PEAK_FLOPS = (("H100", 989e12), ("H200", 989e12), ("A100", 312e12), ("TPU v4", 275e12),
              ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5", 459e12), ("TPU v6", 918e12))


def train_flops_per_token(model_config, seq_len: int) -> float:
    c = model_config
    counts = param_counts(c)
    if c.attention == "mla":
        qk_dims, v_dims = c.mla.head_dim + c.mla.rope_dim, c.mla.head_dim
    else:
        qk_dims = v_dims = attention.head_dim(c)
    forward = (2 * (counts["active"] - counts["residual_overhead"])  # site_flops counts the HC/mHC weights
               + 2 * c.n_layers * seq_len * c.n_heads * (qk_dims + v_dims)
               + 2 * c.n_layers * residual.site_flops(c))
    return 3.0 * forward


def peak_flops_per_device(log_config) -> float | None:
    if log_config.peak_tflops > 0:
        return log_config.peak_tflops * 1e12
    kind = jax.devices()[0].device_kind
    return next((peak for name, peak in PEAK_FLOPS if name in kind), None)
