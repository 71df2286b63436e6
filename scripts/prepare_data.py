"""Build a tokenized dataset folder (ArrayRecord shards + tokenizer + manifest.json).

    python scripts/prepare_data.py --out=data/default            # Python's stdlib, a 32k BPE
    python scripts/prepare_data.py --out=data/web --source=shards/ --text_field=text --tokenizer=gpt2

Sources, tokenizers and the folder layout are described in mhc_jax/data/corpus.py and mhc_jax/data/prepare.py.
Running it again with the same arguments on the same sources changes nothing; a folder that holds
another dataset is refused unless --overwrite is given.
"""

import shlex
import sys
import time

from absl import flags

from mhc_jax import cli
from mhc_jax.data import prepare

DEFAULTS = prepare.Recipe()
OUT = flags.DEFINE_string("out", None, "the dataset folder to create, e.g. data/default")
SOURCE = flags.DEFINE_list("source", list(DEFAULTS.sources),
                           "comma-separated sources: stdlib, debian:<name>, files or folders")
TOKENIZER = flags.DEFINE_string("tokenizer", DEFAULTS.tokenizer,
                                "'bpe' (train one), 'gpt2', or a tokenizer.json / sentencepiece .model")
VOCAB_SIZE = flags.DEFINE_integer("vocab_size", DEFAULTS.vocab_size, "size of the trained BPE")
VAL_FRACTION = flags.DEFINE_float("val_fraction", DEFAULTS.val_fraction, "share of documents for validation")
TEXT_FIELD = flags.DEFINE_string("text_field", DEFAULTS.text_field, "jsonl field / parquet column with the text")
OVERWRITE = flags.DEFINE_bool("overwrite", False, "replace a folder that holds a different dataset")


def main(argv):
    cli.expect(argv, (OUT, "data/default"))
    recipe = prepare.Recipe(sources=tuple(SOURCE.value), tokenizer=TOKENIZER.value, vocab_size=VOCAB_SIZE.value,
                            val_fraction=VAL_FRACTION.value, text_field=TEXT_FIELD.value)
    command = shlex.join(["python", "scripts/prepare_data.py", *sys.argv[1:]])
    start = time.time()
    manifest, built = prepare.prepare(OUT.value, recipe, command, overwrite=OVERWRITE.value)
    splits = manifest["splits"]
    status = f"built in {time.time() - start:.0f} s" if built else "already prepared, nothing changed"
    print(f"{OUT.value} ({status}): {splits['train']['tokens']:,} train tokens ({splits['train']['documents']:,} documents), "
          f"{splits['validation']['tokens']:,} validation tokens ({splits['validation']['documents']:,} documents), "
          f"vocab {manifest['tokenizer']['vocab_size']:,}, {manifest['invalid_utf8']} invalid UTF-8 sequences "
          f"replaced; made by: {manifest['command']}")


if __name__ == "__main__":
    cli.run(main)
