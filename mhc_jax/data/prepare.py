"""Build a tokenized dataset folder from text sources (the work behind scripts/prepare_data.py).

    sources -> work units (corpus.plan) -> tokenizer -> each unit: train / validation shards

Layout of the folder:
  manifest.json                 what went in and what came out (see `assemble`; per split: documents,
                                tokens, UTF-8 bytes of the text, shards in order)
  tokenizer.json | .model       the tokenizer
  train-000000-000.arrayrecord  unit 0's train documents, each followed by the end-of-text token,
  ...                           concatenated and cut into records of RECORD_TOKENS tokens (the
  validation-000000-000...      last record of each shard shorter); a unit's shards in order

A split's token stream is its shards in order, so it is the same whatever runs the units: one
process or several workers (`workers`), on one host or several (`process_count`).

A document goes to validation when the first 8 bytes of the sha256 of its text, read as a number
in [0, 1), fall below --val_fraction: the split is deterministic, independent of document order,
and a text repeated in the corpus never lands on both sides.

Resuming: the folder is built in `.NAME.partial` beside it: `plan.json` (the recipe and the plan's
hash), the tokenizer, the shards, and `ledger/UNIT.json` written (atomically) once a unit's shards
are complete. A run killed at any point and started again with the same command keeps what the
ledger lists and does the rest; a unit without its ledger entry is done again from the start. The
finished folder is renamed into place at the end, so `NAME` is never half-written; bad input
removes the partial folder (the input has to change, and with it the plan). A finished folder
made from the same recipe and the same files (names, sizes and modification times) is kept as it
is, in the time it takes to list the files.

`out` and the sources may be in a bucket (gs://...). Hosts that prepare together share `out`, a
bucket or a shared file system. A bucket has no rename: shards are written on local disk, copied
into the partial folder before their ledger entry, and the finished folder is copied into place,
its manifest last (a folder without manifest.json is not a dataset to any reader).
"""

import ctypes
import dataclasses
import datetime
import hashlib
import json
import multiprocessing
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from concurrent import futures
from pathlib import Path

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from etils import epath

from mhc_jax import storage
from mhc_jax.data import corpus
from mhc_jax.data.tokenizer import MIN_BPE_VOCAB, Tokenizer, file_sha256, gpt2_tokenizer, load_tokenizer, train_bpe
from mhc_jax.errors import UserError

FORMAT = "mhc-jax tokens v3"
RECORD_TOKENS = 8192  # tokens per record: an example of seq_len + 1 tokens reads one or two records
SHARD_RECORDS = 2048  # records per shard file at most (16M tokens)
ENCODE_BATCH = 256  # documents per tokenizer call at most ...
ENCODE_BATCH_BYTES = 1 << 20  # ... and text bytes (a worker's memory follows the batch, not the source)
SPLITS = ("train", "validation")
POLL_SECONDS = 2  # how often a process waiting for another's work looks again
PR_SET_PDEATHSIG = 1  # prctl option: a signal for this process when its parent dies
COPY_THREADS = 16  # files copied at once when a finished folder is copied into place in a bucket
TOKENIZER_COMPANIONS = ("tokenizer_config.json",)  # read with the tokenizer file


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Everything that decides the dataset's contents (with the bytes of the sources)."""
    sources: tuple[str, ...] = ("stdlib",)
    tokenizer: str = "bpe"  # 'bpe' trains one on the train split; 'gpt2'; or a tokenizer file
    eos_token: str = ""  # a tokenizer file's end-of-text token; '': its tokenizer_config.json's, or a usual name
    vocab_size: int = 32768  # size of the trained BPE (ignored for a given tokenizer)
    bpe_sample_bytes: int = 1 << 30  # the BPE learns from the train split's first documents, this many UTF-8 bytes
    val_fraction: float = 0.02  # expected share of documents in the validation split
    text_field: str = "text"  # the field (jsonl) or column (parquet, save_to_disk) holding the text
    unit_bytes: int = 8 << 20  # source bytes per work unit (see corpus.plan); each unit writes its own shards


