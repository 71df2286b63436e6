"""Print the parameter counts of a config as one JSON object, without allocating the model.

    python scripts/count_params.py --config=configs/pretrain.py:mhc,27b

embedding: the token embedding table (+ the unembedding when untied); non_embedding: the rest;
active: parameters one token is multiplied by (all but the input embedding lookup, and in MoE layers
only top_k of the routed experts: the routing arithmetic of transformer.param_counts); residual_overhead: the
parameters of the HC/mHC sites, i.e. what the variant adds to the residual model of the same scale.
"""

import json

from mhc_jax import cli
from mhc_jax.model import transformer

CONFIG = cli.define_config_flag()


def main(argv):
    if len(argv) > 1:
        cli.fail(f"unexpected arguments {argv[1:]}; usage: count_params.py --config=configs/pretrain.py:<variant>,<scale>")
    print(json.dumps(transformer.param_counts(cli.load_config(CONFIG).model)))


if __name__ == "__main__":
    cli.run(main)
