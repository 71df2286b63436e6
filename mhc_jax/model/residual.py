"""The residual connections, behind one interface. The only file that knows which variant runs.

The model carries a stream x_BTNC of n parallel residual streams per token and calls:

    x_BTNC = streams.expand(x_BTC)            # once, after the embedding (most: copy the token n times)
    x_BTNC, maps, aux = site(x_BTNC, branch)  # at every attention and every MLP sublayer
    x_BTC = streams.collapse(x_BTNC)          # once, before the final norm (most: sum the streams)

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
- `mhc_v4`:    mHC as DeepSeek-V4 ships it: a row softmax and eps in the Sinkhorn rounds, eps on
               H_pre, and a learned collapse of the streams (`HyperHead`) instead of their sum.
- `mhc_lite`:  mHC-lite (arXiv 2601.05732): H_res a softmax-weighted mix of the n! permutation matrices.
- `kromhc`:    KromHC (arXiv 2601.21579): H_res a Kronecker product of 2x2 doubly stochastic factors.
- `laurel_rw`, `laurel_lr`, `laurel_pa`: LAuReL (arXiv 2411.07501) on one stream: learned weights
               on the branch and the skip, a low-rank term on the skip, or the previous outputs.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from mhc_jax.model import doubly_stochastic
from mhc_jax.model.layers import RMSNorm, normal, param, rms_normalize

COEFFICIENTS = "site_coefficients"  # checkpoint_name of the per-token H_pre, H_post, H_res
IMPLEMENTATIONS = ("fast", "reference")  # model.site_impl
COEFF_DTYPES = ("float32", "bfloat16")  # model.mhc.coeff_dtype


class SiteMaps(NamedTuple):
    pre: jax.Array  # [B, T, n]: weights that read the branch input from the streams
    post: jax.Array  # [B, T, n]: weights that write the branch output into the streams
    res: jax.Array  # [B, T, n, n]: stream mixing, row i makes the new stream i


class Streams(nnx.Module):
    """Where the n streams begin and end: `expand` copies the embedding into every stream and
    `collapse` sums them (HC and the mHC family; with n = 1, the plain residual stream)."""

    def __init__(self, cfg, rngs: nnx.Rngs):
        del rngs
        self.n = cfg.n_streams

    def expand(self, x_BTC: jax.Array) -> jax.Array:
        return jnp.broadcast_to(x_BTC[:, :, None, :], (*x_BTC.shape[:2], self.n, x_BTC.shape[-1]))

    def collapse(self, x_BTNC: jax.Array) -> jax.Array:
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

    streams = Streams

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
    A_m = e_{site mod n}, A_r = I, B = 1 and zero dynamic weights. AdamW's weight decay skips the
    static coefficients unless hc.static_res_weight_decay puts it on A_r (pulling H_res toward 0).
    """

    streams = Streams

    def __init__(self, cfg, site, rngs: nnx.Rngs):
        n, C = cfg.n_streams, cfg.d_model
        self.static_alpha_m = param(jax.nn.one_hot(site % n, n), ("streams",), weight_decay=False)
        self.static_alpha_r = param(jnp.eye(n), ("streams", "streams_out"), weight_decay=cfg.hc.static_res_weight_decay)
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
    RMSNorm over n*C and one projection phi [n*C, 2n + R] packed as [pre | post | res], gated by
    alpha = (alpha_pre, alpha_post, alpha_res) and offset by the static bias b. The R res logits
    become H_res through `res_map`: here n^2 logits and Sinkhorn-Knopp; the subclasses below keep
    everything else and change that map.

    Init (docs/math.md, "How the variants are built"): sigmoid(b_pre) = 1/n, 2 sigmoid(b_post) = 1,
    b_res = s I (s = mhc.res_init_scale), alpha = 0.01, phi random. With identical streams this is
    exactly the pre-norm residual network, and the random phi breaks the stream symmetry once
    training moves alpha.
    """

    streams = Streams

    def __init__(self, cfg, site, rngs: nnx.Rngs):
        del site
        n, C = cfg.n_streams, cfg.d_model
        mhc = cfg.mhc
        res_bias = self.res_bias(n, mhc.res_init_scale)
        phi_std = mhc.phi_init_scale * (n * C) ** -0.5
        self.phi = param(normal(rngs, (n * C, 2 * n + res_bias.size), phi_std), ("stream_embed", "coeff"))
        self.alpha = param(jnp.full((3,), mhc.alpha_init), (None,), weight_decay=False)
        bias = jnp.concatenate([jnp.full((n,), -math.log(n - 1)), jnp.zeros((n,)), res_bias.ravel()])
        self.bias = param(bias, ("coeff",), weight_decay=False)
        self.n = n
        self.eps = cfg.norm_eps
        self.coeff_dtype = jnp.dtype(mhc.coeff_dtype)
        self.sinkhorn_iters = mhc.sinkhorn_iters
        self.use_pre, self.use_post, self.use_res = mhc.use_pre, mhc.use_post, mhc.use_res
        self.fast = cfg.site_impl == "fast"

    @staticmethod
    def res_bias(n: int, scale: float) -> jax.Array:
        """The static res logits: s I, so that H_res starts near the identity."""
        return scale * jnp.eye(n)

    def res_map(self, logits_BTR: jax.Array) -> jax.Array:
        """H_res [B, T, n, n] from the res logits."""
        B, T, _ = logits_BTR.shape
        return doubly_stochastic.sinkhorn(logits_BTR.reshape(B, T, self.n, self.n), self.sinkhorn_iters, self.fast)

    def pre_map(self, logits_BTN: jax.Array) -> jax.Array:
        return jax.nn.sigmoid(logits_BTN)

    def maps(self, x_BTNC: jax.Array) -> SiteMaps:
        B, T, n, C = x_BTNC.shape
        x_BTX = x_BTNC.reshape(B, T, n * C).astype(self.coeff_dtype)
        proj_BTP = normalized_projection(x_BTX, self.phi[...].astype(self.coeff_dtype), self.eps, self.fast)
        proj_BTP = proj_BTP.astype(jnp.float32)
        a_pre, a_post, a_res = self.alpha[...]
        b_pre, b_post, b_res = jnp.split(self.bias[...], [n, 2 * n])
        p_pre, p_post, p_res = jnp.split(proj_BTP, [n, 2 * n], axis=-1)
        pre = coefficients(self.pre_map(a_pre * p_pre + b_pre)) if self.use_pre else jnp.full((n,), 1.0 / n)
        post = coefficients(2.0 * jax.nn.sigmoid(a_post * p_post + b_post)) if self.use_post else jnp.ones((n,))
        res = coefficients(self.res_map(a_res * p_res + b_res)) if self.use_res else jnp.eye(n)
        return _broadcast_maps(x_BTNC, pre, post, res)

    def __call__(self, x_BTNC: jax.Array, branch) -> tuple[jax.Array, SiteMaps, object]:
        maps = self.maps(x_BTNC)
        x_BTNC, aux = apply_maps(x_BTNC, maps, branch)
        return x_BTNC, maps, aux


class HyperHead(Streams):
    """DeepSeek-V4's collapse of the streams before the final norm (transformers'
    DeepseekV4HyperHead): h = sum_i (sigmoid(alpha p_i + b_i) + eps) x_i, p = RMSNorm(vec x) phi,
    where the mHC family sums. Initialized as the sites' H_pre (sigmoid(b) = 1/n, alpha = 0.01):
    with identical streams it returns their common value."""

    def __init__(self, cfg, rngs: nnx.Rngs):
        super().__init__(cfg, rngs)
        n, C = cfg.n_streams, cfg.d_model
        self.phi = param(normal(rngs, (n * C, n), cfg.mhc.phi_init_scale * (n * C) ** -0.5), ("stream_embed", "coeff"))
        self.alpha = param(jnp.full((1,), cfg.mhc.alpha_init), (None,), weight_decay=False)
        self.bias = param(jnp.full((n,), -math.log(n - 1)), ("coeff",), weight_decay=False)
        self.norm_eps, self.eps = cfg.norm_eps, cfg.mhc.v4_eps

    def collapse(self, x_BTNC: jax.Array) -> jax.Array:
        B, T, n, C = x_BTNC.shape
        x32_BTNC = x_BTNC.astype(jnp.float32)
        proj_BTN = rms_normalize(x32_BTNC.reshape(B, T, n * C), self.norm_eps) @ self.phi[...]
        pre_BTN = jax.nn.sigmoid(self.alpha[...] * proj_BTN + self.bias[...]) + self.eps
        return jnp.einsum("btn,btnc->btc", pre_BTN, x32_BTNC).astype(x_BTNC.dtype)


class DeepSeekV4HyperConnection(ManifoldHyperConnection):
    """mHC as DeepSeek-V4 defines it (transformers 5.x, models/deepseek_v4: DeepseekV4HyperConnection
    and how DeepseekV4DecoderLayer applies it): the same projection, gates and H_post; H_pre =
    sigmoid + eps; H_res = doubly_stochastic.sinkhorn_v4 (a row softmax first, eps in every
    division, mhc.v4_eps = V4's hc_eps); and the streams collapse through a learned `HyperHead`.
    V4's parameters map one to one: fn = phi^T, base = bias, scale = alpha (hc_mult = n,
    hc_sinkhorn_iters = mhc.sinkhorn_iters). Our init (not V4's zero base and unit scale, which
    serve checkpoints) is the mhc variant's."""

    streams = HyperHead

    def __init__(self, cfg, site, rngs: nnx.Rngs):
        super().__init__(cfg, site, rngs)
        self.v4_eps = cfg.mhc.v4_eps

    def res_map(self, logits_BTR: jax.Array) -> jax.Array:
        B, T, _ = logits_BTR.shape
        logits_BTNN = logits_BTR.reshape(B, T, self.n, self.n)
        return doubly_stochastic.sinkhorn_v4(logits_BTNN, self.sinkhorn_iters, self.v4_eps, self.fast)

    def pre_map(self, logits_BTN: jax.Array) -> jax.Array:
        return jax.nn.sigmoid(logits_BTN) + self.v4_eps


