"""Causal attention kernels behind one call, `attend`; `model.attention_kernel` picks one.

- `xla`: `jax.nn.dot_product_attention`'s XLA path. It materialises the float32 scores [B, H, T, S]
  (and the probabilities): the reference the other kernels are tested against.
- `blockwise`: blockwise_attention.py, flash attention in plain JAX (memory linear in T, every
  platform).
- `cudnn`: cuDNN's flash attention (GPU, bfloat16 or float16).
- `splash`: Pallas splash attention (TPU), run per device under `shard_map`.
- `auto`: splash on TPU, cuDNN on GPU in bfloat16/float16 (blockwise in float32), blockwise on
  CPU (CPU_KERNEL: measured against xla in docs/performance.md).

Training and scoring pass whole sequences (query t at slot t). Decoding passes the new tokens'
first slot (`offset`) and each row's first real slot (`start_B`, left padding); splash and cuDNN
are built for long causal blocks, so decoding takes the blockwise kernel in their place, and so
do sequences splash's 128-position tiles do not divide. Query and key head sizes (J) may differ
from the value head size (D), as in MLA; the XLA and cuDNN paths pad the values to J.
"""

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention

from mhc_jax import sharding
from mhc_jax.errors import UserError
from mhc_jax.model import blockwise_attention

KERNELS = ("auto", "xla", "blockwise", "cudnn", "splash")
PLATFORM_ONLY = {"cudnn": "gpu", "splash": "tpu"}
CPU_KERNEL = "blockwise"  # on CPU within 2.5% of xla at 256 positions, 17% faster at 1024 (docs/performance.md)
SPLASH_TILE = 128


def choose(name: str, platform: str, dtype: str) -> str:
    """The kernel `name` means on `platform` ('cpu', 'gpu', 'tpu') at compute dtype `dtype` (model.dtype)."""
    if name != "auto":
        return name
    if platform == "tpu":
        return "splash"
    if platform == "gpu":
        return "cudnn" if dtype in ("auto", "bfloat16", "float16") else "blockwise"
    return CPU_KERNEL


def check_platform(name: str, platform: str) -> None:
    """A kernel that only one platform runs, asked for on another, is refused in one line."""
    needed = PLATFORM_ONLY.get(name)
    if needed and needed != platform:
        here = ", ".join(k for k in KERNELS if PLATFORM_ONLY.get(k, platform) == platform)
        raise UserError(f"model.attention_kernel: {name!r} runs on {needed.upper()} only and this run's devices are "
                        f"{platform}; choose one of {here}")


def attend(q_BTHJ, k_BSKJ, v_BSKD, *, kernel: str, scale: float, offset=None, start_B=None):
    """Causal attention [B, T, H, D]; K divides H (grouped-query). `offset is None`: training (T = S,
    query t at slot t); otherwise decoding (query t at slot offset + t, row b's keys from start_B[b])."""
    with jax.named_scope("attention"):
        if offset is None and kernel == "splash" and q_BTHJ.shape[1] % SPLASH_TILE == 0:
            return splash(q_BTHJ, k_BSKJ, v_BSKD, scale)
        if offset is None and kernel == "cudnn":
            return xla_or_cudnn(q_BTHJ, k_BSKJ, v_BSKD, scale, None, None, "cudnn")
        if kernel == "xla":
            return xla_or_cudnn(q_BTHJ, k_BSKJ, v_BSKD, scale, offset, start_B, "xla")
        return blockwise(q_BTHJ, k_BSKJ, v_BSKD, scale, offset, start_B)


def blockwise(q_BTHJ, k_BSKJ, v_BSKD, scale, offset=None, start_B=None, block=blockwise_attention.BLOCK):
    B, T, H, J = q_BTHJ.shape
    K = k_BSKJ.shape[2]
    start_B = jnp.zeros((B,), jnp.int32) if start_B is None else start_B
    out_BTKUD = blockwise_attention.attention(q_BTHJ.reshape(B, T, K, H // K, J), k_BSKJ, v_BSKD,
                                              0 if offset is None else offset, start_B, scale, block)
    return out_BTKUD.reshape(B, T, H, -1)


def xla_or_cudnn(q_BTHJ, k_BSKJ, v_BSKD, scale, offset, start_B, implementation):
    D, J = v_BSKD.shape[-1], q_BTHJ.shape[-1]
    v_BSKJ = jnp.pad(v_BSKD, ((0, 0),) * 3 + ((0, J - D),))  # one head size for q, k and v
    if offset is None:
        out_BTHJ = jax.nn.dot_product_attention(q_BTHJ, k_BSKJ, v_BSKJ, scale=scale, is_causal=True,
                                                implementation=implementation)
    else:
        mask_BTS = blockwise_attention.seen(offset + jnp.arange(q_BTHJ.shape[1]), jnp.arange(k_BSKJ.shape[1]), start_B)
        out_BTHJ = jax.nn.dot_product_attention(q_BTHJ, k_BSKJ, v_BSKJ, mask=mask_BTS[:, None], scale=scale,
                                                implementation=implementation)
    return out_BTHJ[..., :D]


def splash(q_BTHJ, k_BSKJ, v_BSKD, scale, interpret: bool = False):
    """Splash attention per device: batch over the data-parallel axes, heads over `tensor` (keys and
    values repeated to every query head when their heads do not split the same way). `interpret`
    runs the Pallas kernel on CPU, for tests."""
    mesh = jax.sharding.get_abstract_mesh()
    H, K = q_BTHJ.shape[2], k_BSKJ.shape[2]
    if mesh.empty:
        return splash_on_device(q_BTHJ, k_BSKJ, v_BSKD, scale, interpret)
    q_spec = sharding.spec_for(("batch", None, "heads", None), q_BTHJ.shape, mesh)
    kv_spec = sharding.spec_for(("batch", None, "kv_heads", None), k_BSKJ.shape, mesh)
    if q_spec[2] != kv_spec[2]:
        k_BSKJ, v_BSKD = (jnp.repeat(x, H // K, axis=2) for x in (k_BSKJ, v_BSKD))
        kv_spec = q_spec
    per_device = jax.shard_map(lambda q, k, v: splash_on_device(q, k, v, scale, interpret), mesh=mesh,
                               in_specs=(q_spec, kv_spec, kv_spec), out_specs=q_spec, check_vma=False)
    return per_device(q_BTHJ, k_BSKJ, v_BSKD)


def splash_on_device(q_BTHJ, k_BSKJ, v_BSKD, scale, interpret):
    T, H = q_BTHJ.shape[1:3]
    block = max(b for b in (512, 256, SPLASH_TILE) if T % b == 0)
    sizes = splash_attention.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                                        block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block,
                                        block_kv_dq=block)
    mask = splash_attention.MultiHeadMask([splash_attention.CausalMask((T, T))] * H)
    kernel = splash_attention.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                              interpret=interpret)
    out_BHTD = jax.vmap(kernel)(heads_first(q_BTHJ * jnp.asarray(scale, q_BTHJ.dtype)), heads_first(k_BSKJ),
                                heads_first(v_BSKD))
    return heads_first(out_BHTD)


def heads_first(x):
    """[B, T, H, .] <-> [B, H, T, .]"""
    return jnp.swapaxes(x, 1, 2)
