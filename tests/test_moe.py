"""DeepSeekMoE: V3 routing against a per-token transcription (both dispatches), capacity drops,
dropless dispatch against capacity without drops and a gradient without scatter, the balancing bias,
and expert parallelism against one device (8 CPU devices: the model with expert = 4 for every
variant and data = expert = tensor = 2; the layer alone with expert = 4, 8 and tensor = 2). The
parallel run's train.py end to end (resume, SIGTERM, eval.py) is in test_trainer_moe.py."""

import functools
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import assert_user_error, relative_error

from configs.pretrain import get_config
from mhc_jax import sharding
from mhc_jax.errors import UserError
from mhc_jax.model import moe
from mhc_jax.model.transformer import router_bias, with_router_bias
from mhc_jax.training import trainer
from mhc_jax.training.experiment import Experiment


def moe_config(**overrides):
    cfg = get_config("residual,moe_debug").model
    cfg.moe.update(overrides)
    return cfg


def reference_moe(layer: moe.MoE, x_TC: np.ndarray) -> np.ndarray:
    """V3 routing token by token: top-k on sigmoid + bias, gates = chosen affinities renormalized."""
    c = layer.config
    router, bias = np.asarray(layer.router[...]), np.asarray(layer.router_bias[...])
    gate_w, up_w, down_w = (np.asarray(w[...]) for w in (layer.w_gate, layer.w_up, layer.w_down))
    silu = lambda v: v / (1 + np.exp(-v))
    out = []
    for x_C in x_TC:
        scores = 1 / (1 + np.exp(-(x_C @ router)))
        chosen = np.argsort(-(scores + bias), kind="stable")[:c.top_k]
        gates = c.routed_scale * scores[chosen] / scores[chosen].sum()
        y = sum(g * (silu(x_C @ gate_w[e]) * (x_C @ up_w[e])) @ down_w[e] for g, e in zip(gates, chosen))
        out.append(y + np.asarray(layer.shared(jnp.asarray(x_C[None, None])))[0, 0])
    return np.stack(out)


@pytest.mark.parametrize("dispatch, capacity_factor", [("dropless", 1.25), ("capacity", 0.0)])
def test_dropless_routing_matches_a_per_token_transcription(dispatch, capacity_factor):
    """Every token through its top-k experts: the dropless dispatch (which ignores capacity_factor),
    and the capacity dispatch with capacity T."""
    layer = moe.MoE(moe_config(dispatch=dispatch, capacity_factor=capacity_factor, routed_scale=2.5), out_std=1.0,
                    rngs=nnx.Rngs(0))
    layer.router_bias[...] = jnp.linspace(-0.3, 0.3, 8)  # the bias changes which experts are chosen
    x_BTC = jax.random.normal(jax.random.PRNGKey(1), (2, 12, 64))
    graphdef, _ = nnx.split(layer)
    forward = jax.jit(lambda state, x_BTC: nnx.merge(graphdef, state)(x_BTC))
    y_BTC, stats = forward(nnx.state(layer), x_BTC)
    for b in range(2):
        np.testing.assert_allclose(y_BTC[b], reference_moe(layer, np.asarray(x_BTC[b])), rtol=2e-4, atol=2e-5)
    assert float(stats.dropped) == 0 and float(stats.load.sum()) == 2 * 12 * 2
    layer.router_bias[...] = jnp.zeros(8).at[3].set(100.0)  # a bias this large puts expert 3 in every top-k
    assert float(forward(nnx.state(layer), x_BTC)[1].load[3]) == 2 * 12


