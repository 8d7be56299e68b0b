"""The public API of jdq.formats: names, specs, errors, jit/vmap/grad, quantize/dequantize."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdq.formats as F

ALL = F.names()
X = jax.random.normal(jax.random.key(0), (3, 5, 48), jnp.float32) * 2.0


def test_names_cover_the_contract():
    for n in ["mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4_e2m1", "mxint8",
              "mx9", "mx6", "mx4", "int8", "int6", "int4", "int2", "fp8_e4m3", "fp8_e5m2"]:
        assert n in ALL
        assert F.get(n).name == n


@pytest.mark.parametrize(
    "name,bits,block,kind",
    [("mxfp8_e4m3", 8.25, 32, "mx"), ("mxfp4_e2m1", 4.25, 32, "mx"), ("mxfp6_e2m3", 6.25, 32, "mx"),
     ("mxint8", 8.25, 32, "mx"), ("mx9", 9.0, 16, "smx"), ("mx6", 6.0, 16, "smx"), ("mx4", 4.0, 16, "smx"),
     ("int8", 8.0, None, "int"), ("int4", 4.0, None, "int"), ("fp8_e4m3", 8.0, None, "fp8")],
)
def test_spec_fields(name, bits, block, kind):
    spec = F.get(name)
    assert (spec.bits_per_element, spec.block_size, spec.kind) == (bits, block, kind)
    assert hash(spec) == hash(F.get(name)) and spec == F.get(name)
    with pytest.raises(dataclasses_frozen_error()):
        spec.name = "other"


def dataclasses_frozen_error():
    import dataclasses
    return dataclasses.FrozenInstanceError


def test_options_change_spec_fields():
    assert F.get("mxfp8_e4m3", block_size=16).bits_per_element == 8.5
    assert F.get("int4", granularity="group", group_size=128).bits_per_element == 4 + 16 / 128
    assert F.get("int4", granularity="group", group_size=64, symmetric=False).block_size == 64
    assert F.get("int8", granularity="token").granularity == "row"
    assert F.get("int8", granularity="output_channel").granularity == "row"
    spec = F.get("mx9")
    assert F.get(spec) is spec
    assert F.get(spec, rounding="away").rounding == "away"


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError) as e:
        F.get("mxfp5")
    for n in ALL:
        assert n in str(e.value)
    with pytest.raises(ValueError, match="mxfp5"):
        F.cast(X, "mxfp5")


@pytest.mark.parametrize("name", ["int1", "int9", "int16", "int0"])
def test_bit_width_out_of_range(name):
    with pytest.raises(ValueError, match="bit width"):
        F.cast(X, name)


def test_unknown_option_is_named():
    with pytest.raises(TypeError, match="blocksize"):
        F.cast(X, "mxfp8_e4m3", blocksize=16)
    with pytest.raises(TypeError, match="group_size"):
        F.get("mx9", group_size=4)


@pytest.mark.parametrize("kw,match", [
    (dict(rounding="stochastic"), "rounding"),
    (dict(granularity="channel"), "granularity"),
    (dict(granularity="group"), "group_size"),
    (dict(granularity="row", group_size=4), "group_size"),
    (dict(symmetric="yes"), "symmetric"),
])
def test_bad_int_option_values(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        F.cast(X, "int8", **kw)


def test_bad_block_options():
    with pytest.raises(ValueError, match="block_size"):
        F.get("mxfp4_e2m1", block_size=0)
    with pytest.raises(ValueError, match="sub_block_size"):
        F.get("mx9", block_size=16, sub_block_size=3)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.int8, jnp.bool_, jnp.complex64, jnp.uint8])
@pytest.mark.parametrize("name", ["mxfp8_e4m3", "mx9", "int8", "fp8_e4m3"])
def test_non_float_input_rejected(dtype, name):
    with pytest.raises(TypeError, match="floating dtype"):
        F.cast(jnp.zeros((4, 32), dtype), name)
    with pytest.raises(TypeError, match="floating dtype"):
        F.quantize(jnp.zeros((4, 32), dtype), name)


def test_axis_out_of_range():
    with pytest.raises(ValueError, match="axis=3"):
        F.cast(X, "mxfp8_e4m3", axis=3)
    with pytest.raises(TypeError, match="axis"):
        F.cast(X, "int8", axis=1.0)


def test_scale_only_for_int_and_fp8():
    with pytest.raises(ValueError, match="scale"):
        F.cast(X, "mxfp8_e4m3", scale=1.0)
    with pytest.raises(ValueError, match="zero"):
        F.cast(X, "int8", zero=1.0, scale=1.0)
    with pytest.raises(ValueError, match="zero"):
        F.cast(X, "int8", symmetric=False, scale=1.0)


def test_static_scale_shape_error_names_shapes():
    with pytest.raises(ValueError, match=r"\(7,\).*\(3, 5, 1\)"):
        F.cast(X, "int8", scale=jnp.ones((7,)))


@pytest.mark.parametrize("name", ALL)
def test_shape_dtype_roundtrip_jit_vmap_grad(name):
    """cast == dequantize(quantize) (packed or not) for several axes and dtypes, all in one jit."""

    @jax.jit
    def run(x32, xbf):
        out = {}
        for tag, x, axis, pack in [("f32-1", x32, -1, False), ("f32-0", x32, 0, True), ("bf16-1", xbf, 1, True)]:
            out[tag] = (x, F.cast(x, name, axis=axis), F.dequantize(F.quantize(x, name, axis=axis, pack=pack)))
        out["vmap"] = (x32, jax.vmap(lambda r: F.cast(r, name))(x32), F.cast(x32, name))
        out["grad"] = jax.grad(lambda x: jnp.sum(F.cast(x, name) * 3.0))(x32)
        return out

    out = run(X, X.astype(jnp.bfloat16))
    np.testing.assert_array_equal(out.pop("grad"), jnp.full_like(X, 3.0))  # straight-through
    xv, yv, y = out.pop("vmap")
    if F.get(name).kind in ("mx", "smx"):  # blocks along the last axis: vmap over rows changes nothing
        np.testing.assert_array_equal(yv, y)
    for tag, (x, y, z) in out.items():
        assert y.shape == x.shape and y.dtype == x.dtype and z.dtype == x.dtype, tag
        np.testing.assert_array_equal(np.asarray(z, np.float32), np.asarray(y, np.float32), err_msg=tag)
        # a real quantizer changes Gaussian data, but not by much relative to its size
        assert not np.array_equal(np.asarray(y, np.float32), np.asarray(x, np.float32)), tag


@pytest.mark.parametrize("name", ["int4", "mxfp4_e2m1", "mx6", "int3"])
def test_packing_shrinks_storage(name):
    qt = F.quantize(X, name, axis=-1)
    qp = F.quantize(X, name, axis=-1, pack=True)
    b = F.get(name).element_bits
    assert qp.codes.dtype == jnp.uint8
    assert qp.codes.shape[-1] == -(-X.shape[-1] * b // 8)
    assert qp.nbytes < qt.nbytes
    up = F.unpack(qp)
    np.testing.assert_array_equal(up.codes, qt.codes)
    assert up.codes.dtype == qt.codes.dtype


def test_vmap_over_static_scales():
    scales = jnp.array([0.01, 0.02, 0.05])
    ys = jax.jit(jax.vmap(lambda s: F.cast(X, "int8", granularity="tensor", scale=s)))(scales)
    for i, s in enumerate(scales):
        np.testing.assert_array_equal(ys[i], F.cast(X, "int8", granularity="tensor", scale=s))


@pytest.mark.parametrize("name", ["int8", "int4", "fp8_e4m3", "fp8_e5m2"])
def test_static_equals_dynamic_with_computed_scale(name):
    """Feeding compute_scale's (scale, zero) back as static parameters reproduces the dynamic cast."""
    configs = []
    for gran in ["tensor", "row", "input_channel", ("group", 16), ("group", 20)]:
        kw = dict(granularity=gran[0], group_size=gran[1]) if isinstance(gran, tuple) else dict(granularity=gran)
        for sym in ([True, False] if name.startswith("int") else [None]):
            for axis in ((-1, 0) if gran in ("row", ("group", 20)) else (-1,)):
                configs.append((dict(kw, **({} if sym is None else {"symmetric": sym})), axis))

    @jax.jit
    def run(x):
        out = []
        for kw, axis in configs:
            scale, zero = F.compute_scale(x, name, axis=axis, **kw)
            qt = F.quantize(x, name, axis=axis, **kw)
            out.append((F.cast(x, name, axis=axis, **kw), F.cast(x, name, axis=axis, scale=scale, zero=zero, **kw),
                        scale, qt.scale))
        return out

    for (kw, axis), (dyn, static, scale, qscale) in zip(configs, run(X)):
        np.testing.assert_array_equal(static, dyn, err_msg=f"{kw} axis={axis}")
        np.testing.assert_array_equal(qscale, scale)
    # the static-scale shapes documented in jdq.formats.uniform
    shapes = {"tensor": (), "row": (3, 5, 1), "input_channel": (1, 1, 48)}
    for gran, shape in shapes.items():
        assert F.compute_scale(X, name, granularity=gran)[0].shape == shape
    assert F.compute_scale(X, name, granularity="group", group_size=20)[0].shape == (3, 5, 3)


