"""DeepSeekMoE: V3 routing against a per-token transcription, capacity drops, the balancing bias,
and expert parallelism (8 CPU devices with expert = 4 and 8 against one device, every variant).
The parallel run's train.py end to end (resume, SIGTERM, eval.py) is in test_trainer.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

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


def test_dropless_routing_matches_a_per_token_transcription():
    layer = moe.MoE(moe_config(capacity_factor=0.0, routed_scale=2.5), out_std=1.0, rngs=nnx.Rngs(0))
    layer.router_bias[...] = jnp.linspace(-0.3, 0.3, 8)  # the bias changes which experts are chosen
    x_BTC = jax.random.normal(jax.random.PRNGKey(1), (2, 12, 64))
    y_BTC, stats = layer(x_BTC)
    for b in range(2):
        np.testing.assert_allclose(y_BTC[b], reference_moe(layer, np.asarray(x_BTC[b])), rtol=2e-4, atol=2e-5)
    assert float(stats.dropped) == 0 and float(stats.load.sum()) == 2 * 12 * 2
    layer.router_bias[...] = jnp.zeros(8).at[3].set(100.0)  # a bias this large puts expert 3 in every top-k
    assert float(layer(x_BTC)[1].load[3]) == 2 * 12


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


def test_capacity_drops_the_latest_tokens_of_an_overloaded_expert():
    layer = moe.MoE(moe_config(capacity_factor=1.0), out_std=1.0, rngs=nnx.Rngs(0))
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
    config.model.moe.update(bias_update_rate=0.05, capacity_factor=0.0, balance_loss_weight=1e-4)
    experiment = Experiment(config, mesh_of((1, 1, 1, 1)))
    state = experiment.init_state()
    router = state["params"]["moe_blocks"]["mlp"]["router"]
    state["params"]["moe_blocks"]["mlp"]["router"] = router.at[:, :, :2].add(0.5)  # experts 0 and 1 favoured
    tokens = np.random.default_rng(0).integers(0, 512, (8, 65), dtype=np.int32)
    loads = []
    for _ in range(10):
        state, metrics = experiment.train_step(state, tokens)
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


@pytest.mark.slow
def test_expert_parallelism_gives_the_loss_and_gradients_of_one_device():
    """The same parameters and batch on one device and on 8 with expert = 4 (x fsdp = 2) and = 8. The
    expert dispatch sees [B, T, C] whatever the residual connection; mhc's four streams stand for all."""
    config = get_config("mhc,moe_debug")
    tokens = np.random.default_rng(0).integers(0, 512, (8, 65), dtype=np.int32)
    params = jax.device_get(Experiment(config, mesh_of((1, 1, 1, 1))).init_state()["params"])
    results = []
    for sizes in ((1, 1, 1, 1), (1, 2, 4, 1), (1, 1, 8, 1)):
        experiment = Experiment(config, mesh_of(sizes))
        expert_weights = experiment.param_shardings["moe_blocks"]["mlp"]["w_up"]  # [layers, experts, embed, mlp]
        assert expert_weights.spec[1] == ("expert" if sizes[2] > 1 else None)
        grad_fn = jax.jit(jax.value_and_grad(lambda p, t: experiment.loss(p, t).mean()),
                          in_shardings=(experiment.param_shardings, experiment.batch_sharding))
        with jax.set_mesh(experiment.mesh):
            results.append(jax.device_get(grad_fn(jax.device_put(params, experiment.param_shardings), tokens)))
    (loss, grads), sharded = results[0], results[1:]
    for sharded_loss, sharded_grads in sharded:
        assert float(sharded_loss) == pytest.approx(float(loss), rel=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-6), sharded_grads, grads)


def dispatch_all_to_alls(mesh_sizes) -> int:
    """All-to-all ops of the dispatch's token gather in the compiled train step of moe_debug."""
    experiment = Experiment(get_config("mhc,moe_debug"), mesh_of(mesh_sizes))
    tokens = jax.ShapeDtypeStruct((8, 65), jnp.int32, sharding=experiment.batch_sharding)
    hlo = experiment.train_step.lower(experiment.abstract_state, tokens).compile().as_text()
    return sum(" all-to-all(" in line and "take_along_axis" in line for line in hlo.splitlines())


@pytest.mark.slow
def test_tokens_reach_their_experts_by_all_to_all():
    assert dispatch_all_to_alls((1, 2, 4, 1)) > 0
    assert dispatch_all_to_alls((1, 8, 1, 1)) == 0  # without an expert axis every device has every expert


def test_an_expert_axis_must_divide_the_experts():
    config = get_config("mhc,moe_debug")
    config.mesh.update(expert=3, fsdp=1)
    with pytest.raises(UserError, match="mesh.expert: 3 does not divide model.moe.n_experts=8"):
        trainer.check_mesh(config, mesh_of((1, 1, 3, 1)))
