"""Pretraining entry point (command-line contract in README.md):

    python train.py --config=configs/pretrain.py:<variant>,<scale> --workdir=DIR [--config.a.b=value ...]

Not yet a trainer: the training loop, checkpoints and metrics arrive with the trainer issue (#4).
Today it checks the config and the model it describes, prints the parameter counts, and exits
with status 1 because nothing was trained.
"""

import json
import sys

from mhc_jax import cli, model

CONFIG = cli.define_config_flag()


def main(argv):
    del argv
    counts = model.param_counts(cli.load_config(CONFIG).model)
    print(json.dumps(counts))
    print("train.py: the config is valid, but the training loop is not implemented yet (issue #4)",
          file=sys.stderr)
    return 1


if __name__ == "__main__":
    cli.run(main)