def test_sequence_balance_loss_is_v3s_formula():
    """V3's L_bal per sequence: sum_i f_i P_i, f_i = E / (k T) * (tokens choosing i), P_i = mean over
    tokens of the affinity normalized over all experts; then the mean over sequences."""
    layer = moe.MoE(moe_config(), out_std=1.0, rngs=nnx.Rngs(0))
    x_BTC = jax.random.normal(jax.random.PRNGKey(3), (3, 10, 64))
    _, stats = layer(x_BTC)
    scores = 1 / (1 + np.exp(-(np.asarray(x_BTC) @ np.asarray(layer.router[...]))))
    chosen = np.argsort(-scores, axis=-1)[..., :2]
    expected = []
    for b in range(3):
        f = 8 / (2 * 10) * np.bincount(chosen[b].ravel(), minlength=8)
        p = (scores[b] / scores[b].sum(-1, keepdims=True)).mean(0)
        expected.append((f * p).sum())
    assert float(stats.balance_loss) == pytest.approx(np.mean(expected), rel=1e-5)


def layer_loss_and_grads(layer: moe.MoE, x_BTC: jax.Array):
    """A scalar of the layer's output and router statistics with (output, statistics), its gradients
    (parameters, input), and the compiled text of the gradient."""
    graphdef, state = nnx.split(layer)

    def loss(state, x_BTC):
        y_BTC, stats = nnx.merge(graphdef, state)(x_BTC)
        return jnp.sum(jnp.sin(y_BTC)) + stats.balance_loss, (y_BTC, stats)

    grad_fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    compiled = grad_fn.lower(state, x_BTC).compile()
    return *compiled(state, x_BTC), compiled.as_text()


@pytest.fixture(scope="module")
def without_drops():
    """Each dispatch's layer_loss_and_grads with capacity_factor = E / k, which makes the capacity T."""
    x_BTC = jax.random.normal(jax.random.PRNGKey(2), (3, 16, 64))
    results = {}
    for dispatch in moe.DISPATCHES:
        layer = moe.MoE(moe_config(dispatch=dispatch, capacity_factor=4.0), out_std=1.0, rngs=nnx.Rngs(0))
        layer.router_bias[...] = jnp.linspace(-0.2, 0.2, 8)
        results[dispatch] = layer_loss_and_grads(layer, x_BTC)
    return results


def test_capacity_that_drops_nothing_equals_dropless_in_values_and_gradients(without_drops):
    """Both dispatches compute the same sum; only the order of additions in the weight gradients differs."""
    ((loss, (y, stats)), grads, _), ((loss_capacity, (y_capacity, stats_capacity)), grads_capacity, _) = (
        without_drops["dropless"], without_drops["capacity"])
    for s in (stats, stats_capacity):
        assert float(s.dropped) == 0 and float(s.load.sum()) == 3 * 16 * 2
    np.testing.assert_allclose(y, y_capacity, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(stats.load, stats_capacity.load)
    assert float(stats.balance_loss) == pytest.approx(float(stats_capacity.balance_loss), rel=1e-6)
    assert float(loss) == pytest.approx(float(loss_capacity), rel=1e-6)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(grads_capacity)):
        if np.any(b):  # the router bias only selects: its gradient is 0 in both
            assert relative_error(a, b) < 1e-6, jax.tree_util.keystr(path)


def test_the_dropless_gradient_gathers_and_never_scatters(without_drops):
    """The sort and unsort are gathers whose backward gathers with the inverse permutation, and the
    gates are read without take_along_axis (whose transpose scatter-adds): no scatter in the compiled
    gradient of the dropless layer; the capacity dispatch, for contrast, scatters."""
    dropless, capacity = without_drops["dropless"][2], without_drops["capacity"][2]
    assert hlo_ops(dropless, "scatter") == 0 and hlo_ops(dropless, "gather") > 0
    assert hlo_ops(capacity, "scatter") > 0


IN_MOE_SHARD_MAP = r"moe\)*/shard_map/"  # an op_name under the MoE's scope and its shard_map (jvp(moe)/... too)


def hlo_ops(hlo: str, opcode: str, scope: str = "") -> int:
    """Instructions with this opcode in compiled HLO text (whose line matches the regex `scope`)."""
    return sum(bool(re.search(rf"= \S+ {opcode}\(", line) and re.search(scope, line)) for line in hlo.splitlines())


