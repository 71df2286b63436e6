"""Grain pipelines over a dataset folder made by scripts/prepare_data.py (layout: mhc_jax/data/prepare.py).

Examples are concatenate-and-chunk windows: example i of a split is tokens
[i * seq_len, i * seq_len + seq_len + 1) of the split's token stream (documents joined by the
end-of-text token), so inputs are the first seq_len tokens and targets the last seq_len. No
packing masks: attention crosses document boundaries after an end-of-text token, as in GPT-2.

Training order is a pure function of (seed, step, global batch size): the examples are shuffled
globally (a new permutation each epoch), global batch k holds shuffled examples
[k * G, (k + 1) * G), and process p of P reads only rows [p * G / P, (p + 1) * G / P) of it. So any
number of processes sees the same global batches, and a pipeline started at step k yields what
one iterated from step 0 yields at step k: a resumed run restarts its pipeline at the step it
restored, on any number of processes.
"""

import functools
import hashlib
import json
import sys
from pathlib import Path

import grain
import jax
import numpy as np

from mhc_jax.data.prepare import FORMAT, SPLITS
from mhc_jax.data.tokenizer import Tokenizer, load_tokenizer
from mhc_jax.errors import UserError


def load_manifest(data_dir: str | Path) -> dict:
    """The dataset's manifest, after checking that its shards are all there."""
    data_dir = Path(data_dir)
    path = data_dir / "manifest.json"
    if not path.is_file():
        raise UserError(f"data dir {data_dir}: no manifest.json; make it with "
                        f"python scripts/prepare_data.py --out={data_dir}")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise UserError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}; prepare the data again")
    for split in SPLITS:
        for shard in manifest["splits"][split]["shards"]:
            if not (data_dir / shard["file"]).is_file():
                raise UserError(f"data dir {data_dir}: shard {shard['file']} listed in manifest.json is missing; "
                                "prepare the data again with --overwrite")
    return manifest


def fingerprint(manifest: dict) -> str:
    """One hash of what a run trains and validates on: the tokenizer and every shard's contents."""
    content = {"tokenizer": manifest["tokenizer"]["sha256"],
               "splits": {split: [shard["sha256"] for shard in manifest["splits"][split]["shards"]] for split in SPLITS}}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def load_data_tokenizer(data_dir: str | Path, manifest: dict) -> Tokenizer:
    return load_tokenizer(Path(data_dir) / manifest["tokenizer"]["file"], manifest["tokenizer"]["eos_token"])


def resolve_vocab_size(model_vocab_size: int, manifest: dict, overridden: bool) -> int:
    """The embedding size a model trained on this data gets: the tokenizer's vocabulary, unless the
    user set model.vocab_size (e.g. padded to a multiple of 128), which must then cover it."""
    data_vocab_size = manifest["tokenizer"]["vocab_size"]
    if not overridden:
        return data_vocab_size
    if model_vocab_size < data_vocab_size:
        raise UserError(f"model.vocab_size: {model_vocab_size} is smaller than the data's tokenizer "
                        f"({data_vocab_size} tokens); raise it or drop the override")
    return model_vocab_size


class TokenWindows(grain.sources.RandomAccessDataSource):
    """Example i of a split: its tokens [i * seq_len, (i + 1) * seq_len + 1) as int32. The split's
    stream is its shards in order; each shard's records hold record_tokens tokens but its last."""

    def __init__(self, data_dir: str | Path, manifest: dict, split: str, seq_len: int):
        info = manifest["splits"][split]
        self.records = grain.sources.ArrayRecordDataSource([str(Path(data_dir) / s["file"]) for s in info["shards"]])
        self.dtype = np.dtype(manifest["token_dtype"])
        self.record_tokens = manifest["record_tokens"]
        shard_tokens = np.array([s["tokens"] for s in info["shards"]])
        self.shard_starts = np.concatenate([[0], np.cumsum(shard_tokens)[:-1]])  # first token of each shard
        self.shard_records = np.concatenate([[0], np.cumsum([s["records"] for s in info["shards"]])[:-1]])
        self.seq_len = seq_len
        self.length = window_count(info["tokens"], seq_len)
        if self.length < 1:
            raise UserError(f"train.seq_len: {seq_len} is longer than the {split} split of {data_dir} "
                            f"({info['tokens']} tokens)")

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> np.ndarray:
        start, stop = index * self.seq_len, (index + 1) * self.seq_len + 1
        pieces, position = [], start
        while position < stop:
            shard = int(np.searchsorted(self.shard_starts, position, side="right")) - 1
            record = (position - self.shard_starts[shard]) // self.record_tokens
            record_start = self.shard_starts[shard] + record * self.record_tokens
            tokens = np.frombuffer(self.records[int(self.shard_records[shard] + record)], self.dtype)
            pieces.append(tokens[position - record_start:stop - record_start])
            position = record_start + len(tokens)
        return np.concatenate(pieces).astype(np.int32)


