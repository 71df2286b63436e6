"""Surgery: a residual model's weights in an HC or mHC model that computes the same function.

Every parameter but the sites' is copied; each site's starts as residual.function_preserving
sets it, which keeps the n streams that the embedding copies each token into identical, each the
residual model's stream. The last difference is the final sum over the streams: n copies of the
stream. The final RMSNorm
sees n x h instead of h, which changes its output only through its epsilon: by about
eps / (2 mean(h^2)) relative.
"""

import dataclasses
import json
from pathlib import Path
from typing import Callable

import jax
import ml_collections
import numpy as np

from mhc_jax import config_rules, validation
from mhc_jax.data.tokenizer import load_tokenizer
from mhc_jax.errors import UserError
from mhc_jax.model import residual, transformer
from mhc_jax.pretrained import hf
from mhc_jax.training import checkpoint


def graft(source: dict, target: dict, residual_kind: str) -> dict:
    """`target` (a freshly initialized HC or mHC model's parameters, a pure dict) with every
    parameter the residual `source` has copied from it, and its sites set to start as the identity
    of the residual update (residual.function_preserving)."""
    missing = sorted(set(paths(target)) - set(paths(source)) - {p for p in paths(target) if is_site(p)})
    extra = sorted(set(paths(source)) - set(paths(target)))
    if missing or extra:
        raise UserError(f"--init_from: its parameters are not this model's without the sites (missing {missing[:3]}, "
                        f"unexpected {extra[:3]}); the model fields must match the source's")

    def pick(path, value):
        name = jax.tree_util.keystr(path)
        if is_site(name):
            return np.asarray(residual.function_preserving(residual_kind, path[-1].key, value))
        copied = np.asarray(lookup(source, path), dtype=np.asarray(value).dtype)
        if copied.shape != np.shape(value):
            raise UserError(f"--init_from: {name} is {list(copied.shape)} in the source and {list(np.shape(value))} "
                            "here; the model fields must match the source's")
        return copied

    return jax.tree_util.tree_map_with_path(pick, target)


def paths(tree: dict) -> list[str]:
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def is_site(path: str) -> bool:
    return any(f"['{name}']" in path for name in transformer.SITE_ATTRIBUTES)


def lookup(tree: dict, path):
    for key in path:
        tree = tree[key.key]
    return tree


# The model fields that say which residual connection runs: the run's own config sets them; every
# other model field (the shape, the attention, the experts) comes from the source.
VARIANT_FIELDS = ("residual", "n_streams", "hc.", "mhc.", "laurel.")


@dataclasses.dataclass
class Source:
    """What --init_from names: a workdir of ours (its newest checkpoint) or a Hugging Face folder."""
    path: str
    model: dict  # its model fields (a residual model's)
    tokenizer_sha256: str
    read_params: Callable  # mesh -> its parameters, a pure dict of numpy arrays


def open_source(path: str) -> Source:
    folder = Path(path)
    if (folder / "config.json").is_file() and "architectures" in json.loads((folder / "config.json").read_text()):
        fields = hf.model_fields(hf.read_config(folder))
        if not (folder / "tokenizer.json").is_file():
            raise UserError(f"--init_from: {folder} has no tokenizer.json")
        return Source(path, fields, load_tokenizer(folder / "tokenizer.json").saved_sha256(),
                      lambda mesh: hf.params_from_hf(hf.read_weights(folder), fields))
    checkpoints = checkpoint.Checkpoints(folder, create=False) if (folder / "checkpoints").is_dir() else None
    if checkpoints is None or not checkpoints.steps():
        raise UserError(f"--init_from: {folder} is neither a workdir with checkpoints nor a Hugging Face model folder")
    step = checkpoints.steps()[0]
    meta = checkpoints.read_meta(step)
    model = meta["config"]["model"]
    if model["residual"] != "residual":
        raise UserError(f"--init_from: {folder} holds a {residual.variant_name(ml_collections.ConfigDict(model))} "
                        "model; surgery starts from a residual one")

    def read_params(mesh):
        _, _, sharded = transformer.abstract_model(ml_collections.ConfigDict(model), mesh)
        return jax.device_get(checkpoints.restore_params(step, sharded))

    tokenizer = next((folder / name for name in ("tokenizer.json", "tokenizer.model") if (folder / name).is_file()), None)
    if tokenizer is None:
        raise UserError(f"--init_from: {folder} lacks the tokenizer its checkpoints were trained with")
    return Source(path, model, load_tokenizer(tokenizer).saved_sha256(), read_params)  # as data folders keep it


def take_model_fields(config, source: Source) -> None:
    """config.model gets the source's fields, all but VARIANT_FIELDS and those that change only how
    the model compiles (config_rules.COMPILE_ONLY_FIELDS)."""
    kept = VARIANT_FIELDS + config_rules.COMPILE_ONLY_FIELDS
    for name, value in validation.flat(source.model).items():
        if not any(name == k or (k.endswith(".") and name.startswith(k)) for k in kept):
            section = config.model
            *parents, leaf = name.split(".")
            for parent in parents:
                section = section[parent]
            section[leaf] = value
