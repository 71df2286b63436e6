"""The decoder: embed -> expand -> scan(blocks) -> scan(moe_blocks) -> reduce -> final norm -> unembed.

The residual connection is whatever `residual.make_site` returns; this file never asks which.
A block is attention (`attention.py`: MHA/GQA or MLA) then an FFN (a SwiGLU, or `moe.py`'s
DeepSeekMoE); a dense model has only `blocks`, an MoE model its leading dense layers there and the
rest in `moe_blocks`. Each stack's parameters are stacked on a leading `layers` axis whether or not
the forward pass scans, so `scan_layers` and `remat` change compilation only, never the checkpoint
layout.

Shape suffixes name every array's axes, one letter per axis, each letter with one meaning across
the code base (docs/design.md):
  B batch (sequences)          T positions computed (queries)   S key/value positions (cache slots)
  W a training window: T + 1 tokens (inputs and next-token targets)
  V vocabulary                 C width d_model                  N residual streams n
  L layers of a stack          I residual sites (2 per layer)   M microbatches
  H query heads                K key/value heads                D head dim
  R RoPE dims                  r MLA's KV latent rank           J MLA's query/key head dim (D + R)
  F hidden width of a SwiGLU (d_ff, d_expert)
  E routed experts             A experts per token (top_k)      G capacity (slots per expert)
  Y all experts' buffer slots (capacity: E x G and one discard slot; dropless: the X x A assignments)
  P a coefficient projection's outputs (HC: n + 1, mHC: n^2 + 2n)
  Q chunks of the sequence (the chunked loss)
  U query heads per key/value head (H = K x U)   Z blocks   t, s one block of query / key positions
  X a flattened axis (the axes it merges are named where it is made: n x C, T x A, B x T)
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mhc_jax import sharding
from mhc_jax.model import residual
from mhc_jax.model.attention import LayerCache, cache_shapes, make_attention
from mhc_jax.model.layers import Embedding, RMSNorm, SwiGLU, normal, param
from mhc_jax.model.loss import mean_cross_entropy
from mhc_jax.model.moe import MoE, RouterStats

# The attributes that hold residual.py's modules: a Block's two sites, the Transformer's streams.
SITE_ATTRIBUTES = ("attn_site", "mlp_site", "streams")

DTYPES = ("auto", "float32", "bfloat16", "float16")
SAVE_COEFFICIENTS = jax.checkpoint_policies.save_only_these_names(residual.COEFFICIENTS)
REMAT_POLICIES = {
    "none": None,  # save every activation of the block
    "full": SAVE_COEFFICIENTS,  # save only the stream between blocks and the sites' per-token coefficients
    "dots": jax.checkpoint_policies.save_from_both_policies(  # and the matmul outputs
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable, SAVE_COEFFICIENTS),
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
    """Attention, then the FFN (a dense SwiGLU, or DeepSeekMoE when `moe`), each one residual site
    on the [B, T, n, C] stream."""

    def __init__(self, cfg, layer, moe: bool, rngs: nnx.Rngs):
        out_std = residual.out_proj_scale(cfg) / (2 * cfg.n_layers) ** 0.5
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = make_attention(cfg, out_std, rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MoE(cfg, out_std, rngs) if moe else SwiGLU(cfg.d_model, cfg.d_ff, out_std, rngs)
        # The sites draw their random numbers last, so that for one seed every variant starts
        # from the same attention and MLP weights: variants differ only in the residual connection.
        self.attn_site = residual.make_site(cfg, 2 * layer, rngs)
        self.mlp_site = residual.make_site(cfg, 2 * layer + 1, rngs)

    def attend(self, u_BTC) -> tuple[jax.Array, None]:
        return self.attn(self.attn_norm(u_BTC)), None

    def ffn(self, u_BTC) -> tuple[jax.Array, "RouterStats | None"]:
        """The FFN branch, and an MoE's router statistics."""
        y_BTC = self.mlp(self.mlp_norm(u_BTC))
        return y_BTC if isinstance(self.mlp, MoE) else (y_BTC, None)

    def __call__(self, x_BTNC: jax.Array) -> tuple[jax.Array, Trace, "RouterStats | None"]:
        attn_in_rms = rms(x_BTNC)
        x_BTNC, attn_maps, _ = self.attn_site(x_BTNC, self.attend)
        mlp_in_rms = rms(x_BTNC)
        x_BTNC, mlp_maps, router_stats = self.mlp_site(x_BTNC, self.ffn)
        stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), Trace(attn_maps, attn_in_rms), Trace(mlp_maps, mlp_in_rms))
        return x_BTNC, stacked, router_stats

    def decode(self, x_BTNC: jax.Array, cache: LayerCache) -> tuple[jax.Array, LayerCache]:
        """The same block for new tokens of a decoding batch; attention reads and extends `cache`."""
        x_BTNC, _, new_cache = self.attn_site(x_BTNC, lambda u_BTC: self.attn.decode(self.attn_norm(u_BTC), cache))
        x_BTNC, _, _ = self.mlp_site(x_BTNC, self.ffn)
        return x_BTNC, new_cache


