"""Bit-exactness of the OCP MX casts against torchao's MX emulation (FLOOR scale mode).

Runs when torchao is installed (the `torch` extra; CI installs it), else skipped with the reason.
Compared: dequantized values, E8M0 scale bytes and element codes, on random, heavy-tailed and
adversarial inputs, float32 and bfloat16.
"""

import os
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

import jdq.formats as F

os.environ.setdefault("TORCH_LOGS", "-all")
warnings.filterwarnings("ignore")
torch = pytest.importorskip("torch", reason="torch not installed (pip install jdq[torch])")
mx_tensor = pytest.importorskip(
    "torchao.prototype.mx_formats.mx_tensor", reason="torchao not installed (pip install jdq[torch])"
)
from torchao.prototype.mx_formats import constants as tao_constants  # noqa: E402
from torchao.prototype.mx_formats import kernels as tao_kernels  # noqa: E402
from torchao.prototype.mx_formats.config import ScaleCalculationMode  # noqa: E402

ELEM_DTYPES = {
    "mxfp8_e4m3": torch.float8_e4m3fn,
    "mxfp8_e5m2": torch.float8_e5m2,
    "mxfp6_e3m2": tao_constants.DTYPE_FP6_E3M2,
    "mxfp6_e2m3": tao_constants.DTYPE_FP6_E2M3,
    "mxfp4_e2m1": torch.float4_e2m1fn_x2,
}
BLOCK = 32


def torchao_mx(x: np.ndarray, name: str, block=BLOCK):
    """torchao's (dequantized values, scale bytes, element codes) for a 2-D float array x."""
    dt = ELEM_DTYPES[name]
    t = torch.from_numpy(np.array(x, np.float32))
    scale, data = mx_tensor.to_mx(t, dt, block, ScaleCalculationMode.FLOOR)
    deq = mx_tensor.to_dtype(data, scale, dt, block, torch.float32).numpy()
    if dt == torch.float4_e2m1fn_x2:
        codes = tao_kernels.unpack_uint4(data.view(torch.uint8)).numpy()
    else:
        codes = data.view(torch.uint8).numpy()
    return deq, scale.view(torch.uint8).numpy(), codes.reshape(x.shape)


def _blocks(a):
    return a.reshape(a.shape[0], -1, BLOCK)