class MHCLite(ManifoldHyperConnection):
    """mHC-lite (Yang and Gao 2026, arXiv 2601.05732; code FFTYYY/mhc-lite): H_res = sum_r a_r P_r
    over the n! permutation matrices, a = softmax of n! res logits (doubly_stochastic.permutation_mix):
    exactly doubly stochastic with no iteration. H_pre and H_post as mHC. Static res logits: s on
    the identity, 0 elsewhere (their code uses 0 and -8, i.e. s = 8). Their code applies the mix
    transposed; the permutations are closed under transposition, so that only relabels a."""

    @staticmethod
    def res_bias(n: int, scale: float) -> jax.Array:
        return scale * jnp.eye(1, math.factorial(n))[0]

    def res_map(self, logits_BTR: jax.Array) -> jax.Array:
        return doubly_stochastic.permutation_mix(logits_BTR)


class KromHC(ManifoldHyperConnection):
    """KromHC (Zhou et al. 2026, arXiv 2601.21579; code wz1119/KromHC): for n = 2^K streams, H_res =
    U_1 (x) ... (x) U_K with U_k = p_k I + (1 - p_k) swap and (p_k, 1 - p_k) a softmax of two res
    logits per factor (doubly_stochastic.kronecker_mix): exactly doubly stochastic, 2K logits where
    mHC has n^2. H_pre and H_post as mHC. Static res logits per factor: (s, 0), the identity favoured."""

    @staticmethod
    def res_bias(n: int, scale: float) -> jax.Array:
        return jnp.tile(jnp.array([scale, 0.0]), (n.bit_length() - 1, 1))

    def res_map(self, logits_BTR: jax.Array) -> jax.Array:
        B, T, R = logits_BTR.shape
        return doubly_stochastic.kronecker_mix(logits_BTR.reshape(B, T, R // 2, 2))


class LaurelRW(nnx.Module):
    """LAuReL-RW (Menghani et al. 2025, arXiv 2411.07501, Sec. 2.1): x' = alpha F(x) + beta x with
    two learned scalars per site. The paper bounds them by a softmax or sigmoid and gives no init;
    here alpha = 2 sigmoid(a), beta = 2 sigmoid(b) with a = b = 0, so a site starts as x + F(x)
    and each weight stays in (0, 2). As maps: H_pre = 1, H_post = alpha, H_res = beta (n = 1), so
    the Amax gain is the product of the betas along the depth."""

    streams = Streams

    def __init__(self, cfg, site, rngs: nnx.Rngs):
        del cfg, site, rngs
        self.weights = param(jnp.zeros((2,)), (None,), weight_decay=False)  # (a, b)

    def __call__(self, x_BTNC: jax.Array, branch) -> tuple[jax.Array, SiteMaps, object]:
        alpha, beta = 2.0 * jax.nn.sigmoid(self.weights[...])
        maps = _broadcast_maps(x_BTNC, jnp.ones(()), alpha, beta)
        x_BTNC, aux = apply_maps(x_BTNC, maps, branch)
        return x_BTNC, maps, aux


class LaurelLR(nnx.Module):
    """LAuReL-LR (arXiv 2411.07501, Sec. 2.2, Eq. 3): x' = F(x) + x + B A x, a rank-r term on the
    skip (model.laurel.rank). A [C, r] starts column-orthogonal as the paper's LLMs (A_ij =
    1/sqrt(rC) where i mod r = j, Sec. 3.3), B [r, C] at zero: a site starts as x + F(x). Its maps
    are those of the residual (n = 1, all 1): the skip's C x C map I + BA is not a stream mix, so
    the Amax gain stays 1 and the stream RMS diagnostics show what it does."""

    streams = Streams

    def __init__(self, cfg, site, rngs: nnx.Rngs):
        del site, rngs
        C, r = cfg.d_model, cfg.laurel.rank
        self.down = param(jnp.where(jnp.arange(C)[:, None] % r == jnp.arange(r), (r * C) ** -0.5, 0.0), ("embed", "coeff"))
        self.up = param(jnp.zeros((r, C)), ("coeff", "embed"))

    def __call__(self, x_BTNC: jax.Array, branch) -> tuple[jax.Array, SiteMaps, object]:
        x_BTC = x_BTNC[:, :, 0, :]
        y_BTC, aux = branch(x_BTC)
        low_BTC = (x_BTC.astype(jnp.float32) @ self.down[...]) @ self.up[...]
        x_BTC = (x_BTC.astype(jnp.float32) + y_BTC.astype(jnp.float32) + low_BTC).astype(x_BTNC.dtype)
        one = jnp.ones((), jnp.float32)
        return x_BTC[:, :, None, :], _broadcast_maps(x_BTNC, one, one, one), aux


class History(Streams):
    """LAuReL-PA's streams: stream 0 is the residual stream, stream j > 0 the output of the site j
    sites back. Before the first site there are no earlier outputs: zeros; at the end, stream 0."""

    def expand(self, x_BTC: jax.Array) -> jax.Array:
        return jnp.pad(x_BTC[:, :, None, :], ((0, 0), (0, 0), (0, self.n - 1), (0, 0)))

    def collapse(self, x_BTNC: jax.Array) -> jax.Array:
        return x_BTNC[:, :, 0, :]


class LaurelPA(nnx.Module):
    """LAuReL-PA (arXiv 2411.07501, Sec. 2.3, Eq. 4, h = identity): x' = F(x_i) + x_i + sum_j gamma_j
    x_{i-j} over the k = n_streams most recent outputs (the paper's k = 3), which the streams carry
    (`History`). As maps: H_pre = H_post = e_0 and H_res = [[1 + g_0, g_1, ..., g_{k-1}], the shift
    that moves stream j to j + 1]; gamma starts at 0 (the paper gives no init), a site at x + F(x).
    Of its Amax gains the forward one (row sums: 1 + sum gamma for stream 0, 1 for the copies)
    means what it does for mHC; the backward one counts each output once per stream holding it."""

    streams = History

    def __init__(self, cfg, site, rngs: nnx.Rngs):
        del site, rngs
        self.gamma = param(jnp.zeros((cfg.n_streams,)), ("streams",), weight_decay=False)

    def __call__(self, x_BTNC: jax.Array, branch) -> tuple[jax.Array, SiteMaps, object]:
        n = x_BTNC.shape[2]
        first = jnp.eye(n)[0]
        res = jnp.eye(n, k=-1) + first[:, None] * (first + self.gamma[...])[None, :]
        maps = _broadcast_maps(x_BTNC, first, first, res)
        x_BTNC, aux = apply_maps(x_BTNC, maps, branch)
        return x_BTNC, maps, aux


SITES = {"residual": Residual, "hc": HyperConnection, "mhc": ManifoldHyperConnection,
         "mhc_v4": DeepSeekV4HyperConnection, "mhc_lite": MHCLite, "kromhc": KromHC,
         "laurel_rw": LaurelRW, "laurel_lr": LaurelLR, "laurel_pa": LaurelPA}
GATED = ("mhc", "mhc_v4", "mhc_lite", "kromhc")  # the sites (and V4's head) whose gates alpha scale the dynamic part


def function_preserving(residual: str, name: str, value):
    """A freshly initialized site parameter (`name`: its own key) set so that, on the identical
    streams Streams.expand makes, the site computes the pre-norm residual update: each stream
    stays the residual model's stream (surgery, pretrained/surgery.py).
    - HC's own init already does: H_pre = e_{site mod n}, H_res = I, H_post = 1, zero dynamic weights;
      so do LAuReL's (alpha = beta = 1, B = 0, gamma = 0).
    - The mHC family: its gates alpha go to 0, leaving the static coefficients sigmoid(b_pre) = 1/n,
      2 sigmoid(b_post) = 1 and an H_res whose rows sum to 1 (V4's head: weights 1/n); phi stays
      random, so that the streams can part once training moves alpha."""
    return jnp.zeros_like(value) if residual in GATED and name == "alpha" else value


def stream_count_problem(cfg) -> str | None:
    """Why cfg.residual's sites cannot run on cfg.n_streams streams, or None (config_rules.RELATIONS
    ask, with the rest of the config)."""
    n = cfg.n_streams
    if cfg.residual in ("residual", "laurel_rw", "laurel_lr") and n != 1:
        return f"the {cfg.residual} variant has one stream; use model.residual=hc or mhc for more"
    if cfg.residual in ("mhc", "mhc_v4", "mhc_lite", "kromhc", "laurel_pa") and n < 2:
        return f"{cfg.residual} needs n >= 2 streams (n = 1 is the residual variant)"
    if cfg.residual == "mhc_lite" and n > doubly_stochastic.MAX_PERMUTED_STREAMS:
        return (f"mhc_lite mixes all n! permutations, {math.factorial(n):,} for n = {n}; use n <= "
                f"{doubly_stochastic.MAX_PERMUTED_STREAMS} ({math.factorial(doubly_stochastic.MAX_PERMUTED_STREAMS)} permutations)")
    if cfg.residual == "kromhc" and n & (n - 1):
        return f"kromhc builds H_res from 2x2 factors: n must be a power of 2 (2, 4, 8, ...), not {n}"
    return None


def rank_problem(cfg) -> str | None:
    """Why cfg.laurel.rank cannot be laurel_lr's rank, or None (config_rules.RELATIONS ask)."""
    if cfg.residual == "laurel_lr" and cfg.laurel.rank > cfg.d_model:
        return f"must be at most the width model.d_model = {cfg.d_model} (a low-rank term)"
    return None


def make_site(cfg, site, rngs: nnx.Rngs) -> nnx.Module:
    """The residual site with index `site` (2 * layer for attention, 2 * layer + 1 for the MLP)."""
    return SITES[cfg.residual](cfg, site, rngs)


def make_streams(cfg, rngs: nnx.Rngs) -> Streams:
    """Where the model's streams begin and end (`Streams` or the variant's own)."""
    return SITES[cfg.residual].streams(cfg, rngs)


# The one list of variants (configs, benchmark, study, plots and sweeps read it):
# name -> (model.residual, model.n_streams); 'hc_static' is 'hc' with model.hc.dynamic = False.
VARIANTS = {
    "residual": ("residual", 1),
    "hc": ("hc", 4),
    "hc_static": ("hc", 4),
    "mhc": ("mhc", 4),
    "mhc_v4": ("mhc_v4", 4),
    "mhc_lite": ("mhc_lite", 4),
    "kromhc": ("kromhc", 4),
    "laurel_rw": ("laurel_rw", 1),
    "laurel_lr": ("laurel_lr", 1),
    "laurel_pa": ("laurel_pa", 3),
}


def set_variant(model_config, variant: str) -> None:
    """Makes `model_config` run `variant`'s residual connection, every other field unchanged."""
    model_config.residual, model_config.n_streams = VARIANTS[variant]
    model_config.hc.dynamic = variant != "hc_static"


def overridden_stream_count(model_config) -> int | None:
    """model_config.n_streams where it differs from its variant's own (an override), else None: what
    the bench and the study give every variant of several streams."""
    n = model_config.n_streams
    return n if n != VARIANTS[variant_name(model_config)][1] else None


def variant_name(cfg) -> str:
    """The name of this residual connection in VARIANTS."""
    return "hc_static" if cfg.residual == "hc" and not cfg.hc.dynamic else cfg.residual


def out_proj_scale(cfg) -> float:
    """Multiplier on the init std of the output projections (HC paper section 4: sqrt(n))."""
    return cfg.hc.out_proj_scale if cfg.residual == "hc" else 1.0


def site_flops(cfg) -> int:
    """Forward FLOPs per token of one site's own arithmetic (the branch F not included). With n
    streams, reading u = H_pre x (2nC), mixing H_res x (2n^2 C) and writing H_post y (2nC); plus
    computing the coefficients: HC's per-stream norm and [C, n + 2] projection; the mHC family's
    norm and [nC, 2n + R] projection (R res logits: n^2, n! or 2 log2 n) and its map to H_res
    (Sinkhorn about 6 n^2 per iteration; the permutation mix 2 n! n^2; the Kronecker 2 n^2 log2 n).
    LAuReL: RW 3C, LR 4rC + 2C, PA its n-stream mix. V4's head is not a site (about one more)."""
    n, C = cfg.n_streams, cfg.d_model
    if cfg.residual == "residual":
        return C  # the addition
    if cfg.residual == "laurel_rw":
        return 3 * C
    if cfg.residual == "laurel_lr":
        return 4 * cfg.laurel.rank * C + 2 * C
    apply = 2 * n * C + 2 * n * n * C + 2 * n * C
    if cfg.residual == "laurel_pa":
        return apply
    if cfg.residual == "hc":
        return apply + (4 * n * C + 2 * n * C * (n + 2) if cfg.hc.dynamic else 0)
    res_logits, res_map = {
        "mhc": (n * n, 6 * n * n * cfg.mhc.sinkhorn_iters),
        "mhc_v4": (n * n, 6 * n * n * cfg.mhc.sinkhorn_iters),
        "mhc_lite": (math.factorial(n), 2 * math.factorial(n) * n * n),
        "kromhc": (2 * (n.bit_length() - 1), 2 * n * n * (n.bit_length() - 1)),
    }[cfg.residual]
    return apply + 3 * n * C + 2 * n * C * (2 * n + res_logits) + res_map