def test_scalar_input():
    assert F.cast(jnp.float32(0.3), "int8", granularity="tensor") == pytest.approx(0.3)
    assert float(F.cast(jnp.float32(5.0), "mxfp4_e2m1")) == 4.0
    assert float(F.dequantize(F.quantize(jnp.float32(5.0), "mxfp4_e2m1"))) == 4.0


@pytest.mark.parametrize("name", ["mxfp4_e2m1", "mx6", "int4"])
def test_axis_not_divisible_is_zero_padded(name):
    """Documented rule: the axis is zero-padded to whole blocks/groups; padding is dropped."""
    kw = {"granularity": "group", "group_size": 32} if name == "int4" else {}
    x = jax.random.normal(jax.random.key(2), (4, 70))
    padded = jnp.pad(x, ((0, 0), (0, 26)))
    f = jax.jit(lambda a, b: (F.cast(a, name, **kw), F.cast(b, name, **kw)))
    y, yp = f(x, padded)
    assert y.shape == (4, 70)
    np.testing.assert_array_equal(y, yp[:, :70])


def test_float16_input_keeps_dtype():
    x = (X[0] * 10).astype(jnp.float16)
    for name in ("mxfp8_e4m3", "mx9", "int8", "fp8_e5m2"):
        y = F.cast(x, name)
        assert y.dtype == jnp.float16 and bool(jnp.isfinite(y).all())


