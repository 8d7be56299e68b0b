"""W8A16 / W4A16: packing layout, reference vs fake-quant, GPU kernel in interpret mode, lowering."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_testutil import assert_within_reordering_bound

from jdq.kernels.weight_only import ref
from jdq.kernels.weight_only.gpu import Config, weight_only_matmul_gpu


def test_pack_int4_round_trip_and_layout():
    codes = jax.random.randint(jax.random.key(0), (8, 256), -8, 8).astype(jnp.int8)
    packed = ref.pack_int4(codes)
    assert packed.shape == (8, 128) and packed.dtype == jnp.int8
    np.testing.assert_array_equal(np.asarray(ref.unpack_int4(packed)), np.asarray(codes))
    p = np.asarray(packed, np.int64) & 0xFF
    c = np.asarray(codes, np.int64) & 0xF
    np.testing.assert_array_equal(p[:, 5] & 0xF, c[:, 5])  # feature j in the low nibble of byte j
    np.testing.assert_array_equal(p[:, 5] >> 4, c[:, 69])  # feature j + 64 in the high nibble
    np.testing.assert_array_equal(p[:, 64 + 3] >> 4, c[:, 128 + 64 + 3])  # next 128-block
    with pytest.raises(ValueError, match="multiple of 128"):
        ref.pack_int4(codes[:, :100])


@pytest.mark.parametrize("fmt,group", [("int8", None), ("int4", 128), ("int4", None)])
def test_reference_equals_fake_quant(fmt, group):
    from jdq import formats

    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(k1, (32, 256))
    w = jax.random.normal(k2, (256, 128)) / 16  # (K, N)
    b = jax.random.normal(k3, (128,))
    opts = dict(granularity="group", group_size=group) if group else dict(granularity="row")
    qt = formats.quantize(w, fmt, axis=-2, **opts)
    codes = qt.codes.T
    scale = jnp.maximum(qt.scale, 2.0**-126).reshape(-1, 128).T if group else qt.scale.reshape(128, 1)
    bits = 4 if fmt == "int4" else 8
    packed = ref.pack_int4(codes) if bits == 4 else codes
    got = ref.weight_only_matmul(x, packed, scale, b, bits, group or 256)
    wh = formats.cast(w, fmt, axis=-2, **opts)
    fake = jnp.matmul(x, wh, precision="highest") + b
    # the same K products (dequantized weights are exact: code × scale) summed per group then across groups
    # on one side, in one sum on the other, plus scale and bias: the float32 summation bound of K + 3 terms
    abs_sum = np.abs(np.asarray(x, np.float64)) @ np.abs(np.asarray(wh, np.float64)) + np.abs(np.asarray(b, np.float64))
    assert_within_reordering_bound(got, fake, abs_sum, x.shape[1] + 3)


@pytest.mark.parametrize("bits,group,split", [(8, 1152, 1), (4, 1152, 1), (4, 128, 1), (4, 128, 3), (8, 1152, 9)])
def test_gpu_kernel_lowers_to_mosaic_gpu(bits, group, split):
    m, k, n = 256, 1152, 3456
    shapes = [((m, k), jnp.bfloat16), ((n, k if bits == 8 else k // 2), jnp.int8), ((n, k // group), jnp.float32),
              ((n,), jnp.float32)]
    args = [jax.ShapeDtypeStruct(s, d) for s, d in shapes]
    cfg = Config(64, 64, 128, 4, split_k=split)
    f = jax.jit(functools.partial(weight_only_matmul_gpu, bits=bits, group_size=group, config=cfg))
    assert "mosaic_gpu" in f.trace(*args).lower(lowering_platforms=("cuda",)).as_text()


# the default tiles, and tile configs of the benchmark's weight-only sweep (benchmarks/kernels.py
# --weight-only-tiles): tile_m 128 / 256 (fewer CTAs along M dequantizing the same weight tile) and tile_n 64
@pytest.mark.parametrize("bits,group,tm,tn,stages,split", [(8, 256, 64, 128, 2, 1), (4, 128, 64, 128, 2, 1),
                                                           (4, 128, 128, 64, 2, 1), (8, 256, 256, 64, 2, 1),
                                                           (4, 128, 128, 128, 2, 1),
                                                           (8, 256, 64, 64, 2, 2), (4, 128, 64, 64, 2, 2)])  # split-K
def test_gpu_kernel_interpret(bits, group, tm, tn, stages, split):
    m, k, n = 256, 256, 128
    k1, k2, k3, k4 = jax.random.split(jax.random.key(3), 4)
    x = jax.random.normal(k1, (m, k)).astype(jnp.bfloat16)
    qmax = 127 if bits == 8 else 7
    codes = jax.random.randint(k2, (n, k), -qmax, qmax + 1).astype(jnp.int8)
    packed = codes if bits == 8 else ref.pack_int4(codes)
    scale = jax.random.uniform(k3, (n, k // group), jnp.float32, 0.01, 0.02)
    b = jax.random.normal(k4, (n,))
    cfg = Config(tm, tn, 128, stages, split_k=split)
    got = weight_only_matmul_gpu(x, packed, scale, b, bits, group, jnp.float32, cfg, interpret=True)
    want = ref.weight_only_matmul(x, packed, scale, b, bits, group, jnp.float32)
    # bf16 x and integer codes multiply exactly; only the f32 summation order differs
    rel = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
    assert rel < 1e-5, rel


@pytest.mark.parametrize("tm,tn,stages", [(64, 64, 4), (128, 64, 4), (256, 64, 2), (64, 128, 4), (128, 128, 3)])
@pytest.mark.parametrize("bits", [8, 4])
def test_sweep_tiles_lower_to_mosaic_gpu(bits, tm, tn, stages):
    cfg = Config(tm, tn, 128, stages)
    assert cfg.smem_bytes(bits) <= 220 * 1024  # the budget the benchmark picks stages by
    m, k, n, group = 256, 4608, 1152, 128 if bits == 4 else 4608
    shapes = [((m, k), jnp.bfloat16), ((n, k if bits == 8 else k // 2), jnp.int8), ((n, k // group), jnp.float32),
              ((n,), jnp.float32)]
    args = [jax.ShapeDtypeStruct(s, d) for s, d in shapes]
    f = jax.jit(functools.partial(weight_only_matmul_gpu, bits=bits, group_size=group, config=cfg))
    assert "mosaic_gpu" in f.trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("bits,group,split", [(8, 1152, 1), (4, 128, 1), (8, 128, 3), (4, 1152, 1)])
def test_register_a_kernel_lowers_to_mosaic_gpu(bits, group, split):
    """kind="rega" (dequantized weight as WGMMA's register A operand, warpgroup semantics) lowers."""
    m, k, n = 256, 1152, 3456
    shapes = [((m, k), jnp.bfloat16), ((n, k if bits == 8 else k // 2), jnp.int8), ((n, k // group), jnp.float32),
              ((n,), jnp.float32)]
    args = [jax.ShapeDtypeStruct(s, d) for s, d in shapes]
    cfg = Config(128, 64, 128, 4, split_k=split, kind="rega")
    f = jax.jit(functools.partial(weight_only_matmul_gpu, bits=bits, group_size=group, config=cfg))
    assert "mosaic_gpu" in f.trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("bits,group,tm,split", [(8, 256, 64, 1), (4, 256, 128, 1), (4, 128, 64, 2), (8, 128, 128, 1)])
def test_register_a_kernel_interpret(bits, group, tm, split):
    """kind="rega" computes yᵀ = Ŵ·xᵀ: per channel it equals the float32 reference up to summation order;
    with groups it equals x · bf16(code · scale)ᵀ (the bf16 weight a bf16 fake-quant model uses).
    (Interpreting, A goes through shared memory: the GPU interpreter's wgmma reads no register A.)"""
    m, k, n = 128, 256, 128
    k1, k2, k3, k4 = jax.random.split(jax.random.key(7), 4)
    x = jax.random.normal(k1, (m, k)).astype(jnp.bfloat16)
    qmax = 127 if bits == 8 else 7
    codes = jax.random.randint(k2, (n, k), -qmax, qmax + 1).astype(jnp.int8)
    packed = codes if bits == 8 else ref.pack_int4(codes)
    scale = jax.random.uniform(k3, (n, k // group), jnp.float32, 0.01, 0.02)
    b = jax.random.normal(k4, (n,))
    cfg = Config(tm, 64, 128, 2, split_k=split, kind="rega")
    got = weight_only_matmul_gpu(x, packed, scale, b, bits, group, jnp.float32, cfg, interpret=True)
    want = ref.weight_only_matmul(x, packed, scale, b, bits, group, jnp.float32)
    if group < k:
        w_bf = ref.dequantize(packed, scale, bits, group).astype(jnp.bfloat16).astype(jnp.float32)
        want_bf = jnp.matmul(x.astype(jnp.float32), w_bf.T, precision=jax.lax.Precision.HIGHEST) + b
        assert float(jnp.linalg.norm(want_bf - want) / jnp.linalg.norm(want)) > 1e-4  # the bf16 weight differs...
        want = want_bf  # ...and is what the kernel multiplies by
    rel = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
    assert rel < 1e-5, rel
    with pytest.raises(ValueError, match="rega: tile_n a multiple of 64"):
        weight_only_matmul_gpu(x, packed, scale, b, bits, group, jnp.float32, Config(tm, 32, 128, 2, kind="rega"),
                               interpret=True)


def test_config_smem_and_registers():
    assert Config(64, 128, 128, 4).smem_bytes(8) == 4 * (64 * 128 * 2 + 128 * 128) + 128 * 128 * 2 + 64 * 128 * 2
    assert Config(64, 128, 128, 4).smem_bytes(4) == 4 * (64 * 128 * 2 + 128 * 64) + 128 * 128 * 2 + 64 * 128 * 2
    assert Config(128, 128).acc_registers(grouped=False) == 128
    assert Config(128, 128).acc_registers(grouped=True) == 256


def test_tuned_weight_only_configs_fit_the_device():
    """Every tuned weight-only row is a valid config: tiles fit DiT-XL/2 shapes, buffers fit shared memory."""
    from jdq.kernels import tuning
    from jdq.kernels.weight_only.gpu import Config

    hopper_smem = 232448  # bytes per block on H100/H200 (the Mosaic GPU limit in the device logs)
    for device, rows in tuning.WEIGHT_ONLY.items():
        for row in rows:
            cfg = Config(**row[-1])
            for bits in (4, 8):
                assert cfg.smem_bytes(bits) <= hopper_smem, (device, row, bits)
                for n, k in ((3456, 1152), (1152, 4608), (4608, 1152), (1152, 1152)):  # qkv, fc2, fc1, proj
                    assert cfg.supports(n, k, 128, bits), (device, row, n, k)
    assert tuning.lookup("weight_only", 256, "NVIDIA H200", n=4608, k=1152)["tile_m"] == 256  # fc1
    assert tuning.lookup("weight_only", 256, "NVIDIA H200", n=3456, k=1152)["tile_m"] == 128  # qkv
    assert tuning.lookup("weight_only", 256, "NVIDIA H200", n=1152, k=4608)["split_k"] == 3  # fc2: split K
    assert tuning.lookup("weight_only", 256, "NVIDIA H200", n=1152, k=1152)["split_k"] == 3  # proj
    # the register-A kernel where the run-13 sweep found it faster (fc1 / fc2 at M = 256, every layer at 1024)
    kinds = {(m, n, k): tuning.lookup("weight_only", m, "NVIDIA H200", n=n, k=k).get("kind", "smem")
             for m in (256, 1024) for n, k in ((3456, 1152), (1152, 4608), (4608, 1152), (1152, 1152))}
    assert [key for key, kind in kinds.items() if kind == "smem"] == [(256, 3456, 1152), (256, 1152, 1152)]
    assert tuning.lookup("weight_only", 1024, "NVIDIA H200", n=1152, k=4608)["split_k"] == 3
    assert tuning.lookup("weight_only", 256, "NVIDIA H200")["split_k"] == 3  # N, K unknown: the condition-free row
    assert tuning.lookup("weight_only", 1024, "NVIDIA H200")["tile_m"] == 256
    assert tuning.lookup("weight_only", 8192, "NVIDIA H200") == tuning.lookup("weight_only", 8192, "unknown GPU")


def test_int4_to_bf16_bit_trick_is_exact_for_every_nibble():
    from jdq.kernels.weight_only.gpu import _int4_to_bf16

    nibbles = jnp.arange(16, dtype=jnp.int16)
    want = np.where(np.arange(16) < 8, np.arange(16), np.arange(16) - 16)  # two's complement int4
    got = _int4_to_bf16(nibbles)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32), want)


def test_lowered_dispatch_drops_a_split_that_does_not_divide_k(monkeypatch):
    """A tuned split-K that does not divide a GEMM's K steps runs the kernel unsplit (not the XLA fallback)."""
    import types

    from jdq.kernels.weight_only import api
    from jdq.kernels.weight_only import gpu

    m, k, n = 64, 256, 128  # 2 K steps: a split of 3 does not fit
    k1, k2, k3 = jax.random.split(jax.random.key(5), 3)
    x = jax.random.normal(k1, (m, k)).astype(jnp.bfloat16)
    codes = jax.random.randint(k2, (n, k), -7, 8).astype(jnp.int8)
    scale = jax.random.uniform(k3, (n, k // 128), jnp.float32, 0.01, 0.02)
    lw = types.SimpleNamespace(kind="w4a16", n=n, k=k, group_size=128, codes=ref.pack_int4(codes), scale=scale)
    cfg = Config(64, 64, 128, 2, split_k=3)
    assert not cfg.supports(n, k, 128, 4)
    used = []
    kernel = gpu.weight_only_matmul_gpu

    def spy(*args, **kwargs):
        used.append(args[7] if len(args) > 7 else kwargs["config"])
        return kernel(*args, **kwargs)

    monkeypatch.setattr(gpu, "weight_only_matmul_gpu", spy)
    got = api.weight_only_matmul(x, lw, None, jnp.float32, impl="gpu_interpret", config=cfg)
    assert [c.split_k for c in used] == [1]
    want = ref.weight_only_matmul(x, lw.codes, scale, None, 4, 128, jnp.float32)
    assert float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)) < 1e-5
