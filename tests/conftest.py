"""Shared test configuration: float32 reference precision on CPU, deterministic hypothesis."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

try:
    from hypothesis import settings

    settings.register_profile("jdq", deadline=None, derandomize=True, print_blob=True)
    settings.load_profile("jdq")
except ImportError:  # pragma: no cover
    pass
