"""The model's compiled functions on one mesh: the training step, evaluation and the Amax trace.

`Experiment.train_step` is the whole update in one function. The train state is a plain dict
{step, params, opt} of arrays laid out by the mesh (`params` holds every model variable: the
parameters, and in an MoE model the router bias, which the step sets from the expert load); the
model's structure lives in a graphdef outside it, so the jitted step is a pure function of
(state, batch, hyperparameters): `experiment.hyper` holds the learning rate, schedule length and
the other numbers of optim.Hyperparameters, inputs rather than constants of the compiled step.
"""

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mhc_jax import sharding
from mhc_jax.data import pipeline
from mhc_jax.model import diagnostics, moe
from mhc_jax.model.transformer import Transformer, abstract_model, router_bias, with_router_bias
from mhc_jax.training import optim


class Experiment:
    """Everything one config builds on one mesh: the model, its shardings and the jitted functions."""

    def __init__(self, config, mesh):
        self.config, self.mesh = config, mesh
        t = config.train
        self.graphdef, abstract_params, sharded_params = abstract_model(config.model, mesh)
        self.optimizer_masks = optim.weight_decay_mask(abstract_params), optim.site_mask(abstract_params)
        self.optimizer = optim.make_optimizer(t, *self.optimizer_masks)
        self.hyper = optim.Hyperparameters.of(t)  # host numbers; the step takes them replicated
        self.param_shardings = jax.tree.map(lambda a: a.sharding, sharded_params)
        params_shape = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), sharded_params)
        opt_shape = jax.eval_shape(self.optimizer.init, params_shape)
        opt_shardings = optax.tree_map_params(self.optimizer, lambda _, s: s, opt_shape, self.param_shardings,
                                              transform_non_params=lambda _: sharding.replicated(mesh))
        self.state_shardings = {"step": sharding.replicated(mesh), "params": self.param_shardings, "opt": opt_shardings}
        state_shape = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params_shape, "opt": opt_shape}
        self.abstract_state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                           state_shape, self.state_shardings)
        self.replicated_fraction = sharding.replicated_fraction(params_shape, self.param_shardings)
        self.batch_sharding = sharding.batch_sharding(mesh)
        replicated = sharding.replicated(mesh)
        self.init_state = jax.jit(self._init_state, out_shardings=self.state_shardings)
        self.train_step = jax.jit(self.on_mesh(self._train_step),
                                  in_shardings=(self.state_shardings, self.batch_sharding, replicated),
                                  out_shardings=(self.state_shardings, replicated), donate_argnums=0)
        self.eval_step = jax.jit(self.on_mesh(self._eval_step), out_shardings=replicated)
        self.trace_step = jax.jit(self.on_mesh(self._trace_step), out_shardings=replicated)

    def on_mesh(self, step):
        """`step`, traced with this mesh in context, so that the model's activation sharding
        constraints (sharding.constrain) take effect inside the jitted function."""
        def traced(*args):
            with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh):
                return step(*args)
        return traced

    def trace(self, params, tokens_BT):
        """The model's logits and Trace (Transformer.trace)."""
        return nnx.merge(self.graphdef, params).trace(tokens_BT)

    def loss(self, params, tokens_BW):
        """Mean next-token cross-entropy of each sequence [B]; tokens are [B, seq_len + 1]."""
        return self.loss_and_router_stats(params, tokens_BW)[0]

    def loss_and_router_stats(self, params, tokens_BW):
        """The per-sequence losses and the MoE layers' RouterStats (None for a dense model)."""
        model = nnx.merge(self.graphdef, params)
        return model.losses_and_router_stats(tokens_BW, self.config.train.loss_chunk)

    def _init_state(self):
        model = Transformer(self.config.model, nnx.Rngs(self.config.train.seed))
        params = nnx.to_pure_dict(nnx.state(model))  # the parameters, and an MoE model's router bias
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt": self.optimizer.init(params)}

    def _train_step(self, state, tokens_BW, hyper: optim.Hyperparameters):
        """One AdamW update on a global batch, accumulated over `train.microbatches` parts; in an MoE
        model, then the router bias's balancing update from the load over the whole batch (the
        bias's gradient is zero, it only selects experts, and the step overwrites it)."""
        parts = self.config.train.microbatches
        balance_weight = self.config.model.moe.balance_loss_weight
        # Microbatch m takes rows m, m + parts, ...: each device keeps its rows in every part.
        tokens_MBW = tokens_BW.reshape(-1, parts, tokens_BW.shape[-1]).swapaxes(0, 1)

        def objective(params, tokens):
            losses_B, router_stats = self.loss_and_router_stats(params, tokens)
            balance = 0.0 if router_stats is None else router_stats.balance_loss.sum()
            return losses_B.mean() + balance_weight * balance, (losses_B.mean(), router_stats)

        def accumulate(totals, tokens):
            tokens = sharding.constrain(tokens, ("batch", None))
            (_, (loss, router_stats)), grads = jax.value_and_grad(objective, has_aux=True)(state["params"], tokens)
            return jax.tree.map(jnp.add, totals, (loss, grads, router_stats)), None

        _, (_, stats_shape) = jax.eval_shape(objective, state["params"], tokens_MBW[0])
        zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), (jnp.zeros(()), state["params"], stats_shape))
        (loss, grads, router_stats), _ = jax.lax.scan(accumulate, zeros, tokens_MBW)
        loss, grads = jax.tree.map(lambda x: x / parts, (loss, grads))
        optimizer = optim.make_optimizer(self.config.train, *self.optimizer_masks, hyper)
        updates, opt = optimizer.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
                   "lr": optim.learning_rate(state["step"], hyper)}
        if router_stats is not None:
            bias_LE = moe.balance_router_bias(router_bias(state["params"]), router_stats.load,
                                              self.config.model.moe.bias_update_rate)
            params = with_router_bias(params, bias_LE)
            metrics.update(moe.load_metrics(router_stats.load, bias_LE, router_stats.dropped))
            if balance_weight:
                metrics["balance_loss"] = router_stats.balance_loss.sum() / parts
        return {"step": state["step"] + 1, "params": params, "opt": opt}, metrics

    def _eval_step(self, params, tokens_BW, weight_B):
        return jnp.sum(self.loss(params, tokens_BW) * weight_B), jnp.sum(weight_B)

    def _trace_step(self, params, tokens_BW):
        _, trace = self.trace(params, tokens_BW[:, :-1])
        return {**diagnostics.amax_gain(trace.maps.res), "stream_rms": trace.stream_rms}

    def global_batch(self, local: dict) -> dict:
        return pipeline.global_batch(local, self.batch_sharding)

    def evaluate(self, params, eval_batches) -> float:
        total = count = 0.0
        for local in eval_batches:
            batch = self.global_batch(local)
            loss_sum, weight = jax.device_get(self.eval_step(params, batch["tokens"], batch["weight"]))
            total, count = total + loss_sum, count + weight
        return float(total / count)

    def diagnose(self, params, tokens) -> dict:
        """Stability metrics: composite and single-site Amax gains (max over sites), the worst column
        drift, and per-site lists for plots."""
        gains = jax.device_get(self.trace_step(params, tokens))
        return {
            "amax_forward": float(gains["composite_forward"].max()),
            "amax_backward": float(gains["composite_backward"].max()),
            "amax_forward_single": float(gains["single_forward"].max()),
            "amax_backward_single": float(gains["single_backward"].max()),
            "min_col_sum": float(gains["composite_min_col_sum"].min()),
            "max_abs_log_col_sum": float(gains["single_max_abs_log_col_sum"].max()),
            "amax_forward_per_site": gains["composite_forward"].round(6).tolist(),
            "amax_backward_per_site": gains["composite_backward"].round(6).tolist(),
            "stream_rms_per_site": gains["stream_rms"].round(6).tolist(),
        }
