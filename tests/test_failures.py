"""How train.py and eval.py behave when things go wrong (the README's Failure behaviour): a second
signal during the stop checkpoint, eval.py beside a running training, a host without the data.
Damaged checkpoints and resumes on other process counts are in test_trainer.py, beside the runs
they reuse."""

import os
import signal
import subprocess
import sys
import time

from helpers import QUIET, ROOT, STRAIGHT, losses, run_train, stop_with_sigterm, wait_for_lines, xla_flags


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
    errors = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 2 and all(e.startswith(line) for e in errors), result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
