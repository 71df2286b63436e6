"""Configs: every scale is the size its name says, overhead formulas, the documented fields, and
the validation of every field."""

import re
from pathlib import Path

import ml_collections
import pytest

from configs.pretrain import get_config
from configs.scales import SCALES
from configs.stability import get_config as get_stability_config
from mhc_jax import validation
from mhc_jax.config_rules import FIELD_RULES, validate
from mhc_jax.errors import UserError
from mhc_jax.model.residual import VARIANTS
from mhc_jax.model.transformer import param_counts
from mhc_jax.pods import bench
from mhc_jax.study import stability


@pytest.mark.parametrize("scale, target", [("10m", 10e6), ("100m", 100e6), ("1b", 1e9)])
def test_scale_names_are_non_embedding_parameter_counts(scale, target):
    cfg = get_config(f"residual,{scale}").model
    counts = param_counts(cfg)
    assert abs(counts["non_embedding"] / target - 1) <= 0.10, counts
    assert counts["total"] == counts["embedding"] + counts["non_embedding"]
    input_table = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model  # a lookup, not a matmul
    assert counts["active"] == counts["total"] - input_table
    assert counts["residual_overhead"] == 0


TABLE_5 = {"3b": (2.97e9, 612e6), "9b": (9.18e9, 1.66e9), "27b": (27.0e9, 4.14e9)}  # total, active


@pytest.mark.parametrize("scale", TABLE_5)
def test_paper_scales_have_the_parameter_counts_of_table_5(scale):
    """Shapes only (nothing allocated). Active = total minus the input embedding lookup and the
    routed experts a token does not use: (n_experts - top_k) SwiGLUs of 3 d F per MoE layer."""
    total, active = TABLE_5[scale]
    for variant in ("residual", "hc_static", "hc", "mhc"):
        cfg = get_config(f"{variant},{scale}").model
        counts = param_counts(cfg)
        assert abs(counts["total"] / total - 1) <= 0.01, (variant, counts)
        assert abs(counts["active"] / active - 1) <= 0.01, (variant, counts)
        moe, moe_layers = cfg.moe, cfg.n_layers - cfg.moe.first_dense_layers
        unused = moe_layers * (moe.n_experts - moe.top_k) * 3 * cfg.d_model * moe.d_expert
        assert counts["total"] - counts["active"] == cfg.vocab_size * cfg.d_model + unused


@pytest.mark.parametrize("scale", ["debug", "10m", "1b"])
def test_residual_overheads_follow_the_papers_formulas(scale):
    """HC paper App. B: a static site has n(n + 2) parameters, a dynamic one adds its norm (C),
    d(n + 2) weights and 2 scales; an mHC site has phi [nC, 2n + R], the bias and 3 gates, with R res
    logits: n^2 (mhc, mhc_v4), n! (mhc_lite), 2 log2 n (kromhc); V4's head once, phi [nC, n], n
    biases and a gate. LAuReL per site: RW 2 weights, LR 2rC, PA k = 3 gammas."""
    shape = SCALES[scale]
    n, C, sites, r = 4, shape["d_model"], 2 * shape["n_layers"], get_config("laurel_lr,debug").model.laurel.rank

    def mhc_family(res_logits):
        return n * C * (2 * n + res_logits) + (2 * n + res_logits) + 3

    expected = {  # variant: (per site, once)
        "hc_static": (n * (n + 2), 0),
        "hc": (C + C * (n + 2) + n * (n + 2) + 2, 0),
        "mhc": (mhc_family(n * n), 0),
        "mhc_v4": (mhc_family(n * n), n * C * n + n + 1),
        "mhc_lite": (mhc_family(24), 0),
        "kromhc": (mhc_family(4), 0),
        "laurel_rw": (2, 0),
        "laurel_lr": (2 * r * C, 0),
        "laurel_pa": (3, 0),
    }
    assert set(expected) == set(VARIANTS) - {"residual"}
    base = param_counts(get_config(f"residual,{scale}").model)
    for variant, (per_site, once) in expected.items():
        counts = param_counts(get_config(f"{variant},{scale}").model)
        assert counts["residual_overhead"] == sites * per_site + once, variant
        assert counts["total"] - base["total"] == counts["residual_overhead"], variant


