"""How eval.py lays a checkpoint out for inference: the device mesh (--mesh), parameters in the
compute dtype, batches as global arrays over every process's devices, and the batch size that fits
the device (--batch_size=auto).

The default mesh suits decoding, whose steps read every weight once per token: each device holds
the whole model (pure data parallelism, no collective in a step) when the parameters take at most
half of a device's memory; otherwise the routed experts go over `expert`, then heads and MLP width
over `tensor` (at most one host's 8 devices), and FSDP takes the rest only where the model still
does not fit. Weights that layers cast to the compute dtype at every call are cast once, at restore
(bfloat16 on accelerators, no change on CPU); norms, the router and the HC/mHC coefficients stay
float32, so every score is the one the per-call cast gives.
"""

import functools
import math
import os
from typing import Callable

import jax
import jax.numpy as jnp
from absl import flags
from flax import nnx
from jax.sharding import NamedSharding

from mhc_jax import sharding
from mhc_jax.errors import UserError

# Logical axes of the matmul weights (layers.py, attention.py, moe.py, the head): each layer casts
# them to its input's dtype before use, so holding them in that dtype changes no result.
WEIGHT_AXES = {"vocab", "heads", "kv_heads", "mlp", "kv_latent"}
PARAMETER_SHARE = 0.5  # the default mesh keeps parameters within this share of a device's memory
MAX_AUTO_ROWS = 1024  # --batch_size=auto never goes beyond this many rows
HOST_SHARE = 0.5  # on CPU, the share of the host's memory auto batches may fill: the rest holds the process's own arrays


def define_flags() -> tuple[flags.FlagHolder, flags.FlagHolder]:
    """--batch_size and --mesh of the commands that evaluate, checked as they are parsed."""
    batch_size = flags.DEFINE_string("batch_size", "auto", "sequences per forward pass, or 'auto': the most that fit "
                                     "a device, per width, by XLA's memory analysis of the compiled step")
    mesh = flags.DEFINE_string("mesh", "auto", "the device mesh, e.g. data=4,tensor=2 (axes data, fsdp, expert, "
                               "tensor; one size may be -1), or 'auto': whole model per device when it fits, else "
                               "experts, heads, then FSDP split")
    flags.register_validator("batch_size", lambda text: parse_batch_size(text) is not None)
    flags.register_validator("mesh", lambda text: parse_mesh(text) or True)
    return batch_size, mesh


def parse_batch_size(text: str) -> int | str:
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise UserError(f"--batch_size: {text!r} is neither a positive number of sequences nor 'auto'")
    return int(text)


def parse_mesh(text: str) -> dict | None:
    """--mesh 'data=2,tensor=4' as sizes of every mesh axis (missing ones 1, one may be -1); None
    for 'auto'."""
    if text == "auto":
        return None
    sizes = dict.fromkeys(sharding.MESH_AXES, 1)
    for item in text.split(","):
        name, _, size = item.partition("=")
        if name not in sizes or not size.lstrip("-").isdigit():
            raise UserError(f"--mesh: {item!r} is not axis=size with an axis of {', '.join(sharding.MESH_AXES)}; "
                            "e.g. --mesh=data=2,tensor=4, or --mesh=auto")
        sizes[name] = int(size)
    return sizes


