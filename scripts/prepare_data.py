"""Build a tokenized dataset folder (ArrayRecord shards + tokenizer + manifest.json).

    python scripts/prepare_data.py --out=data/default            # Python's stdlib, a 32k BPE
    python scripts/prepare_data.py --out=data/web --source=shards/ --text_field=text --tokenizer=gpt2
    python scripts/prepare_data.py --out=/shared/web --source=... --num_processes=4 --process_id=$HOST_INDEX

Sources, tokenizers and the folder layout are described in mhc_jax/data/corpus.py and mhc_jax/data/prepare.py.
Running it again with the same arguments on the same sources changes nothing; a run that was stopped
(even by kill -9) resumes where it stopped; a folder that holds another dataset is refused unless
--overwrite is given.
"""

import os
import shlex
import sys
import time

from absl import flags

from mhc_jax import cli
from mhc_jax.data import prepare
from mhc_jax.errors import UserError

DEFAULTS = prepare.Recipe()
OUT = flags.DEFINE_string("out", None, "the dataset folder to create, e.g. data/default")
SOURCE = flags.DEFINE_list("source", list(DEFAULTS.sources),
                           "comma-separated sources: stdlib, debian:<name>, files or folders")
TOKENIZER = flags.DEFINE_string("tokenizer", DEFAULTS.tokenizer,
                                "'bpe' (train one), 'gpt2', or a tokenizer.json / sentencepiece .model")
EOS_TOKEN = flags.DEFINE_string("eos_token", DEFAULTS.eos_token, "a tokenizer file's end-of-text token (default: the "
                                "eos_token of the tokenizer_config.json beside it, or <|endoftext|>, </s>, ...)")
VOCAB_SIZE = flags.DEFINE_integer("vocab_size", DEFAULTS.vocab_size, "size of the trained BPE")
VAL_FRACTION = flags.DEFINE_float("val_fraction", DEFAULTS.val_fraction, "share of documents for validation")
TEXT_FIELD = flags.DEFINE_string("text_field", DEFAULTS.text_field, "jsonl field / parquet column with the text")
UNIT_BYTES = flags.DEFINE_integer("unit_bytes", DEFAULTS.unit_bytes, "source bytes per work unit (unit of parallel "
                                  "work and of resuming; part of the recipe: it decides the shard files)")
BPE_SAMPLE_BYTES = flags.DEFINE_integer("bpe_sample_bytes", DEFAULTS.bpe_sample_bytes,
                                        "--tokenizer=bpe learns from this many bytes of the train split's first documents")
OVERWRITE = flags.DEFINE_bool("overwrite", False, "replace a folder that holds a different dataset")
WORKERS = flags.DEFINE_integer("workers", os.cpu_count(), "worker processes on this host (0: tokenize in this process)")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", 1, "hosts preparing --out together (a file system they share)")
PROCESS_ID = flags.DEFINE_integer("process_id", 0, "this host's index among --num_processes (0 writes the manifest)")


def main(argv):
    cli.expect(argv, (OUT, "data/default"))
    recipe = prepare.Recipe(sources=tuple(SOURCE.value), tokenizer=TOKENIZER.value, eos_token=EOS_TOKEN.value,
                            vocab_size=VOCAB_SIZE.value,
                            bpe_sample_bytes=BPE_SAMPLE_BYTES.value, val_fraction=VAL_FRACTION.value,
                            text_field=TEXT_FIELD.value, unit_bytes=UNIT_BYTES.value)
    if WORKERS.value < 0:
        raise UserError(f"--workers: must be 0 or more, got {WORKERS.value}")
    if not 0 <= PROCESS_ID.value < NUM_PROCESSES.value:
        raise UserError(f"--process_id: {PROCESS_ID.value} is not one of 0 .. {NUM_PROCESSES.value - 1} "
                        f"(--num_processes={NUM_PROCESSES.value})")
    cli.check_creatable(OUT.value, "--out")
    command = shlex.join(["python", "scripts/prepare_data.py", *sys.argv[1:]])
    start = time.time()
    manifest, built = prepare.prepare(OUT.value, recipe, command, overwrite=OVERWRITE.value, workers=WORKERS.value,
                                      process_index=PROCESS_ID.value, process_count=NUM_PROCESSES.value)
    if manifest is None:
        print(f"{OUT.value}: process {PROCESS_ID.value} prepared its units in {time.time() - start:.0f} s; "
              "process 0 writes the manifest")
        return
    splits = manifest["splits"]
    status = f"built in {time.time() - start:.0f} s" if built else "already prepared, nothing changed"
    print(f"{OUT.value} ({status}): {splits['train']['tokens']:,} train tokens ({splits['train']['documents']:,} documents), "
          f"{splits['validation']['tokens']:,} validation tokens ({splits['validation']['documents']:,} documents), "
          f"vocab {manifest['tokenizer']['vocab_size']:,}, {manifest['invalid_utf8']} invalid UTF-8 sequences "
          f"replaced; made by: {manifest['command']}")


if __name__ == "__main__":
    cli.run(main)