def stacked_blocks(cfg, first_layer: int, count: int, moe: bool, rngs: nnx.Rngs) -> Block | None:
    """Blocks first_layer .. first_layer + count - 1, their parameters stacked on a leading `layers` axis."""
    if count == 0:
        return None

    @nnx.split_rngs(splits=count)
    @nnx.vmap(in_axes=(0, 0), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(rngs, layer):
        return Block(cfg, layer, moe, rngs)

    return make(rngs, first_layer + jnp.arange(count))


def dense_layer_count(cfg) -> int:
    """Leading layers with a dense FFN: all of them in a dense model."""
    return cfg.moe.first_dense_layers if cfg.moe.n_experts else cfg.n_layers


class DecodeCache(NamedTuple):
    """Every layer's attention cache for batched decoding (see attention.LayerCache): per stack of
    blocks (dense, MoE), the entries stacked per layer [L, B, S, ...]."""
    stacks: tuple
    start_B: jax.Array
    index: jax.Array


class Transformer(nnx.Module):
    """The leading dense blocks (`blocks`) and the MoE blocks (`moe_blocks`) are two scanned stacks;
    a dense model has only the first."""

    def __init__(self, cfg, rngs: nnx.Rngs):
        self.n_streams = cfg.n_streams
        self.cache_shapes = cache_shapes(cfg)
        self.dtype = compute_dtype(cfg.dtype)
        self.scan_layers = cfg.scan_layers
        self.remat_policy = cfg.remat
        self.embed = Embedding(cfg, rngs)
        n_dense = dense_layer_count(cfg)
        self.blocks = stacked_blocks(cfg, 0, n_dense, False, rngs)
        self.moe_blocks = stacked_blocks(cfg, n_dense, cfg.n_layers - n_dense, True, rngs)
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.unembed = None if cfg.tie_embeddings else param(
            normal(rngs, (cfg.d_model, cfg.vocab_size), cfg.d_model**-0.5), ("embed", "vocab"))
        # Last, like the sites: a variant's own stream ends draw no numbers the others draw.
        self.streams = residual.make_streams(cfg, rngs)

    def __call__(self, tokens_BT: jax.Array) -> jax.Array:
        """Logits [B, T, V] in float32."""
        return self.logits(self.forward(tokens_BT, False, None)[0])

    def losses_and_router_stats(self, tokens_BW: jax.Array, chunk: int) -> tuple[jax.Array, "RouterStats | None"]:
        """Mean next-token cross-entropy of each sequence [B] of a training window (loss.py: the logits
        made `chunk` positions at a time), and the MoE layers' RouterStats stacked per layer
        ([L_moe, E], ...), or None."""
        x_BTNC, _, router_stats, _ = self.forward(tokens_BW[:, :-1], False, None)
        losses_B = mean_cross_entropy(self.final_hidden(x_BTNC), self.unembedding(), tokens_BW[:, 1:], chunk)
        return losses_B, router_stats

    def trace(self, tokens_BT: jax.Array) -> tuple[jax.Array, Trace]:
        """Logits and the Trace of all 2L sites stacked in order (site 2l is block l's attention,
        2l + 1 its FFN): maps [2L, B, T, ...], rms [2L]."""
        x_BTNC, trace, _, _ = self.forward(tokens_BT, True, None)
        return self.logits(x_BTNC), trace

    def decode(self, tokens_BT: jax.Array, cache: "DecodeCache", last_only: bool = False
               ) -> tuple[jax.Array, "DecodeCache"]:
        """Logits of tokens that continue the cached ones (from slot cache.index on), and the cache
        extended by them. `last_only`: the last token's logits alone [B, 1, V], as a prefill needs
        (the others would take B x T x V floats)."""
        x_BTNC, _, _, stacks = self.forward(tokens_BT, False, cache)
        logits_BTV = self.logits(x_BTNC[:, -1:] if last_only else x_BTNC)
        return logits_BTV, DecodeCache(stacks, cache.start_B, cache.index + tokens_BT.shape[1])

    def forward(self, tokens_BT, return_trace: bool, cache: "DecodeCache | None"):
        """The one forward pass behind __call__, losses_and_router_stats, trace and decode: the stream
        after the last block, the trace (if asked), the router statistics, the extended cache entries
        (if decoding)."""
        x_BTNC = self.streams.expand(self.embed(tokens_BT, self.dtype))
        traces, router_stats, stacks = [], None, []
        for index, blocks in enumerate(b for b in (self.blocks, self.moe_blocks) if b is not None):
            layer_cache = None if cache is None else (cache.stacks[index], cache.start_B, cache.index)
            x_BTNC, (trace, stats, entries) = self.run_stack(blocks, x_BTNC, return_trace, layer_cache)
            traces.append(trace)
            router_stats = stats if stats is not None else router_stats
            stacks.append(entries)
        trace = jax.tree.map(lambda *a: jnp.concatenate([x.reshape(-1, *x.shape[2:]) for x in a]), *traces) \
            if return_trace else None
        return x_BTNC, trace, router_stats, tuple(stacks)

    def init_cache(self, start_B: jax.Array, slots: int) -> DecodeCache:
        """An empty cache of `slots` positions for rows whose real tokens start at `start_B`."""
        stacks = tuple(tuple(jnp.zeros((jax.tree.leaves(blocks)[0].shape[0], start_B.shape[0], slots, *shape),
                                       self.dtype) for shape in self.cache_shapes)
                       for blocks in (self.blocks, self.moe_blocks) if blocks is not None)
        return DecodeCache(stacks, start_B.astype(jnp.int32), jnp.zeros((), jnp.int32))

    def final_hidden(self, x_BTNC: jax.Array) -> jax.Array:
        return self.final_norm(self.streams.collapse(x_BTNC))

    def unembedding(self) -> jax.Array:
        """The head's weights [C, V]: the transposed embedding table when tied."""
        return self.embed.table[...].T if self.unembed is None else self.unembed[...]

    def logits(self, x_BTNC: jax.Array) -> jax.Array:
        h_BTC = self.final_hidden(x_BTNC)
        return (h_BTC @ self.unembedding().astype(h_BTC.dtype)).astype(jnp.float32)

    def run_stack(self, blocks: Block, x_BTNC, return_trace: bool, layer_cache):
        """Every block of a stack in turn; also returns, stacked per layer, (the traces if
        return_trace, the router statistics of MoE blocks, the extended cache entries if decoding)."""
        if layer_cache is not None:
            return self.decode_stack(blocks, x_BTNC, *layer_cache)
        graphdef, stacked_state = nnx.split(blocks)

        def body(x_BTNC, layer_state):
            x_BTNC = sharding.constrain(x_BTNC, ("batch", None, None, None))
            x_BTNC, trace, stats = nnx.merge(graphdef, layer_state)(x_BTNC)
            if not return_trace:
                return x_BTNC, (None, stats, None)
            # Split the maps [2, B, T, ...] over the batch: static maps are broadcast from parameters,
            # and were otherwise held whole for the global batch on every device (27b: 755 GB).
            maps = jax.tree.map(lambda a: sharding.constrain(a, (None, "batch") + (None,) * (a.ndim - 2)), trace.maps)
            return x_BTNC, (trace._replace(maps=maps), stats, None)

        if self.remat_policy != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[self.remat_policy], prevent_cse=not self.scan_layers)
        if self.scan_layers:
            with jax.named_scope("layers"):  # the dry run's name for what the scan saves (pods/memory_sources.py)
                return jax.lax.scan(body, x_BTNC, stacked_state)
        per_layer = []
        for layer in range(jax.tree.leaves(stacked_state)[0].shape[0]):
            x_BTNC, out = body(x_BTNC, jax.tree.map(lambda a: a[layer], stacked_state))
            per_layer.append(out)
        return x_BTNC, jax.tree.map(lambda *a: jnp.stack(a), *per_layer)

    def decode_stack(self, blocks: Block, x_BTNC, stack: tuple, start_B, index):
        """Decoding through a stack of blocks: each reads its layer of the cache entries [L, B, S, ...]
        and gives back only the new tokens' entries, written into the stack once after the last
        layer, in place. (The whole extended cache out of each layer copied it whole several times
        per decoding step: 2x slower at 10m.)"""
        graphdef, stacked_state = nnx.split(blocks)
        T = x_BTNC.shape[1]

        def body(x_BTNC, layer):
            layer_state, entries = layer
            x_BTNC = sharding.constrain(x_BTNC, ("batch", None, None, None))
            x_BTNC, written = nnx.merge(graphdef, layer_state).decode(x_BTNC, LayerCache(entries, start_B, index))
            return x_BTNC, tuple(jax.lax.dynamic_slice_in_dim(w, index, T, axis=1) for w in written.entries)

        x_BTNC, new = jax.lax.scan(body, x_BTNC, (stacked_state, stack))
        return x_BTNC, (None, None, tuple(jax.lax.dynamic_update_slice_in_dim(s, n, index, axis=2)
                                          for s, n in zip(stack, new)))


