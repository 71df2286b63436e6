"""The training loop: set up the mesh, data and model, init or restore, run the jitted step, evaluate,
measure stability, checkpoint, and stop cleanly when preempted.

`Experiment.train_step` is the whole update in one function. The train state is a plain dict
{step, params, opt} of arrays laid out by the mesh (`params` holds every model variable: the
parameters, and in an MoE model the router bias, which the step sets from the expert load); the
model's structure lives in a graphdef outside it, so the jitted step is a pure function of
(state, batch).
"""

import json
import os
import signal
import sys
import time
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils

from mhc_jax import checkpoint, data, diagnostics, moe, optim, plots, prepare, residual, sharding, workdirs
from mhc_jax import logging as runlog
from mhc_jax.errors import UserError
from mhc_jax.model import Transformer, abstract_model, router_bias, with_router_bias

DEFAULT_DATA_DIR = "data/default"  # prepared with the default recipe when it is missing
COMPILE_ONLY_FIELDS = ("dtype", "remat", "scan_layers", "site_impl")  # model fields a resumed run may change


class TrainingDiverged(Exception):
    """The loss or the gradient norm stopped being finite."""


class Experiment:
    """Everything one config builds on one mesh: the model, its shardings and the jitted functions."""

    def __init__(self, config, mesh):
        self.config, self.mesh = config, mesh
        t = config.train
        self.graphdef, abstract_params, sharded_params = abstract_model(config.model, mesh)
        self.optimizer = optim.make_optimizer(t, optim.weight_decay_mask(abstract_params))
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
        self.train_step = jax.jit(self.on_mesh(self._train_step), in_shardings=(self.state_shardings, self.batch_sharding),
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

    def apply(self, params, tokens_BT, **kwargs):
        return nnx.merge(self.graphdef, params)(tokens_BT, **kwargs)

    def loss(self, params, tokens_BS):
        """Mean next-token cross-entropy of each sequence [B]; tokens are [B, seq_len + 1]."""
        return self.loss_and_router_stats(params, tokens_BS)[0]

    def loss_and_router_stats(self, params, tokens_BS):
        """The per-sequence losses and the MoE layers' RouterStats (None for a dense model)."""
        logits_BTV, router_stats = nnx.merge(self.graphdef, params).logits_and_router_stats(tokens_BS[:, :-1])
        losses_B = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, tokens_BS[:, 1:]).mean(axis=-1)
        return losses_B, router_stats

    def _init_state(self):
        model = Transformer(self.config.model, nnx.Rngs(self.config.train.seed))
        params = nnx.to_pure_dict(nnx.state(model))  # the parameters, and an MoE model's router bias
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt": self.optimizer.init(params)}

    def _train_step(self, state, tokens_BS):
        """One AdamW update on a global batch, accumulated over `train.microbatches` parts; in an MoE
        model, then the router bias's balancing update from the load over the whole batch (the
        bias's gradient is zero, it only selects experts, and the step overwrites it)."""
        parts = self.config.train.microbatches
        balance_weight = self.config.model.moe.balance_loss_weight
        # Microbatch m takes rows m, m + parts, ...: each device keeps its rows in every part.
        tokens_MBS = tokens_BS.reshape(-1, parts, tokens_BS.shape[-1]).swapaxes(0, 1)

        def objective(params, tokens):
            losses_B, router_stats = self.loss_and_router_stats(params, tokens)
            balance = 0.0 if router_stats is None else router_stats.balance_loss.sum()
            return losses_B.mean() + balance_weight * balance, (losses_B.mean(), router_stats)

        def accumulate(totals, tokens):
            tokens = sharding.constrain(tokens, ("batch", None))
            (_, (loss, router_stats)), grads = jax.value_and_grad(objective, has_aux=True)(state["params"], tokens)
            return jax.tree.map(jnp.add, totals, (loss, grads, router_stats)), None

        _, (_, stats_shape) = jax.eval_shape(objective, state["params"], tokens_MBS[0])
        zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), (jnp.zeros(()), state["params"], stats_shape))
        (loss, grads, router_stats), _ = jax.lax.scan(accumulate, zeros, tokens_MBS)
        loss, grads = jax.tree.map(lambda x: x / parts, (loss, grads))
        updates, opt = self.optimizer.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
                   "lr": optim.learning_rate(state["step"], self.config.train)}
        if router_stats is not None:
            bias_LE = moe.balance_router_bias(router_bias(state["params"]), router_stats.load,
                                              self.config.model.moe.bias_update_rate)
            params = with_router_bias(params, bias_LE)
            metrics.update(moe.load_metrics(router_stats.load, bias_LE, router_stats.dropped))
            if balance_weight:
                metrics["balance_loss"] = router_stats.balance_loss.sum() / parts
        return {"step": state["step"] + 1, "params": params, "opt": opt}, metrics

    def _eval_step(self, params, tokens_BS, weight_B):
        return jnp.sum(self.loss(params, tokens_BS) * weight_B), jnp.sum(weight_B)

    def _trace_step(self, params, tokens_BS):
        _, trace = self.apply(params, tokens_BS[:, :-1], return_trace=True)
        return {**diagnostics.amax_gain(trace.maps.res), "stream_rms": trace.stream_rms}

    def global_batch(self, local: dict) -> dict:
        return data.global_batch(local, self.batch_sharding)

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


