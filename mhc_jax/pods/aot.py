"""Dry runs: the real train step (trainer.Experiment) compiled ahead of time for a topology this
machine does not have, and what XLA says it needs per device.

Per-device memory comes from the compiled step's `memory_analysis()`: its arguments (parameters,
optimizer state, the batch), its outputs less what the donated state aliases, XLA's temporaries
(activations kept for the backward pass, gradients, workspace) and the generated code. Time comes
from the model's FLOPs (mhc_jax/training/flops.py, the MFU basis) at a stated MFU; XLA's own FLOP count
(`cost_analysis()`) is shown beside it, though it counts a scanned loop's body once.
"""

import math

import jax
import jax.numpy as jnp

from mhc_jax import sharding
from mhc_jax.errors import UserError
from mhc_jax.pods import topology
from mhc_jax.training import flops, trainer
from mhc_jax.training.experiment import Experiment

REMAT_BY_MEMORY = ("full", "dots", "none")  # least memory (most recomputation) first
OUT_OF_MEMORY = ("RESOURCE_EXHAUSTED", "Ran out of memory")  # how the TPU compiler refuses a program


def bytes_per_device(abstract_tree) -> int:
    """Bytes one device holds of arrays laid out as their shardings say."""
    return sum(math.prod(a.sharding.shard_shape(a.shape)) * jnp.dtype(a.dtype).itemsize
               for a in jax.tree.leaves(abstract_tree))


def resolve_dtype(config, target: topology.Topology) -> None:
    """'auto' means bfloat16 on accelerators: decide it for the target, not for this machine."""
    if config.model.dtype == "auto":
        config.model.dtype = "float32" if target.platform == "cpu" else "bfloat16"


def dry_run(config, target: topology.Topology, devices: list, mfu: float) -> dict:
    """Compiles `config`'s train step for `devices` and reports memory per device, FITS or not,
    the FLOPs and the time the config's token budget needs at `mfu`."""
    resolve_dtype(config, target)
    mesh = sharding.make_mesh(config.mesh, devices)
    trainer.check_mesh(config, mesh)
    experiment = Experiment(config, mesh)
    t = config.train
    state = experiment.abstract_state
    per_device = {"parameters": bytes_per_device(state["params"]), "optimizer_state": bytes_per_device(state["opt"])}
    report = {"topology": target.name, "devices": len(devices), "mesh": dict(mesh.shape), "remat": config.model.remat,
              "dtype": config.model.dtype, "memory_per_device": target.memory_per_device}
    if per_device["parameters"] + per_device["optimizer_state"] > target.memory_per_device:
        report.update(per_device=per_device, total_per_device=per_device["parameters"] + per_device["optimizer_state"],
                      fits=False, reason="parameters and optimizer state alone exceed the device memory (not compiled)")
        return report
    tokens = jax.ShapeDtypeStruct((t.batch_size, t.seq_len + 1), jnp.int32, sharding=experiment.batch_sharding)
    try:
        compiled = experiment.train_step.lower(state, tokens).compile()
    except jax.errors.JaxRuntimeError as e:
        if not any(marker in str(e) for marker in OUT_OF_MEMORY):
            raise
        message = next((line for line in str(e).splitlines() if "memory" in line.lower()), str(e).splitlines()[0])
        report.update(per_device=per_device, fits=False, reason=f"the compiler ran out of memory: {message.strip()}")
        return report
    memory = compiled.memory_analysis()
    per_device.update(
        other_arguments=memory.argument_size_in_bytes - per_device["parameters"] - per_device["optimizer_state"],
        outputs_not_aliased=memory.output_size_in_bytes - memory.alias_size_in_bytes,
        temporaries=memory.temp_size_in_bytes, generated_code=memory.generated_code_size_in_bytes)
    total = sum(per_device.values())
    tokens_per_step = t.batch_size * t.seq_len
    model_flops = flops.train_flops_per_token(config.model, t.seq_len) * tokens_per_step
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    report.update(per_device=per_device, total_per_device=total, fits=total <= target.memory_per_device,
                  xla_flops_per_device=float(cost.get("flops", 0.0)), model_flops_per_step=model_flops,
                  token_budget=t.steps * tokens_per_step, mfu=mfu)
    if target.peak_flops:
        seconds = model_flops / (len(devices) * target.peak_flops * mfu)
        report.update(peak_flops_per_device=target.peak_flops, step_seconds=seconds, days=t.steps * seconds / 86400)
    return report


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