def test_capacity_drops_the_latest_tokens_of_an_overloaded_expert():
    layer = moe.MoE(moe_config(dispatch="capacity", capacity_factor=1.0), out_std=1.0, rngs=nnx.Rngs(0))
    layer.router_bias[...] = jnp.zeros(8).at[jnp.array([0, 1])].set(100.0)  # every token picks experts 0, 1
    x_BTC = jax.random.normal(jax.random.PRNGKey(1), (1, 16, 64))
    capacity = moe.capacity(layer.config, 16)  # ceil(1.0 * 16 * 2 / 8) = 4
    y_BTC, stats = layer(x_BTC)
    assert capacity == 4 and float(stats.dropped) == 2 * (16 - capacity)
    shared_only = layer.shared(x_BTC)
    kept = ~np.isclose(np.asarray(y_BTC), np.asarray(shared_only)).all(-1)[0]
    assert kept.tolist() == [True] * capacity + [False] * (16 - capacity)  # first come, first served


@pytest.mark.slow
def test_the_bias_update_moves_load_from_overloaded_experts():
    """A model whose router sends most tokens to two experts: train steps with lr = 0 move only the
    bias, and the busiest expert's load over the mean falls until it hovers near balance."""
    config = get_config("mhc,moe_debug")
    config.train.update(lr=0.0, steps=10)
    config.model.moe.update(bias_update_rate=0.05, balance_loss_weight=1e-4)
    experiment = Experiment(config, mesh_of((1, 1, 1, 1)))
    state = experiment.init_state()
    router = state["params"]["moe_blocks"]["mlp"]["router"]
    state["params"]["moe_blocks"]["mlp"]["router"] = router.at[:, :, :2].add(0.5)  # experts 0 and 1 favoured
    tokens = np.random.default_rng(0).integers(0, 512, (8, 65), dtype=np.int32)
    loads = []
    for _ in range(10):
        state, metrics = experiment.train_step(state, tokens, experiment.hyper)
        loads.append(float(metrics["expert_load_max"]))
    assert loads[0] > 2.5 and max(loads[-3:]) < 1.5, loads  # sign steps then hover near balance
    assert all(later < earlier for earlier, later in zip(loads[:4], loads[1:4])), loads
    assert metrics["balance_loss"] > 0  # the optional V3 balance loss is reported once weighted in
    bias = np.asarray(router_bias(state["params"]))
    assert (bias[:, :2] < 0).all() and float(metrics["router_bias_min"]) == pytest.approx(bias.min())


def test_balance_router_bias_is_sign_of_load_deficit():
    load_LE = jnp.array([[4.0, 2.0, 0.0, 2.0]])
    np.testing.assert_allclose(moe.balance_router_bias(jnp.zeros((1, 4)), load_LE, 0.1), [[-0.1, 0.0, 0.1, 0.0]])
    params = {"moe_blocks": {"mlp": {"router_bias": jnp.zeros((1, 4)), "router": 1}}, "embed": 2}
    updated = with_router_bias(params, jnp.ones((1, 4)))
    assert float(router_bias(updated).sum()) == 4 and updated["embed"] == 2 and float(router_bias(params).sum()) == 0


def mesh_of(sizes):
    devices = jax.devices()[:int(np.prod(sizes))]
    return jax.make_mesh(sizes, sharding.MESH_AXES, devices=devices, axis_types=(jax.sharding.AxisType.Auto,) * 4)


@pytest.mark.parametrize("sizes, batch, exchanged", [((1, 2, 4, 1), 8, True), ((1, 1, 8, 1), 8, True),
                                                    ((1, 2, 4, 1), 3, False), ((1, 1, 4, 2), 4, True)])