def open_data(config, vocab_overridden: bool) -> dict:
    """The data manifest (process 0 prepares data/default on first use), the same on every process;
    sets model.vocab_size from it."""
    data_dir = Path(config.data.dir)
    if not (data_dir / "manifest.json").exists() and data_dir == Path(DEFAULT_DATA_DIR):
        if jax.process_index() == 0:
            print(f"preparing {data_dir} (first use; see scripts/prepare_data.py)", flush=True)
            prepare.prepare(data_dir, prepare.Recipe(), command="train.py, on first use of data/default")
        multihost_utils.sync_global_devices("default data prepared")
    try:
        manifest, problem = data.load_manifest(data_dir), None
    except UserError as e:
        manifest, problem = None, e
    check_same_data_everywhere(data_dir, manifest, problem)
    config.model.vocab_size = data.resolve_vocab_size(config.model.vocab_size, manifest, vocab_overridden)
    return manifest


def check_same_data_everywhere(data_dir: Path, manifest: dict | None, problem: UserError | None) -> None:
    """Every process reads its own copy of the data folder: all must hold the same one, or all stop
    with the same line (none trains on missing data or waits for one that stopped)."""
    if jax.process_count() > 1:
        digest = bytes.fromhex(data.fingerprint(manifest)) if manifest else bytes(32)
        digests = multihost_utils.process_allgather(np.frombuffer(digest, np.uint8))
        lacking = [p for p in range(jax.process_count()) if not digests[p].any()]
        if lacking:
            raise UserError(f"data.dir: {data_dir} is missing or incomplete on process(es) {lacking} of "
                            f"{jax.process_count()}; every host needs the same prepared folder: put it on a shared "
                            "filesystem or run the same scripts/prepare_data.py command on each host")
        if (digests != digests[0]).any():
            raise UserError(f"data.dir: {data_dir} holds different data on different processes; prepare it once "
                            "and share it, or run the same scripts/prepare_data.py command on each host")
    if problem:
        raise problem


