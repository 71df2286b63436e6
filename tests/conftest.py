"""Test setup: 8 simulated CPU devices and fast compilation (set before jax loads), a compilation
cache, the `variant` fixture and the fetched benchmark folder."""

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

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

from configs.pretrain import VARIANTS  # noqa: E402
from helpers import ROOT, run_fetch, xla_flags  # noqa: E402
from mhc_jax import data  # noqa: E402


@pytest.fixture(params=tuple(VARIANTS))
def variant(request):
    return request.param


@pytest.fixture(scope="session")
def fetched_eval_data(tmp_path_factory):
    """The benchmark folder of scripts/fetch_eval_data.py, built once per session: (folder, result)."""
    out = tmp_path_factory.mktemp("eval") / "data"
    result = run_fetch(f"--out={out}")
    assert result.returncode == 0, result.stderr
    return out, result


@pytest.fixture(scope="session")
def default_data(tmp_path_factory):
    """The first-use path: train.py in a fresh folder prepares data/default itself, then trains."""
    cwd = tmp_path_factory.mktemp("fresh")
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), f"--config={ROOT / 'configs/pretrain.py'}:hc,debug",
                             f"--workdir={cwd / 'run'}", "--config.log.progress=False", "--config.train.steps=2"],
                            cwd=cwd, env={**os.environ, "XLA_FLAGS": xla_flags(8)}, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    assert "preparing data/default" in result.stdout
    assert data.load_manifest(cwd / "data/default")["splits"]["train"]["tokens"] > 5_000_000
    return cwd / "data/default"