def test_a_dropless_layer_on_a_mesh_computes_what_it_does_on_one_device(sizes, batch, exchanged):
    """The layer alone, its output and input gradient: assignments exchanged with their experts'
    devices and back (the batch splits over fsdp x expert), also with one expert and one sequence per
    device; every device holding every token and a psum over `expert` (batch 3 splits over nothing);
    and the expert width split over `tensor`."""
    layer = moe.MoE(moe_config(), out_std=1.0, rngs=nnx.Rngs(0))
    layer.router_bias[...] = jnp.linspace(-0.2, 0.2, 8)
    graphdef, state = nnx.split(layer)
    x_BTC = jax.random.normal(jax.random.PRNGKey(4), (batch, 16, 64))

    def output_and_input_gradient(state, x_BTC):
        def total(x_BTC):
            y_BTC, _ = nnx.merge(graphdef, state)(x_BTC)
            return jnp.sum(jnp.sin(y_BTC)), y_BTC
        return jax.grad(total, has_aux=True)(x_BTC)[::-1]

    expected = jax.jit(output_and_input_gradient)(state, x_BTC)
    with jax.set_mesh(mesh_of(sizes)):
        step = jax.jit(output_and_input_gradient)
        hlo = step.lower(state, x_BTC).compile().as_text()
        results = step(state, x_BTC)
    for result, reference in zip(results, expected):
        np.testing.assert_allclose(result, reference, rtol=1e-5, atol=1e-5)
    assert (hlo_ops(hlo, "all-gather", IN_MOE_SHARD_MAP) > 0) == exchanged  # the exchange, all_gather on CPU


