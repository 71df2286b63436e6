"""Hardware that dry runs compile for without having it: TPU slices by their usual names, through
the topology descriptions of the `libtpu` wheel (requirements-tpu.txt, kept out of the training
environment), and `cpu:N`, N simulated CPU devices.

A TPU slice's name counts TensorCores: a v5p chip has two that act as one device (megacore), so
`v5p-256` is 128 devices in a 4x4x8 torus; v5e and v6e chips have one, so `v6e-64` is 64 devices
in an 8x8 grid. Per-chip HBM, its bandwidth and bf16 peak are Google Cloud's published figures.
"""

import dataclasses
import importlib.util
import os
import re

from mhc_jax.errors import UserError

GiB = 2**30

# family -> (TensorCores per device, HBM per device, bf16 peak FLOP/s per device, HBM bytes/s per device,
#            device shapes by device count)
GRID_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
TORUS_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
            512: "8x8x8", 1024: "8x8x16"}
TPU_FAMILIES = {
    "v5p": (2, 95 * GiB, 459e12, 2765e9, TORUS_3D),
    "v6e": (1, 32 * GiB, 918e12, 1640e9, GRID_2D),
    "v5e": (1, 16 * GiB, 197e12, 819e9, GRID_2D),
}


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # as given: 'v5p-256', 'cpu:8'
    platform: str  # 'tpu' or 'cpu'
    devices: int
    memory_per_device: int  # bytes a device's program may use
    peak_flops: float | None  # bf16 FLOP/s per device (None: unknown, for CPU)
    libtpu_name: str = ""  # e.g. 'v5p:4x4x8'
    memory_bandwidth: float | None = None  # HBM bytes/s per device (None: unknown, for CPU)

    @property
    def family(self) -> str:
        return self.name.split("-")[0] if self.platform == "tpu" else "cpu"


def tpu_names(family: str) -> list[str]:
    """Every slice name of a TPU family, smallest first."""
    cores, _, _, _, shapes = TPU_FAMILIES[family]
    return [f"{family}-{devices * cores}" for devices in sorted(shapes)]


def parse(name: str) -> Topology:
    """'v5p-256', 'v6e-8', 'v5e-16' or 'cpu:8'; UserError naming what exists otherwise."""
    cpu = re.fullmatch(r"cpu:(\d+)", name or "")
    if cpu and int(cpu.group(1)) > 0:
        # Simulated devices share this machine's memory.
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // int(cpu.group(1))
        return Topology(name, "cpu", int(cpu.group(1)), memory, None)
    tpu = re.fullmatch(r"(v5p|v6e|v5e)-(\d+)", name or "")
    if tpu and tpu.group(1) in TPU_FAMILIES:
        family = tpu.group(1)
        cores, memory, peak, bandwidth, shapes = TPU_FAMILIES[family]
        devices = int(tpu.group(2)) // cores
        if int(tpu.group(2)) % cores == 0 and devices in shapes:
            return Topology(name, "tpu", devices, memory, peak, f"{family}:{shapes[devices]}", bandwidth)
    known = ", ".join(f"{tpu_names(f)[0]} ... {tpu_names(f)[-1]}" for f in TPU_FAMILIES)
    raise UserError(f"--topology: unknown topology {name!r}; use a TPU slice ({known}, powers of two) or cpu:N")


def set_up_process(name: str, libtpu_dir: str) -> None:
    """Environment for a dry run, set before jax is imported: JAX computes on CPU (no TPU runtime
    starts), libtpu (from `libtpu_dir` when `make tpu-compiler` put it there) compiles without
    looking for TPU hosts, and `cpu:N` gets N simulated devices."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    for key, value in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_ACCELERATOR_TYPE", "v5p-8"),
                       ("TPU_WORKER_HOSTNAMES", "localhost"), ("TPU_WORKER_ID", "0"),
                       ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):  # dry runs side by side (no TPU to share)
        os.environ.setdefault(key, value)
    library = os.path.join(libtpu_dir, "libtpu", "libtpu.so")
    if os.path.isfile(library):
        os.environ.setdefault("TPU_LIBRARY_PATH", library)  # jax loads the TPU compiler from this file
    cpu = re.fullmatch(r"cpu:(\d+)", name or "")
    if cpu:
        kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
        os.environ["XLA_FLAGS"] = " ".join([*kept, f"--xla_force_host_platform_device_count={cpu.group(1)}"])


def devices(topology: Topology) -> list:
    """The topology's devices: compile-only TPU devices from libtpu, or this process's CPU devices
    (their count comes from XLA_FLAGS, set before jax is imported)."""
    import jax

    if topology.platform == "cpu":
        found = jax.devices("cpu")
        if len(found) != topology.devices:
            raise UserError(f"--topology: {topology.name} needs {topology.devices} CPU devices, this process has "
                            f"{len(found)} (set XLA_FLAGS=--xla_force_host_platform_device_count={topology.devices})")
        return found
    if not (os.path.isfile(os.environ.get("TPU_LIBRARY_PATH", "")) or importlib.util.find_spec("libtpu")):
        raise UserError(f"--topology: {topology.name} needs the TPU compiler: run `make tpu-compiler` "
                        "(or pip install -r requirements-tpu.txt in its own environment)")
    from jax.experimental import topologies

    hosts = {"chips_per_host_bounds": (1, 1, 1)} if topology.devices == 1 else {}  # else libtpu's 2x2x1 hosts
    return list(topologies.get_topology_desc(platform="tpu", topology_name=topology.libtpu_name, **hosts).devices)
