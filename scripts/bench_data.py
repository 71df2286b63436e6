"""How fast data preparation tokenizes: tokens/s for pools of worker processes, their scaling, and
the peak memory of a worker (mhc_jax/data/throughput.py).

    python scripts/bench_data.py                                  # 1 and 2 workers, 64 MB of jsonl
    python scripts/bench_data.py --megabytes=2000 --workers=2     # a worker's memory on a large file
"""

import json
import os

from absl import flags

from mhc_jax import cli
from mhc_jax.data import prepare, throughput
from mhc_jax.errors import UserError

WORKERS = flags.DEFINE_list("workers", ["1", "2"], "pool sizes to time, in turn")
MEGABYTES = flags.DEFINE_float("megabytes", 64, "size of the jsonl source made from the stdlib's files")
SOURCE = flags.DEFINE_string("source", None, "a jsonl file to tokenize instead (field 'text')")
UNIT_BYTES = flags.DEFINE_integer("unit_bytes", prepare.Recipe().unit_bytes, "source bytes per work unit")
JSON = flags.DEFINE_bool("json", False, "print the result as JSON")


def main(argv):
    cli.expect(argv)
    try:
        workers = [int(w) for w in WORKERS.value]
    except ValueError:
        raise UserError(f"--workers: {','.join(WORKERS.value)} is not a list of whole numbers, e.g. 1,2") from None
    if not workers or min(workers) < 1:
        raise UserError("--workers: give pool sizes of 1 or more, e.g. --workers=1,2")
    if SOURCE.value and not os.path.isfile(SOURCE.value):
        raise UserError(f"--source: {SOURCE.value} is not a file")
    result = throughput.benchmark(workers, MEGABYTES.value, SOURCE.value, UNIT_BYTES.value)
    if JSON.value:
        print(json.dumps(result, indent=1))
        return
    print(f"{result['source']} ({result['source_bytes'] / 1e6:,.0f} MB), tokenizer {result['tokenizer']}, "
          f"units of {result['unit_bytes'] / 2**20:g} MiB, {os.cpu_count()} CPU cores")
    print("| workers | units | seconds | tokens | tokens/s | tokens/s per worker | speedup | peak memory per worker |")
    print("|---|---|---|---|---|---|---|---|")
    for row in result["rows"]:
        print(f"| {row['workers']} | {row['units']} | {row['seconds']:.1f} | {row['tokens']:,} | "
              f"{row['tokens_per_second']:,.0f} | {row['tokens_per_second'] / row['workers']:,.0f} | "
              f"{row['speedup']:.2f} | {row['peak_worker_bytes'] / 2**20:,.0f} MiB |")


if __name__ == "__main__":
    cli.run(main)