def ragged_all_to_all_transcription(operands, outputs, input_offsets, send_sizes, output_offsets):
    """jax.lax.ragged_all_to_all as its documentation states it, device by device in NumPy: slice i of
    sender s (rows input_offsets[s, i] onward, send_sizes[s, i] of them) goes to device i // slices
    per device, at row output_offsets[s, i] of its output."""
    results = [o.copy() for o in outputs]
    n, N = input_offsets.shape
    for s in range(n):
        for i in range(N):
            start, size, place = input_offsets[s, i], send_sizes[s, i], output_offsets[s, i]
            results[i // (N // n)][place:place + size] = operands[s][start:start + size]
    return np.stack(results)


def test_the_all_gather_exchange_is_ragged_all_to_all():
    """ragged_all_to_all_by_gather (the exchange CPU meshes run) against the documented semantics, on
    4 devices with 2 slices per device pair, gaps between the slices and a nonzero output (rows
    nothing lands on keep it)."""
    n, per, rows = 4, 2, 18  # a receiver gets at most 8 slices of 2 rows, after row 0
    rng = np.random.default_rng(0)
    send_sizes = rng.integers(0, 3, (n, n * per)).astype(np.int32)
    input_offsets = np.cumsum(send_sizes + 1, axis=1) - send_sizes - 1  # a row of gap before each slice
    per_receiver = send_sizes.reshape(n, n, per).transpose(1, 0, 2).reshape(n, n * per)  # receiver, (sender, slice)
    places = (np.cumsum(per_receiver, axis=1) - per_receiver + 1).reshape(n, n, per).transpose(1, 0, 2)
    output_offsets = places.reshape(n, n * per).astype(np.int32)  # received slices packed after row 0
    operands = rng.normal(size=(n, 3 * n * per, 3)).astype(np.float32)
    outputs = rng.normal(size=(n, rows, 3)).astype(np.float32)
    recv_sizes = per_receiver.astype(np.int32)
    exchange = jax.shard_map(lambda *a: moe.ragged_all_to_all_by_gather(*(x[0] for x in a))[None],
                             mesh=jax.make_mesh((n,), ("expert",), devices=jax.devices()[:n],
                                                            axis_types=(jax.sharding.AxisType.Auto,)),
                             in_specs=jax.sharding.PartitionSpec("expert"), out_specs=jax.sharding.PartitionSpec("expert"))
    result = jax.jit(exchange)(operands, outputs, input_offsets.astype(np.int32), send_sizes, output_offsets, recv_sizes)
    expected = ragged_all_to_all_transcription(operands, outputs, input_offsets, send_sizes, output_offsets)
    assert not np.array_equal(expected, outputs)
    np.testing.assert_array_equal(np.asarray(result), expected)


def evaluate_with_gathered_exchange(jaxpr, consts, *args) -> list:
    """Evaluates a jaxpr as jax.core.eval_jaxpr does, except that every ragged_all_to_all (which
    XLA:CPU cannot compile), in shard_map bodies and nested jits too, is computed by
    moe.ragged_all_to_all_by_gather."""
    env = dict(zip(jaxpr.constvars, consts)) | dict(zip(jaxpr.invars, args))
    read = lambda v: v.val if isinstance(v, jax.extend.core.Literal) else env[v]  # noqa: E731
    for eqn in jaxpr.eqns:
        inputs, params = [read(v) for v in eqn.invars], eqn.params
        if eqn.primitive.name == "ragged_all_to_all":
            assert params["axis_name"] == ("expert",)
            outputs = [moe.ragged_all_to_all_by_gather(*inputs)]
        elif eqn.primitive.name == "shard_map":
            body = functools.partial(evaluate_with_gathered_exchange, params["jaxpr"], ())
            outputs = jax.shard_map(body, mesh=params["mesh"], in_specs=params["in_specs"],
                                    out_specs=list(params["out_specs"]), check_vma=params["check_vma"],
                                    axis_names=set(params["newly_manual_axes"]))(*inputs)
        elif eqn.primitive.name == "jit":
            outputs = evaluate_with_gathered_exchange(params["jaxpr"].jaxpr, params["jaxpr"].consts, *inputs)
        else:
            with eqn.ctx.manager:
                outputs = eqn.primitive.bind(*inputs, **eqn.primitive.get_bind_params(params))
            outputs = outputs if eqn.primitive.multiple_results else [outputs]
        env.update(zip(eqn.outvars, outputs))
    return [read(v) for v in jaxpr.outvars]


def test_the_ragged_all_to_all_exchange_gives_one_devices_loss_and_gradients():
    """exchange='ragged_all_to_all' (what TPU and GPU run) on 8 CPU devices, fsdp = 2 x expert = 4:
    its gradient traced as jax writes it (the exchange's transpose by jax's rule), then evaluated
    with each ragged_all_to_all computed by the all_gather exchange, equals one device's, weights
    included."""
    layer = moe.MoE(moe_config(exchange="ragged_all_to_all"), out_std=1.0, rngs=nnx.Rngs(0))
    layer.router_bias[...] = jnp.linspace(-0.2, 0.2, 8)
    graphdef, state = nnx.split(layer)
    x_BTC = jax.random.normal(jax.random.PRNGKey(4), (8, 16, 64))
    loss_and_grads = jax.value_and_grad(lambda state, x: jnp.sum(jnp.sin(nnx.merge(graphdef, state)(x)[0])),
                                        argnums=(0, 1))
    expected = jax.tree.leaves(jax.jit(loss_and_grads)(state, x_BTC))
    with jax.set_mesh(mesh_of((1, 2, 4, 1))):
        traced = jax.make_jaxpr(loss_and_grads)(state, x_BTC)
        assert "ragged_all_to_all" in str(traced)
        results = jax.jit(functools.partial(evaluate_with_gathered_exchange, traced.jaxpr, traced.consts))(
            *jax.tree.leaves((state, x_BTC)))
    assert len(results) == len(expected) == 10
    for result, reference in zip(results, expected):
        np.testing.assert_allclose(result, reference, rtol=1e-5, atol=5e-5)


@pytest.mark.parametrize("experts_split", [True, False])
def test_the_megablox_weight_gradient_is_ragged_dots(experts_split):
    """ragged_dot_tgmm (tgmm in Pallas's interpreter) against jax.lax.ragged_dot, value and both
    gradients, inside shard_map over 4 devices with 200 rows each (not whole tiles), an empty group
    and rows past the groups: each device holding its own 3 experts (the weight gradient varies over
    `expert`), or every device the same 3 (the weight gradient is the sum over devices)."""
    n, R, K, N, E = 4, 200, 64, 96, 3
    rng = np.random.default_rng(1)
    x = rng.normal(size=(n * R, K)).astype(np.float32)
    w = rng.normal(size=((n if experts_split else 1) * E, K, N)).astype(np.float32)
    sizes = np.array([[60, 0, 100], [200, 0, 0], [1, 2, 3], [0, 0, 150]], np.int32)
    mesh = jax.make_mesh((n,), ("expert",), devices=jax.devices()[:n], axis_types=(jax.sharding.AxisType.Auto,))

    def value_and_grads(matmul):
        def total(x, w, sizes):
            return jax.lax.psum(jnp.sum(jnp.sin(matmul(x, w, sizes[0]))), "expert")
        split = jax.sharding.PartitionSpec("expert")
        w_spec = split if experts_split else jax.sharding.PartitionSpec()
        run = jax.shard_map(jax.value_and_grad(total, argnums=(0, 1)), mesh=mesh, in_specs=(split, w_spec, split),
                            out_specs=(jax.sharding.PartitionSpec(), (split, w_spec)))
        return jax.jit(run)(x, w, sizes)

    expected = value_and_grads(jax.lax.ragged_dot)
    result = value_and_grads(lambda x, w, sizes: moe.ragged_dot_tgmm(x, w, sizes, True))
    empty_groups = (np.abs(np.asarray(expected[1][1])).max((1, 2)) == 0).sum()
    assert empty_groups == (5 if experts_split else 0)  # the experts without rows on their device
    for got, want in zip(jax.tree.leaves(result), jax.tree.leaves(expected)):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_an_exchange_or_grouped_matmul_the_devices_cannot_run_is_refused_in_one_line():
    config = get_config("mhc,moe_debug")
    config.model.moe.exchange = "ragged_all_to_all"
    config.mesh.update(expert=2, fsdp=1)
    with pytest.raises(UserError, match="^model.moe.exchange: 'ragged_all_to_all' runs on TPU and GPU only and this "
                                        "run's devices are cpu; choose auto or all_gather$"):
        trainer.check_mesh(config, mesh_of((1, 1, 2, 1)))
    config.model.moe.update(exchange="auto", grouped_matmul="megablox")
    with pytest.raises(UserError, match="^model.moe.grouped_matmul: 'megablox' runs on TPU only and this run's devices "
                                        "are cpu; choose auto or ragged_dot$"):
        trainer.check_mesh(config, mesh_of((1, 1, 2, 1)))
    assert moe.choose_grouped_matmul("auto", "tpu") == "megablox"
    assert moe.choose_grouped_matmul("auto", "gpu") == moe.choose_grouped_matmul("auto", "cpu") == "ragged_dot"
    assert moe.choose_exchange("auto", "cpu") == "all_gather"
    assert moe.choose_exchange("auto", "tpu") == moe.choose_exchange("auto", "gpu") == "ragged_all_to_all"


# Meshes (data x fsdp x expert x tensor) beside one device: expert = 4 (x fsdp = 2), and data = expert =
# tensor = 2 (expert = 8: the layer alone, above).
EXPERT_MESHES = ((1, 2, 4, 1), (2, 1, 2, 2))


def loss_and_grads_on(config, sizes, params, tokens):
    """The mean loss and its gradients on a mesh of these sizes, and the compiled text."""
    experiment = Experiment(config, mesh_of(sizes))
    expert_weights = experiment.param_shardings["moe_blocks"]["mlp"]["w_up"]  # [layers, experts, embed, mlp]
    assert expert_weights.spec[1] == ("expert" if sizes[2] > 1 else None)
    grad_fn = jax.jit(jax.value_and_grad(lambda p, t: experiment.loss(p, t).mean()),
                      in_shardings=(experiment.param_shardings, experiment.batch_sharding))
    with jax.set_mesh(experiment.mesh):
        params = jax.device_put(params, experiment.param_shardings)
        compiled = grad_fn.lower(params, tokens).compile()
        return *jax.device_get(compiled(params, tokens)), compiled.as_text()


@pytest.mark.slow
def test_expert_parallelism_gives_the_loss_and_gradients_of_one_device():
    """The same parameters and batch on one device and on 8, in the mhc model (its n streams pass the
    MoE layer like any other input). Gradients: the whole gradient, and every
    leaf above a thousandth of its norm, within 1e-5 relative (the leaves below, HC's static_alpha_m,
    are float cancellation, tiny on any mesh). Dropless expert parallelism on CPU exchanges rows by
    all_gather (its backward reduce-scatters), with no all-to-all."""
    tokens = np.random.default_rng(0).integers(0, 512, (8, 65), dtype=np.int32)
    config = get_config("mhc,moe_debug")
    assert config.model.moe.dispatch == "dropless"
    params = jax.device_get(Experiment(config, mesh_of((1, 1, 1, 1))).init_state()["params"])
    loss, grads, _ = loss_and_grads_on(config, (1, 1, 1, 1), params, tokens)
    norm = np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(grads)))
    for sizes in EXPERT_MESHES:
        sharded_loss, sharded_grads, hlo = loss_and_grads_on(config, sizes, params, tokens)
        assert float(sharded_loss) == pytest.approx(float(loss), rel=1e-5), sizes
        errors = [np.linalg.norm(a - b) for a, b in zip(jax.tree.leaves(sharded_grads), jax.tree.leaves(grads))]
        assert np.sqrt(np.sum(np.square(errors))) < 1e-5 * norm, sizes
        for (path, b), error in zip(jax.tree_util.tree_flatten_with_path(grads)[0], errors):
            if np.linalg.norm(b) > 1e-3 * norm:
                assert error < 1e-5 * np.linalg.norm(b), (sizes, jax.tree_util.keystr(path))
        assert hlo_ops(hlo, "all-gather", IN_MOE_SHARD_MAP) > 0, sizes
        assert hlo_ops(hlo, "reduce-scatter", IN_MOE_SHARD_MAP) > 0, sizes
        assert hlo_ops(hlo, "all-to-all") == 0, sizes


