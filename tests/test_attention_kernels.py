"""The attention kernels against the XLA reference: values and gradients, causal training, grouped
queries, MLA's unequal head sizes, lengths that are not a multiple of the block, decoding from a
left-padded cache; splash attention in Pallas interpret mode, on one device and under shard_map;
the memory that blockwise attention saves; kernels the platform cannot run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.pretrain import get_config
from mhc_jax import config_rules, sharding
from mhc_jax.errors import UserError
from mhc_jax.model import attention_kernels
from mhc_jax.model.transformer import Transformer
from mhc_jax.training import trainer

# (B, T, S, H, K, J, D, offset, start_B): training has T = S and no offset.
CASES = {
    "mha": (2, 40, 40, 4, 4, 16, 16, None, None),
    "gqa": (2, 40, 40, 6, 2, 16, 16, None, None),
    "mla_head_sizes": (2, 40, 40, 4, 4, 24, 16, None, None),
    "decode_one_token": (3, 1, 40, 4, 2, 16, 16, 29, (0, 5, 29)),
    "decode_prefill": (2, 7, 40, 4, 1, 24, 16, 11, (0, 6)),
}


def inputs(B, T, S, H, K, J, D, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    q, k, v = (jax.random.normal(key, shape) for key, shape in
               zip(keys, ((B, T, H, J), (B, S, K, J), (B, S, K, D))))
    return q, k, v, jax.random.normal(keys[3], (B, T, H, D))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("block", (8, 512))
def test_blockwise_attention_equals_the_xla_path_in_values_and_gradients(case, block):
    B, T, S, H, K, J, D, offset, start = CASES[case]
    q, k, v, weight = inputs(B, T, S, H, K, J, D)
    start_B = None if start is None else jnp.array(start)

    def objective(kernel):
        def f(q, k, v):
            if kernel == "blockwise":
                out = attention_kernels.blockwise(q, k, v, 0.3, offset, start_B, block=block)
            else:
                out = attention_kernels.attend(q, k, v, kernel="xla", scale=0.3, offset=offset, start_B=start_B)
            return jnp.sum(out * weight), out
        return jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(q, k, v)

    (_, out), grads = objective("blockwise")
    (_, expected), expected_grads = objective("xla")
    assert out.shape == (B, T, H, D)
    np.testing.assert_allclose(out, expected, atol=2e-6, rtol=1e-5)
    if offset is None:  # decoding needs no gradients
        for g, e in zip(grads, expected_grads):
            np.testing.assert_allclose(g, e, atol=1e-5, rtol=1e-5)


def test_blockwise_attention_never_holds_the_scores():
    """Its compiled gradient's temporaries are a fraction of the [B, H, T, T] float32 scores that
    the XLA path materialises."""
    B, T, H, D = 1, 4096, 4, 32
    q, k, v, _ = inputs(B, T, T, H, H, D, D)
    scores_bytes = B * H * T * T * 4

    def temporaries(kernel):
        loss = lambda q, k, v: attention_kernels.attend(q, k, v, kernel=kernel, scale=0.2).sum()  # noqa: E731
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    assert temporaries("xla") >= scores_bytes
    assert temporaries("blockwise") < scores_bytes / 8


def splash_inputs():
    q, k, v, weight = inputs(2, 256, 256, 4, 2, 24, 16)  # grouped queries, MLA's unequal head sizes
    return q, k, v, weight


def splash_and_reference(q, k, v, weight):
    def f(kernel):
        run = ((lambda q, k, v: attention_kernels.splash(q, k, v, 0.25, interpret=True)) if kernel == "splash"
               else (lambda q, k, v: attention_kernels.attend(q, k, v, kernel="xla", scale=0.25)))
        return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(run(q, k, v) * weight), argnums=(0, 1, 2)))(q, k, v)
    return f("splash"), f("xla")


def assert_same(result, expected):
    (value, grads), (expected_value, expected_grads) = result, expected
    np.testing.assert_allclose(value, expected_value, rtol=1e-5)
    for g, e in zip(grads, expected_grads):
        np.testing.assert_allclose(g, e, atol=2e-4, rtol=1e-4)


@pytest.mark.slow
def test_splash_attention_in_interpret_mode_equals_the_xla_path():
    assert_same(*splash_and_reference(*splash_inputs()))


@pytest.mark.slow
def test_splash_attention_under_shard_map_on_8_devices_equals_one_device():
    """Batch over fsdp, heads over tensor: each device runs the kernel on its own part."""
    mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "expert": 1, "tensor": 4})
    q, k, v, weight = splash_inputs()
    q, k, v, weight = (jax.device_put(x, jax.NamedSharding(mesh, jax.P("fsdp", None, "tensor", None)))
                       if x.shape[2] % 4 == 0 else jax.device_put(x, jax.NamedSharding(mesh, jax.P("fsdp")))
                       for x in (q, k, v, weight))
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        sharded = splash_and_reference(q, k, v, weight)
        jaxpr = str(jax.make_jaxpr(lambda q, k, v: attention_kernels.splash(q, k, v, 0.25, interpret=True))(q, k, v))
    assert "shard_map" in jaxpr
    assert_same(*sharded)


@pytest.mark.parametrize("spec", ("residual,debug", pytest.param("mhc,moe_debug", marks=pytest.mark.slow)))
def test_the_model_gives_the_same_loss_and_gradients_with_every_cpu_kernel(spec):
    """MHA (debug) and MLA (moe_debug) through the whole model: blockwise = the XLA reference."""
    def loss_and_grads(kernel):
        config = get_config(spec)
        config.model.attention_kernel = kernel
        model = Transformer(config.model, nnx.Rngs(0))
        tokens = jax.random.randint(jax.random.key(1), (2, 33), 0, config.model.vocab_size)
        graphdef, params = nnx.split(model)
        loss = lambda p: nnx.merge(graphdef, p).losses_and_router_stats(tokens, 0)[0].mean()  # noqa: E731
        return jax.jit(jax.value_and_grad(loss))(params)

    loss, grads = loss_and_grads("blockwise")
    expected_loss, expected_grads = loss_and_grads("xla")
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-6)
    for g, e in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads)):
        np.testing.assert_allclose(g, e, atol=1e-6, rtol=1e-4)


def test_auto_picks_by_platform():
    assert attention_kernels.choose("auto", "tpu", "auto") == "splash"
    assert attention_kernels.choose("auto", "gpu", "auto") == "cudnn"
    assert attention_kernels.choose("auto", "gpu", "float32") == "blockwise"
    assert attention_kernels.choose("auto", "cpu", "auto") == attention_kernels.CPU_KERNEL
    assert attention_kernels.choose("blockwise", "tpu", "auto") == "blockwise"


@pytest.mark.parametrize("kernel, platform", (("splash", "TPU"), ("cudnn", "GPU")))
def test_a_kernel_the_devices_cannot_run_is_refused_in_one_line(kernel, platform):
    config = get_config("residual,debug")
    config.model.attention_kernel = kernel
    config.model.dtype = "bfloat16"
    with pytest.raises(UserError) as error:
        trainer.check_mesh(config, sharding.make_mesh(config.mesh))
    message = str(error.value)
    assert message.startswith("model.attention_kernel:") and f"{platform} only" in message
    assert "auto, xla, blockwise" in message and "\n" not in message


def test_cudnn_in_float32_is_refused():
    config = get_config("residual,debug")
    config.model.attention_kernel, config.model.dtype = "cudnn", "float32"
    with pytest.raises(UserError, match="model.attention_kernel: .*bfloat16 or float16"):
        config_rules.validate(config)
