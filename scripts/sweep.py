"""A grid of runs: variants x scales x seeds, each in its own workdir under --root.

    python scripts/sweep.py --root=runs/sweep --variants=residual,hc,mhc --scales=10m,100m --seeds=0,1,2
                            [--sweep=configs/sweeps/NAME.py] [--config.a.b=v ...] [--launcher=local]
                            [--dry_run_topology=v5p-256]

--launcher=local runs them here one after another; print prints their commands; tpu writes a script
that starts each on every worker of a TPU VM slice (--tpu_name, --tpu_zone; --root must be a bucket);
slurm writes an sbatch script per run (--nodes, --gpus_per_node, --sbatch=--partition=...,--time=...).
The same command again skips finished runs and resumes interrupted ones. A sweep file gives the grid
and overrides (configs/sweeps/); flags given here take precedence. Runs share the wandb group --group.
"""

import shlex
import sys

from absl import flags

from mhc_jax import cli, storage
from mhc_jax.errors import UserError
from mhc_jax.pods import launchers, sweep

SWEEP_ROOT = flags.DEFINE_string("root", None, "folder or bucket (gs://...) that holds one workdir per run")
VARIANTS = flags.DEFINE_list("variants", ["residual", "hc", "mhc"], "residual connections to compare")
SCALES = flags.DEFINE_list("scales", ["debug"], "model scales")
SEEDS = flags.DEFINE_list("seeds", ["0"], "seeds (parameter init and data order)")
SWEEP_FILE = flags.DEFINE_string("sweep", None, "a sweep file, e.g. configs/sweeps/debug.py")
LAUNCHER = flags.DEFINE_enum("launcher", "local", ["local", "print", "tpu", "slurm"], "where the runs start")
GROUP = flags.DEFINE_string("group", None, "wandb group of the runs (default: the root's last folder name)")
DRY_RUN_TOPOLOGY = flags.DEFINE_string("dry_run_topology", None, "refuse the sweep unless every run fits this "
                                       "topology (scripts/dry_run.py)")
SCRIPTS = flags.DEFINE_string("scripts", None, "where the tpu/slurm launchers write their scripts "
                              "(default: the root, or runs/<group>-launch for a bucket)")
TPU_NAME = flags.DEFINE_string("tpu_name", None, "tpu: the TPU VM slice")
TPU_ZONE = flags.DEFINE_string("tpu_zone", None, "tpu: its zone")
REMOTE_DIR = flags.DEFINE_string("remote_dir", "mhc-jax", "tpu: this repository's folder on the workers")
REMOTE_PYTHON = flags.DEFINE_string("remote_python", "python3", "tpu: the workers' Python")
NODES = flags.DEFINE_integer("nodes", 1, "slurm: nodes per run")
GPUS_PER_NODE = flags.DEFINE_integer("gpus_per_node", 8, "slurm: GPUs per node (0: none requested)")
SBATCH = flags.DEFINE_list("sbatch", [], "slurm: more #SBATCH options, e.g. --partition=gpu,--time=48:00:00")

OVERRIDES = [a for a in sys.argv[1:] if a.startswith("--config.")]  # applied to every run
sys.argv = [a for a in sys.argv if a not in OVERRIDES]


def grid_from_flags() -> tuple[list[str], list[str], list[int], list[str]]:
    """(variants, scales, seeds, overrides): the sweep file's, with the flags given here on top."""
    file = sweep.load_sweep_file(SWEEP_FILE.value) if SWEEP_FILE.value else {}
    def pick(flag, key):
        return flag.value if flag.present or key not in file else file[key]
    try:
        seeds = [int(s) for s in pick(SEEDS, "seeds")]
    except ValueError:
        raise UserError(f"--seeds: integers, e.g. --seeds=0,1,2; got {SEEDS.value}") from None
    overrides = [f"--config.{k}={v}" for k, v in file.get("overrides", {}).items()] + OVERRIDES
    return list(pick(VARIANTS, "variants")), list(pick(SCALES, "scales")), seeds, overrides


def main(argv):
    cli.expect(argv, (SWEEP_ROOT, "runs/sweep"))
    root = SWEEP_ROOT.value
    storage.check_reachable(root, "--root")
    group = GROUP.value or storage.path(root).name
    runs = sweep.grid(*grid_from_flags(), group=group)
    pending = [run for run in runs if not sweep.finished(root, run)]
    print(f"sweep {group}: {len(runs)} runs, {len(runs) - len(pending)} finished, {len(pending)} to run", flush=True)
    refused = launchers.check_fits(pending, DRY_RUN_TOPOLOGY.value) if DRY_RUN_TOPOLOGY.value else []
    if refused:
        print(f"error: refusing the sweep: {', '.join(refused)} do not fit {DRY_RUN_TOPOLOGY.value} "
              f"(see scripts/dry_run.py --suggest)", file=sys.stderr)
        return 1
    if LAUNCHER.value == "local":
        return launchers.run_locally(pending, root)
    if LAUNCHER.value == "print":
        print("\n".join(shlex.join(sweep.train_command(run, root)) for run in pending))
        return 0
    scripts = SCRIPTS.value or (f"runs/{group}-launch" if storage.is_remote(root) else str(storage.path(root)))
    if LAUNCHER.value == "tpu":
        print(launchers.write_tpu_script(pending, root, scripts, TPU_NAME.value, TPU_ZONE.value, REMOTE_DIR.value,
                                         REMOTE_PYTHON.value))
    else:
        print(launchers.write_slurm_scripts(pending, root, scripts, NODES.value, GPUS_PER_NODE.value, SBATCH.value))
    return 0


if __name__ == "__main__":
    cli.run(main)
