"""The decoder: causality, finite forward and backward, and compile-time switches that must not
change the math (fast vs reference residual sites, scan vs unrolled layers, rematerialization)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import loss_and_grads, make_model, random_tokens, randomize, relative_error


def test_forward_and_backward_are_finite(variant):
    model = make_model(variant)
    tokens = random_tokens(512, length=17)
    loss, grads = loss_and_grads(model, tokens)
    assert np.isfinite(float(loss)) and abs(float(loss) - np.log(512)) < 1.0  # near-uniform at init
    flat = nnx.to_flat_state(grads)
    for path, grad in flat:
        assert bool(jnp.isfinite(grad[...]).all()), path
    site_grads = [g[...] for path, g in flat if any(str(p).endswith("_site") for p in path)]
    if variant != "residual":  # the coefficient path is connected to the loss
        assert float(sum(jnp.abs(g).sum() for g in site_grads)) > 0


def test_causal(variant):
    """Changing token t changes no logit before t, and does change logits from t on."""
    model = make_model(variant)
    tokens = random_tokens(512, length=16)
    t = 9
    changed = tokens.at[:, t].set((tokens[:, t] + 1) % 512)
    logits, logits_changed = model(tokens), model(changed)
    np.testing.assert_array_equal(logits[:, :t], logits_changed[:, :t])
    assert float(jnp.abs(logits[:, t:] - logits_changed[:, t:]).max()) > 1e-4


@functools.cache
def reference_outputs(variant, tokens_key):
    """The plain math: the reference residual sites, scanned, nothing rematerialized."""
    model = make_model(variant, {"site_impl": "reference", "scan_layers": True, "remat": "none"})
    randomize(model, scale=0.05)  # off the init, where the streams are equal and some gradients cancel to 0
    tokens = random_tokens(512, length=17, seed=tokens_key)
    return model(tokens), *loss_and_grads(model, tokens)


SWITCHES = {"scanned-none": (True, "none"), "scanned-full": (True, "full"), "scanned-dots": (True, "dots"),
            "unrolled-full": (False, "full")}
CASES = [(v, "scanned-none") for v in ("residual", "hc_static", "hc")] + [("mhc", s) for s in SWITCHES]


FULL_TIER = ("mhc-scanned-dots", "mhc-unrolled-full")  # compile-heavy; the other policies cover the fast tier


@pytest.mark.parametrize("variant, switches", [
    pytest.param(v, s, id=f"{v}-{s}", marks=[pytest.mark.slow] if f"{v}-{s}" in FULL_TIER else []) for v, s in CASES])
def test_fast_sites_and_compile_switches_keep_logits_and_gradients(variant, switches):
    """The fast residual sites give the reference's logits and gradients (relative 1e-5 in float32):
    every variant scanned without remat, and mHC also under every remat policy and unrolled (remat
    and scanning wrap the layer whatever its residual connection).
    Unrolled layers are checked under the policy that rematerializes most (the others differ from
    it only in what they save)."""
    scan_layers, remat = SWITCHES[switches]
    tokens = random_tokens(512, length=17, seed=5)
    ref_logits, ref_loss, ref_grads = reference_outputs(variant, 5)
    fast = make_model(variant, {"site_impl": "fast", "scan_layers": scan_layers, "remat": remat})
    randomize(fast, scale=0.05)
    assert relative_error(fast(tokens), ref_logits) < 1e-5
    loss, grads = loss_and_grads(fast, tokens)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    ref_flat = nnx.to_flat_state(ref_grads)
    whole = float(jnp.sqrt(sum(jnp.sum(ref_g[...] ** 2) for _, ref_g in ref_flat)))
    for (path, g), (_, ref_g) in zip(nnx.to_flat_state(grads), ref_flat):
        # Relative to the leaf, or, for a leaf whose gradient nearly cancels to 0 (hc_static's alpha,
        # where the CPU type's summation order alone moves it by 1e-5 of itself), to the whole gradient.
        error = float(jnp.linalg.norm(g[...] - ref_g[...]))
        assert error < 1e-5 * float(jnp.linalg.norm(ref_g[...])) or error < 1e-6 * whole, (path, error, whole)


def test_site_maps_come_out_in_site_order():
    """Transformer.trace stacks the 2L sites as attention 0, MLP 0, attention 1, ...: HC's one-hot read of
    site k is stream k mod n, which tells the order."""
    model = make_model("hc")
    logits, trace = model.trace(random_tokens(512))
    maps = trace.maps
    assert maps.res.shape == (4, 2, 16, 4, 4) and trace.stream_rms.shape == (4,)
    np.testing.assert_array_equal(jnp.argmax(maps.pre[:, 0, 0], -1), [0, 1, 2, 3])
    np.testing.assert_array_equal(logits, model(random_tokens(512)))


def test_bfloat16_compute_keeps_float32_coefficients():
    model = make_model("mhc", {"dtype": "bfloat16"})
    logits, trace = model.trace(random_tokens(512))
    maps = trace.maps
    assert logits.dtype == jnp.float32 and maps.res.dtype == jnp.float32
    np.testing.assert_allclose(maps.res.sum(-1), 1.0, atol=1e-6)
    assert bool(jnp.isfinite(logits).all())


@pytest.mark.parametrize("tied", [pytest.param(True, marks=pytest.mark.slow), False])
def test_the_chunked_loss_is_the_full_loss(tied):
    """model.loss.mean_cross_entropy in chunks of 12 of the 32 positions (the last chunk padded)
    gives the whole-sequence loss of each sequence and its gradients, with a tied or untied head."""
    model = make_model("mhc", {"tie_embeddings": tied})
    randomize(model, scale=0.1)
    graphdef, params = nnx.split(model)
    tokens_BW = random_tokens(512, batch=3, length=33)

    def loss_and_grads_in_chunks(chunk):
        def mean_loss(params):
            losses_B, _ = nnx.merge(graphdef, params).losses_and_router_stats(tokens_BW, chunk)
            return losses_B.mean(), losses_B
        return jax.jit(jax.value_and_grad(mean_loss, has_aux=True))(params)

    (_, whole_B), whole_grads = loss_and_grads_in_chunks(0)
    (_, chunked_B), chunked_grads = loss_and_grads_in_chunks(12)
    np.testing.assert_allclose(chunked_B, whole_B, rtol=1e-5)
    for (path, g), (_, w) in zip(nnx.to_flat_state(chunked_grads), nnx.to_flat_state(whole_grads), strict=True):
        assert relative_error(g[...], w[...]) < 1e-5, path