def test_every_config_field_is_documented_next_to_its_default():
    source = (Path(__file__).parents[1] / "configs" / "pretrain.py").read_text()
    assignments = [line for line in source.splitlines() if re.match(r"\s+(m|mla|moe|hc|mhc|laurel|t|mesh|log|config)(\.\w+)+ = ", line)]
    assert len(assignments) >= 55
    undocumented = [line.strip() for line in assignments if "#" not in line]
    assert not undocumented, undocumented


def test_every_variant_and_scale_is_valid():
    for variant in VARIANTS:
        for scale in SCALES:
            validate(get_config(f"{variant},{scale}"))


def test_every_field_has_a_rule_and_a_bad_value_of_it_is_refused():
    """Generated from the config: a field without a rule fails here, and so does a rule whose bad
    values get through. Each bad value is set in a copy without type safety (as a config file could)."""
    fields = validation.leaves(get_config("mhc,moe_debug"))
    assert set(fields) == set(FIELD_RULES), "fields without a rule, or rules without a field"
    for field, rule in FIELD_RULES.items():
        bad_values = rule.bad_values()
        assert bad_values, field
        for bad in bad_values:
            config = ml_collections.ConfigDict(get_config("mhc,moe_debug").to_dict(), type_safe=False)
            *parents, name = field.split(".")
            node = config
            for parent in parents:
                node = node[parent]
            node[name] = bad
            bad = node[name]  # as stored (an int given to a float field becomes a float)
            with pytest.raises(UserError) as refused:
                validate(config)
            assert str(refused.value).startswith(f"{field}: got {bad!r}; must be "), str(refused.value)


@pytest.mark.parametrize("overrides, message", [
    ({"train.stop_at_step": 300}, "train.stop_at_step: got 300; must be <= train.steps = 200"),
    ({"train.microbatches": 3}, "train.microbatches: got 3; must divide train.batch_size = 8"),
    ({"mesh.fsdp": -1, "mesh.data": -1}, "mesh.fsdp: got -1; at most one mesh axis may be -1"),
    ({"model.residual": "residual"}, "model.n_streams: got 4; the residual variant has one stream"),
    ({"model.n_streams": 1}, "model.n_streams: got 1; mhc needs n >= 2 streams"),
    ({"model.d_model": 68}, "model.head_dim: got 0; head_dim (d_model // n_heads where model.head_dim is 0) must be even for RoPE"),
    ({"model.head_dim": 7}, "model.head_dim: got 7; head_dim (d_model // n_heads where model.head_dim is 0) must be even for RoPE"),
    ({"model.n_heads": 8, "model.n_kv_heads": 3}, "model.n_kv_heads: got 3; must divide model.n_heads = 8"),
    ({"model.attention": "mla", "model.mla.rope_dim": 7}, "model.mla.rope_dim: got 7; must be even for RoPE"),
    ({"model.moe.n_experts": 4, "model.moe.top_k": 2, "model.moe.d_expert": 16, "model.moe.first_dense_layers": 2},
     "model.moe.first_dense_layers: got 2; must be < model.n_layers = 2 in an MoE model"),
    ({"data.mixture": "data/a:2,data/b:-1"},
     "data.mixture: got 'data/a:2,data/b:-1'; 'data/b:-1' is not FOLDER:WEIGHT with a positive weight"),
])
def test_relations_between_fields_are_checked(overrides, message):
    config = get_config("mhc,debug")
    for field, value in overrides.items():
        *sections, name = field.split(".")
        node = config
        for section in sections:
            node = node[section]
        node[name] = value
    with pytest.raises(UserError, match=re.escape(message)):
        validate(config)


def test_the_bench_and_the_study_give_each_variant_its_streams_or_the_ones_asked_for():
    config = get_config("mhc,debug")
    own = {name: c.model.n_streams for name, c in bench.variant_configs(config, list(VARIANTS)).items()}
    assert own == {name: n for name, (_, n) in VARIANTS.items()}
    config.model.n_streams = 2  # an override reaches every variant of several streams
    asked = {name: c.model.n_streams for name, c in bench.variant_configs(config, list(VARIANTS)).items()}
    assert asked == {name: 1 if n == 1 else 2 for name, (_, n) in VARIANTS.items()}
    study = get_stability_config("debug")
    assert stability.run_config(study, stability.Run("laurel_pa", 0, 1.0), 10).model.n_streams == 3