def assert_matches_torchao(x: np.ndarray, name: str, dtype=np.float32):
    xt = x.astype(np.float32)
    if dtype == "bfloat16":
        xj = jnp.asarray(xt).astype(jnp.bfloat16)
        xt = np.asarray(xj.astype(jnp.float32))  # torchao gets the same (bf16-representable) values
    else:
        xj = jnp.asarray(xt)
    ref, ref_scale, ref_codes = torchao_mx(xt, name)
    ours = np.asarray(F.cast(xj, name, axis=-1).astype(jnp.float32))
    np.testing.assert_array_equal(ours, ref)  # NaNs compare equal positionally
    qt = F.quantize(xj, name, axis=-1)
    np.testing.assert_array_equal(np.asarray(qt.scale), ref_scale)
    ok_blocks = ref_scale != 255  # element codes of NaN blocks are meaningless
    codes = np.asarray(qt.codes)
    np.testing.assert_array_equal(_blocks(codes)[ok_blocks], _blocks(ref_codes)[ok_blocks])
    if name == "mxfp4_e2m1":  # our packing of two codes per byte equals torchao's
        t = torch.from_numpy(ref_codes.astype(np.uint8))
        np.testing.assert_array_equal(
            np.asarray(F.quantize(xj, name, pack=True).codes)[ok_blocks.repeat(BLOCK // 2, axis=1)],
            tao_kernels.pack_uint4(t).numpy()[ok_blocks.repeat(BLOCK // 2, axis=1)],
        )


def gaussian(rng, shape=(64, 256)):
    return rng.standard_normal(shape).astype(np.float32)


def heavy_tailed(rng, shape=(64, 256)):
    t = rng.standard_t(df=1.5, size=shape)
    # per-block magnitudes spread over ~2^-60 .. 2^60 (all normal float32, outputs stay normal)
    mag = np.exp2(rng.integers(-60, 60, size=(shape[0], shape[1] // BLOCK, 1)))
    return (t.reshape(shape[0], -1, BLOCK) * mag).reshape(shape).astype(np.float32)


def adversarial(rng, name):
    """Ties, saturation boundaries, binade roll-overs, zeros, single nonzeros, equal blocks."""
    spec = F.get(name)
    ebits, mbits, emax, max_normal = F.mx.ELEMENTS[spec.element]
    emin = 2 - 2 ** (ebits - 1)
    # every grid value and every midpoint between neighbours (exact ties), in element units
    grid = np.unique([s * m * 2.0 ** (e - mbits) for e in range(emin, emax + 1)
                      for m in range(2 ** mbits, 2 ** (mbits + 1)) for s in (1, -1)]
                     + [s * k * 2.0 ** (emin - mbits) for k in range(2 ** mbits) for s in (1, -1)])
    grid = grid[np.abs(grid) <= max_normal]
    mids = (grid[:-1] + grid[1:]) / 2
    vals = np.concatenate([grid, mids, np.nextafter(mids, 0).astype(np.float64), np.nextafter(mids, 1e9)])
    rows = []
    for shift in (-3, 0, 5):
        v = rng.permutation(vals) * 2.0**shift
        n = (len(v) // (BLOCK - 1)) * (BLOCK - 1)
        blocks = v[:n].reshape(-1, BLOCK - 1)
        # pin each block's scale: its first element is the top of the binade (amax defines E)
        top = np.full((blocks.shape[0], 1), 2.0 ** emax * 2.0**shift * 1.9999)
        rows.append(np.concatenate([top, blocks], axis=1))
    b = np.concatenate(rows)
    special = np.zeros((8, BLOCK))
    special[1, 3] = 1e-30  # a single tiny nonzero
    special[2, :] = -3.0  # equal values, negative max
    special[3, 0] = max_normal * 1.5  # block max above max_normal of the binade
    special[4, 5] = np.float32(2.0**127) * 1.999  # near float32 max
    special[5, :] = np.linspace(-7, 7, BLOCK) * 2.0**-100
    special[6, ::2] = 2.0 ** np.arange(-40, 40, 5)[:16]  # wide range inside one block
    special[7, :] = 2.0**emax * (2 - 2.0**-mbits) + 1e-3  # rounds up past max normal -> saturates
    return np.concatenate([b, special]).astype(np.float32)


NAMES = list(ELEM_DTYPES)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [np.float32, "bfloat16"])
@pytest.mark.parametrize("kind", ["gaussian", "heavy_tailed", "adversarial"])
def test_bit_exact_with_torchao(name, dtype, kind):
    rng = np.random.default_rng(hash((name, kind)) % 2**32)
    x = {"gaussian": lambda: gaussian(rng) * 7.3, "heavy_tailed": lambda: heavy_tailed(rng),
         "adversarial": lambda: adversarial(rng, name)}[kind]()
    assert_matches_torchao(x, name, dtype)


@pytest.mark.parametrize("name", NAMES)
def test_nan_and_inf_blocks_match_torchao(name):
    rng = np.random.default_rng(1)
    x = gaussian(rng, (6, 64))
    x[0, 3] = np.nan  # NaN block -> scale 0xFF, whole block NaN
    x[1, 40] = np.inf  # Inf stays Inf (saturated code times scale 2**(128-emax)); the rest of its block -> 0
    x[2, 0] = -np.inf
    x[3, :32] = 0.0  # all-zero block -> scale byte 0, zeros
    assert_matches_torchao(x, name)
    y = np.asarray(F.cast(jnp.asarray(x), name))
    assert np.isnan(y[0, :32]).all() and np.isfinite(y[0, 32:]).all()
    assert y[1, 40] == np.inf and y[2, 0] == -np.inf
    assert (y[1, 32:40] == 0).all() and (y[2, 1:32] == 0).all() and np.isfinite(y[1, :32]).all()
    assert (y[3, :32] == 0).all()


@pytest.mark.parametrize("name", NAMES)
def test_scale_code_zero_follows_spec(name):
    """Blocks whose E8M0 scale byte is 0: the spec value is 2**-127 for both quantize and decode.

    torchao quantizes these blocks with 2**-126 (it clamps the float scale to the smallest normal)
    but decodes with 2**-127, so its values come out halved. We follow the spec.
    """
    spec = F.get(name)
    # amax = 1.5 * 2**(emax - 127) -> E = -127 (byte 0); elements exact in the element grid, and
    # every value a normal float32 (XLA flushes float32 subnormals)
    x = np.zeros((2, 32), np.float32)
    x[0, :4] = np.float32(2.0 ** (spec.emax - 127)) * np.array([1.5, 1, -1, -1.5])
    x[1, :2] = [2.0 ** (spec.emax - 127.5), 0]  # not a power of two: rounds within the block
    qt = F.quantize(jnp.asarray(x), name)
    assert (np.asarray(qt.scale) == 0).all()
    ours = np.asarray(F.cast(jnp.asarray(x), name))
    ref, ref_scale, _ = torchao_mx(x, name)
    assert (ref_scale == 0).all()
    np.testing.assert_array_equal(ours[0], x[0])  # exactly representable: the spec reproduces them
    np.testing.assert_array_equal(ref[0], x[0] / 2)  # torchao halves them
    expected = np.float32(2.0**-127) * np.float32(F.mx._round_elements(jnp.float32(x[1, 0] * 2.0**127), spec))
    assert ours[1, 0] == expected


def test_float32_subnormals_flush_to_zero():
    """XLA flushes float32 subnormals on CPU/GPU: inputs below 2**-126 act as 0 (torchao keeps them)."""
    x = np.zeros((1, 32), np.float32)
    x[0, 0] = 2.0**-130
    x[0, 1] = -(2.0**-140)
    assert (np.asarray(F.cast(jnp.asarray(x), "mxfp8_e4m3")) == 0).all()
    ref, _, _ = torchao_mx(x, "mxfp8_e4m3")
    assert ref[0, 0] != 0  # the documented difference