def check_mesh(config, mesh) -> None:
    """The batch must split over the data-parallel axes, the routed experts over the expert axis."""
    t, parallel = config.train, mesh.shape["data"] * mesh.shape["fsdp"] * mesh.shape["expert"]
    n_experts = config.model.moe.n_experts
    if n_experts and n_experts % mesh.shape["expert"]:
        raise UserError(f"mesh.expert: {mesh.shape['expert']} does not divide model.moe.n_experts={n_experts}; "
                        f"use an expert axis that divides it")
    if t.microbatches < 1 or t.batch_size % t.microbatches:
        raise UserError(f"train.microbatches: {t.microbatches} does not divide train.batch_size={t.batch_size}")
    if (t.batch_size // t.microbatches) % parallel:
        raise UserError(f"train.batch_size: {t.batch_size} sequences in {t.microbatches} microbatch(es) do not "
                        f"split over data x fsdp x expert = {parallel} devices; make batch_size / microbatches a multiple "
                        f"of {parallel}")


def run_meta(config, manifest) -> dict:
    return {"variant": residual.variant_name(config.model), "n_streams": config.model.n_streams,
            "config": config.to_dict(), "tokenizer_sha256": manifest["tokenizer"]["sha256"],
            "versions": {name: module.__version__ for name, module in
                         (("jax", jax), ("optax", optax), ("numpy", np), ("grain", grain))}}


def checker(config, manifest, workdir):
    """Refuses a checkpoint from another experiment (different model or tokenizer)."""
    def check(meta):
        saved, current = meta["config"]["model"], config.model.to_dict()
        differing = sorted(k for k in set(saved) | set(current)
                           if k not in COMPILE_ONLY_FIELDS and saved.get(k) != current.get(k))
        if differing:
            changes = ", ".join(f"model.{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in differing)
            raise UserError(f"--workdir: {workdir} holds checkpoints of a different model ({changes}); "
                            f"use another --workdir, or delete {workdir}/checkpoints to start fresh")
        if meta["tokenizer_sha256"] != manifest["tokenizer"]["sha256"]:
            raise UserError(f"data.dir: {config.data.dir} was prepared with a different tokenizer than the "
                            f"checkpoints in {workdir}; point data.dir at the data they were trained on")
    return check


class StopRequest:
    """The first SIGTERM / SIGINT sets a flag: the loop saves a checkpoint and stops after the current
    step. A later one stops the process at once (exit 128 + signal): a save it interrupts is never
    committed (orbax writes a step under a temporary name and renames it when complete), so a resume
    reads only whole checkpoints."""

    def __init__(self):
        self.requested = False
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def handle(self, signum, frame):
        if self.requested:
            print(f"error: {signal.Signals(signum).name} again: stopped without finishing the checkpoint; the run "
                  "resumes from its newest committed one", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.requested = True

    def agreed(self) -> bool:
        """True on every process once any process has been asked to stop."""
        if jax.process_count() == 1:
            return self.requested
        return bool(multihost_utils.process_allgather(np.int32(self.requested)).any())

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def train(config, workdir, vocab_overridden: bool = False) -> None:
    """Trains to `train.steps` (or `train.stop_at_step`), resuming from WORKDIR/checkpoints (a local
    folder or a bucket path, see workdirs.py)."""
    workdir = workdirs.path(workdir)
    t = config.train
    mesh = sharding.make_mesh(config.mesh)
    check_mesh(config, mesh)
    workdir.mkdir(parents=True, exist_ok=True)  # a workdir that cannot be made stops the run here, first
    manifest = open_data(config, vocab_overridden)
    experiment = Experiment(config, mesh)
    if mesh.shape["fsdp"] > 1 and experiment.replicated_fraction > config.mesh.max_replicated:
        raise UserError(f"mesh.fsdp: {experiment.replicated_fraction:.1%} of parameter bytes stay replicated "
                        f"(limit mesh.max_replicated={config.mesh.max_replicated}); check sharding.RULES")
    batches = data.train_batches(config.data.dir, manifest, seq_len=t.seq_len, global_batch_size=t.batch_size,
                                 seed=t.seed, process_index=jax.process_index(), process_count=jax.process_count())
    eval_batches = data.eval_batches(config.data.dir, manifest, seq_len=t.seq_len, global_batch_size=t.batch_size,
                                     process_index=jax.process_index(), process_count=jax.process_count(),
                                     max_batches=t.eval_batches or None)
    diag_tokens = experiment.global_batch(eval_batches[0])["tokens"]
    checkpoints = checkpoint.Checkpoints(workdir, keep=t.keep_checkpoints)
    restored = checkpoints.restore_latest(experiment.abstract_state, checker(config, manifest, workdir))
    state = experiment.init_state() if restored is None else restored[1]
    step = 0 if restored is None else restored[0]
    iterator = data.train_iterator(batches, start_step=step)  # the data position is the step
    if jax.process_index() == 0:  # what eval.py and compare.py need besides the checkpoints
        (workdir / "config.json").write_text(json.dumps(config.to_dict(), indent=1) + "\n")
        (workdir / "data.json").write_text(json.dumps({"dir": config.data.dir, "fingerprint": data.fingerprint(manifest),
                                                       "tokenizer_sha256": manifest["tokenizer"]["sha256"]}) + "\n")
        tokenizer_file = manifest["tokenizer"]["file"]
        (workdir / tokenizer_file).write_bytes((Path(config.data.dir) / tokenizer_file).read_bytes())
    stop_at = min(t.steps, t.stop_at_step) if t.stop_at_step > 0 else t.steps
    log = runlog.RunLog(workdir, config, start_step=step)
    meta = run_meta(config, manifest)
    flops = runlog.train_flops_per_token(config.model, t.seq_len)
    peak = runlog.peak_flops_per_device(config.log)
    tokens_per_step = t.batch_size * t.seq_len
    stop = StopRequest()
    try:
        first_step = True
        while step < stop_at:
            started = time.perf_counter()
            batch = experiment.global_batch(next(iterator))
            state, metrics = experiment.train_step(state, batch["tokens"])
            step += 1
            record = {"step": step, **{k: float(v) for k, v in jax.device_get(metrics).items()}}
            seconds = time.perf_counter() - started
            if first_step:  # the first step of a process includes compiling it
                record["compile_seconds"], first_step = round(seconds, 2), False
            else:
                record.update(step_seconds=round(seconds, 4), tokens_per_sec=round(tokens_per_step / seconds, 1))
                if peak:
                    record["mfu"] = round(flops * tokens_per_step / seconds / (peak * jax.device_count()), 5)
            if not (np.isfinite(record["loss"]) and np.isfinite(record["grad_norm"])):
                log.write(record)
                last = checkpoints.steps()[:1]
                raise TrainingDiverged(f"step {step}: loss {record['loss']}, grad_norm {record['grad_norm']}; "
                                       f"stopped without saving (last checkpoint: {last[0] if last else 'none'})")
            if step % t.eval_every == 0 or step == t.steps:
                record["eval_loss"] = experiment.evaluate(state["params"], eval_batches)
            if step % t.diag_every == 0 or step == t.steps:
                record.update(experiment.diagnose(state["params"], diag_tokens))
            if step % t.log_every == 0 or step == stop_at or {"eval_loss", "amax_forward", "compile_seconds"} & set(record):
                log.write(record)
            log.advance(record["loss"], record.get("tokens_per_sec", 0.0))
            preempted = stop.agreed()
            if step % t.checkpoint_every == 0 or step == stop_at or preempted:
                checkpoints.save(step, state, {**meta, "step": step})
            if preempted:
                break
    finally:
        checkpoints.wait()
        checkpoints.close()
        log.close()
        stop.restore()
    if jax.process_index() == 0 and step == t.steps:
        plots.plot_run(workdir)
