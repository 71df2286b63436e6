"""Configs: every scale is the size its name says, overhead formulas, and the documented fields."""

import re
from pathlib import Path

import pytest

from configs.pretrain import get_config
from configs.scales import SCALES
from mhc_jax.model import param_counts


@pytest.mark.parametrize("scale, target", [("10m", 10e6), ("100m", 100e6), ("1b", 1e9)])
def test_scale_names_are_non_embedding_parameter_counts(scale, target):
    counts = param_counts(get_config(f"residual,{scale}").model)
    assert abs(counts["non_embedding"] / target - 1) <= 0.10, counts
    assert counts["total"] == counts["embedding"] + counts["non_embedding"] == counts["active"]
    assert counts["residual_overhead"] == 0


@pytest.mark.parametrize("scale", ["debug", "10m", "1b"])
def test_residual_overheads_follow_the_papers_formulas(scale):
    """HC paper App. B: a static site has n(n + 2) parameters, a dynamic one adds its norm (C),
    d(n + 2) weights and 2 scales; an mHC site has phi [nC, n^2 + 2n], the bias and 3 gates."""
    shape = SCALES[scale]
    n, C, sites = 4, shape["d_model"], 2 * shape["n_layers"]
    expected = {
        "hc_static": n * (n + 2),
        "hc": C + C * (n + 2) + n * (n + 2) + 2,
        "mhc": n * C * (n * n + 2 * n) + (n * n + 2 * n) + 3,
    }
    base = param_counts(get_config(f"residual,{scale}").model)
    for variant, per_site in expected.items():
        counts = param_counts(get_config(f"{variant},{scale}").model)
        assert counts["residual_overhead"] == sites * per_site, variant
        assert counts["total"] - base["total"] == counts["residual_overhead"], variant


def test_every_config_field_is_documented_next_to_its_default():
    source = (Path(__file__).parents[1] / "configs" / "pretrain.py").read_text()
    assignments = [line for line in source.splitlines() if re.match(r"\s+(m|hc|mhc|t|mesh|log|config)(\.\w+)+ = ", line)]
    assert len(assignments) >= 55
    undocumented = [line.strip() for line in assignments if "#" not in line]
    assert not undocumented, undocumented
