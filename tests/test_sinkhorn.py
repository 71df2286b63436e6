"""Sinkhorn-Knopp (mHC paper Eq. 9): the projection that keeps mHC's H_res doubly stochastic."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mhc_jax.residual import sinkhorn


def reference_sinkhorn(logits, iters):
    """The paper's arithmetic, literally: exp, then per iteration divide by column sums, then row sums."""
    m = np.exp(np.asarray(logits, np.float64))
    for _ in range(iters):
        m = m / m.sum(-2, keepdims=True)
        m = m / m.sum(-1, keepdims=True)
    return m


def column_error(m):
    return float(jnp.abs(m.sum(-2) - 1).max())


@pytest.mark.parametrize("n", [2, 4, 8])
def test_matches_the_papers_division_form(n):
    logits = 2.0 * jax.random.normal(jax.random.PRNGKey(n), (64, n, n))
    for iters in (1, 3, 20):
        np.testing.assert_allclose(sinkhorn(logits, iters), reference_sinkhorn(logits, iters), atol=2e-6)


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_rows_exact_and_column_error_shrinks_with_iterations(scale):
    logits = scale * jax.random.normal(jax.random.PRNGKey(0), (256, 4, 4))
    errors = []
    for iters in (2, 5, 10, 20, 40, 80):
        m = sinkhorn(logits, iters)
        assert float(jnp.abs(m.sum(-1) - 1).max()) <= 1e-6  # T_r runs last: rows are exact
        errors.append(column_error(m))
    assert all(later <= earlier + 1e-7 for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < errors[0] / 10, errors
    assert errors[3] < {1.0: 1e-3, 3.0: 0.1}[scale], errors  # the bound at the paper's 20 iterations


def test_extreme_logits_stay_finite_and_stochastic():
    logits = jax.random.uniform(jax.random.PRNGKey(1), (512, 4, 4), minval=-50.0, maxval=50.0)
    logits = logits.at[0].set(jnp.array([[50.0, -50, -50, -50]] * 4))  # one column dominates every row
    m = sinkhorn(logits, 20)
    assert bool(jnp.isfinite(m).all())
    assert float(m.min()) >= 0.0
    assert float(jnp.abs(m.sum(-1) - 1).max()) <= 1e-6
    assert column_error(sinkhorn(logits, 200)) < column_error(m)


@pytest.mark.parametrize("low, high", [(-3.0, 3.0), (-50.0, 50.0)])
def test_gradients_are_finite(low, high):
    logits = jax.random.uniform(jax.random.PRNGKey(2), (64, 4, 4), minval=low, maxval=high)
    weights = jax.random.normal(jax.random.PRNGKey(3), (64, 4, 4))
    grads = jax.grad(lambda z: (sinkhorn(z, 20) * weights).sum())(logits)
    assert bool(jnp.isfinite(grads).all())
    assert float(jnp.abs(grads).max()) > 0.0


def test_default_init_bias_is_near_identity_with_live_gradients():
    """b_res = 4 I (spec section 8): diag about 0.95, not saturated, so H_res can learn."""
    m = sinkhorn(4.0 * jnp.eye(4), 20)
    np.testing.assert_allclose(jnp.diag(m), 0.948, atol=2e-3)
    grads = jax.grad(lambda z: sinkhorn(z, 20)[0, 1])(4.0 * jnp.eye(4))
    assert float(jnp.abs(grads).max()) > 1e-3
