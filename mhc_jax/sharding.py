"""The device mesh, one table of logical-axis rules, and the shardings derived from them.

Parameters name their axes logically (layers.py); RULES maps each name to the mesh axes that
split it. FSDP splits every weight along its model width (`embed`), tensor parallelism splits
heads, MLP width and vocabulary, expert parallelism splits the routed experts, and activations
split the batch over `data` x `fsdp` x `expert` (outside the experts the expert axis is one more
data-parallel axis; inside them, moe.py's dispatch moves tokens to their experts' devices). A
dimension that a mesh axis does not divide is left whole (`spec_for`); the trainer then checks
that almost nothing ended up replicated (`replicated_fraction`).
"""

import math

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from mhc_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "expert", "tensor")
RULES = {
    "batch": ("data", "fsdp", "expert"),  # activations: the batch over every data-parallel axis
    "expert_batch": ("data", "fsdp"),  # ... and tokens dispatched to experts, which take the expert axis
    "experts": "expert",  # routed experts (their weights and their dispatched tokens)
    "kv_latent": "fsdp",  # MLA's compressed KV latent (in W_kv_b, whose other axes are not FSDP's)
    "embed": "fsdp",  # parameters: FSDP splits the model width ...
    "stream_embed": "fsdp",  # ... and mHC's flattened n * C coefficient input
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "head_dim": None,
    "layers": None,
    "norm": None,
    "streams": None,
    "streams_out": None,
    "coeff": None,
}


def make_mesh(mesh_config, devices: list | None = None) -> Mesh:
    """The (data, fsdp, expert, tensor) mesh over `devices` (default: all of this run's devices); one
    size may be -1 to take what is left."""
    sizes = [mesh_config[axis] for axis in MESH_AXES]
    count = len(devices) if devices is not None else jax.device_count()
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise UserError(f"mesh: sizes {dict(zip(MESH_AXES, sizes))} must be positive, with at most one -1")
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        if count % known:
            raise UserError(f"mesh: {count} devices are not divisible by the fixed mesh sizes "
                            f"{dict(zip(MESH_AXES, sizes))}")
        sizes[sizes.index(-1)] = count // known
    if math.prod(sizes) != count:
        raise UserError(f"mesh: {' x '.join(MESH_AXES)} = {' x '.join(map(str, sizes))} = {math.prod(sizes)}, "
                        f"but there are {count} devices; make the product {count} (one size may be -1)")
    # On a TPU torus, a mesh axis may take part of a physical axis (e.g. tensor=8 on 4x4x4).
    grid = mesh_utils.create_device_mesh(sizes, devices if devices is not None else jax.devices(),
                                         allow_split_physical_axes=True)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def spec_for(logical_axes: tuple, shape: tuple, mesh: Mesh) -> PartitionSpec:
    """The PartitionSpec of an array with these logical axes on this mesh."""
    used, spec = set(), []
    for name, size in zip(logical_axes, shape):
        rule = RULES[name] if name is not None else None
        wanted = (rule,) if isinstance(rule, str) else tuple(rule or ())
        axes = tuple(a for a in wanted if a not in used and mesh.shape[a] > 1)
        if axes and size % math.prod(mesh.shape[a] for a in axes) == 0:
            used.update(axes)
            spec.append(axes if len(axes) > 1 else axes[0])
        else:
            spec.append(None)
    return PartitionSpec(*spec)


def param_shardings(abstract_state: nnx.State, mesh: Mesh):
    """NamedShardings for an (abstract) parameter state, as a pure dict like nnx.to_pure_dict's."""
    shardings = jax.tree.map(lambda v: NamedSharding(mesh, spec_for(v.get_metadata()["out_sharding"], v.shape, mesh)),
                             abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(shardings)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(RULES["batch"]))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def mesh_of(arrays) -> Mesh | None:
    """The mesh that (concrete) arrays are laid out on; None for arrays on one device."""
    layout = jax.tree.leaves(arrays)[0].sharding
    return layout.mesh if isinstance(layout, NamedSharding) else None


def batch_layout(shape: tuple, mesh: Mesh | None) -> NamedSharding | None:
    """How a batch of this shape lies on the mesh: rows split over the data-parallel axes where they
    divide, else whole on every device (a scalar: whole)."""
    if mesh is None:
        return None
    return NamedSharding(mesh, spec_for(("batch",) + (None,) * (len(shape) - 1), shape, mesh) if shape else PartitionSpec())


def global_batch(array: np.ndarray, mesh: Mesh | None) -> jax.Array:
    """A batch that every process holds whole on its host, as one array over the mesh (batch_layout)."""
    if mesh is None:
        return jax.numpy.asarray(array)
    return jax.make_array_from_callback(array.shape, batch_layout(array.shape, mesh), lambda index: array[index])


def everywhere(tree):
    """Inside jit under a mesh: results replicated, so that every process can read all of them."""
    if jax.sharding.get_abstract_mesh().empty:
        return tree
    return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, PartitionSpec()), tree)


def abstract_mesh_of(arrays) -> jax.sharding.AbstractMesh:
    """The mesh that (concrete) arrays are laid out on, an empty one for arrays on one device. A
    jitted function traced under it (`jax.sharding.use_abstract_mesh`) applies `constrain`; without
    it XLA chose layouts that ran an 8-device forward pass 8x slower than one device."""
    layout = jax.tree.leaves(arrays)[0].sharding
    return layout.mesh.abstract_mesh if isinstance(layout, NamedSharding) else jax.sharding.AbstractMesh((), ())


def constrain(x: jax.Array, logical_axes: tuple) -> jax.Array:
    """Pins an activation's sharding inside jit under `jax.set_mesh`; a no-op without a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, spec_for(logical_axes, x.shape, mesh))


def replicated_fraction(abstract_params, shardings) -> float:
    """Share of parameter bytes that every device holds whole."""
    total = replicated_bytes = 0
    for leaf, sharding in zip(jax.tree.leaves(abstract_params), jax.tree.leaves(shardings)):
        size = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
        total += size
        replicated_bytes += size if sharding.is_fully_replicated else 0
    return replicated_bytes / max(total, 1)
