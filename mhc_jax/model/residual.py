"""The residual connections, behind one interface. The only file that knows which variant runs.

The model carries a stream x_BTNC of n parallel residual streams per token and calls:

    x_BTNC = expand(x_BTC, n)              # once, after the embedding: copy the token n times
    x_BTNC, maps, aux = site(x_BTNC, branch)  # at every attention and every MLP sublayer
    x_BTC = reduce(x_BTNC)                 # once, before the final norm: sum the streams

Every site computes, with its own coefficients (the mHC paper's orientation, Eq. 3):

    u = sum_i H_pre[i] x_i                           # the branch input
    x'_i = sum_j H_res[i, j] x_j + H_post[i] F(u)   # F = branch, which applies its own pre-norm

and returns the maps it used (`SiteMaps`) so diagnostics read them without recomputation. The
branch returns (F(u), aux): whatever else the sublayer produces (an MoE's router statistics, a
decoding step's attention cache) leaves the site as `aux`.
- `residual`:  n = 1 and H_pre = H_post = H_res = 1, i.e. x + F(x).
- `hc`:        Hyper-Connections (Zhu et al. 2024), static or dynamic (tanh) coefficients.
- `mhc`:       manifold-constrained HC (Xie et al. 2025): H_pre = sigmoid, H_post = 2 sigmoid,
               H_res = Sinkhorn-Knopp projection onto the doubly stochastic matrices.
"""

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from mhc_jax.model.layers import RMSNorm, normal, param, rms_normalize

COEFFICIENTS = "site_coefficients"  # checkpoint_name of the per-token H_pre, H_post, H_res
IMPLEMENTATIONS = ("fast", "reference")  # model.site_impl
COEFF_DTYPES = ("float32", "bfloat16")  # model.mhc.coeff_dtype


class SiteMaps(NamedTuple):
    pre: jax.Array  # [B, T, n]: weights that read the branch input from the streams
    post: jax.Array  # [B, T, n]: weights that write the branch output into the streams
    res: jax.Array  # [B, T, n, n]: stream mixing, row i makes the new stream i


def expand(x_BTC: jax.Array, n_streams: int) -> jax.Array:
    return jnp.broadcast_to(x_BTC[:, :, None, :], (*x_BTC.shape[:2], n_streams, x_BTC.shape[-1]))


def reduce(x_BTNC: jax.Array) -> jax.Array:
    return x_BTNC.sum(axis=2)


def apply_maps(x_BTNC: jax.Array, maps: SiteMaps, branch) -> tuple[jax.Array, object]:
    """One site's update, accumulated in float32 so that row sums of H_res stay exact: one
    contraction reads u = H_pre x, one mixes H_res x, and the write adds H_post y. XLA runs each
    contraction as a per-token matrix product; on CPU that is faster, forward and backward, than
    spelling them as elementwise sums over the n streams (docs/performance.md)."""
    x32_BTNC = x_BTNC.astype(jnp.float32)
    u_BTC = jnp.einsum("btn,btnc->btc", maps.pre, x32_BTNC).astype(x_BTNC.dtype)
    y_BTC, aux = branch(u_BTC)
    mixed_BTNC = jnp.einsum("btij,btjc->btic", maps.res, x32_BTNC)
    written_BTNC = maps.post[..., None] * y_BTC.astype(jnp.float32)[:, :, None, :]
    return (mixed_BTNC + written_BTNC).astype(x_BTNC.dtype), aux


def normalized_projection(x_BTX: jax.Array, w_XP: jax.Array, eps: float, fast: bool) -> jax.Array:
    """rms_normalize(x) @ w. The fast form divides by the RMS after the projection (the paper's
    "dividing-by-norm after the matrix multiplication"), so no normalized copy of x is written."""
    if not fast:
        return rms_normalize(x_BTX, eps) @ w_XP
    return (x_BTX @ w_XP) * jax.lax.rsqrt(jnp.mean(jnp.square(x_BTX), axis=-1, keepdims=True) + eps)


def sinkhorn(logits: jax.Array, iters: int, fast: bool) -> jax.Array:
    """Sinkhorn-Knopp on exp(logits) [..., n, n]: `iters` rounds of T_c (columns sum to 1) then
    T_r (rows sum to 1), the paper's Eq. 9. Rows are exact; columns carry the truncation error.

    The reference runs every round in the log domain (max-shifted logsumexps), which cannot underflow
    to 0/0 for logits far apart (e.g. +-50). The fast form runs only the first round there: after it
    every row and column holds an entry >= 1/n^2, so the other rounds divide by sums that cannot
    vanish and run in the linear domain, on [n, n, tokens] so that every sum adds whole slabs (a
    fori_loop: a Python-unrolled loop compiled 4x slower and ran 3x slower on CPU); its backward
    recomputes the rounds from the logits instead of saving 2 * iters matrices per token.
    """
    return _sinkhorn_fast(logits, iters) if fast else _sinkhorn_log_domain(logits, iters)


