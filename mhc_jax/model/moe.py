"""DeepSeekMoE FFN with DeepSeek-V3 routing and auxiliary-loss-free load balancing.

    y = sum_s Shared_s(x) + sum_{i in TopK} g_i Expert_i(x)        every expert a SwiGLU of width F

Routing (V3): affinities s_i = sigmoid(x . e_i); the top-k experts are chosen on s_i + b_i, where b
is a per-expert bias used only for the choice; the gates are the chosen s_i renormalized to sum to
1, times `routed_scale`. The bias balances the load without an auxiliary loss: after every step the
trainer moves it by `bias_update_rate * sign(mean load - load_i)`, from the load counted over the
whole global batch (`balance_router_bias`). It is a `RouterBias` variable, not a parameter: its
gradient is zero (it only selects), the train step sets it, checkpoints save it. V3's complementary
sequence-wise balance loss is returned too; the trainer adds it with `balance_loss_weight` (0: off).

Dispatch is capacity-based within each sequence (the routing group): expert e takes at most
`capacity = ceil(capacity_factor * T * k / E)` of a sequence's T tokens, first come first served
in token order, and an assignment past it is dropped (it contributes 0; the shared experts and the
residual stream still carry the token). The dropped fraction is logged. `capacity_factor <= 0` is
dropless (capacity = T), which evaluation and decoding always use. Because groups are
sequences, the same tokens are dropped on any mesh.

Expert parallelism: the dispatched tokens [B, E, capacity, C] are resharded from the batch
(sharded over data x fsdp x expert) to the experts (E over `expert`, the batch over data x fsdp):
XLA turns that into an all-to-all over the `expert` axis, and the reverse one brings the outputs
back. Expert weights [E, ...] are sharded over `expert` by the logical-axis rules.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mhc_jax import sharding
from mhc_jax.model.layers import SwiGLU, normal, param


class RouterBias(nnx.Variable):
    """The per-expert selection bias of auxiliary-loss-free balancing (set by the train step)."""


class RouterStats(NamedTuple):
    load: jax.Array  # [E] assignments to each expert (before capacity drops), summed over the batch
    dropped: jax.Array  # [] assignments dropped by the capacity limit
    balance_loss: jax.Array  # [] V3's sequence-wise balance loss, averaged over sequences


def capacity(moe_config, tokens: int) -> int:
    c = moe_config
    if c.capacity_factor <= 0:
        return tokens
    return min(tokens, math.ceil(c.capacity_factor * tokens * c.top_k / c.n_experts))


class MoE(nnx.Module):
    def __init__(self, cfg, out_std: float, rngs: nnx.Rngs):
        C, c = cfg.d_model, cfg.moe
        E, F = c.n_experts, c.d_expert
        self.router = param(normal(rngs, (C, E), C**-0.5), ("embed", None))
        self.router_bias = RouterBias(jnp.zeros((E,), jnp.float32), out_sharding=(None,), eager_sharding=False,
                                      weight_decay=False)
        self.w_gate = param(normal(rngs, (E, C, F), C**-0.5), ("experts", "embed", "mlp"))
        self.w_up = param(normal(rngs, (E, C, F), C**-0.5), ("experts", "embed", "mlp"))
        self.w_down = param(normal(rngs, (E, F, C), out_std * F**-0.5), ("experts", "mlp", "embed"))
        self.shared = SwiGLU(C, c.n_shared * F, out_std, rngs) if c.n_shared else None
        self.config = c

    def __call__(self, x_BTC: jax.Array) -> tuple[jax.Array, RouterStats]:
        c = self.config
        B, T, C = x_BTC.shape
        E, A = c.n_experts, c.top_k
        scores_BTE = jax.nn.sigmoid(x_BTC.astype(jnp.float32) @ self.router[...])
        _, expert_BTA = jax.lax.top_k(scores_BTE + self.router_bias[...], A)
        chosen_BTA = jnp.take_along_axis(scores_BTE, expert_BTA, axis=-1)
        gate_BTA = c.routed_scale * chosen_BTA / chosen_BTA.sum(-1, keepdims=True)

        # Slot of every assignment (token t's k-th choice, in token order) in its expert's buffer.
        cap = capacity(c, T)
        expert_BX = expert_BTA.reshape(B, T * A)
        onehot_BXE = jax.nn.one_hot(expert_BX, E, dtype=jnp.int32)
        rank_BX = (jnp.cumsum(onehot_BXE, axis=1) * onehot_BXE).sum(-1) - 1
        kept_BX = rank_BX < cap
        slot_BX = jnp.where(kept_BX, expert_BX * cap + rank_BX, E * cap)  # E * cap: the discard slot
        token_X = jnp.repeat(jnp.arange(T), A)
        token_of_slot_BY = jax.vmap(lambda slots: jnp.full((E * cap + 1,), T).at[slots].set(token_X))(slot_BX)

        x_padded_BTC = jnp.concatenate([x_BTC, jnp.zeros((B, 1, C), x_BTC.dtype)], axis=1)  # row T: empty slot
        xe_BYC = jnp.take_along_axis(x_padded_BTC, token_of_slot_BY[:, :E * cap, None], axis=1)
        xe_BEGC = sharding.constrain(xe_BYC.reshape(B, E, cap, C), ("expert_batch", "experts", None, None))
        ye_BEGC = self.experts(xe_BEGC)
        ye_BEGC = sharding.constrain(ye_BEGC, ("batch", None, None, None))
        ye_BYC = jnp.concatenate([ye_BEGC.reshape(B, E * cap, C), jnp.zeros((B, 1, C), ye_BEGC.dtype)], axis=1)
        y_BXC = jnp.take_along_axis(ye_BYC, slot_BX[..., None], axis=1)
        y_BTC = jnp.einsum("btac,bta->btc", y_BXC.reshape(B, T, A, C), gate_BTA.astype(y_BXC.dtype))
        if self.shared is not None:
            y_BTC = y_BTC + self.shared(x_BTC)

        fraction_BE = onehot_BXE.sum(1) * (E / (A * T))  # V3's f_i
        affinity_BE = (scores_BTE / scores_BTE.sum(-1, keepdims=True)).mean(1)  # V3's P_i
        stats = RouterStats(load=onehot_BXE.sum((0, 1)).astype(jnp.float32),
                            dropped=(~kept_BX).sum().astype(jnp.float32),
                            balance_loss=(fraction_BE * affinity_BE).sum(-1).mean())
        return y_BTC, stats

    def experts(self, x_BEGC: jax.Array) -> jax.Array:
        """Each expert's SwiGLU on its tokens. The weights are gathered over FSDP first (kept split
        over experts), so each device runs its own experts on the tokens dispatched to it."""
        dtype = x_BEGC.dtype
        w_gate, w_up = (sharding.constrain(w[...].astype(dtype), ("experts", None, "mlp")) for w in (self.w_gate, self.w_up))
        w_down = sharding.constrain(self.w_down[...].astype(dtype), ("experts", "mlp", None))
        gate_BEGF = jax.nn.silu(jnp.einsum("begc,ecf->begf", x_BEGC, w_gate))
        return jnp.einsum("begf,efc->begc", gate_BEGF * jnp.einsum("begc,ecf->begf", x_BEGC, w_up), w_down)


def balance_router_bias(bias_LE: jax.Array, load_LE: jax.Array, rate: float) -> jax.Array:
    """Auxiliary-loss-free balancing: raise the bias of underloaded experts, lower the overloaded."""
    return bias_LE + rate * jnp.sign(load_LE.mean(-1, keepdims=True) - load_LE)


def load_metrics(load_LE: jax.Array, bias_LE: jax.Array, dropped_L: jax.Array) -> dict:
    """metrics.jsonl's load balance: the busiest and idlest expert's load over the mean (worst layer),
    the bias range, and the share of assignments dropped by the capacity limit."""
    mean_L1 = load_LE.mean(-1, keepdims=True)
    return {"expert_load_max": (load_LE / mean_L1).max(), "expert_load_min": (load_LE / mean_L1).min(),
            "router_bias_min": bias_LE.min(), "router_bias_max": bias_LE.max(),
            "dropped_fraction": dropped_L.sum() / load_LE.sum()}
