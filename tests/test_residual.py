"""The residual connections against their definitions (docs/math.md)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import debug_model_config, make_model, random_tokens, randomize, relative_error
from test_sinkhorn import reference_sinkhorn

from mhc_jax.model import residual
from mhc_jax.model.transformer import SITE_ATTRIBUTES

B, T = 2, 5
PERMUTATION = np.array([2, 0, 3, 1])  # new stream i is old stream PERMUTATION[i]


def make_site(variant, overrides=None, site=0):
    return residual.make_site(debug_model_config(variant, overrides), site, nnx.Rngs(0))


def random_streams(n=4, C=64, seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed), (B, T, n, C))


def branch_fn(C=64):
    w = jax.random.normal(jax.random.PRNGKey(7), (C, C)) / C**0.5
    return lambda u: jnp.tanh(u @ w)


def np_rms(x, eps=1e-6):
    return x / np.sqrt(np.mean(x**2, -1, keepdims=True) + eps)


def np_sigmoid(z):
    return 1 / (1 + np.exp(-z))


def reference_hc(site, x, branch, use_tanh=True):
    """HC paper Eq. 8-13 in its own notation: h0 = sum_i A_m[i] h_i, h'_j = sum_i A_r[i, j] h_i,
    new_j = B_j T(h0) + h'_j, with row i of the dynamic terms computed from stream i."""
    x = np.asarray(x, np.float64)
    squash = np.tanh if use_tanh else (lambda v: v)
    hbar = np_rms(x) * np.asarray(site.norm.scale[...])
    w_alpha, w_beta = np.asarray(site.dynamic_alpha[...]), np.asarray(site.dynamic_beta[...])
    s_alpha, s_beta = float(site.alpha_scale[...]), float(site.beta_scale[...])
    a_m = s_alpha * squash(hbar @ w_alpha[:, 0]) + np.asarray(site.static_alpha_m[...])
    a_r = s_alpha * squash(hbar @ w_alpha[:, 1:]) + np.asarray(site.static_alpha_r[...])
    b = s_beta * squash(hbar @ w_beta) + np.asarray(site.static_beta[...])
    h0 = np.einsum("btn,btnc->btc", a_m, x)
    h_prime = np.einsum("btij,btic->btjc", a_r, x)
    return b[..., None] * np.asarray(branch(jnp.asarray(h0, jnp.float32)))[:, :, None, :] + h_prime


def reference_mhc(site, x, branch, iters=20):
    """mHC paper Eq. 7-9 and Eq. 3: flatten, RMSNorm over nC, project, constrain, apply."""
    x = np.asarray(x, np.float64)
    n = x.shape[2]
    xn = np_rms(x.reshape(B, T, -1))
    h = xn @ np.asarray(site.phi[...])
    a, b = np.asarray(site.alpha[...]), np.asarray(site.bias[...])
    pre = np_sigmoid(a[0] * h[..., :n] + b[:n])
    post = 2 * np_sigmoid(a[1] * h[..., n:2 * n] + b[n:2 * n])
    res = reference_sinkhorn((a[2] * h[..., 2 * n:] + b[2 * n:]).reshape(B, T, n, n), iters)
    u = np.einsum("btn,btnc->btc", pre, x)
    return np.einsum("btij,btjc->btic", res, x) + post[..., None] * np.asarray(
        branch(jnp.asarray(u, jnp.float32)))[:, :, None, :]


@pytest.mark.parametrize("use_tanh", [True, False])
def test_dynamic_hc_site_matches_the_hc_paper(use_tanh):
    site = make_site("hc", {"hc.use_tanh": use_tanh})
    randomize(site)
    x, branch = random_streams(), branch_fn()
    out, _, _ = site(x, lambda u: (branch(u), None))
    np.testing.assert_allclose(out, reference_hc(site, x, branch, use_tanh), rtol=1e-4, atol=1e-4)


def test_mhc_site_matches_the_mhc_paper():
    site = make_site("mhc")
    randomize(site)
    x, branch = random_streams(), branch_fn()
    out, maps, _ = site(x, lambda u: (branch(u), None))
    np.testing.assert_allclose(out, reference_mhc(site, x, branch), rtol=1e-4, atol=1e-4)
    assert float(maps.pre.min()) > 0 and float(maps.pre.max()) < 1
    assert float(maps.post.min()) > 0 and float(maps.post.max()) < 2
    np.testing.assert_allclose(maps.res.sum(-1), 1.0, atol=1e-6)


def test_hc_init_is_the_prenorm_residual():
    """HC Eq. 14: site k reads stream k mod n, writes to all streams, and mixes nothing."""
    x = random_streams()
    for k in range(6):
        maps = make_site("hc", site=k).maps(x)
        np.testing.assert_array_equal(maps.pre, jnp.broadcast_to(jax.nn.one_hot(k % 4, 4), (B, T, 4)))
        np.testing.assert_array_equal(maps.post, 1.0)
        np.testing.assert_array_equal(maps.res, jnp.broadcast_to(jnp.eye(4), (B, T, 4, 4)))


def test_mhc_init_maps():
    maps = make_site("mhc").maps(random_streams())
    np.testing.assert_allclose(maps.pre, 0.25, atol=0.01)  # sigmoid(b_pre) = 1/n
    np.testing.assert_allclose(maps.post, 1.0, atol=0.03)  # 2 sigmoid(0) = 1
    np.testing.assert_allclose(jnp.diagonal(maps.res, axis1=-2, axis2=-1), 0.948, atol=0.01)


