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

A weighted mixture of prepared folders (`data.mixture`, `Mixture`) keeps that: the row stream is
cut into blocks of MIXTURE_BLOCK rows; in every block source s fills counts[s] rows (its weight's
share of the block, rounded), at positions a permutation seeded by (seed, block) chooses, and its
j-th row overall is its own j-th shuffled example. Which example a row holds is computed from the
row's index alone. One folder is the mixture of one source: row m is its example m.
"""

import dataclasses
import functools
import hashlib
import json
import sys
from pathlib import Path

import grain
import jax
import numpy as np
from etils import epath

from mhc_jax import storage
from mhc_jax.data.prepare import FORMAT, SPLITS, TOKENIZER_COMPANIONS
from mhc_jax.data.tokenizer import Tokenizer, load_tokenizer
from mhc_jax.errors import UserError


def load_manifest(data_dir: str | Path) -> dict:
    """The dataset's manifest, after checking that its shards are all there."""
    if storage.is_remote(data_dir):
        storage.check_reachable(data_dir, "data dir")
    data_dir = epath.Path(data_dir)
    path = data_dir / "manifest.json"
    if not path.is_file():
        raise UserError(f"data dir {data_dir}: no manifest.json; make it with "
                        f"python scripts/prepare_data.py --out={data_dir}")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        flags = [f"--source={','.join(value)}" if name == "sources" else f"--{name}={value}"
                 for name, value in manifest.get("recipe", {}).items()]
        again = " ".join(flags)
        raise UserError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}; prepare it again: "
                        f"python scripts/prepare_data.py --out={data_dir} {again} --overwrite")
    present = {path.name for path in data_dir.iterdir()}  # one listing (a bucket answers each question remotely)
    for split in SPLITS:
        for shard in manifest["splits"][split]["shards"]:
            if shard["file"] not in present:
                raise UserError(f"data dir {data_dir}: shard {shard['file']} listed in manifest.json is missing; "
                                "prepare the data again with --overwrite")
    return manifest


