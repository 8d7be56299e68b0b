"""Every registered kernel op (jdq.kernels.registry) over its implementations: accepts its plan shape,
packs a weight that dequantizes to the fake-quant weight exactly, and its lowered matmul equals the
fake-quant matmul up to float32 summation order."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdq.kernels import lowered_linear
from jdq.kernels.registry import OPS
from jdq.quant import Context, cast, describe_transform, outlier_split, outlier_weight

K, N, M = 256, 256, 24

#: op name -> (weight transform, activation transform or None, the kind it runs)
CASES = {
    "w8a8": (cast("int8", granularity="row"), cast("int8", granularity="row"), "w8a8"),
    "w4a8": (cast("int4", granularity="group", group_size=128), cast("int8", granularity="row"), "w4a8"),
    "weight_only": (cast("int4", granularity="group", group_size=128), None, "w4a16"),
    "mixdit": (outlier_weight(cast("mx6"), 0.25, channel_multiple=16),
               outlier_split(0.25, hi="mx9", lo="mx6", granularity="channel"), "mixdit"),
    "mx": (cast("mxfp8_e4m3"), cast("mxfp8_e4m3"), "mxfp8"),
}


def test_every_op_has_a_case():
    assert {op.name for op in OPS} == set(CASES)


@pytest.mark.parametrize("impl", ["xla", "tpu_interpret", "gpu_interpret"])
@pytest.mark.parametrize("op", OPS, ids=lambda op: op.name)
def test_op_equals_fake_quant(op, impl):
    wt, at, kind = CASES[op.name]
    kx, kw = jax.random.split(jax.random.key(7))
    # the weight-only GPU kernel multiplies bf16 activations (a model's compute dtype on the GPU)
    x = jax.random.normal(kx, (M, K), jnp.bfloat16 if op.name == "weight_only" else jnp.float32)
    w = jax.random.normal(kw, (K, N), jnp.float32) / 16
    absmax = jnp.abs(x).max(0)[None]  # one calibration step
    stats = {"absmax_channel": absmax, "act_absmax_channel": absmax}
    w_state, a_state = wt.init(stats), (None if at is None else at.init(stats))
    w_op = describe_transform(wt, w_state, "s:weight")
    a_op = None if at is None else describe_transform(at, a_state, "s:act")
    assert op.supports(w_op, a_op) == (kind, op.supports(w_op, a_op)[1])
    lw, deq = op.pack(w, kind, w_op, a_op)
    assert lw is not None, deq
    w_fake = wt.apply(w, w_state, Context("s", "weight", -2))
    np.testing.assert_array_equal(np.asarray(deq, np.float32), np.asarray(w_fake))
    x_fake = x if at is None else at.apply(x, a_state, Context("s", "act", -1))
    want = np.asarray(x_fake, np.float64) @ np.asarray(w_fake, np.float64)
    got = np.asarray(lowered_linear(x, lw, site="s", quant=types.SimpleNamespace(impl=impl)), np.float64)
    # Same quantized operands, so only float32 rounding differs: a K-term float32 dot product is within
    # K·u·Σ|a||w| of the exact one (u = 2⁻²⁴), and the cast to the output dtype adds u_out·|y|; twice that.
    u_out = float(jnp.finfo(x.dtype).eps) / 2
    bound = 2 * (K * 2.0**-24 * (np.abs(np.asarray(x_fake, np.float64)) @ np.abs(np.asarray(w_fake, np.float64)))
                 + u_out * np.abs(want))
    assert np.all(np.abs(got - want) <= bound), float(np.max(np.abs(got - want) - bound))
