"""Dry runs: every step a run executes (trainer.Experiment's train step, evaluation step and
diagnostics step, STEPS) compiled ahead of time for a topology this machine does not have, and what
XLA says each needs per device. A config fits only if every step fits.

Per-device memory comes from each compiled step's `memory_analysis()`: its arguments (parameters,
optimizer state, the batch), its outputs less what the donated state aliases, XLA's temporaries
and the generated code. The train state stays on the device while evaluation and diagnostics run,
so their columns count the optimizer state too. The temporaries are broken down by source at their
peak (saved activations, attention, MoE dispatch, logits/loss, other; mhc_jax/pods/memory_sources.py).
Time comes from the model's FLOPs (mhc_jax/training/flops.py, the MFU basis) at a stated MFU; XLA's
own FLOP count (`cost_analysis()`) is shown beside it, though it counts a scanned loop's body once.
"""

import hashlib
import math
import re
import time

import jax
import jax.numpy as jnp

from mhc_jax import sharding
from mhc_jax.errors import UserError
from mhc_jax.evals import serving
from mhc_jax.model import attention_kernels, moe
from mhc_jax.pods import memory_sources, topology
from mhc_jax.training import flops, trainer
from mhc_jax.training.experiment import Experiment

REMAT_BY_MEMORY = ("full", "dots", "none")  # least memory (most recomputation) first
STEPS = ("train", "eval", "diagnostics")  # every compiled step a run executes (trainer.loop, read_step)
COMPILED: dict = {}  # (target, step, memory, lowered program's hash) -> compile_step's report


def bytes_per_device(abstract_tree) -> int:
    """Bytes one device holds of arrays laid out as their shardings say."""
    return sum(math.prod(a.sharding.shard_shape(a.shape)) * jnp.dtype(a.dtype).itemsize
               for a in jax.tree.leaves(abstract_tree))


def resolve_auto(config, target: topology.Topology) -> None:
    """Decide the 'auto' dtype (bfloat16 on accelerators), attention kernel, MoE exchange and grouped
    matmul for the target, not for this machine."""
    m = config.model
    m.attention_kernel = attention_kernels.choose(m.attention_kernel, target.platform, m.dtype)
    m.moe.exchange = moe.choose_exchange(m.moe.exchange, target.platform)
    m.moe.grouped_matmul = moe.choose_grouped_matmul(m.moe.grouped_matmul, target.platform)
    if m.dtype == "auto":
        m.dtype = "float32" if target.platform == "cpu" else "bfloat16"


def dry_run(config, target: topology.Topology, devices: list, mfu: float, steps: tuple = STEPS) -> dict:
    """Compiles every step of `config` (`steps`: STEPS, or the train step and some of the others) for
    `devices` and reports memory per device of each (`steps`; the train step's also at the top, as
    `per_device` and `total_per_device`), FITS only if every step fits, the FLOPs and the time the
    config's token budget needs at `mfu`. The others are compiled only when the train step fits."""
    resolve_auto(config, target)
    mesh = sharding.make_mesh(config.mesh, devices)
    trainer.check_mesh(config, mesh)
    experiment = Experiment(config, mesh)
    t = config.train
    state = experiment.abstract_state
    per_device = {"parameters": bytes_per_device(state["params"]), "optimizer_state": bytes_per_device(state["opt"])}
    report = {"topology": target.name, "devices": len(devices), "mesh": dict(mesh.shape), "remat": config.model.remat,
              "dtype": config.model.dtype, "attention_kernel": config.model.attention_kernel,
              "moe_exchange": config.model.moe.exchange, "moe_grouped_matmul": config.model.moe.grouped_matmul,
              "memory_per_device": target.memory_per_device}
    if per_device["parameters"] + per_device["optimizer_state"] > target.memory_per_device:
        report.update(per_device=per_device, total_per_device=per_device["parameters"] + per_device["optimizer_state"],
                      fits=False, reason="parameters and optimizer state alone exceed the device memory (not compiled)")
        return report
    asked, by_step, compiled = ("train", *(s for s in steps if s != "train")), {}, None
    for step in asked:
        if step != "train" and not by_step["train"]["fits"]:
            break
        function, args = step_programs(experiment)[step]
        by_step[step], step_compiled = compile_step(step, function, args, per_device, target.memory_per_device,
                                                  target.name)
        compiled = step_compiled if step == "train" else compiled  # the FLOPs are the train step's
    train = by_step["train"]
    report.update(steps=by_step, per_device=train["per_device"],
                  fits=len(by_step) == len(asked) and all(s["fits"] for s in by_step.values()),
                  compile_seconds=round(sum(s["compile_seconds"] for s in by_step.values()), 1))
    if not report["fits"]:
        report["reason"] = "; ".join(s["reason"] for s in by_step.values() if "reason" in s)
    if compiled is None:
        return report
    report["total_per_device"] = train["total_per_device"]
    tokens_per_step = t.batch_size * t.seq_len
    model_flops = flops.train_flops_per_token(config.model, t.seq_len) * tokens_per_step
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    report.update(xla_flops_per_device=float(cost.get("flops", 0.0)), model_flops_per_step=model_flops,
                  token_budget=t.steps * tokens_per_step, mfu=mfu)
    if target.peak_flops:
        seconds = model_flops / (len(devices) * target.peak_flops * mfu)
        report.update(peak_flops_per_device=target.peak_flops, step_seconds=seconds, days=t.steps * seconds / 86400)
    return report


