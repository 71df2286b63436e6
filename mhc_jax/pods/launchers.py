"""Where a sweep's runs start: here one after another, as printed commands, on every worker of a
TPU VM slice (a script), or as SLURM batch jobs (sbatch scripts); and the check that every run fits a
slice before any starts."""

import json
import os
import shlex
import signal
import subprocess
import sys

from mhc_jax import storage
from mhc_jax.errors import UserError
from mhc_jax.pods.sweep import ROOT, Run, train_command


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


def check_fits(runs: list[Run], topology: str) -> list[str]:
    """scripts/dry_run.py for every run, one line each; the names of the runs that do not fit."""
    refused = []
    for run in runs:
        result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts/dry_run.py"), f"--topology={topology}",
                                 "--json", run.config_flag, *run.overrides],
                                capture_output=True, text=True, cwd=ROOT)
        if result.returncode == 2:
            raise UserError(f"--dry_run_topology: {run.name}: {result.stderr.strip().splitlines()[-1]}")
        report = json.loads(result.stdout)
        total, memory = report.get("total_per_device"), report["memory_per_device"]
        usage = f" ({total / 2**30:.1f} of {memory / 2**30:.1f} GiB per device)" if total else ""
        print(f"{run.name:<32} {'fits' if report['fits'] else 'DOES NOT FIT'} on {topology}{usage}")
        if not report["fits"]:
            refused.append(run.name)
    return refused


def write_script(folder: str, name: str, text: str) -> str:
    """An executable script `name` in `folder`; its path."""
    path = os.path.join(folder, name)
    os.makedirs(folder, exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o755)
    return path



def write_tpu_script(runs: list[Run], root: str, folder: str, tpu: str, zone: str, remote_dir: str,
                     python: str) -> str:
    """FOLDER/tpu.sh (tpu_script); what to do next, in words."""
    if not (tpu and zone):
        raise UserError("--tpu_name, --tpu_zone: required with --launcher=tpu")
    if not storage.is_remote(root):
        raise UserError(f"--root: {root} is local, but a TPU slice's workers share no disk; use a bucket, "
                        "e.g. --root=gs://BUCKET/sweeps/NAME")
    path = write_script(folder, "tpu.sh", tpu_script(runs, root, tpu, zone, remote_dir, python))
    return f"wrote {path}; start the sweep with: bash {path}"


def write_slurm_scripts(runs: list[Run], root: str, folder: str, nodes: int, gpus_per_node: int,
                        extra: list[str]) -> str:
    """One FOLDER/<run>.sbatch per run (slurm_script) and FOLDER/submit.sh; what to do next, in words."""
    paths = [write_script(folder, f"{run.name}.sbatch",
                          slurm_script(run, root, nodes, gpus_per_node, os.path.abspath(folder), extra))
             for run in runs]
    submit = write_script(folder, "submit.sh", "#!/usr/bin/env bash\nset -euo pipefail\n" +
                          "".join(f"sbatch {shlex.quote(os.path.abspath(p))}\n" for p in paths))
    return f"wrote {len(paths)} sbatch scripts to {folder}; submit them with: bash {submit}"
