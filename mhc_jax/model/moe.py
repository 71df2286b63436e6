"""DeepSeekMoE FFN with DeepSeek-V3 routing and auxiliary-loss-free load balancing.

    y = sum_s Shared_s(x) + sum_{i in TopK} g_i Expert_i(x)        every expert a SwiGLU of width F

Routing (V3): affinities s_i = sigmoid(x . e_i); the top-k experts are chosen on s_i + b_i, where b
is a per-expert bias used only for the choice; the gates are the chosen s_i renormalized to sum to
1, times `routed_scale`. The bias balances the load without an auxiliary loss: after every step the
trainer moves it by `bias_update_rate * sign(mean load - load_i)`, from the load counted over the
whole global batch (`balance_router_bias`). It is a `RouterBias` variable, not a parameter: its
gradient is zero (it only selects), the train step sets it, checkpoints save it. V3's complementary
sequence-wise balance loss is returned too; the trainer adds it with `balance_loss_weight` (0: off).

Dispatch (`dispatch`): 'dropless' (the default, as V3 trains) sends every assignment to its expert.
The B*T*k assignments are sorted by expert, each expert's SwiGLU runs as grouped matmuls
(`jax.lax.ragged_dot`, one group per expert, its size the expert's token count), and the outputs
are unsorted and combined with the gates. The permutations are gathers in both directions
(`take_rows`: its backward gathers with the inverse permutation) and the gates are read with a
one-hot product, not take_along_axis: the layer's gradient has no scatter (tests/test_moe.py).
`RouterStats.dropped` is 0. Evaluation and decoding always use it.

'capacity' is capacity-based within each sequence (the routing group): expert e takes at most
`capacity = ceil(capacity_factor * T * k / E)` of a sequence's T tokens, first come first served
in token order, and an assignment past it is dropped (it contributes 0; the shared experts and the
residual stream still carry the token). The dropped fraction is logged. `capacity_factor <= 0`
makes capacity = T (nothing drops, at E/k times the routed FLOPs). Because groups are sequences,
the same tokens are dropped on any mesh.

Where each path runs:
- one device (or no mesh): 'dropless' sorts and runs ragged_dot over all E experts in place.
- a mesh: 'dropless' runs inside `jax.shard_map` over every mesh axis, so each device sorts only
  its own tokens. With expert parallelism (expert weights split over `expert`, the batch too),
  each device sorts its assignments by expert and exchanges them with the devices of its `expert`
  group (`exchanged_experts`): every expert's rows go to the device that holds it, which runs its
  E / expert local experts as grouped matmuls and sends the outputs back. `exchange` chooses the
  collective: 'ragged_all_to_all' (`jax.lax.ragged_all_to_all`, TPU and GPU: each device sends
  only its rows) or 'all_gather' (the same exchange built from all_gather: every device receives
  the group's rows and keeps its own; XLA:CPU has no ragged all-to-all, so CPU meshes, and the
  tests, run this one); 'auto' takes the first where it runs. Either way the receive buffer holds
  the worst case, `expert` x the device's assignments. Expert weights enter gathered over fsdp and
  split over `tensor` along the expert width; a psum over `tensor` completes the down projection.
  Without expert parallelism the batch axes only split the tokens: no collective beyond the
  weights' gather over fsdp. A batch too small to split is computed whole on every device (with
  the experts split, a psum over `expert` adds up their parts).
  `grouped_matmul` chooses the grouped matmul. XLA:CPU has no ragged-dot instruction: on CPU
  `ragged_dot` expands each group densely (E times the FLOPs of the grouped matmul). On TPU (v5p
  dry runs) the forward and the input gradient compile to a ragged-dot kernel, but the weight
  gradient (ragged_dot's transpose that contracts over the ragged rows) compiles densely, every row
  against every local expert: E_local times its FLOPs. 'megablox' (auto on TPU) keeps ragged_dot
  forward and for the input gradient and computes the weight gradient with megablox's tgmm Pallas
  kernel (`ragged_dot_tgmm`). On GPU jax emits XLA's ragged dot (not checked here).
- 'capacity' on a mesh: the dispatched tokens [B, E, capacity, C] are resharded from the batch
  (sharded over data x fsdp x expert) to the experts (E over `expert`, the batch over data x
  fsdp): XLA turns that into an all-to-all over the `expert` axis, and the reverse one brings the
  outputs back.
Expert weights [E, ...] are sharded over `expert` by the logical-axis rules.
"""