def in_validation(text: str, val_fraction: float) -> bool:
    digest = hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") < val_fraction * 2**64


class ShardWriter:
    """Appends documents to one unit's part of a split, written as records of RECORD_TOKENS into
    `folder` (a bucket's shards: on local disk first, copied there once complete)."""

    def __init__(self, folder: epath.Path, prefix: str, dtype):
        self.folder, self.prefix, self.dtype = folder, prefix, dtype
        self.local = Path(tempfile.mkdtemp(prefix="mhc-jax-shards-")) if storage.is_remote(folder) else folder
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.shards: list[dict] = []
        self.writer = None
        self.documents = 0
        self.text_bytes = 0

    def add(self, tokens: np.ndarray, text_bytes: int) -> None:
        self.documents += 1
        self.text_bytes += text_bytes
        self.pending.append(tokens.astype(self.dtype))
        self.pending_tokens += len(tokens)
        if self.pending_tokens >= RECORD_TOKENS:
            stream = np.concatenate(self.pending)
            full = len(stream) - len(stream) % RECORD_TOKENS
            for start in range(0, full, RECORD_TOKENS):
                self.write_record(stream[start:start + RECORD_TOKENS])
            self.pending, self.pending_tokens = [stream[full:]], len(stream) - full

    def write_record(self, tokens: np.ndarray) -> None:
        if self.writer is None or self.shards[-1]["records"] == SHARD_RECORDS:
            self.close_shard()
            name = f"{self.prefix}-{len(self.shards):03d}.arrayrecord"
            self.writer = ArrayRecordWriter(str(self.local / name), "group_size:1")
            self.shards.append({"file": name, "records": 0, "tokens": 0})
        self.writer.write(tokens.tobytes())
        self.shards[-1]["records"] += 1
        self.shards[-1]["tokens"] += len(tokens)

    def close_shard(self) -> None:
        if self.writer is not None:
            self.writer.close()
            written = self.local / self.shards[-1]["file"]
            self.shards[-1]["sha256"] = file_sha256(written)
            if self.local != self.folder:
                storage.copy_file(written, self.folder / written.name)
                os.remove(written)
            self.writer = None

    def finish(self) -> dict:
        if self.pending_tokens:
            self.write_record(np.concatenate(self.pending))
        self.close_shard()
        if self.local != self.folder:
            shutil.rmtree(self.local)
        return {"documents": self.documents, "tokens": sum(s["tokens"] for s in self.shards),
                "bytes": self.text_bytes, "shards": self.shards}


def make_tokenizer(recipe: Recipe, units: list[corpus.Unit]) -> Tokenizer:
    if recipe.tokenizer == "bpe":
        return train_bpe(bpe_sample(recipe, units), recipe.vocab_size)
    if recipe.tokenizer == "gpt2":
        return gpt2_tokenizer()
    return load_tokenizer(recipe.tokenizer, recipe.eos_token)


def bpe_sample(recipe: Recipe, units: list[corpus.Unit]):
    """The train split's documents in order, until bpe_sample_bytes of UTF-8 text."""
    taken = 0
    for unit in units:
        for text in corpus.unit_documents(unit, recipe.text_field, corpus.SourceStats(unit.source)):
            if not in_validation(text, recipe.val_fraction):
                yield text
                taken += len(text.encode("utf-8", "surrogatepass"))
                if taken >= recipe.bpe_sample_bytes:
                    return


def check_recipe(recipe: Recipe) -> None:
    if not recipe.sources:
        raise UserError("--source: give at least one source, e.g. --source=stdlib")
    if recipe.tokenizer == "bpe" and recipe.vocab_size < MIN_BPE_VOCAB:
        raise UserError(f"--vocab_size: {recipe.vocab_size} is too small for a byte-level BPE; "
                        f"it needs at least {MIN_BPE_VOCAB} (256 bytes + end-of-text)")
    if recipe.eos_token and recipe.tokenizer in ("bpe", "gpt2"):
        raise UserError(f"--eos_token: names the end-of-text token of a tokenizer file; --tokenizer={recipe.tokenizer} "
                        "uses <|endoftext|>")
    if not 0 < recipe.val_fraction < 1:
        raise UserError(f"--val_fraction: must be between 0 and 1 (exclusive), got {recipe.val_fraction}")
    for name in ("unit_bytes", "bpe_sample_bytes"):
        if getattr(recipe, name) < 1:
            raise UserError(f"--{name}: must be positive, got {getattr(recipe, name)}")