def fingerprint(manifest: dict) -> str:
    """One hash of what a run trains and validates on: the tokenizer and every shard's contents."""
    content = {"tokenizer": manifest["tokenizer"]["sha256"],
               "splits": {split: [shard["sha256"] for shard in manifest["splits"][split]["shards"]] for split in SPLITS}}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def load_data_tokenizer(data_dir: str | Path, manifest: dict) -> Tokenizer:
    tokenizer = epath.Path(data_dir) / manifest["tokenizer"]["file"]
    return load_tokenizer(storage.local_copy(tokenizer, TOKENIZER_COMPANIONS), manifest["tokenizer"]["eos_token"])


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
    stream is its shards in order; each shard's records hold record_tokens tokens but its last.
    Shards in a bucket are read in place (ArrayRecord's reader fetches the records it is asked for)."""

    def __init__(self, data_dir: str | Path, manifest: dict, split: str, seq_len: int):
        info = manifest["splits"][split]
        self.records = grain.sources.ArrayRecordDataSource([str(epath.Path(data_dir) / s["file"])
                                                            for s in info["shards"]])
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


def epoch_of(rows: int, examples: int) -> int:
    """The pass (1, 2, ...) over a source's shuffled examples that its first `rows` rows end in."""
    return max(rows - 1, 0) // examples + 1


def local_batch_size(global_batch_size: int, process_count: int) -> int:
    if global_batch_size % process_count:
        raise UserError(f"train.batch_size: {global_batch_size} is not divisible by the {process_count} processes")
    return global_batch_size // process_count


def _local_example(examples, global_batch_size: int, local_batch_size: int, process_index: int, m: int):
    step, row = divmod(m, local_batch_size)
    return examples[step * global_batch_size + process_index * local_batch_size + row]


MIXTURE_BLOCK = 4096  # rows per block of a mixture (each source's row count per block is fixed)


@dataclasses.dataclass(frozen=True)
class Source:
    """A prepared folder and its weight in the training mixture."""
    dir: str
    manifest: dict
    weight: float = 1.0

    @property
    def name(self) -> str:
        return Path(self.dir).name


def parse_mixture(text: str) -> tuple[list[tuple[str, float]], str | None]:
    """data.mixture's 'DIR:WEIGHT,DIR:WEIGHT' as (folder, weight) pairs ('' is no mixture), and
    what is wrong with it (None: nothing)."""
    pairs = []
    for item in (part.strip() for part in text.split(",") if part.strip()):
        folder, _, weight = item.rpartition(":")
        try:
            value = float(weight)
        except ValueError:
            value = float("nan")
        if not folder or not value > 0:
            return [], f"{item!r} is not FOLDER:WEIGHT with a positive weight, e.g. data/web:0.7,data/code:0.3"
        pairs.append((folder, value))
    if len({Path(folder).name for folder, _ in pairs}) < len(pairs):  # the names of the metrics
        return [], "names two folders of the same name; give each folder once, under a name of its own"
    return pairs, None


def block_counts(weights: list[float]) -> np.ndarray:
    """Rows of each source per MIXTURE_BLOCK: the weights' shares, rounded by largest remainder."""
    exact = np.asarray(weights, np.float64) / sum(weights) * MIXTURE_BLOCK
    counts = np.floor(exact).astype(np.int64)
    counts[np.argsort(-(exact - counts), kind="stable")[:MIXTURE_BLOCK - counts.sum()]] += 1
    return counts


class Mixture:
    """Row m of the training stream, and how many rows of each source the rows before m took."""

    def __init__(self, examples: list, counts: np.ndarray, seed: int):
        self.examples, self.counts, self.seed = examples, counts, seed

    @functools.lru_cache(maxsize=4)
    def block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Block b's source of each position, and each position's rank among its source's."""
        sources = np.repeat(np.arange(len(self.counts)), self.counts)
        if len(self.counts) > 1:
            sources = sources[np.random.default_rng([self.seed, b]).permutation(MIXTURE_BLOCK)]
        ranks = np.zeros(MIXTURE_BLOCK, np.int64)
        for s in range(len(self.counts)):
            ranks[sources == s] = np.arange(self.counts[s])
        return sources, ranks

    def __getitem__(self, m: int):
        b, position = divmod(m, MIXTURE_BLOCK)
        sources, ranks = self.block(b)
        s = sources[position]
        return self.examples[s][b * int(self.counts[s]) + int(ranks[position])]

    def taken(self, m: int) -> np.ndarray:
        """Rows of each source among rows [0, m)."""
        b, position = divmod(m, MIXTURE_BLOCK)
        return b * self.counts + np.bincount(self.block(b)[0][:position], minlength=len(self.counts))


def data_fingerprint(manifest: dict, sources: list[Source]) -> str:
    """What a run trains and validates on: the validation folder's fingerprint, and with a mixture,
    every folder's and its weight's."""
    if len(sources) == 1 and sources[0].manifest is manifest:
        return fingerprint(manifest)
    parts = [fingerprint(manifest), [[fingerprint(s.manifest), s.weight] for s in sources]]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def mixture(sources: list[Source], seq_len: int, seed: int) -> Mixture:
    """The training stream over `sources`, each its train split shuffled (seed + its index), repeated."""
    examples = [grain.MapDataset.source(TokenWindows(s.dir, s.manifest, "train", seq_len))
                .shuffle(seed=(seed + i) % 2**32).repeat() for i, s in enumerate(sources)]
    counts = block_counts([s.weight for s in sources])
    for s, count in zip(sources, counts):
        if count == 0:
            raise UserError(f"data.mixture: {s.dir}'s weight gives it no row in a block of {MIXTURE_BLOCK}; "
                            "raise it or leave the folder out")
    return Mixture(examples, counts, seed)


def train_batches(stream: Mixture, *, global_batch_size: int, process_index: int = 0,
                  process_count: int = 1) -> grain.MapDataset:
    """This process's training batches from `stream` (see `mixture`), endless: element k is
    {'tokens': int32 [G / P, seq_len + 1]}, its rows of global batch k."""
    local = local_batch_size(global_batch_size, process_count)
    pick = functools.partial(_local_example, stream, global_batch_size, local, process_index)
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
