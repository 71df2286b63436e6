"""The serving layout of eval.py (mhc_jax/evals/serving.py): the default mesh by what fits, weights
cast once with scores unchanged, and the batch size that fits a device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import debug_model_config, randomize

from mhc_jax import sharding
from mhc_jax.errors import UserError
from mhc_jax.evals import serving
from mhc_jax.model.transformer import Transformer, abstract_variables_of

MiB = 2**20


def sizes(**given):
    return {**dict.fromkeys(sharding.MESH_AXES, 1), **given}


def test_the_default_mesh_splits_the_model_only_as_far_as_it_must_fit():
    """moe_debug on 8 devices: whole per device when there is room, then experts over `expert`, then
    FSDP too; each only when the one before does not fit; one line naming --mesh when none fits."""
    cfg = debug_model_config("mhc", scale="moe_debug")
    _, variables = abstract_variables_of(cfg)
    need = lambda mesh: serving.parameter_bytes(variables, mesh, jnp.float32)  # noqa: E731
    choose = lambda memory: serving.choose_mesh(variables, cfg, 8, None, memory, jnp.float32)  # noqa: E731
    whole, experts = need(sizes(data=8)), need(sizes(expert=8))
    assert experts < whole
    assert choose(2 * whole) == sizes(data=8)
    assert choose(2 * whole - 1) == sizes(expert=8)
    tight = choose(2 * experts - 1)
    assert tight["fsdp"] > 1 and need(tight) <= experts and np.prod(list(tight.values())) == 8
    with pytest.raises(UserError, match=r"--mesh: the parameters need .* GiB per device on .*fsdp=.* over 8 devices"):
        choose(1000)
    with pytest.raises(UserError, match=r"--mesh: .* on data=8 over 8 devices"):
        serving.choose_mesh(variables, cfg, 8, sizes(data=-1), whole - 1, jnp.float32)
    assert serving.choose_mesh(variables, cfg, 8, sizes(data=2, fsdp=-1), whole, jnp.float32) == sizes(data=2, fsdp=4)


@pytest.mark.slow
def test_weights_cast_once_score_as_the_per_call_cast():
    """A bfloat16 model: its matmul weights restored in bfloat16 (norms, router and HC/mHC
    coefficients in float32) give the logits of float32 parameters cast at every call, bit for bit."""
    cfg = debug_model_config("mhc", {"dtype": "bfloat16", "n_layers": 2}, scale="moe_debug")
    model = Transformer(cfg, nnx.Rngs(0))
    randomize(model)
    graphdef, params = nnx.split(model)
    _, variables = abstract_variables_of(cfg)
    mesh = jax.make_mesh((1, 1, 1, 1), sharding.MESH_AXES, devices=jax.devices()[:1],
                         axis_types=(jax.sharding.AxisType.Auto,) * 4)
    abstract = serving.serving_params(variables, mesh, jnp.bfloat16)
    cast = jax.tree.map(lambda p, a: p.astype(a.dtype), nnx.to_pure_dict(params), abstract)
    dtypes = {"/".join(str(k.key) for k in path): a.dtype for path, a in jax.tree_util.tree_leaves_with_path(cast)}
    assert dtypes["blocks/attn/wq"] == dtypes["embed/table"] == dtypes["moe_blocks/mlp/w_up"] == jnp.bfloat16
    assert dtypes["moe_blocks/mlp/router"] == dtypes["blocks/attn_site/phi"] == dtypes["final_norm/scale"] == jnp.float32
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, cfg.vocab_size)
    forward = jax.jit(lambda p: nnx.merge(graphdef, p)(tokens))
    np.testing.assert_array_equal(forward(cast), forward(nnx.to_pure_dict(params)))


def test_the_largest_batch_that_fits_by_the_compiled_memory():
    """Rows in powers of two from the data-parallel unit, or the cap (the requests left): the most
    whose step fits; a step that does not fit at the unit is one line naming --batch_size."""
    compiled = []

    def step_memory(rows):  # a fixed part and a part per row, as XLA's analysis shows
        compiled.append(rows)
        return 100 * MiB + rows * MiB
    assert serving.largest_batch(step_memory, 200 * MiB, 8, 1024) == 64
    assert len(set(compiled)) == len(compiled)  # each size compiled once
    compiled.clear()
    assert serving.largest_batch(step_memory, 200 * MiB, 8, 40) == 40 and compiled == [40]  # the cap fits: one compile
    assert serving.largest_batch(step_memory, 200 * MiB, 8, 32) == 32
    assert serving.largest_batch(step_memory, 200 * MiB, 8, 96) == 96  # all that is left, not a power of two
    assert serving.largest_batch(step_memory, 10**12, 8, 8) == 8
    skewed = lambda rows: 100 * MiB + rows * MiB * (1 if rows <= 16 else 5)  # noqa: E731  # the line over-promises
    assert serving.largest_batch(skewed, 200 * MiB, 8, 1024) == 16
    with pytest.raises(UserError, match="--batch_size: even 8 rows"):
        serving.largest_batch(step_memory, 50 * MiB, 8, 64)


def test_a_step_the_compiler_refuses_for_memory_does_not_fit():
    """The TPU compiler raises RESOURCE_EXHAUSTED instead of compiling a step that cannot fit: that
    size does not fit (and smaller ones are tried); any other compiler error is raised."""
    def compile_refusing(rows):
        if rows > 16:
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory "
                                             "required for HLO temporaries (397.28G) exceeds available HBM")
        return jax.jit(lambda x: x * 2).lower(jax.ShapeDtypeStruct((rows, 1024), jnp.float32)).compile()
    step_memory = lambda rows: serving.compiled_memory(lambda: compile_refusing(rows))  # noqa: E731
    assert step_memory(64) == float("inf") and step_memory(8) > 0
    assert serving.largest_batch(step_memory, 2**30, 8, 64) == 16
    with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
        serving.compiled_memory(lambda: (_ for _ in ()).throw(jax.errors.JaxRuntimeError("INTERNAL: broken")))


def test_flag_values():
    assert serving.parse_mesh("auto") is None
    assert serving.parse_mesh("data=2,tensor=-1") == sizes(data=2, tensor=-1)
    for bad in ("model=2", "data", "data=x"):
        with pytest.raises(UserError, match="--mesh: .* axis=size"):
            serving.parse_mesh(bad)
    assert serving.parse_batch_size("auto") == "auto" and serving.parse_batch_size("16") == 16
    for bad in ("0", "-3", "big"):
        with pytest.raises(UserError, match="--batch_size"):
            serving.parse_batch_size(bad)