def plan_record(recipe: Recipe, units: list[corpus.Unit]) -> dict:
    """What decides the folder: the recipe and the plan, with every file's size and modification time."""
    stamps = {piece.path: corpus.stamp(piece) for unit in units for piece in unit.pieces}
    plan = [[unit.source, [[p.path, p.start, p.stop, *stamps[p.path]] for p in unit.pieces]] for unit in units]
    return {"format": FORMAT, "recipe": recipe_record(recipe), "units": len(units),
            "plan_sha256": hashlib.sha256(json.dumps(plan).encode()).hexdigest()}


def recipe_record(recipe: Recipe) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(recipe)))  # tuples as lists, as in manifest.json


def existing_dataset(out: epath.Path, plan: dict, overwrite: bool) -> dict | None:
    """The manifest already in `out` if it was made from this plan; None if `out` is free (or
    `overwrite`); UserError if it holds something else."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return None
    manifest_path = out / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("plan") == plan:
            return manifest
    if overwrite:
        return None
    what = "a different dataset" if manifest_path.is_file() else "files that are not a dataset"
    raise UserError(f"--out: {out} already holds {what}; pass --overwrite to replace it, or choose another --out")


def write_json(path: epath.Path, value) -> None:
    storage.write_whole(path, json.dumps(value, indent=1) + "\n")


def read_json(path: epath.Path):
    return json.loads(path.read_text()) if path.is_file() else None


def encode_unit(building: epath.Path, index: int, unit: corpus.Unit, recipe: Recipe, tokenizer: Tokenizer) -> dict:
    """Unit `index`'s shards, then its ledger entry (what the manifest needs of it)."""
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    writers = {split: ShardWriter(building, f"{split}-{index:06d}", dtype) for split in SPLITS}
    stats = corpus.SourceStats(unit.source)
    batch: list[str] = []
    batch_bytes = 0

    def flush():
        for text, tokens in zip(batch, tokenizer.encode_batch(batch)):
            split = "validation" if in_validation(text, recipe.val_fraction) else "train"
            writers[split].add(np.append(tokens, tokenizer.eos_id), len(text.encode("utf-8", "surrogatepass")))
        batch.clear()

    for text in corpus.unit_documents(unit, recipe.text_field, stats):
        batch.append(text)
        batch_bytes += len(text)
        if len(batch) == ENCODE_BATCH or batch_bytes >= ENCODE_BATCH_BYTES:
            flush()
            batch_bytes = 0
    flush()
    entry = {"unit": index, "source": stats.record(), "token_dtype": np.dtype(dtype).name,
             "splits": {split: writer.finish() for split, writer in writers.items()}}
    write_json(building / "ledger" / f"{index:06d}.json", entry)
    return entry


_WORKER: dict = {}


def start_worker(tokenizer_path: str) -> None:
    """A worker process tokenizes on one thread (the workers are the parallelism), and dies with the
    process that started it (Linux), so that a killed run leaves no worker writing into the folder."""
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER["tokenizer"] = load_tokenizer(tokenizer_path)


def worker_pool(workers: int, tokenizer_path: Path) -> futures.ProcessPoolExecutor:
    """`workers` processes started with `start_worker`; spawned, not forked: the caller may have
    started threads (JAX, grain)."""
    return futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=start_worker, initargs=(str(tokenizer_path),))


def worker_encode_unit(building: str, index: int, unit: corpus.Unit, recipe: Recipe) -> dict:
    return encode_unit(epath.Path(building), index, unit, recipe, _WORKER["tokenizer"])


