"""The command-line contract: JSON out on success; on bad input one line on stderr naming the
field, exit code 2, no traceback."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import assert_user_error

pytestmark = pytest.mark.slow  # every test here starts a script in a subprocess

ROOT = Path(__file__).parents[1]


def run_script(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_count_params_of_the_paper_scales_is_table_5():
    result = run_script("scripts/count_params.py", "--config=configs/pretrain.py:mhc,27b")
    assert result.returncode == 0, result.stderr
    counts = json.loads(result.stdout)
    assert abs(counts["total"] / 27.0e9 - 1) < 0.01 and abs(counts["active"] / 4.14e9 - 1) < 0.01


def test_count_params_prints_one_json_object():
    result = run_script("scripts/count_params.py", "--config=configs/pretrain.py:mhc,1b")
    assert result.returncode == 0, result.stderr
    counts = json.loads(result.stdout)
    assert set(counts) == {"total", "embedding", "non_embedding", "active", "residual_overhead"}
    assert counts["non_embedding"] > 0.9e9 and counts["residual_overhead"] > 0


@pytest.mark.parametrize("args, field", [
    (["--config=configs/pretrain.py:hyper,debug"], "unknown variant 'hyper'"),
    (["--config=configs/pretrain.py:mhc,7b"], "unknown scale '7b'"),
    (["--config=configs/pretrain.py:mhc,debug", "--config.model.n_streams=0"], "model.n_streams"),
    (["--config=configs/pretrain.py:mhc,debug", "--config.model.no_such_field=1"], "--config.model.no_such_field"),
    (["--config=configs/pretrain.py:mhc,debug", "--config.model.n_layers=two"], "--config.model.n_layers"),
    (["--config=configs/missing.py:mhc,debug"], "configs/missing.py"),
    (["--config=configs/pretrain.py:mhc,moe_debug", "--config.model.moe.top_k=9"], "model.moe.top_k: got 9"),
])  # every field's rule and relation, in process: tests/test_configs.py
def test_bad_input_is_one_line_naming_the_field(args, field):
    result = run_script("scripts/count_params.py", *args)
    assert_user_error(result, field)
    assert result.stdout == ""


@pytest.mark.parametrize("override, line", [
    ("--config.model.n_streams=4", "model.n_streams: got 4; the residual variant has one stream; "
                                   "use model.residual=hc or mhc for more"),
    ("--config.train.schedule=cosin", "train.schedule: got 'cosin'; must be one of step, cosine, wsd"),
])
def test_train_validates_its_config_before_writing(tmp_path, override, line):
    result = run_script("train.py", "--config=configs/pretrain.py:residual,debug", f"--workdir={tmp_path / 'run'}",
                        override)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {line}"]
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("script, flag", [
    ("train.py", "--workdir"), ("scripts/prepare_data.py", "--out"), ("scripts/stability.py", "--out")])
def test_a_path_that_cannot_be_created_is_one_line_naming_its_flag(tmp_path, script, flag):
    """A folder asked for under a regular file cannot be created (by any user, root included)."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    config = [] if script == "scripts/prepare_data.py" else ["--config=configs/pretrain.py:hc,debug"]
    result = run_script(script, *config, f"{flag}={blocker / 'run'}")
    assert_user_error(result, f"{flag}: cannot use {blocker}", "Not a directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_a_missing_config_file_is_one_line_with_or_without_overrides():
    for overrides in ([], ["--config.train.lr=0.1"]):
        result = run_script("train.py", "--config=configs/missing.py:mhc,debug", "--workdir=/tmp/never", *overrides)
        assert_user_error(result, "--config: cannot read the config file 'configs/missing.py'")


REFAULTS = """
import ctypes, resource, sys
from mhc_jax import host_memory

applied = sys.argv[1] == "reuse" and host_memory.reuse_freed_pages()
libc, size = ctypes.CDLL(None), 256 << 20  # a block as large as a step's temporaries
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
faults = []
for _ in range(2):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, faults[1])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_host_pages_are_reused():
    """A freed block as large as a step's temporaries comes back without faulting its pages in again."""
    plain, reused = (run_script("-c", REFAULTS, mode).stdout.split() for mode in ("plain", "reuse"))
    assert plain[0] == "False" and int(plain[1]) > 50_000  # glibc unmaps it and maps it again
    assert reused == ["True", "0"]
