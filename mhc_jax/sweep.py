"""Sweeps: a grid of variants x scales x seeds, one train.py run and workdir (ROOT/<variant>-<scale>-seed<S>)
each, and the launchers that start them: here one after another, as printed commands, on every
worker of a TPU VM slice, or as SLURM batch jobs.

A run is finished when its checkpoints reach its `train.steps` (orbax's committed steps; the workdir
may be a bucket); the same sweep command again skips finished runs and resumes the others, since
train.py resumes from a workdir's newest checkpoint.
"""

import dataclasses
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys

from absl import flags
from ml_collections import config_flags

from configs.pretrain import VARIANTS, validate
from configs.scales import SCALES
from mhc_jax import checkpoint, cli, workdirs
from mhc_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
    return str(workdirs.path(root) / run.name)


def load_sweep_file(path: str) -> dict:
    """configs/sweeps/<name>.py: get_sweep() -> {variants, scales, seeds, overrides: {field: value}}."""
    if not os.path.isfile(path):
        raise UserError(f"--sweep: no sweep file {path!r}; see configs/sweeps/ for examples")
    spec = importlib.util.spec_from_file_location("sweep_file", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sweep = module.get_sweep()
    unknown = set(sweep) - {"variants", "scales", "seeds", "overrides"}
    if unknown:
        raise UserError(f"--sweep: {path} has unknown keys {sorted(unknown)}; use variants, scales, seeds, overrides")
    return sweep


def grid(variants: list[str], scales: list[str], seeds: list[int], overrides: list[str], group: str) -> list[Run]:
    """Every (variant, scale, seed), each run's config checked as train.py would (UserError if not)."""
    for name, values, known in (("variants", variants, VARIANTS), ("scales", scales, SCALES)):
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
    validate(config)
    return config


def finished(root: str, run: Run) -> bool:
    """The run's committed checkpoints reach its train.steps."""
    path = workdirs.path(workdir(root, run))
    if not (path / "config.json").exists():
        return False
    steps = json.loads((path / "config.json").read_text())["train"]["steps"]
    saved = checkpoint.Checkpoints(path, create=False).steps() if (path / "checkpoints").exists() else []
    return bool(saved) and saved[0] >= steps


def train_command(run: Run, root: str, python: str = "python", distributed: bool = False) -> list[str]:
    return [python, "train.py", *(["--distributed"] if distributed else []), *run.train_args(root)]


def run_locally(runs: list[Run], root: str) -> int:
    """One run after another in this process's terminal. SIGINT/SIGTERM reach the running train.py,
    which saves a checkpoint and exits; the sweep then stops (the same command resumes it)."""
    stop = {"requested": False}
    current = {}

    def forward(signum, frame):
        stop["requested"] = True
        if current.get("process"):
            current["process"].send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    failed = []
    try:
        for run in runs:
            print(f"== {run.name}", flush=True)
            current["process"] = subprocess.Popen(train_command(run, root, sys.executable), cwd=ROOT)
            code = current["process"].wait()
            if stop["requested"]:
                print(f"sweep stopped during {run.name}; the same command resumes it", file=sys.stderr)
                return 1
            if code != 0:
                failed.append(run.name)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if failed:
        print(f"error: runs that failed: {', '.join(failed)} (see their output above)", file=sys.stderr)
        return 1
    return 0


def tpu_script(runs: list[Run], root: str, tpu: str, zone: str, remote_dir: str, python: str) -> str:
    """A bash script that starts each run on every worker of the TPU VM slice `tpu`, one run after
    another: the same train.py --distributed on every host (JAX finds the slice's other hosts), with
    the workdirs in the bucket `root`."""
    lines = ["#!/usr/bin/env bash",
             f"# Sweep of {len(runs)} runs on the TPU VM slice {tpu}; checkpoints under {root}.",
             "# Rerunning it resumes interrupted runs; `python scripts/sweep.py` with the same flags drops finished ones.",
             "set -euo pipefail",
             f"TPU={shlex.quote(tpu)}",
             f"ZONE={shlex.quote(zone)}",
             'on_every_worker() { gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="$1"; }']
    for run in runs:
        command = f"cd {remote_dir} && {shlex.join(train_command(run, root, python, distributed=True))}"
        lines += [f"echo '== {run.name}'", f"on_every_worker {shlex.quote(command)}"]
    return "\n".join(lines) + "\n"


def slurm_script(run: Run, root: str, nodes: int, gpus_per_node: int, log_dir: str, extra: list[str]) -> str:
    """An sbatch script for one run: one process per GPU (one per node without GPUs), started by srun.
    JAX reads SLURM's environment for the process count, the process index, the coordinator (the
    first node) and, from the task's local rank, the GPU each process takes."""
    directives = [f"--job-name={run.name}", f"--nodes={nodes}", f"--ntasks-per-node={max(gpus_per_node, 1)}",
                  *([f"--gpus-per-node={gpus_per_node}"] if gpus_per_node else []),
                  f"--output={log_dir}/{run.name}-%j.log", *extra]
    return "\n".join(["#!/usr/bin/env bash", *(f"#SBATCH {d}" for d in directives),
                      "set -euo pipefail", f"cd {shlex.quote(ROOT)}",
                      f"srun {shlex.join(train_command(run, root, sys.executable, distributed=True))}"]) + "\n"
