"""Sweeps: a grid of variants x scales x seeds, one train.py run and workdir (ROOT/<variant>-<scale>-seed<S>)
each; launchers.py starts them.

A run is finished when its checkpoints reach its `train.steps` (orbax's committed steps; the workdir
may be a bucket); the same sweep command again skips finished runs and resumes the others, since
train.py resumes from a workdir's newest checkpoint.
"""

import dataclasses
import importlib.util
import json
import os

from absl import flags
from ml_collections import config_flags

from mhc_jax import cli, config_rules, storage
from mhc_jax.errors import UserError
from mhc_jax.model.residual import VARIANTS
from mhc_jax.training import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
CONFIG_FILE = "configs/pretrain.py"


@dataclasses.dataclass(frozen=True)
class Run:
    variant: str
    scale: str
    seed: int
    overrides: tuple[str, ...]  # --config.a.b=v, the sweep's own first, then the seed and the wandb group

    @property
    def name(self) -> str:
        return f"{self.variant}-{self.scale}-seed{self.seed}"

    @property
    def config_flag(self) -> str:
        return f"--config={CONFIG_FILE}:{self.variant},{self.scale}"

    def train_args(self, root: str) -> list[str]:
        """train.py's arguments (after the script), relative to the repository root."""
        return [self.config_flag, f"--workdir={workdir(root, self)}", *self.overrides]


def workdir(root: str, run: Run) -> str:
    return str(storage.path(root) / run.name)


def load_module(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_sweep_file(path: str) -> dict:
    """configs/sweeps/<name>.py: get_sweep() -> {variants, scales, seeds, overrides: {field: value}}."""
    if not os.path.isfile(path):
        raise UserError(f"--sweep: no sweep file {path!r}; see configs/sweeps/ for examples")
    sweep = load_module(path, "sweep_file").get_sweep()
    unknown = set(sweep) - {"variants", "scales", "seeds", "overrides"}
    if unknown:
        raise UserError(f"--sweep: {path} has unknown keys {sorted(unknown)}; use variants, scales, seeds, overrides")
    return sweep


def grid(variants: list[str], scales: list[str], seeds: list[int], overrides: list[str], group: str) -> list[Run]:
    """Every (variant, scale, seed), each run's config checked as train.py would (UserError if not)."""
    for name, values, known in (("variants", variants, VARIANTS), ("scales", scales, config_file().SCALES)):
        bad = [v for v in values if v not in known]
        if bad or not values:
            raise UserError(f"--{name}: {', '.join(bad) or 'none given'}; choose from {', '.join(known)}")
    if not seeds:
        raise UserError("--seeds: none given, e.g. --seeds=0,1,2")
    runs = [Run(v, s, seed, (*overrides, f"--config.train.seed={seed}", f"--config.log.wandb_group={group}"))
            for s in scales for v in variants for seed in seeds]
    for run in runs:
        resolve_config(run)
    return runs


def resolve_config(run: Run):
    """The run's config with its overrides applied, checked like train.py checks it."""
    argv = ["sweep", f"--config={os.path.join(ROOT, CONFIG_FILE)}:{run.variant},{run.scale}", *run.overrides]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, sys_argv=argv)
    try:
        values(argv)
        config = values.config
    except cli.OVERRIDE_ERRORS as e:
        raise UserError(cli.override_error_line(e, argv)) from None
    config_rules.validate(config)
    return config


def config_file():
    """The module of CONFIG_FILE, read by path as --config reads it."""
    return load_module(os.path.join(ROOT, CONFIG_FILE), "pretrain_config")


def finished(root: str, run: Run) -> bool:
    """The run's committed checkpoints reach its train.steps."""
    path = storage.path(workdir(root, run))
    if not (path / "config.json").exists():
        return False
    steps = json.loads((path / "config.json").read_text())["train"]["steps"]
    saved = checkpoint.Checkpoints(path, create=False).steps() if (path / "checkpoints").exists() else []
    return bool(saved) and saved[0] >= steps


def train_command(run: Run, root: str, python: str = "python", distributed: bool = False) -> list[str]:
    return [python, "train.py", *(["--distributed"] if distributed else []), *run.train_args(root)]