def run_units(building: epath.Path, todo: list[int], units: list[corpus.Unit], recipe: Recipe, tokenizer_path: Path,
              workers: int) -> None:
    """Units `todo`, in this process (workers 0) or in that many worker processes."""
    progress = Progress(len(todo))
    if workers == 0:
        tokenizer = load_tokenizer(tokenizer_path)
        for index in todo:
            progress.add(encode_unit(building, index, units[index], recipe, tokenizer))
        return
    with worker_pool(workers, tokenizer_path) as pool:
        running = [pool.submit(worker_encode_unit, str(building), index, units[index], recipe) for index in todo]
        try:
            for done in futures.as_completed(running):
                progress.add(done.result())
        except BaseException:
            for job in running:
                job.cancel()
            raise


class Progress:
    """A line on stderr every 30 s of a long preparation."""

    def __init__(self, units: int):
        self.units, self.done, self.tokens, self.start, self.shown = units, 0, 0, time.time(), time.time()

    def add(self, entry: dict) -> None:
        self.done += 1
        self.tokens += sum(split["tokens"] for split in entry["splits"].values())
        if time.time() - self.shown > 30:
            self.shown = time.time()
            rate = self.tokens / (self.shown - self.start)
            print(f"prepared {self.done}/{self.units} units, {self.tokens:,} tokens ({rate:,.0f} tokens/s)",
                  file=sys.stderr, flush=True)