def dispatch_all_to_alls(mesh_sizes) -> int:
    """All-to-all ops of the capacity dispatch's token gather in the compiled train step of moe_debug."""
    config = get_config("mhc,moe_debug")
    config.model.moe.dispatch = "capacity"
    experiment = Experiment(config, mesh_of(mesh_sizes))
    tokens = jax.ShapeDtypeStruct((8, 65), jnp.int32, sharding=experiment.batch_sharding)
    hlo = experiment.train_step.lower(experiment.abstract_state, tokens, experiment.hyper).compile().as_text()
    return sum(" all-to-all(" in line and "take_along_axis" in line for line in hlo.splitlines())


@pytest.mark.slow
def test_tokens_reach_their_experts_by_all_to_all():
    assert dispatch_all_to_alls((1, 2, 4, 1)) > 0


@pytest.mark.slow
@pytest.mark.parametrize("override, line", [
    ("--config.model.moe.dispatch=sorted", "model.moe.dispatch: got 'sorted'; must be one of dropless, capacity"),
    ("--config.mesh.expert=3", "mesh.expert: got 3; must divide model.moe.n_experts = 8"),
])
def test_a_bad_dispatch_or_expert_axis_is_one_line_naming_the_field(override, line):
    result = subprocess.run([sys.executable, "scripts/count_params.py", "--config=configs/pretrain.py:mhc,moe_debug",
                             override], cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=300)
    assert_user_error(result, line)


def test_an_expert_axis_must_divide_the_experts():
    config = get_config("mhc,moe_debug")
    config.mesh.update(expert=3, fsdp=1)
    with pytest.raises(UserError, match="mesh.expert: 3 does not divide model.moe.n_experts=8"):
        trainer.check_mesh(config, mesh_of((1, 1, 3, 1)))
