"""How fast data preparation tokenizes (the work behind scripts/bench_data.py).

The units of a jsonl source (made here from the standard library's files when none is given) are
tokenized and written as prepare.prepare does it, by pools of 1, 2, ... worker processes in turn;
for each pool: wall time (worker start-up included), tokens per second, and the largest peak
resident memory of any of its workers.
"""

import json
import resource
import tempfile
import time
from pathlib import Path

from mhc_jax.data import corpus, prepare
from mhc_jax.data.tokenizer import gpt2_tokenizer


def make_jsonl(path: Path, megabytes: float) -> Path:
    """A jsonl file of about `megabytes` MB: the stdlib source's documents, repeated as needed."""
    target, written = megabytes * 1e6, 0
    with open(path, "w") as f:
        while written < target:
            for text in corpus.documents(["stdlib"], "text", []):
                line = json.dumps({"text": text}) + "\n"
                f.write(line)
                written += len(line)
                if written >= target:
                    break
    return path


def measured_unit(building: str, index: int, unit: corpus.Unit, recipe: prepare.Recipe) -> tuple[int, int]:
    """A worker's unit: its tokens, and the worker's peak resident memory so far (bytes)."""
    entry = prepare.worker_encode_unit(building, index, unit, recipe)
    tokens = sum(split["tokens"] for split in entry["splits"].values())
    return tokens, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_pool(source: Path, tokenizer_path: Path, recipe: prepare.Recipe, workers: int) -> dict:
    units = corpus.plan([str(source)], recipe.unit_bytes)
    with tempfile.TemporaryDirectory(prefix="mhc-jax-bench-data-") as building:
        (Path(building) / "ledger").mkdir()
        start = time.perf_counter()
        with prepare.worker_pool(workers, tokenizer_path) as pool:
            results = list(pool.map(measured_unit, [building] * len(units), range(len(units)), units,
                                    [recipe] * len(units)))
        seconds = time.perf_counter() - start
    tokens = sum(t for t, _ in results)
    return {"workers": workers, "units": len(units), "seconds": seconds, "tokens": tokens,
            "tokens_per_second": tokens / seconds, "peak_worker_bytes": max(peak for _, peak in results)}


def benchmark(workers: list[int], megabytes: float, source: str | None, unit_bytes: int) -> dict:
    """The table's rows, and what they were measured on."""
    with tempfile.TemporaryDirectory(prefix="mhc-jax-bench-data-") as folder:
        folder = Path(folder)
        path = Path(source) if source else make_jsonl(folder / "stdlib.jsonl", megabytes)
        tokenizer_path = gpt2_tokenizer().save(folder)
        recipe = prepare.Recipe(sources=(str(path),), tokenizer="gpt2", unit_bytes=unit_bytes)
        rows = [run_pool(path, tokenizer_path, recipe, n) for n in workers]
        size = path.stat().st_size
    for row in rows:
        row["speedup"] = row["tokens_per_second"] / rows[0]["tokens_per_second"]  # over the first row
    return {"source": source or f"{megabytes} MB jsonl of the stdlib source", "source_bytes": size,
            "tokenizer": "gpt2", "unit_bytes": unit_bytes, "rows": rows}
