"""How train.py and eval.py behave when things go wrong (docs/training.md, Failure behaviour): damaged
checkpoints, a second signal during the stop checkpoint, eval.py beside a running training, a run
resumed on other numbers of processes, a host without the data."""

import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from helpers import QUIET, ROOT, STRAIGHT, losses, run_train, stop_with_sigterm, wait_for_lines, xla_flags

from configs.pretrain import get_config
from mhc_jax import sharding
from mhc_jax.errors import UserError
from mhc_jax.training import checkpoint
from mhc_jax.training.experiment import Experiment


@pytest.mark.slow
def test_a_second_signal_during_the_stop_checkpoint_leaves_only_committed_steps(default_data, tmp_path):
    """SIGINT, then SIGINT again while the stop checkpoint is being written: the process ends at once
    with one line (or cleanly, if the save won the race), and every step on disk reads."""
    workdir = tmp_path / "run"
    process = run_train(workdir, *STRAIGHT, "--config.train.steps=1000", devices=1, data_dir=default_data, wait=False)
    wait_for_lines(process, workdir, 6)
    process.send_signal(signal.SIGINT)
    time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode in (0, 128 + signal.SIGINT), stderr
    assert "Traceback" not in stderr
    if process.returncode:
        assert stderr.strip().splitlines()[-1].startswith("error: SIGINT again: stopped without finishing")
    resumed = run_train(workdir, *STRAIGHT, "--config.train.steps=1000", "--config.train.stop_at_step=12", devices=1,
                        data_dir=default_data)
    assert resumed.returncode == 0, resumed.stderr
    assert "unreadable" not in resumed.stderr and losses(workdir)[-1][0] == 12