def window_count(tokens: int, seq_len: int) -> int:
    """Windows of seq_len + 1 tokens, seq_len apart, in a stream of `tokens`."""
    return (tokens - 1) // seq_len


def train_examples(manifest: dict, seq_len: int) -> int:
    return window_count(manifest["splits"]["train"]["tokens"], seq_len)


def epoch_of(step: int, global_batch_size: int, examples: int) -> int:
    """The pass over the shuffled examples (1, 2, ...) that step `step` (1, 2, ...; batch step - 1)
    ends in; step 0 is in epoch 1."""
    return max(step * global_batch_size - 1, 0) // examples + 1


def local_batch_size(global_batch_size: int, process_count: int) -> int:
    if global_batch_size % process_count:
        raise UserError(f"train.batch_size: {global_batch_size} is not divisible by the {process_count} processes")
    return global_batch_size // process_count


def _local_example(examples, global_batch_size: int, local_batch_size: int, process_index: int, m: int):
    step, row = divmod(m, local_batch_size)
    return examples[step * global_batch_size + process_index * local_batch_size + row]


def train_batches(data_dir: str | Path, manifest: dict, *, seq_len: int, global_batch_size: int, seed: int,
                  process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
    """This process's training batches, endless: element k is {'tokens': int32 [G / P, seq_len + 1]},
    its rows of global batch k."""
    local = local_batch_size(global_batch_size, process_count)
    examples = grain.MapDataset.source(TokenWindows(data_dir, manifest, "train", seq_len))
    examples = examples.shuffle(seed=seed % 2**32).repeat()
    pick = functools.partial(_local_example, examples, global_batch_size, local, process_index)
    rows = grain.MapDataset.range(sys.maxsize).map(pick)
    return rows.batch(local, drop_remainder=True).map(lambda tokens: {"tokens": tokens})


def train_iterator(batches: grain.MapDataset, start_step: int = 0, prefetch: int = 4) -> grain.DatasetIterator:
    """An iterator over `batches` whose first element is batch `start_step`, read ahead by
    `prefetch` threads (worker processes are not needed: scripts/bench.py measures the threads at
    thousands of times what a train step consumes)."""
    iterator = iter(batches.to_iter_dataset(grain.ReadOptions(num_threads=prefetch, prefetch_buffer_size=prefetch)))
    if start_step:
        iterator.set_state({**iterator.get_state(), "next_index": start_step})
    return iterator


def _eval_example(examples, global_batch_size: int, local_batch_size: int, process_index: int, m: int):
    step, row = divmod(m, local_batch_size)
    index = step * global_batch_size + process_index * local_batch_size + row
    if index < len(examples):
        return {"tokens": examples[index], "weight": np.float32(1.0)}
    return {"tokens": np.zeros(examples.seq_len + 1, np.int32), "weight": np.float32(0.0)}


def eval_batches(data_dir: str | Path, manifest: dict, *, seq_len: int, global_batch_size: int,
                 process_index: int = 0, process_count: int = 1, max_batches: int | None = None):
    """One deterministic pass over the validation split, in order: a list-like of
    {'tokens': int32 [G / P, seq_len + 1], 'weight': float32 [G / P]}; the rows that pad the last
    batch have weight 0. `max_batches` stops early."""
    local = local_batch_size(global_batch_size, process_count)
    examples = TokenWindows(data_dir, manifest, "validation", seq_len)
    n_batches = -(-len(examples) // global_batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    pick = functools.partial(_eval_example, examples, global_batch_size, local, process_index)
    return grain.MapDataset.range(n_batches * local).map(pick).batch(local)


def global_batch(local_batch: dict, sharding: jax.sharding.Sharding) -> dict:
    """Global jax.Arrays from every process's rows (the leading axis is the batch)."""
    return {name: jax.make_array_from_process_local_data(sharding, rows) for name, rows in local_batch.items()}
