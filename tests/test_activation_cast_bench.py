"""benchmarks/activation_cast.py on a CPU: every formulation of a cast equals the library's bit for bit."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench():
    spec = importlib.util.spec_from_file_location("activation_cast", os.path.join(ROOT, "benchmarks", "activation_cast.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name", ["mx6", "mx9", "mxint8", "mxfp8_e4m3", "mxfp4_e2m1"])
def test_formulations_equal_the_library(name):
    """The timed variants are formulations of one cast: same bits on adversarial bf16 (NaN, ±Inf, zeros, tiny)."""
    ac = _bench()
    x = jax.nn.gelu(3 * jax.random.normal(jax.random.key(0), (8, 128), jnp.bfloat16))
    x = x.at[0, 3].set(jnp.nan).at[1, 5].set(jnp.inf).at[2, :16].set(1e-39).at[3, 0].set(-0.0).at[4, 32:64].set(-jnp.inf)
    variants = ac.variants(name)
    assert len(variants) >= 4
    want = np.asarray(jax.jit(variants["library"])(x).astype(jnp.float32))
    for label, cast in variants.items():
        got = np.asarray(jax.jit(cast)(x).astype(jnp.float32))
        np.testing.assert_array_equal(got, want, err_msg=label)


def test_needs_a_mode():
    with pytest.raises(SystemExit, match="device-run"):
        _bench().main([])
