"""Benchmarks of the train step of configs that differ in one thing (scripts/bench.py prints the report).

The real train step (Experiment: forward, backward, AdamW, on all local devices with the
config's mesh) on a batch from the data pipeline. The contenders are the config's variants
(`--variants` swaps only the residual connection: residual.set_variant; the variants of several
streams keep an overridden model.n_streams) or the values of one field (`--vary=FIELD=A,B`). Their steps are
timed interleaved, one step of each in turn, so that machine noise hits them alike; per contender:
  step_seconds (median of --steps) with step_seconds_min and _max; step_time_vs_baseline, the
  median over rounds of the ratio within a round to the baseline (residual among variants, else
  the first contender); tokens_per_sec; mfu (FLOPs per token as in
  mhc_jax/training/flops.py, against peak_flops: the device's published bf16 peak, log.peak_tflops, or on
  CPU a measured float32 matmul peak, as peak_source says); compile_seconds (lower + compile);
  memory_bytes from XLA's memory analysis of the compiled step (arguments + temporaries + outputs
  not aliased), and at the top device_peak_bytes where the device reports it (the whole process);
  host_page_faults_per_step and kernel_seconds_per_step (the process's, medians; a CPU step that
  faults in its temporaries again pays for it in the kernel, see mhc_jax/host_memory.py);
  with --depths, compile_seconds at each depth (model.n_layers); with --profile, where the time
  of one traced step goes (mhc_jax/training/op_profile.py).
And the data pipeline: data_tokens_per_sec and how many times the fastest step it outruns.
"""

import functools
import resource
import statistics
import time

import jax
import jax.numpy as jnp

from mhc_jax import config_rules, sharding
from mhc_jax.data import pipeline
from mhc_jax.errors import UserError
from mhc_jax.model import residual
from mhc_jax.training import flops, op_profile, trainer
from mhc_jax.training.experiment import Experiment


class Contender:
    """One variant's compiled step, state and batch."""

    def __init__(self, config, peak: float):
        self.config = config
        self.tokens_per_step = config.train.batch_size * config.train.seq_len
        mesh = sharding.make_mesh(config.mesh)
        trainer.check_mesh(config, mesh)
        self.experiment = Experiment(config, mesh)
        manifest = pipeline.load_manifest(config.data.dir)
        stream = pipeline.mixture([pipeline.Source(config.data.dir, manifest)], config.train.seq_len, seed=0)
        batches = pipeline.train_batches(stream, global_batch_size=config.train.batch_size)
        self.tokens = self.experiment.global_batch(batches[0])["tokens"]
        self.state = self.experiment.init_state()
        self.compiled, self.compile_seconds = compile_step(self.experiment, self.tokens)
        self.flops_per_step = flops.train_flops_per_token(config.model, config.train.seq_len) * self.tokens_per_step
        self.peak, self.seconds, self.page_faults, self.kernel_seconds = peak, [], [], []

    def step(self) -> float:
        start = time.perf_counter()
        self.state, metrics = self.compiled(self.state, self.tokens, self.experiment.hyper)
        jax.block_until_ready(metrics)
        return time.perf_counter() - start

    def timed_step(self) -> float:
        """A step for the statistics: its time, and the process's page faults and kernel time."""
        before = resource.getrusage(resource.RUSAGE_SELF)
        seconds = self.step()
        after = resource.getrusage(resource.RUSAGE_SELF)
        self.seconds.append(seconds)
        self.page_faults.append(after.ru_minflt - before.ru_minflt)
        self.kernel_seconds.append(after.ru_stime - before.ru_stime)
        return seconds

    def report(self) -> dict:
        memory = self.compiled.memory_analysis()
        seconds = statistics.median(self.seconds)
        return {"step_seconds": round(seconds, 4), "step_seconds_min": round(min(self.seconds), 4),
                "step_seconds_max": round(max(self.seconds), 4),
                "tokens_per_sec": round(self.tokens_per_step / seconds, 1),
                "mfu": round(self.flops_per_step / seconds / (self.peak * jax.device_count()), 4),
                "compile_seconds": round(self.compile_seconds, 2),
                "host_page_faults_per_step": int(statistics.median(self.page_faults)),
                "kernel_seconds_per_step": round(statistics.median(self.kernel_seconds), 3),
                "memory_bytes": int(memory.argument_size_in_bytes + memory.temp_size_in_bytes
                                    + memory.output_size_in_bytes - memory.alias_size_in_bytes)}


def compile_step(experiment, tokens) -> tuple:
    """The lowered and compiled train step, and the seconds that took."""
    start = time.perf_counter()
    compiled = experiment.train_step.lower(experiment.abstract_state, tokens, experiment.hyper).compile()
    return compiled, time.perf_counter() - start


def variant_configs(config, variants: list[str]) -> dict:
    """`config` with each variant's residual connection (those of several streams keep an overridden
    n_streams)."""
    n_streams = residual.overridden_stream_count(config.model)
    configs = {}
    for variant in variants:
        candidate = config.copy_and_resolve_references()
        residual.set_variant(candidate.model, variant)
        if n_streams and candidate.model.n_streams > 1:
            candidate.model.n_streams = n_streams
        config_rules.validate(candidate)
        configs[variant] = candidate
    return configs