def _sinkhorn_log_domain(logits: jax.Array, iters: int) -> jax.Array:
    def normalize(z, _):
        z = z - jax.nn.logsumexp(z, axis=-2, keepdims=True)  # T_c
        z = z - jax.nn.logsumexp(z, axis=-1, keepdims=True)  # T_r
        return z, None

    z, _ = jax.lax.scan(normalize, logits.astype(jnp.float32), length=iters)
    return jnp.exp(z)


def _sinkhorn_linear(logits: jax.Array, iters: int) -> jax.Array:
    z_NNX = jnp.moveaxis(logits.astype(jnp.float32), (-2, -1), (0, 1))  # sums over n run over whole slabs
    z_NNX = z_NNX - jax.nn.logsumexp(z_NNX, axis=0, keepdims=True)  # T_c
    m_NNX = jnp.exp(z_NNX - jax.nn.logsumexp(z_NNX, axis=1, keepdims=True))  # T_r

    def normalize(_, m_NNX):
        m_NNX = m_NNX / m_NNX.sum(axis=0, keepdims=True)  # T_c
        return m_NNX / m_NNX.sum(axis=1, keepdims=True)  # T_r

    m_NNX = jax.lax.fori_loop(0, iters - 1, normalize, m_NNX)
    return jnp.moveaxis(m_NNX, (0, 1), (-2, -1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _sinkhorn_fast(logits: jax.Array, iters: int) -> jax.Array:
    return _sinkhorn_linear(logits, iters)


def _sinkhorn_fast_forward(logits, iters):
    return _sinkhorn_linear(logits, iters), logits


def _sinkhorn_fast_backward(iters, logits, grad):
    _, pullback = jax.vjp(lambda z: _sinkhorn_linear(z, iters), logits)
    return pullback(grad)


_sinkhorn_fast.defvjp(_sinkhorn_fast_forward, _sinkhorn_fast_backward)


def coefficients(per_token: jax.Array) -> jax.Array:
    """Marks a site's per-token coefficients (a few numbers per token, where the stream holds n * C)
    so that the remat policies save them instead of recomputing the path that made them."""
    return checkpoint_name(per_token, COEFFICIENTS)


def _broadcast_maps(x_BTNC: jax.Array, pre, post, res) -> SiteMaps:
    B, T, n, _ = x_BTNC.shape
    return SiteMaps(jnp.broadcast_to(pre, (B, T, n)), jnp.broadcast_to(post, (B, T, n)),
                    jnp.broadcast_to(res, (B, T, n, n)))


class Residual(nnx.Module):
    """The standard pre-norm residual x + F(x), on a stream of n = 1."""

    def __init__(self, cfg, site: int, rngs: nnx.Rngs):
        del cfg, site, rngs

    def __call__(self, x_BTNC: jax.Array, branch) -> tuple[jax.Array, SiteMaps, object]:
        y_BTC, aux = branch(x_BTNC[:, :, 0, :])
        one = jnp.ones((), jnp.float32)
        return x_BTNC + y_BTC[:, :, None, :], _broadcast_maps(x_BTNC, one, one, one), aux


class HyperConnection(nnx.Module):
    """Hyper-Connections (HC paper Eq. 1-13), in the HC paper's own parameters:
    A_m (read weights), A_r (stream-to-stream), B (write weights); H_pre = A_m, H_post = B,
    H_res = A_r^T. Initialized (HC Eq. 14) so that the network starts as pre-norm residual:
    A_m = e_{site mod n}, A_r = I, B = 1 and zero dynamic weights.
    """

    def __init__(self, cfg, site, rngs: nnx.Rngs):
        n, C = cfg.n_streams, cfg.d_model
        self.static_alpha_m = param(jax.nn.one_hot(site % n, n), ("streams",), weight_decay=False)
        self.static_alpha_r = param(jnp.eye(n), ("streams", "streams_out"), weight_decay=False)
        self.static_beta = param(jnp.ones((n,)), ("streams",), weight_decay=False)
        self.dynamic = cfg.hc.dynamic
        self.use_tanh = cfg.hc.use_tanh
        self.fast = cfg.site_impl == "fast"
        if self.dynamic:  # each stream makes its own row of [A_m | A_r] and its own beta
            self.norm = RMSNorm(C, cfg.norm_eps)
            self.dynamic_alpha = param(jnp.zeros((C, n + 1)), ("embed", "coeff"))  # [W_m | W_r]
            self.dynamic_beta = param(jnp.zeros((C,)), ("embed",))  # W_beta
            self.alpha_scale = param(jnp.full((), cfg.hc.scale_init), (), weight_decay=False)  # s_alpha
            self.beta_scale = param(jnp.full((), cfg.hc.scale_init), (), weight_decay=False)  # s_beta

    def maps(self, x_BTNC: jax.Array) -> SiteMaps:
        alpha_m = self.static_alpha_m[...]
        alpha_r = self.static_alpha_r[...]
        beta = self.static_beta[...]
        if self.dynamic:
            squash = jnp.tanh if self.use_tanh else (lambda v: v)
            n = alpha_m.shape[0]
            # [W_m | W_r | W_beta] in one projection, the RMSNorm gain folded into it
            w_CP = jnp.concatenate([self.dynamic_alpha[...], self.dynamic_beta[...][:, None]], axis=-1)
            w_CP = w_CP * self.norm.scale[...][:, None]
            proj_BTNP = squash(normalized_projection(x_BTNC.astype(jnp.float32), w_CP, self.norm.eps, self.fast))
            alpha_m = coefficients(alpha_m + self.alpha_scale[...] * proj_BTNP[..., 0])
            alpha_r = coefficients(alpha_r + self.alpha_scale[...] * proj_BTNP[..., 1:n + 1])
            beta = coefficients(beta + self.beta_scale[...] * proj_BTNP[..., n + 1])
        return _broadcast_maps(x_BTNC, alpha_m, beta, jnp.swapaxes(alpha_r, -1, -2))

    def __call__(self, x_BTNC: jax.Array, branch) -> tuple[jax.Array, SiteMaps, object]:
        maps = self.maps(x_BTNC)
        x_BTNC, aux = apply_maps(x_BTNC, maps, branch)
        return x_BTNC, maps, aux


class ManifoldHyperConnection(nnx.Module):
    """mHC (mHC paper Eq. 7-9): coefficients from the whole token state flattened to n*C, one
    RMSNorm over n*C and one projection phi [n*C, 2n + n^2] packed as [pre | post | res], gated by
    alpha = (alpha_pre, alpha_post, alpha_res) and offset by the static bias b.

    Init (docs/math.md, "How the variants are built"): sigmoid(b_pre) = 1/n, 2 sigmoid(b_post) = 1, b_res = s * I, alpha = 0.01,
    phi random. With identical streams this is exactly the pre-norm residual network, and the
    random phi breaks the stream symmetry once training moves alpha.
    """

    def __init__(self, cfg, site, rngs: nnx.Rngs):
        del site
        n, C = cfg.n_streams, cfg.d_model
        mhc = cfg.mhc
        phi_std = mhc.phi_init_scale * (n * C) ** -0.5
        self.phi = param(normal(rngs, (n * C, 2 * n + n * n), phi_std), ("stream_embed", "coeff"))
        self.alpha = param(jnp.full((3,), mhc.alpha_init), (None,), weight_decay=False)
        bias = jnp.concatenate([jnp.full((n,), -math.log(n - 1)), jnp.zeros((n,)),
                                mhc.res_init_scale * jnp.eye(n).ravel()])
        self.bias = param(bias, ("coeff",), weight_decay=False)
        self.n = n
        self.eps = cfg.norm_eps
        self.coeff_dtype = jnp.dtype(mhc.coeff_dtype)
        self.sinkhorn_iters = mhc.sinkhorn_iters
        self.use_pre, self.use_post, self.use_res = mhc.use_pre, mhc.use_post, mhc.use_res
        self.fast = cfg.site_impl == "fast"

    def maps(self, x_BTNC: jax.Array) -> SiteMaps:
        B, T, n, C = x_BTNC.shape
        x_BTX = x_BTNC.reshape(B, T, n * C).astype(self.coeff_dtype)
        proj_BTP = normalized_projection(x_BTX, self.phi[...].astype(self.coeff_dtype), self.eps, self.fast)
        proj_BTP = proj_BTP.astype(jnp.float32)
        a_pre, a_post, a_res = self.alpha[...]
        b_pre, b_post, b_res = jnp.split(self.bias[...], [n, 2 * n])
        p_pre, p_post, p_res = jnp.split(proj_BTP, [n, 2 * n], axis=-1)
        pre = coefficients(jax.nn.sigmoid(a_pre * p_pre + b_pre)) if self.use_pre else jnp.full((n,), 1.0 / n)
        post = coefficients(2.0 * jax.nn.sigmoid(a_post * p_post + b_post)) if self.use_post else jnp.ones((n,))
        res_logits = (a_res * p_res + b_res).reshape(B, T, n, n)
        res = coefficients(sinkhorn(res_logits, self.sinkhorn_iters, self.fast)) if self.use_res else jnp.eye(n)
        return _broadcast_maps(x_BTNC, pre, post, res)

    def __call__(self, x_BTNC: jax.Array, branch) -> tuple[jax.Array, SiteMaps, object]:
        maps = self.maps(x_BTNC)
        x_BTNC, aux = apply_maps(x_BTNC, maps, branch)
        return x_BTNC, maps, aux


SITES = {"residual": Residual, "hc": HyperConnection, "mhc": ManifoldHyperConnection}


def function_preserving(residual: str, name: str, value):
    """A freshly initialized site parameter (`name`: its own key) set so that, on the identical
    streams residual.expand makes, the site computes the pre-norm residual update: each stream
    stays the residual model's stream (surgery, pretrained/surgery.py).
    - HC's own init already does: H_pre = e_{site mod n}, H_res = I, H_post = 1, zero dynamic weights.
    - mHC: its gates alpha go to 0, leaving the static coefficients sigmoid(b_pre) = 1/n,
      2 sigmoid(b_post) = 1 and H_res = Sinkhorn(b_res), whose rows sum to 1; phi stays random, so
      that the streams can part once training moves alpha."""
    return jnp.zeros_like(value) if residual == "mhc" and name == "alpha" else value


def stream_count_problem(cfg) -> str | None:
    """Why cfg.residual's sites cannot run on cfg.n_streams streams, or None (config_rules.RELATIONS
    ask, with the rest of the config)."""
    if cfg.residual == "residual" and cfg.n_streams != 1:
        return "the residual variant has one stream; use model.residual=hc or mhc for more"
    if cfg.residual == "mhc" and cfg.n_streams < 2:
        return "mhc needs n >= 2 streams (n = 1 is the residual variant)"
    return None


def make_site(cfg, site, rngs: nnx.Rngs) -> nnx.Module:
    """The residual site with index `site` (2 * layer for attention, 2 * layer + 1 for the MLP)."""
    return SITES[cfg.residual](cfg, site, rngs)


# The one list of variants (configs, benchmark, study, plots and sweeps read it):
# name -> (model.residual, model.n_streams); 'hc_static' is 'hc' with model.hc.dynamic = False.
VARIANTS = {
    "residual": ("residual", 1),
    "hc": ("hc", 4),
    "hc_static": ("hc", 4),
    "mhc": ("mhc", 4),
}


def set_variant(model_config, variant: str) -> None:
    """Makes `model_config` run `variant`'s residual connection, every other field unchanged."""
    model_config.residual, model_config.n_streams = VARIANTS[variant]
    model_config.hc.dynamic = variant != "hc_static"


def variant_name(cfg) -> str:
    """The name of this residual connection in VARIANTS: residual, hc, hc_static or mhc."""
    return "hc_static" if cfg.residual == "hc" and not cfg.hc.dynamic else cfg.residual


def out_proj_scale(cfg) -> float:
    """Multiplier on the init std of the output projections (HC paper section 4: sqrt(n))."""
    return cfg.hc.out_proj_scale if cfg.residual == "hc" else 1.0


def site_flops(cfg) -> int:
    """Forward FLOPs per token of one site's own arithmetic (the branch F not included): reading
    u = H_pre x (2nC), mixing H_res x (2n^2 C) and writing H_post y (2nC); plus computing the
    coefficients: HC's per-stream norm and [C, n + 2] projection, mHC's norm and [nC, n^2 + 2n]
    projection and its Sinkhorn iterations (about 6 n^2 per iteration)."""
    n, C = cfg.n_streams, cfg.d_model
    if cfg.residual == "residual":
        return C  # the addition
    apply = 2 * n * C + 2 * n * n * C + 2 * n * C
    if cfg.residual == "hc":
        return apply + (4 * n * C + 2 * n * C * (n + 2) if cfg.hc.dynamic else 0)
    return apply + 3 * n * C + 2 * n * C * (n * n + 2 * n) + 6 * n * n * cfg.mhc.sinkhorn_iters
