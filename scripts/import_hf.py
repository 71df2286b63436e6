"""A Hugging Face causal LM folder (Llama, Mistral, Qwen2, Qwen3: config.json, safetensors,
tokenizer.json) as a workdir of ours that eval.py evaluates (docs/pretrained.md):

    python scripts/import_hf.py --hf_dir=PATH --workdir=runs/imported
    python eval.py --workdir=runs/imported --tasks=mmlu --limit=50

--config sets the training fields stored with it (its model fields come from config.json);
the default is the residual variant's debug scale.
"""

from pathlib import Path

from absl import flags

from configs.pretrain import get_config
from mhc_jax import cli
from mhc_jax.pretrained import importer

CONFIG = cli.define_config_flag()
HF_DIR = flags.DEFINE_string("hf_dir", None, "a Hugging Face model folder")
WORKDIR = flags.DEFINE_string("workdir", None, "the workdir to write (new, or without checkpoints)")


def main(argv):
    cli.expect(argv, (HF_DIR, "a Hugging Face model folder"), (WORKDIR, "the workdir to write"))
    config = get_config("residual,debug") if CONFIG.value is None else cli.load_config(CONFIG)
    meta = importer.import_hf(Path(HF_DIR.value), Path(WORKDIR.value), config)
    model = meta["config"]["model"]
    print(f"wrote {WORKDIR.value}: step 0 of a residual model, {model['n_layers']} layers of width {model['d_model']}, "
          f"vocabulary {model['vocab_size']}, end-of-text {meta['eos_token']!r}")


if __name__ == "__main__":
    cli.run(main)
