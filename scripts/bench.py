"""Benchmarks the train step of a config and of its variants; prints one JSON object.

    python scripts/bench.py --config=configs/pretrain.py:mhc,100m [--config.a.b=v ...]
                            [--variants=residual,hc,mhc | --vary=FIELD=A,B] [--steps=10] [--depths=12,48] [--profile]

What it measures is described in mhc_jax/pods/bench.py.
"""

import json
import sys

from absl import flags

from mhc_jax import cli
from mhc_jax.model import residual
from mhc_jax.pods import bench
from mhc_jax.training import trainer

CONFIG = cli.define_config_flag()
VARIANTS = cli.define_choices("variants", None, residual.VARIANTS,
                              "residual connections to time (default: the config's own)")
VARY = flags.DEFINE_string("vary", None, "time one config field's values instead, e.g. train.loss_chunk=0,256")
STEPS = flags.DEFINE_integer("steps", 10, "timed rounds after one untimed step of each variant", lower_bound=1)
DEPTHS = flags.DEFINE_list("depths", [], "model.n_layers values at which to measure compile time, e.g. 12,48")
PROFILE = flags.DEFINE_bool("profile", False, "trace one step per variant and report where its time goes")
DATA_BATCHES = flags.DEFINE_integer("data_batches", 500, "batches read to time the pipeline", lower_bound=1)


def main(argv):
    cli.expect(argv, (CONFIG, "configs/pretrain.py:mhc,100m"))
    config = cli.load_config(CONFIG)
    try:
        depths = [int(d) for d in DEPTHS.value]
    except ValueError:
        cli.fail(f"--depths: expected layer counts such as 12,48, got {','.join(DEPTHS.value)}")
    overrides = [a for a in sys.argv[1:] if a.startswith("--config.")]
    trainer.open_data(config, vocab_overridden=any(a.startswith("--config.model.vocab_size") for a in overrides))
    if VARY.value and VARIANTS.value:
        cli.fail("--vary, --variants: give one of them (the contenders differ in one thing)")
    if VARY.value:
        configs = bench.varied_configs(config, VARY.value)
        baseline = next(iter(configs))
    else:
        configs = bench.variant_configs(config, VARIANTS.value or [cli.config_spec(CONFIG).split(",")[0]])
        baseline = "residual" if "residual" in configs else next(iter(configs))
    report = bench.benchmark(configs, baseline, STEPS.value, depths, PROFILE.value, DATA_BATCHES.value)
    print(json.dumps({"config": cli.config_spec(CONFIG), "overrides": overrides, **report}))


if __name__ == "__main__":
    cli.run(main)