import functools
import importlib
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax._src import config as jax_config

from mhc_jax import sharding
from mhc_jax.errors import UserError
from mhc_jax.model.layers import SwiGLU, normal, param

DISPATCHES = ("dropless", "capacity")
EXCHANGES = ("auto", "ragged_all_to_all", "all_gather")
TGMM_TILE = 128
# the module: the megablox package exports a function of the same name
megablox = importlib.import_module("jax.experimental.pallas.ops.tpu.megablox.gmm")


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
        self.exchange = choose_exchange(c.exchange, jax.default_backend())
        self.matmul = GROUPED_MATMULS[choose_grouped_matmul(c.grouped_matmul, jax.default_backend())]

    def __call__(self, x_BTC: jax.Array) -> tuple[jax.Array, RouterStats]:
        with jax.named_scope("moe"):  # a dry run's memory report attributes buffers by this name
            c = self.config
            B, T, C = x_BTC.shape
            E, A = c.n_experts, c.top_k
            scores_BTE = jax.nn.sigmoid(x_BTC.astype(jnp.float32) @ self.router[...])
            _, expert_BTA = jax.lax.top_k(scores_BTE + self.router_bias[...], A)
            if c.dispatch == "capacity":
                chosen_BTA = jnp.take_along_axis(scores_BTE, expert_BTA, axis=-1)
            else:  # the same numbers, without the scatter-add that take_along_axis's gradient is
                chosen_BTA = (scores_BTE[:, :, None, :] * jax.nn.one_hot(expert_BTA, E, dtype=scores_BTE.dtype)).sum(-1)
            gate_BTA = c.routed_scale * chosen_BTA / chosen_BTA.sum(-1, keepdims=True)
            expert_BX = expert_BTA.reshape(B, T * A)
            onehot_BXE = jax.nn.one_hot(expert_BX, E, dtype=jnp.int32)
            if c.dispatch == "capacity":
                y_BTC, dropped = self.capacity_dispatch(x_BTC, expert_BX, onehot_BXE, gate_BTA)
            else:
                y_BTC, dropped = self.dropless_dispatch(x_BTC, expert_BTA, gate_BTA), jnp.zeros((), jnp.float32)
            if self.shared is not None:
                y_BTC = y_BTC + self.shared(x_BTC)

            fraction_BE = onehot_BXE.sum(1) * (E / (A * T))  # V3's f_i
            affinity_BE = (scores_BTE / scores_BTE.sum(-1, keepdims=True)).mean(1)  # V3's P_i
            stats = RouterStats(load=onehot_BXE.sum((0, 1)).astype(jnp.float32), dropped=dropped,
                                balance_loss=(fraction_BE * affinity_BE).sum(-1).mean())
            return y_BTC, stats

    def capacity_dispatch(self, x_BTC, expert_BX, onehot_BXE, gate_BTA) -> tuple[jax.Array, jax.Array]:
        """dispatch='capacity': the routed experts' sum [B, T, C], and the count of dropped assignments."""
        c = self.config
        B, T, C = x_BTC.shape
        E, A = c.n_experts, c.top_k
        # Slot of every assignment (token t's k-th choice, in token order) in its expert's buffer.
        cap = capacity(c, T)
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
        return y_BTC, (~kept_BX).sum().astype(jnp.float32)

    def dropless_dispatch(self, x_BTC, expert_BTA, gate_BTA) -> jax.Array:
        """dispatch='dropless': the routed experts' sum [B, T, C], every assignment computed. On a
        mesh, inside shard_map: each device sorts its own tokens (with expert parallelism, its
        expert group's tokens, for its own experts; see the module docstring)."""
        B, T, C = x_BTC.shape
        A = expert_BTA.shape[-1]
        weights = tuple(w[...].astype(x_BTC.dtype) for w in (self.w_gate, self.w_up, self.w_down))
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty or mesh.size == 1:
            y_XC = dropless_experts(x_BTC.reshape(B * T, C), expert_BTA.reshape(B * T, A),
                                    gate_BTA.reshape(B * T, A), *weights, matmul=self.matmul)
            return y_XC.reshape(B, T, C)

        batch = sharding.spec_for(("batch", None, None), x_BTC.shape, mesh)
        in_specs = (sharding.spec_for(("experts", None, "mlp"), weights[0].shape, mesh),
                    sharding.spec_for(("experts", None, "mlp"), weights[1].shape, mesh),
                    sharding.spec_for(("experts", "mlp", None), weights[2].shape, mesh))
        experts_split = in_specs[0][0] == "expert"  # else every device holds every expert
        mlp_split = in_specs[0][2] == "tensor"
        batch_axes = (batch[0],) if isinstance(batch[0], str) else tuple(batch[0] or ())
        exchanged = experts_split and "expert" in batch_axes
        collective = COLLECTIVES[self.exchange]

        def local(x_BTC, expert_BTA, gate_BTA, *weights):
            b = x_BTC.shape[0]
            x_XC, expert_XA, gate_XA = x_BTC.reshape(b * T, C), expert_BTA.reshape(b * T, A), gate_BTA.reshape(b * T, A)
            if exchanged:
                y_XC = exchanged_experts(x_XC, expert_XA, gate_XA, *weights, collective=collective, matmul=self.matmul)
            elif experts_split:  # every device has these tokens and runs its own experts on them; the custom
                # gradient of take_rows must see x vary over `expert`, so that its cotangent is summed
                x_XC = jax.lax.pcast(x_XC, "expert", to="varying")
                first = jax.lax.axis_index("expert") * weights[0].shape[0]
                y_XC = jax.lax.psum(dropless_experts(x_XC, expert_XA, gate_XA, *weights, first_expert=first,
                                                     matmul=self.matmul), "expert")
            else:
                y_XC = dropless_experts(x_XC, expert_XA, gate_XA, *weights, matmul=self.matmul)
            if mlp_split:  # the down projection's partial sums over the expert width
                y_XC = jax.lax.psum(y_XC, "tensor")
            return y_XC.reshape(b, T, C)

        return jax.shard_map(local, mesh=mesh, in_specs=(batch, batch, batch, *in_specs),
                             out_specs=batch)(x_BTC, expert_BTA, gate_BTA, *weights)

    def experts(self, x_BEGC: jax.Array) -> jax.Array:
        """dispatch='capacity': each expert's SwiGLU on its tokens. The weights are gathered over FSDP first (kept split
        over experts), so each device runs its own experts on the tokens dispatched to it."""
        dtype = x_BEGC.dtype
        w_gate, w_up = (sharding.constrain(w[...].astype(dtype), ("experts", None, "mlp")) for w in (self.w_gate, self.w_up))
        w_down = sharding.constrain(self.w_down[...].astype(dtype), ("experts", "mlp", None))
        gate_BEGF = jax.nn.silu(jnp.einsum("begc,ecf->begf", x_BEGC, w_gate))
        return jnp.einsum("begf,efc->begc", gate_BEGF * jnp.einsum("begc,ecf->begf", x_BEGC, w_up), w_down)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def take_rows(x_XC: jax.Array, perm_Y: jax.Array, inverse_Y: jax.Array, copies: int) -> jax.Array:
    """Row perm[i] // copies of x for every i: x's rows, each repeated `copies` times (Y = X x copies
    rows), put in the order of the permutation `perm` (whose inverse permutation is `inverse`). Its
    backward gathers with `inverse` and sums the copies; a plain gather's would scatter-add, slow on
    accelerators."""
    return x_XC[perm_Y // copies if copies > 1 else perm_Y]


def _take_rows_fwd(x_XC, perm_Y, inverse_Y, copies):
    return take_rows(x_XC, perm_Y, inverse_Y, copies), inverse_Y


def _take_rows_bwd(copies, inverse_Y, g_YC):
    g_XAC = g_YC[inverse_Y].reshape(-1, copies, g_YC.shape[-1])
    return g_XAC.sum(1) if copies > 1 else g_XAC[:, 0], None, None


take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


def dropless_experts(x_XC, expert_XA, gate_XA, w_gate_ECF, w_up_ECF, w_down_EFC, first_expert=None, *,
                     matmul=jax.lax.ragged_dot) -> jax.Array:
    """For each of X tokens t with A assignments: sum_a gate[t, a] * Expert_{expert[t, a]}(x[t]), over
    the experts whose weights are given: all of them (first_expert None), or experts first_expert ..
    first_expert + E - 1 of a larger set, the other assignments contributing 0. The assignments are
    sorted by expert (the others' last, outside every group), each expert's SwiGLU is a group of
    `ragged_dot` (group sizes: the experts' assignment counts), and the outputs return to assignment
    order."""
    (X, A), C, E = expert_XA.shape, x_XC.shape[-1], w_gate_ECF.shape[0]
    key_XA = expert_XA if first_expert is None else expert_XA - first_expert
    here_XA = (key_XA >= 0) & (key_XA < E)
    key_Y = jnp.where(here_XA, key_XA, E).reshape(X * A)  # Y: X x A, token x's a-th choice at x * A + a
    order_Y = jnp.argsort(key_Y, stable=True)  # sorted position -> assignment
    inverse_Y = jnp.argsort(order_Y)  # assignment -> sorted position
    sizes_E = (key_Y[:, None] == jnp.arange(E, dtype=key_Y.dtype)).sum(0, dtype=jnp.int32)
    xs_YC = take_rows(x_XC, order_Y, inverse_Y, A)
    ys_YC = grouped_swiglu(xs_YC, w_gate_ECF, w_up_ECF, w_down_EFC, sizes_E, matmul)
    y_XAC = take_rows(ys_YC, inverse_Y, order_Y, 1).reshape(X, A, C)
    if first_expert is not None:  # rows outside every group: not this device's experts
        y_XAC = jnp.where(here_XA[..., None], y_XAC, jnp.zeros((), y_XAC.dtype))
    return jnp.einsum("xac,xa->xc", y_XAC, gate_XA.astype(y_XAC.dtype))


def exchanged_experts(x_XC, expert_XA, gate_XA, w_gate_ECF, w_up_ECF, w_down_EFC, *, collective, matmul) -> jax.Array:
    """dropless_experts with expert parallelism, inside shard_map (tokens and experts split over the
    O devices of `expert`; the weights are this device's E experts, O x E in all): each device sorts
    its own assignments by expert and sends each expert's rows to the device that holds it
    (`collective`, a ragged all-to-all with one slice per expert); a device receives its expert e's
    rows from every sender, expert by expert and senders in axis order within each (so they arrive
    grouped), runs its experts as grouped matmuls on them, and sends the outputs back by the reverse
    exchange. The receive buffer holds the worst case, every device's every assignment (O x X x A
    rows); rows past the received ones are outside every group."""
    (X, A), C, E = expert_XA.shape, x_XC.shape[-1], w_gate_ECF.shape[0]
    O, me = jax.lax.axis_size("expert"), jax.lax.axis_index("expert")
    key_Y = expert_XA.reshape(X * A)
    order_Y = jnp.argsort(key_Y, stable=True)
    inverse_Y = jnp.argsort(order_Y)
    sizes_X = (key_Y[:, None] == jnp.arange(O * E, dtype=key_Y.dtype)).sum(0, dtype=jnp.int32)  # X: O x E experts
    sizes_OOE = jax.lax.all_gather(sizes_X, "expert").reshape(O, O, E)  # sender, receiver, the receiver's expert
    starts_OOE = (jnp.cumsum(sizes_OOE.reshape(O, O * E), axis=1).reshape(O, O, E)
                  - sizes_OOE)  # where each slice starts in its sender's sorted rows
    expert_starts_OE = jnp.cumsum(sizes_OOE.sum(0), axis=1) - sizes_OOE.sum(0)
    places_OOE = expert_starts_OE + jnp.cumsum(sizes_OOE, axis=0) - sizes_OOE  # where it lands on its receiver
    sent = lambda a_OOE: a_OOE[me].reshape(O * E)  # noqa: E731  (this device's slices, by receiver and expert)
    received = lambda a_OOE: a_OOE[:, me].reshape(O * E)  # noqa: E731  (the slices it receives, by sender and expert)
    xs_YC = take_rows(x_XC, order_Y, inverse_Y, A)
    # jax types a ragged all-to-all's result as its `output` argument: zeros that vary as the rows do
    # (invariant zeros would make the received rows' gradient a sum over the mesh)
    zeros = lambda rows: jax.lax.pcast(jnp.zeros((rows, C), xs_YC.dtype), tuple(sorted(varying_axes(xs_YC))),  # noqa: E731
                                       to="varying")
    received_YC = collective(xs_YC, zeros(O * X * A), sent(starts_OOE), sizes_X, sent(places_OOE),
                             received(sizes_OOE))
    out_YC = grouped_swiglu(received_YC, w_gate_ECF, w_up_ECF, w_down_EFC, sizes_OOE[:, me].sum(0), matmul)
    ys_YC = collective(out_YC, zeros(X * A), received(places_OOE), received(sizes_OOE), received(starts_OOE),
                       sizes_X)
    y_XAC = take_rows(ys_YC, inverse_Y, order_Y, 1).reshape(X, A, C)
    return jnp.einsum("xac,xa->xc", y_XAC, gate_XA.astype(y_XAC.dtype))


def grouped_swiglu(x_YC, w_gate_ECF, w_up_ECF, w_down_EFC, sizes_E, matmul) -> jax.Array:
    """Each expert's SwiGLU on its group of the rows (sizes_E of them, in expert order; rows past the
    groups give 0), with `matmul` a grouped matmul: jax.lax.ragged_dot or ragged_dot_tgmm."""
    hidden_YF = jax.nn.silu(matmul(x_YC, w_gate_ECF, sizes_E)) * matmul(x_YC, w_up_ECF, sizes_E)
    return matmul(hidden_YF, w_down_EFC, sizes_E)


def ragged_dot_tgmm(lhs, rhs, sizes_E, interpret=False) -> jax.Array:
    """jax.lax.ragged_dot(lhs, rhs, sizes_E) (lhs: rows x in, rhs: E x in x out; generic, so unsuffixed),
    with megablox's tgmm Pallas kernel for its weight gradient (TPU; `interpret`:
    Pallas's interpreter, for tests on CPU). XLA compiles ragged_dot's own weight gradient on TPU
    densely, every row against every expert; tgmm visits each expert's rows only. Inside shard_map,
    weights that vary over fewer mesh axes than the rows are cast to vary as they do (so the cast's
    transpose sums the weight gradient over those axes)."""
    missing = varying_axes(lhs) - varying_axes(rhs)
    if missing:
        rhs = jax.lax.pcast(rhs, tuple(sorted(missing)), to="varying")
    return _ragged_dot_tgmm(lhs, rhs, sizes_E, interpret)


def varying_axes(a: jax.Array) -> frozenset:
    """The mesh axes over which `a` differs from device to device (inside shard_map; else none)."""
    return jax.typeof(a).manual_axis_type.varying


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _ragged_dot_tgmm(lhs, rhs, sizes_E, interpret):
    return jax.lax.ragged_dot(lhs, rhs, sizes_E)


def _ragged_dot_tgmm_fwd(lhs, rhs, sizes_E, interpret):
    return _ragged_dot_tgmm(lhs, rhs, sizes_E, interpret), (lhs, rhs, sizes_E)


def _ragged_dot_tgmm_bwd(interpret, residuals, g_out):
    lhs, rhs, sizes_E = residuals
    rows = -(-lhs.shape[0] // TGMM_TILE) * TGMM_TILE  # tgmm takes whole row tiles; rows past the groups add nothing
    pad = lambda a: jnp.pad(a, ((0, rows - a.shape[0]), (0, 0)))  # noqa: E731
    # Inside shard_map, tgmm's pallas_call would have to declare how its output varies over the mesh,
    # and tgmm does not take that: it is traced without the check, and its output then declared to
    # vary as the weights do (each device's own experts).
    with jax_config._check_vma(False):
        g_rhs = megablox.tgmm(pad(lhs).T, pad(g_out), sizes_E, preferred_element_type=rhs.dtype,
                               tiling=(TGMM_TILE,) * 3, num_actual_groups=rhs.shape[0], interpret=interpret)
    if varying_axes(rhs):
        g_rhs = jax.lax.pcast(g_rhs, tuple(sorted(varying_axes(rhs))), to="varying")
    return jax.lax.ragged_dot(g_out, rhs.swapaxes(1, 2), sizes_E), g_rhs, None


_ragged_dot_tgmm.defvjp(_ragged_dot_tgmm_fwd, _ragged_dot_tgmm_bwd)
GROUPED_MATMULS = {"ragged_dot": jax.lax.ragged_dot, "megablox": ragged_dot_tgmm}


def choose_grouped_matmul(name: str, platform: str) -> str:
    """The grouped matmul `name` ('auto' or one of GROUPED_MATMULS) means on `platform`."""
    if name != "auto":
        return name
    return "megablox" if platform == "tpu" else "ragged_dot"


def ragged_all_to_all_by_gather(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes):
    """jax.lax.ragged_all_to_all over `expert` (same arguments and result), built from all_gather: XLA:CPU
    has no ragged all-to-all. Every device receives every device's rows and slice tables, and copies
    out the slices sent to it; recv_sizes is implied by them. (Arrays: rows Y, slices X.)"""
    O, me = jax.lax.axis_size("expert"), jax.lax.axis_index("expert")
    per_receiver = input_offsets.shape[0] // O
    rows_OYC = jax.lax.all_gather(operand, "expert")
    starts_OX, sizes_OX, places_OX = (jax.lax.dynamic_slice_in_dim(jax.lax.all_gather(table, "expert"),
                                                                   me * per_receiver, per_receiver, axis=1)
                                      for table in (input_offsets, send_sizes, output_offsets))
    starts_X, sizes_X, places_X = (a.reshape(O * per_receiver) for a in (starts_OX, sizes_OX, places_OX))
    row_Y = jnp.arange(output.shape[0], dtype=places_X.dtype)
    inside_YX = (row_Y[:, None] >= places_X) & (row_Y[:, None] < places_X + sizes_X)
    slice_Y = jnp.argmax(inside_YX, axis=1)
    source_Y = jnp.clip(starts_X[slice_Y] + row_Y - places_X[slice_Y], 0, operand.shape[0] - 1)
    received_YC = rows_OYC[slice_Y // per_receiver, source_Y]
    return jnp.where(inside_YX.any(1)[:, None], received_YC, output)


COLLECTIVES = {"ragged_all_to_all": functools.partial(jax.lax.ragged_all_to_all, axis_name="expert"),
               "all_gather": ragged_all_to_all_by_gather}


def choose_exchange(name: str, platform: str) -> str:
    """The expert exchange `name` ('auto' or one of COLLECTIVES) means on `platform`."""
    if name != "auto":
        return name
    return "all_gather" if platform == "cpu" else "ragged_all_to_all"


def check_platform(moe_config, platform: str) -> None:
    """A ragged all-to-all on CPU (XLA:CPU has none), or megablox off TPU, is refused in one line."""
    if platform == "cpu" and moe_config.exchange == "ragged_all_to_all":
        raise UserError("model.moe.exchange: 'ragged_all_to_all' runs on TPU and GPU only and this run's devices "
                        "are cpu; choose auto or all_gather")
    if platform != "tpu" and moe_config.grouped_matmul == "megablox":
        raise UserError(f"model.moe.grouped_matmul: 'megablox' runs on TPU only and this run's devices are "
                        f"{platform}; choose auto or ragged_dot")


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
