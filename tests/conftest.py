"""Test setup: 8 simulated CPU devices (set before jax loads) and the `variant` fixture."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

from configs.pretrain import VARIANTS  # noqa: E402


@pytest.fixture(params=tuple(VARIANTS))
def variant(request):
    return request.param
