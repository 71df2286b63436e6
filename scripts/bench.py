"""Benchmarks; prints one JSON object. Today it measures the data pipeline against the model it feeds:

    python scripts/bench.py --data_dir=data/default [--seq_len=256] [--batch_size=8]

data_tokens_per_sec       tokens per second out of the grain training pipeline (threads, no workers)
train_tokens_per_sec      tokens per second of a jitted AdamW train step (forward, backward, update)
                          of the `residual` model at --scale (default 10m), at the same batch shape,
                          on this machine's default JAX device
data_over_train           how many times faster the pipeline is than the step it feeds
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import optax  # noqa: E402
from absl import flags  # noqa: E402
from flax import nnx  # noqa: E402

from configs.pretrain import get_config  # noqa: E402
from mhc_jax import cli, data  # noqa: E402
from mhc_jax.model import Transformer  # noqa: E402

DATA_DIR = flags.DEFINE_string("data_dir", "data/default", "a folder made by scripts/prepare_data.py")
SEQ_LEN = flags.DEFINE_integer("seq_len", 256, "tokens per example")
BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "examples per batch")
SCALE = flags.DEFINE_string("scale", "10m", "the model scale whose train step is measured")
DATA_BATCHES = flags.DEFINE_integer("data_batches", 500, "batches read to time the pipeline")
TRAIN_STEPS = flags.DEFINE_integer("train_steps", 5, "steps timed after the compiling one")


def data_tokens_per_sec(manifest) -> float:
    batches = data.train_batches(DATA_DIR.value, manifest, seq_len=SEQ_LEN.value,
                                 global_batch_size=BATCH_SIZE.value, seed=0)
    iterator = data.train_iterator(batches)
    next(iterator)  # start the prefetch threads
    start, tokens = time.perf_counter(), 0
    for _ in range(DATA_BATCHES.value):
        tokens += next(iterator)["tokens"][:, 1:].size
    return tokens / (time.perf_counter() - start)


def train_tokens_per_sec(manifest) -> float:
    model_config = get_config(f"residual,{SCALE.value}").model
    model_config.vocab_size = manifest["tokenizer"]["vocab_size"]
    graphdef, params = nnx.split(Transformer(model_config, nnx.Rngs(0)), nnx.Param)
    optimizer = optax.adamw(1e-3, b1=0.9, b2=0.95, weight_decay=0.1)

    def loss_fn(params, tokens_BT):
        logits_BTV = nnx.merge(graphdef, params)(tokens_BT[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits_BTV, tokens_BT[:, 1:]).mean()

    @jax.jit
    def step(params, opt_state, tokens_BT):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens_BT)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    batch = data.train_batches(DATA_DIR.value, manifest, seq_len=SEQ_LEN.value,
                               global_batch_size=BATCH_SIZE.value, seed=0)[0]["tokens"]
    opt_state = optimizer.init(params)
    params, opt_state, loss = step(params, opt_state, batch)
    jax.block_until_ready(loss)
    start = time.perf_counter()
    for _ in range(TRAIN_STEPS.value):
        params, opt_state, loss = step(params, opt_state, batch)
    jax.block_until_ready(loss)
    return TRAIN_STEPS.value * batch[:, 1:].size / (time.perf_counter() - start)


def main(argv):
    if len(argv) > 1:
        cli.fail(f"unexpected arguments {argv[1:]}; see --help")
    manifest = data.load_manifest(DATA_DIR.value)
    pipeline, train = data_tokens_per_sec(manifest), train_tokens_per_sec(manifest)
    print(json.dumps({"data_dir": DATA_DIR.value, "seq_len": SEQ_LEN.value, "batch_size": BATCH_SIZE.value,
                      "scale": SCALE.value, "device": jax.devices()[0].device_kind,
                      "data_tokens_per_sec": round(pipeline), "train_tokens_per_sec": round(train),
                      "data_over_train": round(pipeline / train, 1)}))


if __name__ == "__main__":
    cli.run(main)