def abstract_variables_of(cfg):
    """The model's graphdef and abstract variables (nnx.State with the Variables' metadata)."""
    return nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))))


def abstract_model(cfg, mesh):
    """The model's graphdef, its abstract variables (nnx.State with the Variables' metadata:
    parameters, and the MoE router bias) and the same as a pure dict of ShapeDtypeStructs that
    carry the mesh's shardings."""
    graphdef, abstract_variables = abstract_variables_of(cfg)
    shardings = sharding.param_shardings(abstract_variables, mesh)
    sharded = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
                           nnx.to_pure_dict(abstract_variables), shardings)
    return graphdef, abstract_variables, sharded


ROUTED_EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")


def router_bias(variables: dict) -> jax.Array:
    """The MoE blocks' router bias [L_moe, E] in the model's variables (a pure dict)."""
    return variables["moe_blocks"]["mlp"]["router_bias"]


def with_router_bias(variables: dict, bias_LE: jax.Array) -> dict:
    moe_blocks = {**variables["moe_blocks"], "mlp": {**variables["moe_blocks"]["mlp"], "router_bias": bias_LE}}
    return {**variables, "moe_blocks": moe_blocks}


def param_counts(cfg) -> dict:
    """Parameter counts by role, from shapes alone (`nnx.eval_shape`: nothing is allocated).

    `active` counts what one token's forward pass multiplies by: everything but the input embedding
    lookup (a tied table counts once, as the head) and, in MoE layers, only top_k of the n_experts
    routed experts (the router and the shared experts in full)."""
    abstract = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
    counts = dict(total=0, embedding=0, non_embedding=0, active=0, residual_overhead=0)
    routed_share = cfg.moe.top_k / cfg.moe.n_experts if cfg.moe.n_experts else 1.0
    for path, variable in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        size = variable.size
        counts["total"] += size
        counts["embedding" if path[0] in ("embed", "unembed") else "non_embedding"] += size
        counts["residual_overhead"] += size if any(key in SITE_ATTRIBUTES for key in path[:2]) else 0
        if path[0] == "moe_blocks" and path[1] == "mlp" and path[2] in ROUTED_EXPERT_WEIGHTS:  # not "shared"
            counts["active"] += round(size * routed_share)
        elif not (path[0] == "embed" and not cfg.tie_embeddings):
            counts["active"] += size
    return counts


