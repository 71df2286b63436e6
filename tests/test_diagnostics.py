"""Amax gain (mHC paper section 3.1, docs/math.md) on hand-built maps with known answers."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import make_model, random_tokens

from mhc_jax.model.diagnostics import amax_gain, composite_maps


@pytest.mark.parametrize("k", [1, 3, 6])
def test_composite_of_k_doublings_gains_2_to_the_k(k):
    h_res = jnp.broadcast_to(2.0 * jnp.eye(4), (k, 2, 3, 4, 4))  # k sites, 2 x 3 tokens
    gains = amax_gain(h_res)
    np.testing.assert_allclose(gains["single_forward"], 2.0)
    np.testing.assert_allclose(gains["composite_forward"], [2.0 ** (k - l) for l in range(k)])
    np.testing.assert_allclose(gains["composite_backward"], [2.0 ** (k - l) for l in range(k)])
    np.testing.assert_allclose(gains["composite_max_abs_log_col_sum"], [(k - l) * np.log(2) for l in range(k)],
                               rtol=1e-6)


def random_doubly_stochastic(key, n=4):
    """A convex combination of all n! permutation matrices: exactly doubly stochastic."""
    perms = np.array([np.eye(n)[list(p)] for p in itertools.permutations(range(n))])
    weights = jax.random.dirichlet(key, jnp.ones(len(perms)))
    return jnp.einsum("p,pij->ij", weights, perms)


def test_products_of_doubly_stochastic_maps_gain_exactly_one():
    keys = jax.random.split(jax.random.PRNGKey(0), 12 * 5)
    h_res = jnp.stack([random_doubly_stochastic(k) for k in keys]).reshape(12, 5, 4, 4)
    gains = amax_gain(h_res)
    for name in ("single_forward", "single_backward", "composite_forward", "composite_backward",
                 "composite_min_col_sum"):
        np.testing.assert_allclose(gains[name], 1.0, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(gains["composite_max_abs_log_col_sum"], 0.0, atol=1e-5)


def test_gains_are_per_token_then_averaged():
    """Two tokens with maps diag(2, 0) and diag(0, 2): each gains 2, their average matrix only 1."""
    h_res = jnp.array([[[[2.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 2.0]]]])  # 1 site, 2 tokens
    assert float(amax_gain(h_res)["single_forward"][0]) == 2.0


def test_row_stochastic_map_reports_its_column_drift():
    h = jnp.array([[[0.9, 0.1], [0.7, 0.3]]])  # rows sum to 1, columns to 1.6 and 0.4
    gains = amax_gain(h)
    np.testing.assert_allclose(gains["single_forward"], [1.0], rtol=1e-6)
    np.testing.assert_allclose(gains["single_backward"], [1.6], rtol=1e-6)
    np.testing.assert_allclose(gains["single_min_col_sum"], [0.4], rtol=1e-6)
    np.testing.assert_allclose(gains["single_max_abs_log_col_sum"], [abs(np.log(0.4))], rtol=1e-5)


def test_composite_order_is_later_sites_on_the_left():
    a = jnp.array([[1.0, 1.0], [0.0, 1.0]])
    b = jnp.array([[1.0, 0.0], [2.0, 1.0]])
    composites = composite_maps(jnp.stack([a, b]))  # P_0 = H_1 H_0, P_1 = H_1
    np.testing.assert_allclose(composites[0], b @ a)
    np.testing.assert_allclose(composites[1], b)


def test_mhc_model_maps_have_exact_forward_gain():
    model = make_model("mhc", {"mhc.alpha_init": 1.0, "mhc.res_init_scale": 0.0})
    _, trace = model.trace(random_tokens(512))
    gains = amax_gain(trace.maps.res)
    np.testing.assert_allclose(gains["composite_forward"], 1.0, atol=1e-5)
    assert float(jnp.abs(gains["composite_backward"] - 1).max()) < 0.05