def device_memory() -> int:
    """Bytes a device's program may use: the accelerator's limit; on CPU, HOST_SHARE of the host's
    memory, shared by its devices."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    return int(HOST_SHARE * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) // jax.local_device_count()


def parameter_bytes(abstract_variables, sizes: dict, dtype) -> int:
    """Bytes of serving parameters (`serving_dtypes`) that one device holds on a mesh of these sizes."""
    mesh = jax.sharding.AbstractMesh(tuple(sizes.values()), tuple(sizes))
    total = 0
    for v in jax.tree.leaves(abstract_variables, is_leaf=is_variable):
        axes = v.get_metadata()["out_sharding"]
        split = math.prod(mesh.shape[a] for entry in sharding.spec_for(axes, v.shape, mesh) if entry
                          for a in ((entry,) if isinstance(entry, str) else entry))
        total += math.prod(v.shape) * jnp.dtype(serving_dtype(axes, dtype)).itemsize // split
    return total


def serving_dtype(logical_axes: tuple, compute_dtype):
    return compute_dtype if WEIGHT_AXES & set(logical_axes) else jnp.float32


def serving_params(abstract_variables, mesh, compute_dtype) -> dict:
    """The parameters to restore, as a pure dict of ShapeDtypeStructs: weights in the compute dtype,
    laid out on `mesh` by the sharding rules."""
    def abstract(v):
        axes = v.get_metadata()["out_sharding"]
        return jax.ShapeDtypeStruct(v.shape, serving_dtype(axes, compute_dtype),
                                    sharding=NamedSharding(mesh, sharding.spec_for(axes, v.shape, mesh)))
    return nnx.to_pure_dict(jax.tree.map(abstract, abstract_variables, is_leaf=is_variable))


def is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def mesh_candidates(model_cfg, devices: int) -> list[dict]:
    """The default meshes in order of preference: data-parallel; experts over `expert`; + heads and
    MLP width over `tensor` (within one host's 8 devices); + FSDP over the rest; FSDP and `tensor`
    over every device."""
    expert = math.gcd(model_cfg.moe.n_experts, devices) if model_cfg.moe.n_experts else 1
    tensor, wide_tensor = math.gcd(model_cfg.n_heads, devices // expert, 8), math.gcd(model_cfg.n_heads, devices, 8)
    rest = devices // (expert * tensor)
    meshes = [{"data": devices}, {"data": devices // expert, "expert": expert},
              {"data": rest, "expert": expert, "tensor": tensor}, {"fsdp": rest, "expert": expert, "tensor": tensor},
              {"fsdp": devices // wide_tensor, "tensor": wide_tensor}]
    unique = []
    for mesh in meshes:
        full = {axis: mesh.get(axis, 1) for axis in sharding.MESH_AXES}
        if full not in unique:
            unique.append(full)
    return unique


def choose_mesh(abstract_variables, model_cfg, devices: int, requested: dict | None, memory: int, dtype) -> dict:
    """The mesh sizes to serve on: `requested` (--mesh) if given, else the first of
    `mesh_candidates` whose parameters take at most PARAMETER_SHARE of a device (else the most
    frugal). UserError when the parameters do not fit the device on the mesh chosen."""
    if requested is not None:
        sizes = dict(requested)
        fixed = math.prod(s for s in sizes.values() if s != -1)
        if -1 in sizes.values() and fixed > 0 and devices % fixed == 0:
            sizes[next(a for a, s in sizes.items() if s == -1)] = devices // fixed
    else:
        needs = [(parameter_bytes(abstract_variables, c, dtype), c) for c in mesh_candidates(model_cfg, devices)]
        fitting = [c for needed, c in needs if needed <= PARAMETER_SHARE * memory]
        sizes = fitting[0] if fitting else min(needs, key=lambda pair: pair[0])[1]
    if math.prod(sizes.values()) == devices:  # else make_mesh names the mismatch
        needed = parameter_bytes(abstract_variables, sizes, dtype)
        if needed > memory:
            given = ",".join(f"{a}={s}" for a, s in sizes.items() if s != 1) or "data=1"
            raise UserError(f"--mesh: the parameters need {needed / 2**30:.2f} GiB per device on {given} over "
                            f"{devices} devices, which have {memory / 2**30:.2f} GiB; split them further "
                            "with --mesh (fsdp=, tensor=, expert=) or use more devices")
    return sizes


def data_parallel(mesh) -> int:
    """How many ways a batch splits on this mesh (its rows over data x fsdp x expert)."""
    return math.prod(mesh.shape[a] for a in sharding.RULES["batch"])


OUT_OF_MEMORY = ("RESOURCE_EXHAUSTED", "Ran out of memory")  # how a TPU compiler refuses a program


def compiled_memory(compile_step: Callable[[], object]) -> float:
    """`memory_of` the step `compile_step()` compiles; infinite where the compiler refuses it for
    memory (the TPU compiler raises rather than compiling a program that cannot fit)."""
    try:
        return memory_of(compile_step())
    except jax.errors.JaxRuntimeError as e:
        if any(marker in str(e) for marker in OUT_OF_MEMORY):
            return math.inf
        raise


def memory_of(compiled) -> int:
    """Bytes a compiled step needs on a device: arguments, outputs not aliased, temporaries, code."""
    m = compiled.memory_analysis()
    return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
            + m.generated_code_size_in_bytes)


def largest_batch(step_memory: Callable[[int], int], memory: int, unit: int, cap: int) -> int:
    """The most rows, `cap` (a multiple of unit) or else unit x 2^k, whose compiled step fits
    `memory` by `step_memory` (rows -> bytes, from compiling; cached): `cap` if it fits, else a line
    through unit and 2 x unit rows predicts it, and compiling the prediction confirms it (halving
    until one fits)."""
    step_memory = functools.cache(step_memory)
    if step_memory(cap) <= memory:  # all that is left fits (usual on CPU): the one compile is the one that runs
        return cap
    if step_memory(unit) > memory:
        raise UserError(f"--batch_size: even {unit} rows (one per data-parallel device) need "
                        f"{step_memory(unit) / 2**30:.2f} GiB per device of {memory / 2**30:.2f} GiB; lower "
                        "--max_length or split the model further with --mesh")
    rows = unit
    if cap > unit:
        first, per_row = step_memory(unit), max(step_memory(min(2 * unit, cap)) - step_memory(unit), 1) / unit
        while rows < cap and first + per_row * (min(rows * 2, cap) - unit) <= memory:
            rows = min(rows * 2, cap)
        while rows > unit and step_memory(rows) > memory:
            rows = max(unit, rows // 2 // unit * unit)
    return rows