def assemble(building: epath.Path, plan: dict, units: list[corpus.Unit], tokenizer_path: epath.Path,
             command: str) -> dict:
    """The manifest, from the ledger entries in unit order."""
    entries = [read_json(building / "ledger" / f"{index:06d}.json") for index in range(len(units))]
    splits = {split: {"documents": sum(e["splits"][split]["documents"] for e in entries),
                      "tokens": sum(e["splits"][split]["tokens"] for e in entries),
                      "bytes": sum(e["splits"][split]["bytes"] for e in entries),
                      "shards": [shard for e in entries for shard in e["splits"][split]["shards"]]}
              for split in SPLITS}
    total = sum(s["documents"] for s in splits.values())
    sources = [source_total(source, [e["source"] for e in entries if e["source"]["source"] == source])
               for source in dict.fromkeys(unit.source for unit in units)]
    if total == 0:
        raise UserError(f"--source: {', '.join(plan['recipe']['sources'])} holds no non-empty documents")
    for split, info in splits.items():
        if info["documents"] == 0:
            raise UserError(f"--val_fraction: {plan['recipe']['val_fraction']} leaves the {split} split empty "
                            f"({total} documents in all); choose a value that gives both splits documents")
    tokenizer = load_tokenizer(storage.local_copy(tokenizer_path, TOKENIZER_COMPANIONS))
    return {
        "format": FORMAT,
        "recipe": plan["recipe"],
        "plan": plan,
        "sources": sources,
        "invalid_utf8": sum(s["invalid_utf8"] for s in sources),
        "python_version": platform.python_version(),  # the 'stdlib' source depends on it
        "tokenizer": {"file": tokenizer_path.name, "sha256": file_sha256(tokenizer_path),
                      "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id, "eos_token": tokenizer.eos_token},
        "token_dtype": entries[0]["token_dtype"],
        "record_tokens": RECORD_TOKENS,
        "splits": splits,
        "command": command,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def source_total(source: str, records: list[dict]) -> dict:
    """One source's record, from its units' (its sha256: of their sha256s, in order)."""
    summed = {key: sum(r[key] for r in records) for key in ("files", "bytes", "documents", "invalid_utf8")}
    digests = "".join(r["sha256"] for r in records).encode()
    return {"source": source, **summed, "sha256": hashlib.sha256(digests).hexdigest()}


def prepare(out: str | Path, recipe: Recipe, command: str, overwrite: bool = False, workers: int = 0,
            process_index: int = 0, process_count: int = 1) -> tuple[dict, bool]:
    """Builds the dataset folder `out` from `recipe`; returns its manifest (None on a process other
    than 0, which leaves the manifest to process 0) and whether it was built now (False: `out`
    already held this dataset, and nothing changed). Each of `process_count` processes (hosts
    sharing `out`'s file system) runs every process_count-th unit, in `workers` worker processes."""
    out = epath.Path(out)
    check_recipe(recipe)
    units = corpus.plan(list(recipe.sources), recipe.unit_bytes)
    plan = plan_record(recipe, units)
    building = out.parent / f".{out.name}.partial"
    finished = read_json(building / "manifest.json")
    if finished is not None and finished["plan"] == plan:  # stopped while the folder was put in place
        if process_index == 0:
            finish(building, out)
        return finished, True
    manifest = existing_dataset(out, plan, overwrite)
    if manifest is not None:
        return manifest, False
    try:
        tokenizer_path = start_building(building, plan, recipe, units, process_index)
        todo = [i for i in range(process_index, len(units), process_count)
                if not (building / "ledger" / f"{i:06d}.json").is_file()]
        run_units(building, todo, units, recipe, storage.local_copy(tokenizer_path, TOKENIZER_COMPANIONS), workers)
        if process_index != 0:
            return None, True
        wait_for(lambda: all((building / "ledger" / f"{i:06d}.json").is_file() for i in range(len(units))),
                 "the other processes' units")
        manifest = assemble(building, plan, units, tokenizer_path, command)
        write_json(building / "manifest.json", manifest)
        finish(building, out)
    except UserError:
        if process_count == 1:  # bad input: nothing to resume from
            storage.remove(building)
        raise
    return manifest, True


def start_building(building: epath.Path, plan: dict, recipe: Recipe, units: list[corpus.Unit],
                   process_index: int) -> epath.Path:
    """The partial folder of this plan, with its tokenizer (a partial folder of another plan is
    started afresh); process 0 makes them, the others wait for them. Returns the tokenizer's path."""
    if process_index == 0:
        if read_json(building / "plan.json") != plan:
            storage.remove(building)
            (building / "ledger").mkdir(parents=True)
            write_json(building / "plan.json", plan)
        if not tokenizer_file(building):
            staging = Path(tempfile.mkdtemp(prefix="mhc-jax-tokenizer-"))
            saved = make_tokenizer(recipe, units).save(staging)
            for path in sorted(staging.iterdir(), key=lambda p: p == saved):  # the tokenizer itself last
                storage.copy_file(path, building / path.name)
            shutil.rmtree(staging)
    wait_for(lambda: read_json(building / "plan.json") == plan and tokenizer_file(building), "process 0's tokenizer")
    return tokenizer_file(building)


def tokenizer_file(building: epath.Path) -> epath.Path | None:
    return next((building / name for name in ("tokenizer.json", "tokenizer.model") if (building / name).is_file()),
                None)


def wait_for(ready, what: str) -> None:
    if not ready():
        print(f"waiting for {what}", file=sys.stderr, flush=True)
    while not ready():
        time.sleep(POLL_SECONDS)


def finish(building: epath.Path, out: epath.Path) -> None:
    """The bookkeeping out of the finished folder, and the folder into place."""
    for name in ("ledger", "plan.json"):
        storage.remove(building / name)
    copy_into_place(building, out) if storage.is_remote(out) else commit(building, out)


def copy_into_place(building: epath.Path, out: epath.Path) -> None:
    """A bucket's finished folder into place: copied, manifest.json last, then the partial folder
    removed. Stopped at any point, `prepare` starts here again (the partial folder has it all)."""
    storage.remove(out)
    files = [path for path in building.iterdir() if path.name != "manifest.json"]
    with futures.ThreadPoolExecutor(COPY_THREADS) as pool:
        list(pool.map(lambda path: storage.copy_file(path, out / path.name), files))
    storage.copy_file(building / "manifest.json", out / "manifest.json")
    storage.remove(building)


def commit(building: epath.Path, out: epath.Path) -> None:
    """Moves the finished folder into place; an old `out` is removed only once the new one is there."""
    if not out.exists():
        building.rename(out)
        return
    retired = out.parent / f".{out.name}.replaced-{os.getpid()}"
    out.rename(retired)
    building.rename(out)
    shutil.rmtree(retired)
