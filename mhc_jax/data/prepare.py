"""Build a tokenized dataset folder from text sources (the work behind scripts/prepare_data.py).

    documents (corpus.py) -> train / validation by document -> tokenizer -> shards + manifest.json

Layout of the folder:
  manifest.json                 what went in and what came out (see `prepare`; per split: documents,
                                tokens, UTF-8 bytes of the text, shards)
  tokenizer.json | .model       the tokenizer
  train-00000.arrayrecord ...   the split's documents, each followed by the end-of-text token,
  validation-00000.arrayrecord  concatenated into one token stream and cut into records of
                                RECORD_TOKENS tokens (the last one shorter)

A document goes to validation when the first 8 bytes of the sha256 of its text, read as a number
in [0, 1), fall below --val_fraction: the split is deterministic, independent of document order,
and a text repeated in the corpus never lands on both sides. The folder is built under a temporary
name beside it and renamed into place at the end, so it is never left half-written.
"""

import dataclasses
import datetime
import hashlib
import json
import os
import platform
import shutil
from pathlib import Path

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from mhc_jax.data import corpus
from mhc_jax.data.tokenizer import MIN_BPE_VOCAB, Tokenizer, file_sha256, gpt2_tokenizer, load_tokenizer, train_bpe
from mhc_jax.errors import UserError

FORMAT = "mhc-jax tokens v2"
RECORD_TOKENS = 8192  # tokens per record: an example of seq_len + 1 tokens reads one or two records
SHARD_RECORDS = 2048  # records per shard file (16M tokens)
ENCODE_BATCH = 256  # documents per tokenizer call
SPLITS = ("train", "validation")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Everything that decides the dataset's contents (with the bytes of the sources)."""
    sources: tuple[str, ...] = ("stdlib",)
    tokenizer: str = "bpe"  # 'bpe' trains one on the train split; 'gpt2'; or a tokenizer file
    vocab_size: int = 32768  # size of the trained BPE (ignored for a given tokenizer)
    val_fraction: float = 0.02  # expected share of documents in the validation split
    text_field: str = "text"  # the field (jsonl) or column (parquet, save_to_disk) holding the text


def in_validation(text: str, val_fraction: float) -> bool:
    digest = hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") < val_fraction * 2**64


