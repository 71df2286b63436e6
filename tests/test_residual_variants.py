"""The variants that followed the mHC paper (residual.py): DeepSeek-V4's mHC against its reference
implementation, mHC-lite and KromHC against NumPy transcriptions and exact double stochasticity,
LAuReL's three forms against theirs; each starting as the residual network where its paper (or
our init) says it does; the configs that cannot work refused in one line."""

import itertools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import debug_model_config, make_model, random_tokens, randomize, relative_error
from test_residual import B, T, branch_fn, make_site, np_rms, np_sigmoid, random_streams

from configs.pretrain import get_config
from mhc_jax.config_rules import validate
from mhc_jax.errors import UserError
from mhc_jax.model import doubly_stochastic, residual

V4_REFERENCE = Path(__file__).parent / "data" / "deepseek_v4" / "reference.npz"


def relative(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


@pytest.mark.parametrize("site_impl", residual.IMPLEMENTATIONS)
def test_mhc_v4_is_deepseek_v4s_reference_in_outputs_and_gradients(site_impl):
    """scripts/make_v4_reference.py ran transformers' DeepseekV4HyperConnection, the decoder layer's
    update and DeepseekV4HyperHead; our site and head with its weights (fn = phi^T, base = bias,
    scale = alpha) give its outputs and gradients within 1e-5 relative, in both site forms (the
    fast one's Sinkhorn runs on slabs and recomputes its rounds in the backward pass)."""
    ref = dict(np.load(V4_REFERENCE))
    n, C = ref["x"].shape[2:]
    cfg = debug_model_config("mhc_v4", {"d_model": int(C), "n_streams": int(n), "mhc.sinkhorn_iters": int(ref["iters"]),
                                        "mhc.v4_eps": float(ref["eps"]), "site_impl": site_impl})
    site = residual.make_site(cfg, 0, nnx.Rngs(0))
    head = residual.make_streams(cfg, nnx.Rngs(0))
    weights = {"fn": ref["fn"].T, "base": ref["base"], "scale": ref["scale"],
               "head_fn": ref["head_fn"].T, "head_base": ref["head_base"], "head_scale": ref["head_scale"]}
    graph_site, _ = nnx.split(site)
    graph_head, _ = nnx.split(head)

    def run(weights, x):
        s = nnx.merge(graph_site, nnx.State({"phi": weights["fn"], "alpha": weights["scale"], "bias": weights["base"]}))
        h = nnx.merge(graph_head, nnx.State({"phi": weights["head_fn"], "alpha": weights["head_scale"],
                                             "bias": weights["head_base"]}))
        streams, maps, collapsed = s(x, lambda u: (jnp.tanh(u @ ref["branch"]), u))
        final = h.collapse(streams)
        outputs = {"post": maps.post, "comb": jnp.swapaxes(maps.res, -1, -2), "collapsed": collapsed,
                   "streams": streams, "final": final}
        return jnp.sum(final * ref["probe"]), outputs

    grads, outputs = jax.grad(run, argnums=(0, 1), has_aux=True)(weights, jnp.asarray(ref["x"]))
    for name, value in outputs.items():
        assert relative(value, ref[name]) < 1e-5, name
    for name, grad in grads[0].items():
        assert relative(grad.T if name.endswith("fn") else grad, ref[f"grad_{name}"]) < 1e-5, name
    assert relative(grads[1], ref["grad_x"]) < 1e-5


def np_permutation_mix(logits, n):
    perms = list(itertools.permutations(range(n)))
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w = w / w.sum(-1, keepdims=True)
    return sum(w[..., r, None, None] * np.eye(n)[list(p)] for r, p in enumerate(perms))


def np_kronecker(logits, n):
    """kron(U_1, ..., U_K), U_k = [[p, 1 - p], [1 - p, p]], p = softmax(logits[k])[0], as the paper writes it."""
    result = np.ones(logits.shape[:-2] + (1, 1))
    for k in range(logits.shape[-2]):
        p = np_sigmoid(logits[..., k, 0] - logits[..., k, 1])[..., None, None]
        u = p * np.eye(2) + (1 - p) * (1 - np.eye(2))
        result = np.einsum("...ij,...kl->...ikjl", result, u).reshape(*logits.shape[:-2], result.shape[-2] * 2, -1)
    return result


def reference_mhc_family(site, x, branch, res_map):
    """mHC's Eq. 7-8 with another res map: flatten, RMSNorm over nC, project, sigmoid / 2 sigmoid, apply."""
    x = np.asarray(x, np.float64)
    n = x.shape[2]
    h = np_rms(x.reshape(B, T, -1)) @ np.asarray(site.phi[...])
    a, b = np.asarray(site.alpha[...]), np.asarray(site.bias[...])
    pre = np_sigmoid(a[0] * h[..., :n] + b[:n])
    post = 2 * np_sigmoid(a[1] * h[..., n:2 * n] + b[n:2 * n])
    res = res_map(a[2] * h[..., 2 * n:] + b[2 * n:])
    u = np.einsum("btn,btnc->btc", pre, x)
    return np.einsum("btij,btjc->btic", res, x) + post[..., None] * np.asarray(
        branch(jnp.asarray(u, jnp.float32)))[:, :, None, :]


@pytest.mark.parametrize("variant, res_map", [
    ("mhc_lite", lambda z: np_permutation_mix(z, 4)),
    ("kromhc", lambda z: np_kronecker(z.reshape(*z.shape[:-1], 2, 2), 4)),
])
def test_exact_mhc_variants_match_their_papers(variant, res_map):
    site = make_site(variant)
    randomize(site)
    x, branch = random_streams(), branch_fn()
    out, maps, _ = site(x, lambda u: (branch(u), None))
    np.testing.assert_allclose(out, reference_mhc_family(site, x, branch, res_map), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n", [2, 3, 4, 6])
def test_permutation_mixes_are_doubly_stochastic_with_no_iteration(n):
    import math
    logits = 6.0 * jax.random.normal(jax.random.PRNGKey(n), (256, math.factorial(n)))
    h = doubly_stochastic.permutation_mix(logits)
    np.testing.assert_allclose(h, np_permutation_mix(np.asarray(logits, np.float64), n), atol=1e-6)
    assert float(jnp.abs(h.sum(-1) - 1).max()) <= 1e-6 and float(jnp.abs(h.sum(-2) - 1).max()) <= 1e-6
    assert float(h.min()) >= 0


@pytest.mark.parametrize("n", [2, 4, 8, 16])
def test_kronecker_mixes_are_doubly_stochastic_with_no_iteration(n):
    K = n.bit_length() - 1
    logits = 6.0 * jax.random.normal(jax.random.PRNGKey(n), (256, K, 2))
    h = doubly_stochastic.kronecker_mix(logits)
    np.testing.assert_allclose(h, np_kronecker(np.asarray(logits, np.float64), n), atol=1e-6)
    assert float(jnp.abs(h.sum(-1) - 1).max()) <= 1e-6 and float(jnp.abs(h.sum(-2) - 1).max()) <= 1e-6


def test_the_exact_variants_start_near_the_identity_and_permute_the_streams_when_told():
    x = random_streams()
    # s = 4: the identity's weight e^4 / (e^4 + 23) plus the 5 other permutations fixing i; sigmoid(4)^2
    for variant, diagonal in (("mhc_lite", 0.768), ("kromhc", 0.964)):
        site = make_site(variant, {"mhc.alpha_init": 0.0})
        np.testing.assert_allclose(jnp.diagonal(site.maps(x).res, axis1=-2, axis2=-1), diagonal, atol=0.005)
    site = make_site("mhc_lite", {"mhc.alpha_init": 0.0})
    order = [2, 0, 3, 1]
    index = list(itertools.permutations(range(4))).index(tuple(order))
    site.bias[...] = site.bias[...].at[8:].set(60.0 * jax.nn.one_hot(index, 24))
    out, _, _ = site(x, lambda u: (jnp.zeros_like(u), None))
    np.testing.assert_allclose(out, x[:, :, order], atol=1e-5)


def np_laurel(variant, site, x, branch):
    """LAuReL's Eq. 1-4 (arXiv 2411.07501) on x [B, T, n, C]: RW alpha F(x) + beta x; LR F(x) + x +
    B A x; PA F(x_i) + x_i + sum_j gamma_j x_{i-j}, the streams shifting one place."""
    x = np.asarray(x, np.float64)
    y = np.asarray(branch(jnp.asarray(x[:, :, 0], jnp.float32)), np.float64)
    if variant == "laurel_rw":
        alpha, beta = 2 * np_sigmoid(np.asarray(site.weights[...]))
        return (alpha * y + beta * x[:, :, 0])[:, :, None]
    if variant == "laurel_lr":
        low = x[:, :, 0] @ np.asarray(site.down[...]) @ np.asarray(site.up[...])
        return (y + x[:, :, 0] + low)[:, :, None]
    gamma = np.asarray(site.gamma[...])
    new = y + x[:, :, 0] + np.einsum("j,btjc->btc", gamma, x)
    return np.concatenate([new[:, :, None], x[:, :, :-1]], axis=2)


@pytest.mark.parametrize("variant", ["laurel_rw", "laurel_lr", "laurel_pa"])
def test_laurel_sites_match_the_paper(variant):
    site = make_site(variant)
    randomize(site)
    n = debug_model_config(variant).n_streams
    x, branch = random_streams(n=n), branch_fn()
    out, _, _ = site(x, lambda u: (branch(u), None))
    assert out.shape == x.shape
    np.testing.assert_allclose(out, np_laurel(variant, site, x, branch), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant, overrides", [
    ("laurel_rw", {}), ("laurel_lr", {}), ("laurel_pa", {}),  # their inits: alpha = beta = 1, B = 0, gamma = 0
    ("mhc_v4", {"mhc.alpha_init": 0.0}), ("mhc_lite", {"mhc.alpha_init": 0.0}), ("kromhc", {"mhc.alpha_init": 0.0}),
])
def test_each_variant_starts_as_the_residual_network(variant, overrides):
    """LAuReL's forms at their init; the mHC family with its gates at 0 (any doubly stochastic H_res
    keeps identical streams identical; V4's eps moves its H_pre and head by 1e-6)."""
    tokens = random_tokens(512)
    baseline = make_model("residual")(tokens)
    assert relative_error(make_model(variant, overrides)(tokens), baseline) <= 1e-5


@pytest.mark.parametrize("variant, overrides, fragments", [
    ("laurel_lr", {"model.laurel.rank": 0}, ("model.laurel.rank",)),
    ("laurel_lr", {"model.laurel.rank": 65}, ("model.laurel.rank", "model.d_model = 64")),
    ("kromhc", {"model.n_streams": 6}, ("model.n_streams", "power of 2")),
    ("mhc_lite", {"model.n_streams": 7}, ("model.n_streams", "5,040", "n <= 6")),
    ("laurel_rw", {"model.n_streams": 2}, ("model.n_streams", "one stream")),
    ("laurel_pa", {"model.n_streams": 1}, ("model.n_streams", "n >= 2")),
])
def test_configs_a_variant_cannot_run_are_refused_in_one_line(variant, overrides, fragments):
    config = get_config(f"{variant},debug")
    config.update_from_flattened_dict(overrides)
    with pytest.raises(UserError) as refused:
        validate(config)
    message = str(refused.value)
    assert "\n" not in message and all(f in message for f in fragments), message