@pytest.mark.slow
def test_eval_beside_a_running_training_reads_committed_steps(default_data, fetched_eval_data, tmp_path):
    """train.py saves every step and keeps one checkpoint (each save deletes the step before);
    eval.py on the same workdir meanwhile evaluates a step that was committed, retrying when the
    one it chose is rotated away."""
    data_dir, _ = fetched_eval_data
    workdir = tmp_path / "run"
    process = run_train(workdir, "--config.train.steps=100000", "--config.train.log_every=1",
                        "--config.train.checkpoint_every=1", "--config.train.keep_checkpoints=1", devices=1,
                        data_dir=default_data, wait=False)
    wait_for_lines(process, workdir, 3)
    env = {**os.environ, "XLA_FLAGS": xla_flags(1)}
    result = subprocess.run([sys.executable, "eval.py", f"--workdir={workdir}", "--tasks=perplexity", "--limit=2",
                             f"--data_dir={data_dir}"], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    stop_with_sigterm(process, workdir, after_lines=0)
    assert result.returncode == 0, result.stderr
    evaluated = [int(p.name) for p in (workdir / "eval").iterdir()]
    assert len(evaluated) == 1 and 1 <= evaluated[0] <= losses(workdir)[-1][0]


@pytest.mark.slow
def test_a_host_without_the_data_stops_every_process_with_one_line(default_data, tmp_path):
    """2 processes, each in its own folder with a relative data.dir that only process 0's folder holds
    (as on hosts without a shared filesystem): both stop at start, naming process 1."""
    (tmp_path / "p0").mkdir()
    (tmp_path / "p1").mkdir()
    (tmp_path / "p0" / "prepared").symlink_to(default_data)
    in_own_folder = ["bash", "-c", 'cd "$0/p$SLURM_PROCID" && exec "$@"', str(tmp_path)]
    command = [str(ROOT / "tests/fake_slurm/srun"), *in_own_folder, sys.executable, str(ROOT / "train.py"),
               "--distributed", f"--config={ROOT / 'configs/pretrain.py'}:hc,debug", f"--workdir={tmp_path / 'run'}",
               *QUIET, "--config.data.dir=prepared"]
    env = {**os.environ, "XLA_FLAGS": xla_flags(4), "SLURM_JOB_ID": str(1000 + (os.getpid() + 7) % 3000),
           "SLURM_NTASKS": "2"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    line = "error: data.dir: prepared is missing or incomplete on process(es) [1] of 2"
    errors = [l for l in result.stderr.splitlines() if l.startswith("error:")]  # one from each process
    assert len(errors) == 2 and all(e.startswith(line) for e in errors), result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_two_slurm_processes_train_like_one_through_the_sweeps_sbatch_script(straight_run, default_data, tmp_path):
    """scripts/sweep.py --launcher=slurm writes the sbatch script; it runs as written, its srun a stand-in
    that starts 2 processes x 4 devices (data=2 x fsdp=4) on localhost with SLURM's variables, which
    train.py --distributed reads. Against the straight run's 1 process x 8 devices (fsdp=8)."""
    overrides = (*STRAIGHT, *QUIET, "--config.train.stop_at_step=6", "--config.mesh.data=2", "--config.mesh.fsdp=4",
                 f"--config.data.dir={default_data}")
    written = subprocess.run([sys.executable, "scripts/sweep.py", f"--root={tmp_path / 'sweep'}", "--variants=hc",
                              "--scales=debug", "--seeds=0", "--launcher=slurm", "--nodes=2", "--gpus_per_node=0",
                              *overrides], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert written.returncode == 0, written.stderr
    script = tmp_path / "sweep" / "hc-debug-seed0.sbatch"
    assert "#SBATCH --nodes=2" in script.read_text() and "srun " in script.read_text()
    job_id = 1000 + os.getpid() % 3000  # JAX's coordinator port comes from the job id
    env = {**os.environ, "XLA_FLAGS": xla_flags(4), "PATH": f"{ROOT / 'tests/fake_slurm'}:{os.environ['PATH']}",
           "SLURM_JOB_ID": str(job_id), "SLURM_NTASKS": "2"}
    result = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    workdir = tmp_path / "sweep" / "hc-debug-seed0"
    two, one = losses(workdir), losses(straight_run)[:6]
    assert [s for s, _ in two] == [s for s, _ in one] == list(range(1, 7))
    np.testing.assert_allclose([l for _, l in two], [l for _, l in one], rtol=1e-5)
    assert "6" in os.listdir(workdir / "checkpoints")
    # The run saved by 2 processes resumes on 1, with the batches of the straight run.
    resumed = run_train(workdir, *STRAIGHT, "--config.train.stop_at_step=12", data_dir=default_data)
    assert resumed.returncode == 0, resumed.stderr
    assert [s for s, _ in losses(workdir)] == list(range(1, 13))
    np.testing.assert_allclose([l for _, l in losses(workdir)], [l for _, l in losses(straight_run)[:12]], rtol=1e-5)


def test_an_unreadable_checkpoint_is_set_aside_and_its_step_saved_again(tmp_path, caplog):
    mesh = jax.make_mesh((1, 1, 1, 1), sharding.MESH_AXES, devices=jax.devices()[:1],
                         axis_types=(jax.sharding.AxisType.Auto,) * 4)
    experiment = Experiment(get_config("residual,debug"), mesh)
    checkpoints = checkpoint.Checkpoints(tmp_path, keep=3)
    state = experiment.init_state()
    for step in (1, 2, 3):
        checkpoints.save(step, state, {"step": step})
        checkpoints.wait()
    (tmp_path / "checkpoints" / "3" / "state" / "_METADATA").write_text("{garbled")  # the state's tree
    for path in (tmp_path / "checkpoints" / "2" / "state").rglob("*"):  # every file of the state truncated
        if path.is_file():
            path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    step, restored, meta = checkpoints.restore_latest(experiment.abstract_state, lambda meta: None)
    assert (step, meta["step"]) == (1, 1)
    assert "3: unreadable" in caplog.text and "2: unreadable" in caplog.text
    np.testing.assert_array_equal(restored["params"]["embed"]["table"], state["params"]["embed"]["table"])
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names[0] == "1" and [n.split("-")[0] for n in names[1:]] == ["2.damaged", "3.damaged"]
    checkpoints.save(2, state, {"step": 2})  # the step of a damaged checkpoint is saved again
    checkpoints.wait()
    assert checkpoints.steps() == [2, 1]


def test_a_reader_beside_the_run_follows_a_step_deleted_under_it_and_skips_unreadable_ones(tmp_path, caplog):
    """read_newest as eval.py uses it (owner=False): step 3 is rotated away while being read, so the
    steps are listed again; step 2 cannot be read and is skipped but left in place; step 1 is read."""
    checkpoints = checkpoint.Checkpoints(tmp_path)
    for step in (1, 2, 3):
        checkpoints.save(step, {"x": np.zeros(2)}, {"step": step})
        checkpoints.wait()
    (tmp_path / "checkpoints" / "2" / "meta" / "metadata").write_text("{garbled")
    tried = []

    def read(step):
        tried.append(step)
        if step == 3:
            shutil.rmtree(tmp_path / "checkpoints" / "3")  # what keep_checkpoints does in the writing run
        return checkpoints.read_meta(step)

    assert checkpoints.read_newest(read, owner=False) == (1, {"step": 1})
    assert tried == [3, 2, 1] and "3: the steps changed while it was read" in caplog.text
    assert "2 cannot be read" in caplog.text and sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]
    with pytest.raises(UserError, match="--step: .*/2 cannot be read"):
        checkpoints.read_newest(read, owner=False, pinned=2)


def test_a_checkpoint_of_another_structure_is_refused_not_set_aside(tmp_path):
    mesh = jax.make_mesh((1, 1, 1, 1), sharding.MESH_AXES, devices=jax.devices()[:1],
                         axis_types=(jax.sharding.AxisType.Auto,) * 4)
    experiment = Experiment(get_config("residual,debug"), mesh)
    checkpoints = checkpoint.Checkpoints(tmp_path)
    state = experiment.init_state()
    checkpoints.save(1, {**state, "extra": state["step"]}, {"step": 1})
    checkpoints.wait()
    with pytest.raises(UserError, match="another structure .unexpected extra"):
        checkpoints.restore_latest(experiment.abstract_state, lambda meta: None)
    assert checkpoints.steps() == [1]


@pytest.mark.slow
def test_damaged_newest_checkpoints_are_survived_to_the_end(straight_run, default_data, tmp_path):
    """The newest checkpoint without its metadata, the one before with its state truncated: both are
    set aside, the run resumes from the third, saves their steps again and ends like the straight run."""
    workdir = tmp_path / "run"
    shutil.copytree(straight_run, workdir)
    shutil.rmtree(workdir / "checkpoints" / "24" / "meta")
    for path in (workdir / "checkpoints" / "20" / "state").rglob("*"):
        if path.is_file():
            path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    result = run_train(workdir, *STRAIGHT, data_dir=default_data)
    assert result.returncode == 0, result.stderr
    assert "24: unreadable" in result.stderr and "20: unreadable" in result.stderr
    names = [p.name for p in (workdir / "checkpoints").iterdir()]
    assert sorted(int(n) for n in names if n.isdigit()) == [15, 20, 24]
    assert sorted(n.split("-")[0] for n in names if not n.isdigit()) == ["20.damaged", "24.damaged"]
    assert losses(workdir) == losses(straight_run)