class ShardWriter:
    """Appends documents to one split's token stream, written as fixed-size records."""

    def __init__(self, folder: Path, split: str, dtype):
        self.folder, self.split, self.dtype = folder, split, dtype
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
            name = f"{self.split}-{len(self.shards):05d}.arrayrecord"
            self.writer = ArrayRecordWriter(str(self.folder / name), "group_size:1")
            self.shards.append({"file": name, "records": 0, "tokens": 0})
        self.writer.write(tokens.tobytes())
        self.shards[-1]["records"] += 1
        self.shards[-1]["tokens"] += len(tokens)

    def close_shard(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.shards[-1]["sha256"] = file_sha256(self.folder / self.shards[-1]["file"])
            self.writer = None

    def finish(self) -> dict:
        if self.pending_tokens:
            self.write_record(np.concatenate(self.pending))
        self.close_shard()
        return {"documents": self.documents, "tokens": sum(s["tokens"] for s in self.shards),
                "bytes": self.text_bytes, "shards": self.shards}


def make_tokenizer(recipe: Recipe) -> Tokenizer:
    if recipe.tokenizer == "bpe":
        train_texts = (text for text in corpus.documents(list(recipe.sources), recipe.text_field, [])
                       if not in_validation(text, recipe.val_fraction))
        return train_bpe(train_texts, recipe.vocab_size)
    if recipe.tokenizer == "gpt2":
        return gpt2_tokenizer()
    return load_tokenizer(recipe.tokenizer)


def check_recipe(recipe: Recipe) -> None:
    if not recipe.sources:
        raise UserError("--source: give at least one source, e.g. --source=stdlib")
    if recipe.tokenizer == "bpe" and recipe.vocab_size < MIN_BPE_VOCAB:
        raise UserError(f"--vocab_size: {recipe.vocab_size} is too small for a byte-level BPE; "
                        f"it needs at least {MIN_BPE_VOCAB} (256 bytes + end-of-text)")
    if not 0 < recipe.val_fraction < 1:
        raise UserError(f"--val_fraction: must be between 0 and 1 (exclusive), got {recipe.val_fraction}")


def write_splits(folder: Path, recipe: Recipe, tokenizer: Tokenizer, source_stats: list) -> dict:
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    writers = {split: ShardWriter(folder, split, dtype) for split in SPLITS}
    batch: list[str] = []

    def flush():
        for text, tokens in zip(batch, tokenizer.encode_batch(batch)):
            split = "validation" if in_validation(text, recipe.val_fraction) else "train"
            writers[split].add(np.append(tokens, tokenizer.eos_id), len(text.encode("utf-8", "surrogatepass")))
        batch.clear()

    for text in corpus.documents(list(recipe.sources), recipe.text_field, source_stats):
        batch.append(text)
        if len(batch) == ENCODE_BATCH:
            flush()
    flush()
    return {"token_dtype": np.dtype(dtype).name, "record_tokens": RECORD_TOKENS,
            "splits": {split: writer.finish() for split, writer in writers.items()}}


def check_splits(splits: dict, recipe: Recipe) -> None:
    total = sum(s["documents"] for s in splits.values())
    if total == 0:
        raise UserError(f"--source: {', '.join(recipe.sources)} holds no non-empty documents")
    for split, info in splits.items():
        if info["documents"] == 0:
            raise UserError(f"--val_fraction: {recipe.val_fraction} leaves the {split} split empty "
                            f"({total} documents in all); choose a value that gives both splits documents")


def source_records(recipe: Recipe) -> list[dict]:
    """The manifest's record of the sources as they are now (one read, no tokenizing)."""
    stats: list = []
    for _ in corpus.documents(list(recipe.sources), recipe.text_field, stats):
        pass
    return [s.record() for s in stats]


def existing_dataset(out: Path, recipe: Recipe, overwrite: bool) -> dict | None:
    """The manifest already in `out` if it was made from this recipe and these source bytes;
    None if `out` is free (or `overwrite`); UserError if it holds something else."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return None
    manifest_path = out / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        same = (manifest.get("format") == FORMAT and manifest.get("recipe") == recipe_record(recipe)
                and manifest.get("sources") == source_records(recipe))
        if same:
            return manifest
    if overwrite:
        return None
    what = "a different dataset" if manifest_path.is_file() else "files that are not a dataset"
    raise UserError(f"--out: {out} already holds {what}; pass --overwrite to replace it, or choose another --out")


def recipe_record(recipe: Recipe) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(recipe)))  # tuples as lists, as in manifest.json


def prepare(out: str | Path, recipe: Recipe, command: str, overwrite: bool = False) -> tuple[dict, bool]:
    """Builds the dataset folder `out` from `recipe`; returns its manifest and whether it was built
    now (False: `out` already held this dataset, and nothing changed)."""
    out = Path(out)
    check_recipe(recipe)
    manifest = existing_dataset(out, recipe, overwrite)
    if manifest is not None:
        return manifest, False
    building = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir(parents=True)
    try:
        tokenizer = make_tokenizer(recipe)
        source_stats: list = []
        written = write_splits(building, recipe, tokenizer, source_stats)
        check_splits(written["splits"], recipe)
        tokenizer_path = tokenizer.save(building)
        manifest = {
            "format": FORMAT,
            "recipe": recipe_record(recipe),
            "sources": [s.record() for s in source_stats],
            "invalid_utf8": sum(s.invalid_utf8 for s in source_stats),
            "python_version": platform.python_version(),  # the 'stdlib' source depends on it
            "tokenizer": {"file": tokenizer_path.name, "sha256": file_sha256(tokenizer_path),
                          "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id},
            **written,
            "command": command,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        (building / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        commit(building, out)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return manifest, True


def commit(building: Path, out: Path) -> None:
    """Moves the finished folder into place; an old `out` is removed only once the new one is there."""
    if not out.exists():
        building.rename(out)
        return
    retired = out.parent / f".{out.name}.replaced-{os.getpid()}"
    out.rename(retired)
    building.rename(out)
    shutil.rmtree(retired)
