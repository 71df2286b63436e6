"""The decoder: embed -> expand -> scan(blocks) -> reduce -> final norm -> unembed.

The residual connection is whatever `residual.make_site` returns; this file never asks which.
The blocks' parameters are stacked on a leading `layers` axis whether or not the forward pass
scans, so `scan_layers` and `remat` change compilation only, never the checkpoint layout.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mhc_jax import residual, sharding
from mhc_jax.errors import UserError
from mhc_jax.layers import Attention, Embedding, LayerCache, RMSNorm, SwiGLU, normal, param

DTYPES = ("auto", "float32", "bfloat16", "float16")
REMAT_POLICIES = {
    "none": None,  # save every activation of the block
    "full": jax.checkpoint_policies.nothing_saveable,  # save only the stream between blocks
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # save matmul outputs
}


class Trace(NamedTuple):
    """What the forward pass saw at each residual site, for diagnostics."""
    maps: residual.SiteMaps  # H_pre, H_post, H_res of every site
    stream_rms: jax.Array  # root mean square of the [B, T, n, C] stream entering every site


def compute_dtype(name: str):
    """'auto' computes in bfloat16 on accelerators and in float32 on CPU."""
    if name == "auto":
        return jnp.bfloat16 if jax.default_backend() != "cpu" else jnp.float32
    return jnp.dtype(name)


def rms(x: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32))))


class Block(nnx.Module):
    """Attention, then MLP, each one residual site on the [B, T, n, C] stream."""

    def __init__(self, cfg, layer, rngs: nnx.Rngs):
        out_std = residual.out_proj_scale(cfg) / (2 * cfg.n_layers) ** 0.5
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, out_std, rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg, out_std, rngs)
        # The sites draw their random numbers last, so that for one seed every variant starts
        # from the same attention and MLP weights: variants differ only in the residual connection.
        self.attn_site = residual.make_site(cfg, 2 * layer, rngs)
        self.mlp_site = residual.make_site(cfg, 2 * layer + 1, rngs)

    def __call__(self, x_BTNC: jax.Array) -> tuple[jax.Array, Trace]:
        attn_in_rms = rms(x_BTNC)
        x_BTNC, attn_maps = self.attn_site(x_BTNC, lambda u: self.attn(self.attn_norm(u)))
        mlp_in_rms = rms(x_BTNC)
        x_BTNC, mlp_maps = self.mlp_site(x_BTNC, lambda u: self.mlp(self.mlp_norm(u)))
        stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), Trace(attn_maps, attn_in_rms), Trace(mlp_maps, mlp_in_rms))
        return x_BTNC, stacked

    def decode(self, x_BTNC: jax.Array, kv: LayerCache) -> tuple[jax.Array, LayerCache]:
        """The same block for new tokens of a decoding batch; attention reads and extends `kv`."""
        written = []

        def attend(u_BTC):
            y_BTC, new_kv = self.attn.decode(self.attn_norm(u_BTC), kv)
            written.append(new_kv)
            return y_BTC

        x_BTNC, _ = self.attn_site(x_BTNC, attend)
        x_BTNC, _ = self.mlp_site(x_BTNC, lambda u: self.mlp(self.mlp_norm(u)))
        return x_BTNC, written[0]


def stacked_blocks(cfg, rngs: nnx.Rngs) -> Block:
    """n_layers Blocks with their parameters stacked on a leading `layers` axis."""

    @nnx.split_rngs(splits=cfg.n_layers)
    @nnx.vmap(in_axes=(0, 0), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(rngs, layer):
        return Block(cfg, layer, rngs)

    return make(rngs, jnp.arange(cfg.n_layers))


class DecodeCache(NamedTuple):
    """Every layer's keys and values for batched decoding (see layers.LayerCache)."""
    k_LBSKD: jax.Array
    v_LBSKD: jax.Array
    start_B: jax.Array
    index: jax.Array


