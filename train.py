"""Pretraining entry point:

    python train.py --config=configs/pretrain.py:<variant>,<scale> --workdir=DIR [--config.a.b=value ...]

Resumes from the newest checkpoint in DIR/checkpoints. A new run may start from a residual model's
weights, `--init_from=PATH` (a workdir of ours or a Hugging Face folder): its model fields are the
source's, the config chooses the residual connection, and an HC or mHC model starts computing the
source's function (docs/pretrained.md). SIGTERM or SIGINT saves a checkpoint of
the current step and exits 0; the same command resumes. Several processes (a TPU pod, a GPU
cluster, or CPU processes on one machine) run the same command with --distributed, or with
--coordinator_address, --num_processes and --process_id.
"""

import sys

from absl import flags
from ml_collections import config_flags

from mhc_jax import cli, config_rules, storage
from mhc_jax.pretrained import surgery
from mhc_jax.training import trainer

CONFIG = cli.define_config_flag()
WORKDIR = flags.DEFINE_string("workdir", None, "where config.json, metrics.jsonl and checkpoints/ go")
INIT_FROM = flags.DEFINE_string("init_from", None, "a new run starts from this residual model: a workdir of ours or a "
                                "Hugging Face folder (Llama, Mistral, Qwen2, Qwen3)")
cli.define_process_flags()


def main(argv):
    cli.expect(argv, (WORKDIR, "runs/mhc-10m"))
    config = cli.load_config(CONFIG)
    source = None
    if INIT_FROM.value:
        source = surgery.open_source(INIT_FROM.value)
        surgery.take_model_fields(config, source)
        config_rules.validate(config)
    storage.check_reachable(WORKDIR.value, "--workdir")
    cli.start_processes()
    overrides = config_flags.get_override_values(flags.FLAGS["config"])
    try:
        trainer.train(config, WORKDIR.value, vocab_overridden="model.vocab_size" in overrides or source is not None,
                      init_from=source)
    except trainer.TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    cli.run(main)