@pytest.mark.parametrize("switch, field, expected", [
    ("use_pre", "pre", np.full((B, T, 4), 0.25)),
    ("use_post", "post", np.ones((B, T, 4))),
    ("use_res", "res", np.broadcast_to(np.eye(4), (B, T, 4, 4))),
])
def test_mhc_ablation_switches_use_the_papers_fixed_maps(switch, field, expected):
    site = make_site("mhc", {f"mhc.{switch}": False})
    randomize(site)
    maps = site.maps(random_streams())
    np.testing.assert_array_equal(getattr(maps, field), expected)
    other = [f for f in ("pre", "post", "res") if f != field][0]
    assert float(jnp.abs(getattr(maps, other) - getattr(site.maps(random_streams(seed=1)), other)).max()) > 0


def test_static_hc_residual_permutation_permutes_the_streams():
    site = make_site("hc_static")
    site.static_alpha_r[...] = jnp.asarray(np.eye(4)[PERMUTATION].T)  # H_res = A_r^T
    x = random_streams()
    out, maps, _ = site(x, lambda u: (jnp.zeros_like(u), None))
    np.testing.assert_array_equal(maps.res[0, 0], np.eye(4)[PERMUTATION])
    np.testing.assert_allclose(out, x[:, :, PERMUTATION], atol=1e-6)


def test_mhc_residual_permutation_permutes_the_streams():
    site = make_site("mhc")
    site.alpha[...] = jnp.zeros(3)
    n = 4
    site.bias[...] = site.bias[...].at[2 * n:].set(60.0 * np.eye(n)[PERMUTATION].ravel())
    x = random_streams()
    out, _, _ = site(x, lambda u: (jnp.zeros_like(u), None))
    np.testing.assert_allclose(out, x[:, :, PERMUTATION], atol=1e-5)


@pytest.mark.parametrize("res_init_scale", [4.0, 0.0])
def test_mhc_with_zero_gates_is_the_residual_network(res_init_scale):
    """docs/math.md, identities: with alpha = 0 and identical streams, any row-stochastic H_res leaves them
    identical, so the n-stream sum is n times the residual stream and the final norm removes n."""
    tokens = random_tokens(512)
    baseline = make_model("residual")(tokens)
    mhc = make_model("mhc", {"mhc.alpha_init": 0.0, "mhc.res_init_scale": res_init_scale})(tokens)
    assert relative_error(mhc, baseline) <= 1e-5


def test_static_hc_with_one_stream_and_unit_maps_is_the_residual_network():
    tokens = random_tokens(512)
    baseline = make_model("residual")(tokens)
    hc = make_model("hc_static", {"n_streams": 1})(tokens)
    assert relative_error(hc, baseline) <= 1e-6


def test_dynamic_hc_starts_as_the_residual_network():
    tokens = random_tokens(512)
    assert relative_error(make_model("hc")(tokens), make_model("residual")(tokens)) <= 1e-5


def test_variants_share_their_attention_and_mlp_weights():
    """For one seed every variant starts from the same non-residual weights: a controlled comparison."""
    def shared(model):
        return {path: v[...] for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
                if not any(p in SITE_ATTRIBUTES for p in path)}

    baseline = shared(make_model("residual"))
    for variant in residual.VARIANTS:
        other = shared(make_model(variant))
        assert other.keys() == baseline.keys()
        for path in baseline:
            np.testing.assert_array_equal(other[path], baseline[path], err_msg=str(path))


@pytest.mark.parametrize("variant", ["hc", "mhc"])
def test_blocks_carry_all_streams(variant):
    """Stream persistence: a block maps [B, T, n, C] to [B, T, n, C] and keeps the streams distinct."""
    model = make_model(variant)
    graphdef, stacked = nnx.split(model.blocks)
    block = nnx.merge(graphdef, jax.tree.map(lambda a: a[0], stacked))
    x = random_streams()
    out, trace, _ = block(x)
    assert out.shape == x.shape == (B, T, 4, 64)
    assert trace.maps.res.shape == (2, B, T, 4, 4)
    assert float(jnp.abs(out[:, :, 0] - out[:, :, 1]).min()) > 0


def test_mhc_logits_depend_on_h_res():
    """Catches an H_res that is computed but never applied (a bug two public repos shipped)."""
    tokens = random_tokens(512)
    mixing = {"mhc.alpha_init": 0.5, "mhc.res_init_scale": 0.0}
    with_res = make_model("mhc", mixing)(tokens)
    identity_res = make_model("mhc", {**mixing, "mhc.use_res": False})(tokens)
    assert relative_error(with_res, identity_res) > 1e-3


def test_hc_logits_depend_on_h_res():
    tokens = random_tokens(512)
    model = make_model("hc_static")
    for site in (model.blocks.attn_site, model.blocks.mlp_site):
        site.static_beta[...] = 1.0 + jax.random.uniform(jax.random.PRNGKey(0), site.static_beta.shape)
    identity_res = model(tokens)
    for site in (model.blocks.attn_site, model.blocks.mlp_site):
        site.static_alpha_r[...] = jax.random.uniform(jax.random.PRNGKey(1), site.static_alpha_r.shape)
    assert relative_error(model(tokens), identity_res) > 1e-3
