"""Sinkhorn-Knopp (mHC paper Eq. 9): the projection that keeps mHC's H_res doubly stochastic, in
its fast form (one log-domain round, then divisions in a loop, backward by recomputation) and its
reference form (every round in the log domain)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mhc_jax.model import doubly_stochastic

FORMS = pytest.mark.parametrize("fast", [True, False], ids=["fast", "reference"])


def sinkhorn(logits, iters, fast=True):
    return doubly_stochastic.sinkhorn(logits, iters, fast)


def reference_sinkhorn(logits, iters):
    """The paper's arithmetic, literally: exp, then per iteration divide by column sums, then row sums."""
    m = np.exp(np.asarray(logits, np.float64))
    for _ in range(iters):
        m = m / m.sum(-2, keepdims=True)
        m = m / m.sum(-1, keepdims=True)
    return m


def column_error(m):
    return float(jnp.abs(m.sum(-2) - 1).max())


@FORMS
@pytest.mark.parametrize("n", [2, 4, 8])
def test_matches_the_papers_division_form(n, fast):
    logits = 2.0 * jax.random.normal(jax.random.PRNGKey(n), (64, n, n))
    for iters in (1, 3, 20):
        np.testing.assert_allclose(sinkhorn(logits, iters, fast), reference_sinkhorn(logits, iters), atol=2e-6)


@FORMS
@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_rows_exact_and_column_error_shrinks_with_iterations(scale, fast):
    logits = scale * jax.random.normal(jax.random.PRNGKey(0), (256, 4, 4))
    errors = []
    for iters in (2, 5, 10, 20, 40, 80):
        m = sinkhorn(logits, iters, fast)
        assert float(jnp.abs(m.sum(-1) - 1).max()) <= 1e-6  # T_r runs last: rows are exact
        errors.append(column_error(m))
    assert all(later <= earlier + 1e-7 for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < errors[0] / 10, errors
    assert errors[3] < {1.0: 1e-3, 3.0: 0.1}[scale], errors  # the bound at the paper's 20 iterations


@FORMS
def test_extreme_logits_stay_finite_and_stochastic(fast):
    logits = jax.random.uniform(jax.random.PRNGKey(1), (512, 4, 4), minval=-50.0, maxval=50.0)
    logits = logits.at[0].set(jnp.array([[50.0, -50, -50, -50]] * 4))  # one column dominates every row
    logits = logits.at[1].set(jnp.array([[50.0] * 4] * 3 + [[-50.0] * 4]))  # a row far below the others
    m = sinkhorn(logits, 20, fast)
    assert bool(jnp.isfinite(m).all())
    assert float(m.min()) >= 0.0
    assert float(jnp.abs(m.sum(-1) - 1).max()) <= 1e-6
    assert column_error(sinkhorn(logits, 200, fast)) < column_error(m)
    if fast:
        np.testing.assert_allclose(m, sinkhorn(logits, 20, fast=False), atol=1e-6)


@FORMS
@pytest.mark.parametrize("low, high", [(-3.0, 3.0), (-50.0, 50.0)])
def test_gradients_are_finite(low, high, fast):
    logits = jax.random.uniform(jax.random.PRNGKey(2), (64, 4, 4), minval=low, maxval=high)
    weights = jax.random.normal(jax.random.PRNGKey(3), (64, 4, 4))
    grads = jax.grad(lambda z: (sinkhorn(z, 20, fast) * weights).sum())(logits)
    assert bool(jnp.isfinite(grads).all())
    assert float(jnp.abs(grads).max()) > 0.0


@FORMS
def test_gradients_match_finite_differences(fast):
    """The fast form's hand-made backward (recomputing the rounds) against central differences of
    its own forward along random directions, and against the reference's autodiff gradients."""
    logits = 1.5 * jax.random.normal(jax.random.PRNGKey(4), (32, 4, 4))
    weights = jax.random.normal(jax.random.PRNGKey(5), (32, 4, 4))
    objective = jax.jit(lambda z: (sinkhorn(z, 20, fast) * weights).sum())
    grads = jax.grad(objective)(logits)
    for seed in range(3):
        direction = jax.random.normal(jax.random.PRNGKey(10 + seed), logits.shape)
        eps = 1e-2
        numeric = (objective(logits + eps * direction) - objective(logits - eps * direction)) / (2 * eps)
        np.testing.assert_allclose(float(jnp.vdot(grads, direction)), float(numeric), rtol=2e-3)
    reference = jax.grad(lambda z: (sinkhorn(z, 20, False) * weights).sum())(logits)
    assert float(jnp.linalg.norm(grads - reference) / jnp.linalg.norm(reference)) < 1e-5


def test_default_init_bias_is_near_identity_with_live_gradients():
    """b_res = 4 I (docs/math.md): diag about 0.95, not saturated, so H_res can learn."""
    m = sinkhorn(4.0 * jnp.eye(4), 20)
    np.testing.assert_allclose(jnp.diag(m), 0.948, atol=2e-3)
    grads = jax.grad(lambda z: sinkhorn(z, 20)[0, 1])(4.0 * jnp.eye(4))
    assert float(jnp.abs(grads).max()) > 1e-3