def test_cast_select_is_a_per_element_choice_of_two_casts_with_a_straight_through_gradient():
    from jdq import formats

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 64)) * 4, jnp.bfloat16)
    select = jnp.asarray(rng.random((3, 64)) < 0.3)
    for hi, lo in (("mx9", "mx6"), ("mxfp8_e4m3", "mxfp4_e2m1"), ("int8", "mx4")):
        want = jnp.where(select, formats.cast(x, hi), formats.cast(x, lo))
        np.testing.assert_array_equal(np.asarray(formats.cast_select(x, select, hi, lo)), np.asarray(want))
    row = jnp.asarray([True, False, True])[:, None]  # broadcasts over the row
    np.testing.assert_array_equal(
        np.asarray(formats.cast_select(x, row, "mx9", "mx6")),
        np.asarray(jnp.where(row, formats.cast(x, "mx9"), formats.cast(x, "mx6"))))
    g = jax.grad(lambda v: jnp.sum(formats.cast_select(v, select, "mx9", "mx6") * 3.0))(x.astype(jnp.float32))
    np.testing.assert_array_equal(np.asarray(g), np.full((3, 64), 3.0, np.float32))
    with pytest.raises(TypeError, match="select must be a boolean"):
        formats.cast_select(x, select.astype(jnp.int32), "mx9", "mx6")
    with pytest.raises(ValueError, match=r"select of shape \(2, 64\) does not broadcast"):
        formats.cast_select(x, select[:2], "mx9", "mx6")
    with pytest.raises(ValueError, match="unknown format"):
        formats.cast_select(x, select, "mx10", "mx6")