def step_programs(experiment: Experiment) -> dict:
    """step -> (jitted function, abstract arguments), shaped as the trainer calls them: the train
    step on a global batch of windows [batch_size, seq_len + 1]; evaluation on batches of the same
    shape with a weight per row (pipeline.eval_batches, global batch_size rows); diagnostics on the
    first evaluation batch's tokens (trainer.setup's diag_tokens)."""
    t, state = experiment.config.train, experiment.abstract_state
    tokens = jax.ShapeDtypeStruct((t.batch_size, t.seq_len + 1), jnp.int32, sharding=experiment.batch_sharding)
    weight = jax.ShapeDtypeStruct((t.batch_size,), jnp.float32, sharding=experiment.batch_sharding)
    return {"train": (experiment.train_step, (state, tokens, experiment.hyper)),
            "eval": (experiment.eval_step, (state["params"], tokens, weight)),
            "diagnostics": (experiment.trace_step, (state["params"], tokens))}


def compile_step(step: str, function, args: tuple, resident: dict, memory_per_device: int, target_name: str = ""):
    """One step compiled: (its report, the compiled step or None when the compiler refused it for
    memory or reused an earlier compile). `resident` holds the parameters' and optimizer state's
    bytes per device: on the device during every step, arguments of the train step only. A program
    identical to one compiled before for the same target (evaluation and diagnostics do not depend
    on the remat policy, which --suggest varies last) reuses that compile's report."""
    start = time.perf_counter()
    lowered = function.lower(*args)
    key = None if step == "train" else (target_name, step, memory_per_device,
                                        hashlib.sha256(lowered.as_text().encode()).hexdigest())
    if key in COMPILED:
        return {**COMPILED[key], "compile_seconds": round(time.perf_counter() - start, 1), "reused": True}, None
    try:
        compiled, sources = memory_sources.compile_with_sources(lowered)
    except jax.errors.JaxRuntimeError as e:
        if not any(marker in str(e) for marker in serving.OUT_OF_MEMORY):
            raise
        message = next((line for line in str(e).splitlines() if "memory" in line.lower()), str(e).splitlines()[0])
        return {"per_device": dict(resident), "fits": False, "compile_seconds": round(time.perf_counter() - start, 1),
                "reason": f"the compiler ran out of memory for the {step} step: {message.strip()}"}, None
    memory = compiled.memory_analysis()
    in_arguments = resident["parameters"] + (resident["optimizer_state"] if step == "train" else 0)
    # max: XLA drops parameters a step never reads (diagnostics: the head) from its arguments.
    per_device = {**resident, "other_arguments": max(0, memory.argument_size_in_bytes - in_arguments),
                  "outputs_not_aliased": memory.output_size_in_bytes - memory.alias_size_in_bytes,
                  "temporaries": memory.temp_size_in_bytes, "generated_code": memory.generated_code_size_in_bytes}
    total = sum(per_device.values())
    report = {"per_device": per_device, "total_per_device": total, "fits": total <= memory_per_device,
              "temporaries_by_source": sources and sources["by_source"],
              "largest_temporaries": sources and sources["largest"], "collectives": collectives(compiled.as_text()),
              "compile_seconds": round(time.perf_counter() - start, 1)}
    if not report["fits"]:
        report["reason"] = f"the {step} step needs {total / 2**30:.2f} GiB per device"
    if key is not None:
        COMPILED[key] = report
    return report, compiled


