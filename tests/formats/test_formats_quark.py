"""MX9 / MX6 / MX4 against AMD Quark's CPU PyTorch emulation (PyPI ``amd-quark``).

Quark is the only runnable reference for the shared-microexponent formats (docs/methods.md §1.2):
``fake_quantize_mx6_mx9(x, axis, block_size=16, quant_bit=m+1, sub_block_size=2)``, which
``torch.ops.quark.non_scaled_fake_quantize(x, "mx9" | "mx6", ...)`` calls; MX4 is quant_bit=3.
Install: ``pip install --no-deps amd-quark && pip install onnx onnxslim``. Skipped, with the
reason, when it is not installed. Importing Quark takes ~20-50 s (it imports transformers model
code), hence the ``slow`` mark.
"""

import warnings

import jax.numpy as jnp
import numpy as np
import pytest

import jdq.formats as F

pytestmark = pytest.mark.slow
warnings.filterwarnings("ignore")
torch = pytest.importorskip("torch", reason="torch not installed (pip install jdq[torch])")
quark_hw = pytest.importorskip(
    "quark.torch.kernel.hw_emulation.hw_emulation_interface",
    reason="AMD Quark not installed (pip install --no-deps amd-quark onnx onnxslim)",
)

QUANT_BIT = {"mx9": 8, "mx6": 5, "mx4": 3}


def quark_cast(x: np.ndarray, name: str, axis: int) -> np.ndarray:
    t = torch.from_numpy(np.array(x, np.float32))
    y = quark_hw.fake_quantize_mx6_mx9(t, axis % x.ndim, block_size=16, quant_bit=QUANT_BIT[name], sub_block_size=2)
    return y.numpy()


def inputs(seed):
    rng = np.random.default_rng(seed)
    yield "gaussian", rng.standard_normal((32, 96)).astype(np.float32)
    t = rng.standard_t(1.5, (32, 96)) * np.exp2(rng.integers(-50, 50, (32, 6, 1))).repeat(16, -1).reshape(32, 96)
    yield "heavy_tailed", t.astype(np.float32)
    # adversarial: exact ties on each grid, pairs straddling the block exponent, near-saturation,
    # zeros, one-hot blocks, float32 subnormals (Quark flushes them too)
    grid = rng.integers(-255, 256, (32, 96)) / 64.0
    grid[0, :16] = [1.0, 0.9995, 0.5, 0.49, 0.999, 0.25, 1.99, 1.999, 0, 0, 3.9, 0.3, -2, 2, 1e-3, 0.75]
    grid[1, :16] = 0
    grid[2, 5] = 7.0
    grid[3, :4] = [2.0**-130, 1.0, 2.0**-127, -(2.0**-140)]
    grid[4] = (np.arange(96) % 16 + 0.5) * 2.0 ** -3  # .5 ties everywhere
    yield "adversarial", grid.astype(np.float32)


@pytest.mark.parametrize("name", list(QUANT_BIT))
def test_bit_exact_with_quark(name):
    for kind, x in inputs(QUANT_BIT[name]):
        for axis, xa in ((-1, x), (0, x[:, :40].T.copy()), (-1, x[:, :40])):  # last: padded to 48
            ref = quark_cast(xa, name, axis)
            for dtype in (jnp.float32, jnp.bfloat16):
                xj = jnp.asarray(xa).astype(dtype)
                ref_d = ref if dtype == jnp.float32 else quark_cast(np.asarray(xj.astype(jnp.float32)), name, axis)
                ours = np.asarray(F.cast(xj, name, axis=axis).astype(jnp.float32))
                np.testing.assert_array_equal(ours, ref_d, err_msg=f"{name} {kind} axis={axis} {dtype}")


def test_shift_decided_before_rounding_saturates_like_quark():
    """docs/methods.md §1.2: a pair shifted on exponents alone can saturate (MX4: 0.9995 -> 0.75)."""
    x = np.zeros((1, 16), np.float32)
    x[0, :4] = [1.0, 0.0, 0.9995, 0.0]
    assert quark_cast(x, "mx4", -1)[0, 2] == 0.75
    assert float(F.cast(jnp.asarray(x), "mx4")[0, 2]) == 0.75
    # our 'fit' option shifts only pairs that still fit: 0.9995 -> 1.0 at the coarse step
    assert float(F.cast(jnp.asarray(x), "mx4", microexponent="fit")[0, 2]) == 1.0


def test_non_finite_blocks_differ_from_quark_by_design():
    """Quark passes NaN/Inf through and quantizes the rest of the block; we make the block NaN."""
    x = np.linspace(-1, 1, 32, dtype=np.float32).reshape(1, 32)
    x[0, 3] = np.inf
    ref = quark_cast(x, "mx9", -1)
    ours = np.asarray(F.cast(jnp.asarray(x), "mx9"))
    assert ref[0, 3] == np.inf and np.isfinite(np.delete(ref[0, :16], 3)).all()
    assert np.isnan(ours[0, :16]).all()
    np.testing.assert_array_equal(ours[0, 16:], ref[0, 16:])  # the other block is unaffected