def parse_like(default, text: str):
    """`text` as a value of the type of `default` (bools: true/false)."""
    if isinstance(default, bool):
        if text.lower() not in ("true", "false"):
            raise ValueError(text)
        return text.lower() == "true"
    return type(default)(text)


def varied_configs(config, vary: str) -> dict:
    """FIELD=A,B,...: `config` with the field set to each value (parsed as the type of the field's
    default), each validated like train.py's."""
    field, _, values = vary.partition("=")
    if not (field and values):
        raise UserError(f"--vary: expected FIELD=A,B, e.g. --vary=train.loss_chunk=0,256; got {vary!r}")
    *parents, name = field.split(".")
    try:
        owner = functools.reduce(getattr, parents, config)
        default = owner[name]
    except (AttributeError, KeyError):
        raise UserError(f"--vary: no config field {field!r} (see configs/pretrain.py for the fields)") from None
    configs = {}
    for value in values.split(","):
        candidate = config.copy_and_resolve_references()
        target = functools.reduce(getattr, parents, candidate)
        try:
            target[name] = parse_like(default, value)
        except ValueError:
            raise UserError(f"--vary: {field}={value!r} is not a {type(default).__name__}") from None
        config_rules.validate(candidate)
        configs[f"{field}={value}"] = candidate
    return configs


def measured_peak_flops() -> tuple[float, str]:
    """Float32 FLOP/s of a 2048^2 matmul on device 0: the attainable peak used for CPU MFU."""
    n = 2048
    a = jnp.ones((n, n), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    start = time.perf_counter()
    for _ in range(5):
        matmul(a).block_until_ready()
    return 5 * 2 * n**3 / (time.perf_counter() - start), "measured float32 2048x2048 matmul on device 0"


def depth_compile_seconds(config, depths: list[int]) -> dict:
    """Compile seconds of the train step at each model.n_layers in `depths`."""
    seconds = {}
    for depth in depths:
        deeper = config.copy_and_resolve_references()
        deeper.model.n_layers = depth
        experiment = Experiment(deeper, sharding.make_mesh(deeper.mesh))
        tokens = jax.ShapeDtypeStruct((deeper.train.batch_size, deeper.train.seq_len + 1), jnp.int32,
                                      sharding=experiment.batch_sharding)
        seconds[str(depth)] = round(compile_step(experiment, tokens)[1], 2)
    return seconds


def data_tokens_per_sec(config, count: int) -> float:
    """Tokens per second that the training pipeline delivers, over `count` batches."""
    manifest = pipeline.load_manifest(config.data.dir)
    stream = pipeline.mixture([pipeline.Source(config.data.dir, manifest)], config.train.seq_len, seed=0)
    batches = pipeline.train_batches(stream, global_batch_size=config.train.batch_size)
    iterator = pipeline.train_iterator(batches)
    next(iterator)  # starts the prefetch threads
    start, tokens = time.perf_counter(), 0
    for _ in range(count):
        tokens += next(iterator)["tokens"][:, 1:].size
    return tokens / (time.perf_counter() - start)


def benchmark(configs: dict, baseline: str, steps: int, depths: list[int], profile: bool, data_batches: int) -> dict:
    """Times the train step of each of `configs` ({name: config}), interleaved: one step of each in
    turn, `steps` rounds after an untimed one. The report is described in this module's docstring."""
    config = configs[baseline]
    t = config.train
    peak, peak_source = flops.peak_flops_per_device(config.log), "published peak of the device (or log.peak_tflops)"
    if not peak:
        peak, peak_source = measured_peak_flops()
    contenders = {name: Contender(c, peak) for name, c in configs.items()}
    for contender in contenders.values():
        contender.step()  # the first call of a compiled step pays for buffer allocation
    ratios = {variant: [] for variant in contenders}
    for _ in range(steps):
        round_seconds = {variant: contender.timed_step() for variant, contender in contenders.items()}
        for variant, seconds in round_seconds.items():
            ratios[variant].append(seconds / round_seconds[baseline])
    results = {variant: contender.report() for variant, contender in contenders.items()}
    for variant, result in results.items():
        result["step_time_vs_baseline"] = round(statistics.median(ratios[variant]), 3)
        if depths:
            result["compile_seconds_by_depth"] = depth_compile_seconds(configs[variant], depths)
        if profile:
            contender = contenders[variant]
            result["profile"] = op_profile.profile(contender.compiled, contender.step)
    data_rate = data_tokens_per_sec(config, data_batches)
    fastest = max(result["tokens_per_sec"] for result in results.values())
    stats = jax.devices()[0].memory_stats() or {}
    return {"device": jax.devices()[0].device_kind, "devices": jax.device_count(),
            "mesh": dict(contenders[next(iter(contenders))].experiment.mesh.shape),
            "dtype": config.model.dtype, "seq_len": t.seq_len, "batch_size": t.batch_size, "steps": steps,
            "peak_flops": round(peak), "peak_source": peak_source,
            "memory_source": "XLA memory analysis of the compiled step",
            "device_peak_bytes": stats.get("peak_bytes_in_use"), "baseline": baseline, "contenders": results,
            "data_tokens_per_sec": round(data_rate), "data_over_fastest_step": round(data_rate / fastest, 1)}