COLLECTIVE_OPS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "ragged-all-to-all", "collective-permute")


def collectives(hlo: str) -> dict:
    """How many of each collective op the compiled program has (synchronous or started async)."""
    found = re.findall(r"\s(" + "|".join(COLLECTIVE_OPS) + r")(?:-start)?\(", hlo)
    return {op: found.count(op) for op in COLLECTIVE_OPS if op in found}


def candidate_meshes(config, devices: int) -> list[dict]:
    """Meshes for `devices`, most memory-frugal first: everything sharded (data = 1), the batch over
    fsdp x expert, then tensor parallelism where the batch does not split that far."""
    per_microbatch = config.train.batch_size // config.train.microbatches
    n_experts = config.model.moe.n_experts
    meshes = []
    for tensor in (1, 2, 4, 8):
        for expert in (1, 2, 4, 8, 16):
            if devices % (tensor * expert) or (expert > 1 and (not n_experts or n_experts % expert)):
                continue
            fsdp = devices // (tensor * expert)
            if per_microbatch % (fsdp * expert) == 0:
                meshes.append({"data": 1, "fsdp": fsdp, "expert": expert, "tensor": tensor})
    return meshes


def suggest(config, start: topology.Topology, compile_for) -> dict:
    """The smallest slice of `start`'s family that fits, found by walking from `start` (the slice the
    user names, so that a good guess costs two compiles): down one size while the slice below still
    fits, or up one size until one fits, each with the most frugal mesh and remat='full'; then, on
    that slice, the lightest remat policy that still fits. `compile_for(config, topology)` returns
    dry_run's report; every attempt is listed."""
    names = topology.tpu_names(start.family)
    attempts = []

    def attempt(name, mesh, remat):
        candidate = config.copy_and_resolve_references()
        candidate.mesh.update(mesh)
        candidate.model.remat = remat
        report = compile_for(candidate, topology.parse(name))
        attempts.append({k: report[k] for k in ("topology", "mesh", "remat", "fits")} |
                        {"total_per_device": report.get("total_per_device")})
        return report

    def frugal(index):
        """The report of slice `index` with the most frugal mesh, or None when the batch does not
        split over its devices."""
        meshes = candidate_meshes(config, topology.parse(names[index]).devices)
        return attempt(names[index], meshes[0], "full") if meshes else None

    index = names.index(start.name)
    while index > 0 and not candidate_meshes(config, topology.parse(names[index]).devices):
        index -= 1  # more devices than the batch splits over: start from the largest slice it does
    best, report = None, frugal(index)
    if report is not None and report["fits"]:
        best = (index, report)
        while index > 0 and (report := frugal(index - 1)) is not None and report["fits"]:
            index -= 1
            best = (index, report)
    else:
        while best is None and index + 1 < len(names) and (report := frugal(index + 1)) is not None:
            index += 1
            best = (index, report) if report["fits"] else None
    if best is None:
        return {"family": start.family, "fits": False, "attempts": attempts}
    name, chosen = names[best[0]], best[1]
    for remat in REMAT_BY_MEMORY[1:]:
        report = attempt(name, chosen["mesh"], remat)
        if not report["fits"]:
            break
        chosen = report
    return {"family": start.family, "fits": True, "smallest": name, "mesh": chosen["mesh"], "remat": chosen["remat"],
            "report": chosen, "attempts": attempts}


def check_mfu(mfu: float) -> None:
    if not 0 < mfu <= 1:
        raise UserError(f"--mfu: {mfu} is not in (0, 1]; e.g. --mfu=0.4")