class Transformer(nnx.Module):
    def __init__(self, cfg, rngs: nnx.Rngs):
        self.n_streams = cfg.n_streams
        self.cache_shape = (cfg.n_layers, cfg.n_kv_heads, cfg.d_model // cfg.n_heads)  # L, K, D
        self.dtype = compute_dtype(cfg.dtype)
        self.scan_layers = cfg.scan_layers
        self.remat_policy = cfg.remat
        self.embed = Embedding(cfg, rngs)
        self.blocks = stacked_blocks(cfg, rngs)
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.unembed = None if cfg.tie_embeddings else param(
            normal(rngs, (cfg.d_model, cfg.vocab_size), cfg.d_model**-0.5), ("embed", "vocab"))

    def __call__(self, tokens_BT: jax.Array, *, return_trace: bool = False, cache: "DecodeCache | None" = None):
        """Logits [B, T, V] in float32; with `return_trace`, also the Trace of all 2L sites stacked
        in order (site 2l is block l's attention, 2l + 1 its MLP): maps [2L, B, T, ...], rms [2L].
        With `cache`, the tokens continue the cached ones (from slot cache.index on) and the call
        returns (logits, the extended cache)."""
        x_BTNC = residual.expand(self.embed(tokens_BT, self.dtype), self.n_streams)
        x_BTNC, per_layer = self.run_blocks(x_BTNC, return_trace, cache)
        logits_BTV = self.logits(x_BTNC)
        if cache is not None:
            k_LBSKD, v_LBSKD = per_layer
            return logits_BTV, DecodeCache(k_LBSKD, v_LBSKD, cache.start_B, cache.index + tokens_BT.shape[1])
        if not return_trace:
            return logits_BTV
        return logits_BTV, jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), per_layer)

    def init_cache(self, start_B: jax.Array, slots: int) -> DecodeCache:
        """An empty cache of `slots` positions for rows whose real tokens start at `start_B`."""
        L, K, D = self.cache_shape
        zeros = jnp.zeros((L, start_B.shape[0], slots, K, D), self.dtype)
        return DecodeCache(zeros, zeros, start_B.astype(jnp.int32), jnp.zeros((), jnp.int32))

    def logits(self, x_BTNC: jax.Array) -> jax.Array:
        h_BTC = self.final_norm(residual.reduce(x_BTNC))
        if self.unembed is None:
            logits_BTV = self.embed.attend(h_BTC)
        else:
            logits_BTV = h_BTC @ self.unembed[...].astype(h_BTC.dtype)
        return logits_BTV.astype(jnp.float32)

    def run_blocks(self, x_BTNC, return_trace: bool, cache: "DecodeCache | None"):
        """Every block in turn; also returns, stacked per layer, the traces (return_trace), the
        extended keys and values (cache), or None."""
        graphdef, stacked_state = nnx.split(self.blocks)

        def body(x_BTNC, layer):
            layer_state, layer_kv = layer
            x_BTNC = sharding.constrain(x_BTNC, ("batch", None, None, None))
            block = nnx.merge(graphdef, layer_state)
            if layer_kv is not None:
                x_BTNC, written = block.decode(x_BTNC, LayerCache(*layer_kv, cache.start_B, cache.index))
                return x_BTNC, (written.k_BSKD, written.v_BSKD)
            x_BTNC, trace = block(x_BTNC)
            return x_BTNC, (trace if return_trace else None)

        policy = REMAT_POLICIES[self.remat_policy]
        if self.remat_policy != "none":
            body = jax.checkpoint(body, policy=policy, prevent_cse=not self.scan_layers)
        layers = (stacked_state, None if cache is None else (cache.k_LBSKD, cache.v_LBSKD))
        if self.scan_layers:
            return jax.lax.scan(body, x_BTNC, layers)
        per_layer = []
        n_layers = jax.tree.leaves(stacked_state)[0].shape[0]
        for layer in range(n_layers):
            x_BTNC, out = body(x_BTNC, jax.tree.map(lambda a: a[layer], layers))
            per_layer.append(out)
        return x_BTNC, jax.tree.map(lambda *a: jnp.stack(a), *per_layer)


def abstract_model(cfg, mesh):
    """The model's graphdef, its abstract parameters (nnx.State, with the Variables' metadata) and
    the same as a pure dict of ShapeDtypeStructs that carry the mesh's shardings."""
    graphdef, abstract_params = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))), nnx.Param)
    shardings = sharding.param_shardings(abstract_params, mesh)
    sharded = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
                           nnx.to_pure_dict(abstract_params), shardings)
    return graphdef, abstract_params, sharded


def param_counts(cfg) -> dict:
    """Parameter counts by role, from shapes alone (`nnx.eval_shape`: nothing is allocated)."""
    abstract = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
    counts = dict(total=0, embedding=0, non_embedding=0, active=0, residual_overhead=0)
    for path, variable in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        size = variable.size
        counts["total"] += size
        counts["embedding" if path[0] in ("embed", "unembed") else "non_embedding"] += size
        counts["residual_overhead"] += size if path[1:2] in (("attn_site",), ("mlp_site",)) else 0
    counts["active"] = counts["total"]  # dense: every parameter takes part in every token
    return counts


def check_config(cfg) -> None:
    """Raises UserError naming the first field of the model config that cannot work."""
    for field in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff"):
        if cfg[field] < 1:
            raise UserError(f"model.{field}: must be >= 1, got {cfg[field]}")
    if cfg.d_model % cfg.n_heads:
        raise UserError(f"model.d_model: {cfg.d_model} is not divisible by model.n_heads={cfg.n_heads}")
    if (cfg.d_model // cfg.n_heads) % 2:
        raise UserError(f"model.d_model: head_dim = d_model // n_heads = {cfg.d_model // cfg.n_heads} "
                        "must be even for RoPE")
    if cfg.n_heads % cfg.n_kv_heads:
        raise UserError(f"model.n_kv_heads: {cfg.n_kv_heads} does not divide model.n_heads={cfg.n_heads}")
    if cfg.remat not in REMAT_POLICIES:
        raise UserError(f"model.remat: unknown {cfg.remat!r}; choose one of {', '.join(REMAT_POLICIES)}")
    if cfg.dtype not in DTYPES:
        raise UserError(f"model.dtype: unknown {cfg.dtype!r}; choose one of {', '.join(DTYPES)}")
    residual.check_config(cfg)
