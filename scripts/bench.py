"""Benchmarks; prints one JSON object.

    python scripts/bench.py [--data_dir=data/default] [--scale=10m] [--variants=residual,hc,mhc]
                            [--seq_len=256] [--batch_size=8]

For each variant, the real train step (trainer.Experiment: forward, backward, AdamW) on batches
from the data pipeline, on all local devices (an FSDP mesh):
  compile_seconds, step_seconds (median of --steps), tokens_per_sec, mfu (FLOPs per token as in
  mhc_jax/logging.py, against the device's peak; on CPU against a measured float32 matmul peak,
  reported as peak_flops), peak_memory_bytes (the device's peak use, or XLA's memory analysis of
  the compiled step where the device does not report it), and step_time_vs_residual.
And the data pipeline: data_tokens_per_sec and how many times the fastest step it outruns.
"""

import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import flags  # noqa: E402

from configs.pretrain import get_config  # noqa: E402
from mhc_jax import cli, data, sharding, trainer  # noqa: E402
from mhc_jax import logging as runlog  # noqa: E402

DATA_DIR = flags.DEFINE_string("data_dir", "data/default", "a folder made by scripts/prepare_data.py")
SCALE = flags.DEFINE_string("scale", "10m", "the model scale")
VARIANTS = flags.DEFINE_list("variants", ["residual", "hc", "mhc"], "variants to time")
SEQ_LEN = flags.DEFINE_integer("seq_len", 256, "tokens per sequence")
BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "sequences per step")
STEPS = flags.DEFINE_integer("steps", 5, "steps timed after the compiling one")
DATA_BATCHES = flags.DEFINE_integer("data_batches", 500, "batches read to time the pipeline")


def data_tokens_per_sec(manifest) -> float:
    batches = data.train_batches(DATA_DIR.value, manifest, seq_len=SEQ_LEN.value,
                                 global_batch_size=BATCH_SIZE.value, seed=0)
    iterator = data.train_iterator(batches)
    next(iterator)  # starts the prefetch threads
    start, tokens = time.perf_counter(), 0
    for _ in range(DATA_BATCHES.value):
        tokens += next(iterator)["tokens"][:, 1:].size
    return tokens / (time.perf_counter() - start)


def matmul_peak_flops() -> float:
    """Float32 FLOP/s of a large square matmul on device 0: the attainable peak used for CPU MFU."""
    n = 2048
    a = jnp.ones((n, n), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    start = time.perf_counter()
    for _ in range(5):
        matmul(a).block_until_ready()
    return 5 * 2 * n**3 / (time.perf_counter() - start)


def time_variant(variant: str, manifest, peak: float) -> dict:
    config = get_config(f"{variant},{SCALE.value}")
    config.model.vocab_size = manifest["tokenizer"]["vocab_size"]
    config.train.update_from_flattened_dict({"seq_len": SEQ_LEN.value, "batch_size": BATCH_SIZE.value})
    mesh = sharding.make_mesh(config.mesh)
    experiment = trainer.Experiment(config, mesh)
    batches = data.train_batches(DATA_DIR.value, manifest, seq_len=SEQ_LEN.value,
                                 global_batch_size=BATCH_SIZE.value, seed=0)
    tokens = experiment.global_batch(batches[0])["tokens"]
    state = experiment.init_state()
    start = time.perf_counter()
    compiled = experiment.train_step.lower(state, tokens).compile()
    compile_seconds = time.perf_counter() - start
    state, metrics = compiled(state, tokens)
    jax.block_until_ready(metrics)
    seconds = []
    for _ in range(STEPS.value):
        start = time.perf_counter()
        state, metrics = compiled(state, tokens)
        jax.block_until_ready(metrics)
        seconds.append(time.perf_counter() - start)
    step_seconds = statistics.median(seconds)
    tokens_per_step = BATCH_SIZE.value * SEQ_LEN.value
    flops = runlog.train_flops_per_token(config.model, SEQ_LEN.value) * tokens_per_step
    stats = jax.devices()[0].memory_stats() or {}
    memory = compiled.memory_analysis()
    peak_memory = stats.get("peak_bytes_in_use") or (memory.temp_size_in_bytes + memory.argument_size_in_bytes
                                                      + memory.output_size_in_bytes - memory.alias_size_in_bytes)
    return {"compile_seconds": round(compile_seconds, 2), "step_seconds": round(step_seconds, 4),
            "tokens_per_sec": round(tokens_per_step / step_seconds, 1),
            "mfu": round(flops / step_seconds / (peak * jax.device_count()), 4),
            "train_flops_per_token": runlog.train_flops_per_token(config.model, SEQ_LEN.value),
            "peak_memory_bytes": int(peak_memory)}


def main(argv):
    cli.expect(argv)
    manifest = data.load_manifest(DATA_DIR.value)
    peak = runlog.peak_flops_per_device(get_config("mhc,debug").log) or matmul_peak_flops()
    report = {"device": jax.devices()[0].device_kind, "devices": jax.device_count(), "scale": SCALE.value,
              "seq_len": SEQ_LEN.value, "batch_size": BATCH_SIZE.value, "peak_flops": round(peak)}
    variants = {variant: time_variant(variant, manifest, peak) for variant in VARIANTS.value}
    if "residual" in variants:
        for result in variants.values():
            result["step_time_vs_residual"] = round(result["step_seconds"] / variants["residual"]["step_seconds"], 3)
    pipeline = data_tokens_per_sec(manifest)
    fastest = max(result["tokens_per_sec"] for result in variants.values())
    report.update(variants=variants, data_tokens_per_sec=round(pipeline),
                  data_over_fastest_step=round(pipeline / fastest, 1))
    print(json.dumps(report))


if __name__ == "__main__":
    cli.run(main)
