"""Pod tooling: dry runs for TPU slices and simulated CPU meshes, bench's --vary. (Sweeps, compare.py
and the launchers: test_sweep.py; buckets: test_buckets.py.)"""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import ROOT, assert_user_error, xla_flags

from configs.pretrain import get_config
from mhc_jax import sharding
from mhc_jax.errors import UserError
from mhc_jax.pods import aot, bench, fit_report, memory_sources, topology
from mhc_jax.training.experiment import Experiment


def dry_run(*args, devices=1):
    env = {**os.environ, "XLA_FLAGS": xla_flags(devices, optimized=False)}
    return subprocess.run([sys.executable, "scripts/dry_run.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_moe_debug_fits_a_tpu_slice_with_the_tpu_kernels():
    """Through the command line, for v5p-8 (simulated CPU meshes: the in-process dry runs below)."""
    result = dry_run("--config=configs/pretrain.py:mhc,moe_debug", "--topology=v5p-8", "--config.mesh.expert=2",
                     "--config.train.seq_len=128", "--json")  # a whole number of splash's 128-position tiles
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["fits"] and 0 < report["total_per_device"] < report["memory_per_device"]
    assert report["per_device"]["parameters"] > 0 and report["per_device"]["temporaries"] > 0
    assert np.prod(list(report["mesh"].values())) == report["devices"] == 4
    assert list(report["steps"]) == ["train", "eval", "diagnostics"]
    for step in report["steps"].values():
        assert step["fits"] and sum(step["temporaries_by_source"].values()) == step["per_device"]["temporaries"]
    assert report["steps"]["train"]["temporaries_by_source"]["saved_activations"] > 0
    assert report["mesh"]["expert"] == 2 and report["dtype"] == "bfloat16" and report["days"] > 0
    assert report["attention_kernel"] == "splash"  # 'auto' on a TPU: the Pallas kernel, compiled for it
    assert report["moe_exchange"] == "ragged_all_to_all"  # and XLA's ragged all-to-all, forward and backward
    assert report["moe_grouped_matmul"] == "megablox"  # the weight gradient in megablox's Pallas kernel
    assert report["steps"]["train"]["collectives"]["ragged-all-to-all"] == 2 * report["steps"]["eval"]["collectives"][
        "ragged-all-to-all"] > 0


@pytest.mark.slow
def test_a_config_too_large_for_the_chip_does_not_fit():
    result = dry_run("--config=configs/pretrain.py:mhc,debug", "--topology=v5e-1", "--config.train.batch_size=512",
                     "--config.train.seq_len=4096")
    assert result.returncode == 1, result.stderr
    assert "DOES NOT FIT" in result.stdout
    assert re.search(r"per device +train +eval +diagnostics\n +parameters +[\d.]+ KiB +- +-", result.stdout)


MiB = 2**20


def dry_run_here(config, memory: int, steps=aot.STEPS) -> dict:
    """aot.dry_run on one of this process's CPU devices, taken for a chip of `memory` bytes."""
    return aot.dry_run(config, topology.Topology("cpu:1", "cpu", 1, memory, None), jax.devices("cpu")[:1], 0.4, steps)


def test_the_dry_run_compiles_every_step_and_fits_only_if_every_one_fits():
    """32 sequences in 32 microbatches with whole-sequence logits (loss_chunk=0): the train step
    makes one sequence's logits at a time, evaluation all 32 at once, float32 [32, 64, 16384] =
    128 MiB. On a 96 MiB device the train step fits and evaluation does not."""
    B, T, V = 32, 64, 16384
    config = get_config("residual,debug")
    config.model.vocab_size = V
    config.train.update(batch_size=B, microbatches=B, loss_chunk=0)
    report = dry_run_here(config, 96 * MiB)
    steps = report["steps"]
    assert list(steps) == ["train", "eval", "diagnostics"]
    assert steps["train"]["fits"] and not steps["eval"]["fits"] and steps["diagnostics"]["fits"]
    assert not report["fits"]
    assert report["reason"] == f"the eval step needs {steps['eval']['total_per_device'] / 2**30:.2f} GiB per device"
    assert report["per_device"] == steps["train"]["per_device"]
    assert report["total_per_device"] == steps["train"]["total_per_device"]
    for step in steps.values():
        sources = step["temporaries_by_source"]
        assert sum(sources.values()) == step["per_device"]["temporaries"] and min(sources.values()) >= 0
        assert step["per_device"]["optimizer_state"] == steps["train"]["per_device"]["optimizer_state"] > 0
    logits = B * T * V * 4
    assert steps["eval"]["temporaries_by_source"]["logits_loss"] >= logits
    assert logits / B <= steps["train"]["temporaries_by_source"]["logits_loss"] < logits
    assert steps["train"]["temporaries_by_source"]["saved_activations"] > 0
    assert steps["eval"]["temporaries_by_source"]["saved_activations"] == 0  # no backward pass to save for
    text = fit_report.report_text("residual,debug", report)
    assert re.search(r"per device +train +eval +diagnostics\n", text)
    assert re.search(r"\n    saved activations +[\d.]+ [KM]iB +0 B +0 B\n", text)
    assert re.search(r"\n    logits/loss +[\d.]+ MiB +[\d.]+ MiB +0 B\n", text)
    assert "\nDOES NOT FIT: the eval step needs" in text


@pytest.mark.slow
def test_the_logits_source_shrinks_with_the_loss_chunk():
    """The train step at debug (8 x 64 tokens) with 32768 tokens of vocabulary: whole-sequence logits
    hold float32 [8, 64, 32768] at the peak; in chunks of 16 positions, less, but at least one
    chunk's (a quarter of that)."""
    logits = {}
    for chunk in (0, 16):
        config = get_config("residual,debug")  # the loss does not depend on the residual connection
        config.model.update(vocab_size=32768, n_layers=1, remat="full")
        config.train.loss_chunk = chunk
        train = dry_run_here(config, 2**40, steps=("train",))["steps"]["train"]
        logits[chunk] = train["temporaries_by_source"]["logits_loss"]
    whole = 8 * 64 * 32768 * 4
    assert logits[0] >= whole
    assert whole // 4 <= logits[16] < whole


def test_static_maps_in_the_diagnostics_step_are_split_over_the_batch():
    """hc_static's maps are parameters broadcast to every token ([2L, B, T, n, n]). On 8 devices
    its diagnostics step holds what hc's does (per-token maps, split over the batch as the
    activations are), not the whole batch's maps on every device: that took 1.8x hc's temporaries
    here and 755 GB per chip at 27b."""
    temporaries = {}
    for variant in ("hc", "hc_static"):
        config = get_config(f"{variant},debug")
        config.train.batch_size = 64
        aot.resolve_auto(config, topology.parse("cpu:8"))
        experiment = Experiment(config, sharding.make_mesh(config.mesh, jax.devices("cpu")[:8]))
        function, args = aot.step_programs(experiment)["diagnostics"]
        temporaries[variant] = function.lower(*args).compile().memory_analysis().temp_size_in_bytes
    assert temporaries["hc_static"] < 1.1 * temporaries["hc"]


def test_the_moe_layers_buffers_are_moe_dispatch():
    """The evaluation step of moe_debug on one device: at its peak, the MoE layers' dispatch (the
    `moe` scope) holds most of the temporaries; nothing is saved for a backward pass."""
    config = get_config("mhc,moe_debug")
    aot.resolve_auto(config, topology.parse("cpu:1"))
    experiment = Experiment(config, sharding.make_mesh(config.mesh, jax.devices("cpu")[:1]))
    function, args = aot.step_programs(experiment)["eval"]
    compiled, sources = memory_sources.compile_with_sources(function.lower(*args))
    by_source = sources["by_source"]
    assert sum(by_source.values()) == compiled.memory_analysis().temp_size_in_bytes
    assert by_source["moe_dispatch"] > sum(by_source.values()) / 2 and by_source["saved_activations"] == 0
    assert sources["largest"][0]["source"] == "moe_dispatch" and "/moe/" in sources["largest"][0]["op_name"]


@pytest.mark.slow
def test_dry_run_bad_inputs():
    assert_user_error(dry_run("--config=configs/pretrain.py:mhc,debug", "--topology=v5p-7"),
                      "--topology: unknown topology 'v5p-7'", "v5p-8 ... v5p-2048")
    assert_user_error(dry_run("--config=configs/pretrain.py:mhc,debug", "--topology=cpu:2", "--suggest"), "--suggest")
    assert_user_error(dry_run("--config=configs/pretrain.py:mhc,debug", "--topology=cpu:2", "--eval"), "--eval", "TPU")
    assert_user_error(dry_run("--config=configs/pretrain.py:mhc,debug", "--topology=cpu:3"),
                      "train.batch_size: 8", "= 3 devices")


@pytest.mark.parametrize("start,walk", [("v5p-256", ["v5p-256", "v5p-128", "v5p-64"]),
                                         ("v5p-32", ["v5p-32", "v5p-64", "v5p-128"]),
                                         ("v5p-2048", ["v5p-2048", "v5p-1024", "v5p-512", "v5p-256", "v5p-128", "v5p-64"])])
@pytest.mark.slow
def test_suggest_walks_from_the_named_slice_to_the_smallest_that_fits_then_the_lightest_remat(start, walk):
    """The search with a stand-in for the compiler: a slice fits from 64 devices (v5p-128) up, remat
    'none' never; from above it walks down, from below up, each slice with remat 'full' first."""
    config = get_config("residual,1b")
    tried = []

    def compile_for(candidate, target):
        tried.append((target.name, candidate.model.remat))
        fits = target.devices >= 64 and candidate.model.remat != "none"
        return {"topology": target.name, "mesh": dict(candidate.mesh), "remat": candidate.model.remat, "fits": fits}

    result = aot.suggest(config, topology.parse(start), compile_for)
    assert result["smallest"] == "v5p-128" and result["remat"] == "dots" and result["fits"]
    assert result["mesh"]["fsdp"] * result["mesh"]["tensor"] == 64
    assert tried == [(name, "full") for name in walk] + [("v5p-128", "dots"), ("v5p-128", "none")]
    tried.clear()
    assert not aot.suggest(config, topology.parse(start), lambda c, t: compile_for(c, t) | {"fits": False})["fits"]


@pytest.mark.slow
def test_topology_names():
    assert topology.parse("v5p-256").libtpu_name == "v5p:4x4x8" and topology.parse("v5p-256").devices == 128
    assert topology.parse("v6e-64").libtpu_name == "v6e:8x8"
    assert topology.parse("cpu:8").devices == 8
    assert topology.tpu_names("v5p")[0] == "v5p-8" and topology.tpu_names("v5p")[-1] == "v5p-2048"


def test_bench_vary_parses_values_as_the_fields_type_and_validates_them():
    config = get_config("mhc,debug")
    configs = bench.varied_configs(config, "model.mhc.use_res=true,False")
    assert [c.model.mhc.use_res for c in configs.values()] == [True, False]
    assert [c.train.loss_chunk for c in bench.varied_configs(config, "train.loss_chunk=0,256").values()] == [0, 256]
    for vary, message in (("train.loss_chunk", "expected FIELD=A,B"), ("train.nope=1,2", "no config field 'train.nope'"),
                          ("train.loss_chunk=8,x", "'x' is not a int"), ("train.loss_chunk=8,-1", "train.loss_chunk: got -1"),
                          ("model.mhc.use_res=yes", "'yes' is not a bool")):
        with pytest.raises(UserError, match=message):
            bench.varied_configs(config, vary)
