"""A residual workdir's newest checkpoint as a Hugging Face folder (config.json, safetensors,
tokenizer.json) that transformers loads as Llama, Qwen2 or Qwen3 (docs/pretrained.md):

    python scripts/export_hf.py --workdir=runs/imported --out=exported
"""

from pathlib import Path

from absl import flags

from mhc_jax import cli
from mhc_jax.pretrained import importer

WORKDIR = flags.DEFINE_string("workdir", None, "a workdir of a residual model")
OUT = flags.DEFINE_string("out", None, "the folder to write (new, or empty)")


def main(argv):
    cli.expect(argv, (WORKDIR, "runs/imported"), (OUT, "exported"))
    written = importer.export_hf(Path(WORKDIR.value), Path(OUT.value))
    print(f"wrote {OUT.value}: {', '.join(written)}")


if __name__ == "__main__":
    cli.run(main)
