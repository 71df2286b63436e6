"""Evaluation entry point (command-line contract in README.md):

    python eval.py --workdir=DIR [--step=N] [--tasks=perplexity,mmlu,gsm8k,bbh,drop] [--limit=K]

Not yet an evaluator: checkpoints arrive with the trainer issue (#4) and the benchmarks with the
evaluation issue (#5). Until then it exits with status 1 and says so.
"""

import sys

from mhc_jax import cli


def main(argv):
    del argv
    print("eval.py: not implemented yet; it needs checkpoints (issue #4) and benchmarks (issue #5)",
          file=sys.stderr)
    return 1


if __name__ == "__main__":
    cli.run(main)
