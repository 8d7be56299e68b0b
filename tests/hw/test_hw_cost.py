"""The latency/energy model: hand-computed cases, presets against datasheet numbers, jit × vmap."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdq.hw as H
from jdq.hw import presets
from jdq.hw.workload import Gemm, OperandFormat, pack

F16 = OperandFormat("fp16")


def _accel(**overrides):
    """A plain rate-1 array with no memory or conversion limits (pure compute)."""
    kw = dict(rows=8, cols=8, dataflow="os", clock_hz=1e9, pe_rate={(a, b): 1.0 for a in H.PE_FORMATS for b in H.PE_FORMATS},
              mac_pj={(a, b): 1.0 for a in H.PE_FORMATS for b in H.PE_FORMATS},
              buf_a_bytes=1e12, buf_b_bytes=1e12, buf_out_bytes=1e12, dram_bytes_per_s=1e30,
              dram_pj_per_byte=0.0, sram_pj_per_byte=0.0, conv_elems_per_cycle=1e9, conv_pj_per_elem=0.0)
    kw.update(overrides)
    return H.accelerator(**kw)


def test_gpu_roofline_compute_and_memory_bound():
    hw = presets.h100()
    big = pack([Gemm("g", 4096, 4096, 4096, 1, OperandFormat("bf16"), OperandFormat("bf16"))])
    c = H.evaluate(hw, big)
    # Compute bound: 2·M·N·K FLOPs at the datasheet's 989.4 dense BF16 TFLOPS.
    assert float(c.seconds[0]) == pytest.approx(2 * 4096**3 / 989.4e12, rel=1e-5)
    assert not bool(c.memory_bound[0])
    thin = pack([Gemm("v", 1, 8192, 8192, 1, OperandFormat("bf16"), OperandFormat("bf16"))])
    c = H.evaluate(hw, thin)
    # Memory bound: (1·8192 + 8192·8192 + 1·8192)·2 bytes at 3.35 TB/s.
    assert float(c.seconds[0]) == pytest.approx((8192 + 8192 * 8192 + 8192) * 2 / 3.35e12, rel=1e-5)
    assert bool(c.memory_bound[0])
    # INT8 runs at twice the BF16 rate on Hopper; MX6 (no native support) at the BF16 rate.
    int8 = pack([Gemm("i", 4096, 4096, 4096, 1, OperandFormat("int8"), OperandFormat("int8"))])
    assert float(H.latency(hw, int8)) == pytest.approx(2 * 4096**3 / 1979e12, rel=1e-5)
    mx6 = pack([Gemm("x", 4096, 4096, 4096, 1, OperandFormat("mx6"), OperandFormat("mx6"))])
    assert float(H.latency(hw, mx6)) == pytest.approx(2 * 4096**3 / 989.4e12, rel=1e-5)


@pytest.mark.parametrize("name,bf16_tflops,bw", [
    ("rtx3090", 71.0, 936e9), ("a100", 312.0, 2039e9), ("h100", 989.4, 3350e9), ("h200", 989.4, 4800e9)])
def test_gpu_presets_datasheet_numbers(name, bf16_tflops, bw):
    hw = presets.get(name)
    i = H.PE_FORMATS.index("bf16")
    assert float(hw.peak_macs_per_s[i, i]) * 2 == pytest.approx(bf16_tflops * 1e12, rel=1e-6)
    assert float(hw.dram_bytes_per_s) == pytest.approx(bw)


def test_preset_lookup_errors_and_device_kinds():
    with pytest.raises(KeyError, match="unknown hardware preset 'tpu9'"):
        presets.get("tpu9")
    assert presets.for_device_kind("NVIDIA H100 80GB HBM3") == "h100"
    assert presets.for_device_kind("NVIDIA H100 PCIe") == "h100_pcie"
    assert presets.for_device_kind("NVIDIA H200") == "h200"


def test_accelerator_compute_is_gemm_cycles_at_rate_one():
    hw = _accel(dataflow="ws")
    wl = pack([Gemm("g", 40, 24, 30, 3, F16, F16)])
    c = H.evaluate(hw, wl)
    assert float(c.compute_s[0]) == pytest.approx(3 * float(H.gemm_cycles(40, 24, 30, 8, 8, "ws")) / 1e9)
    assert float(c.seconds[0]) == float(c.compute_s[0])
    assert float(c.macs[0]) == 3 * 40 * 24 * 30


def test_precision_flexible_pe_shrinks_k():
    rate = {(a, b): 1.0 for a in H.PE_FORMATS for b in H.PE_FORMATS}
    rate.update({("mx6", "mx6"): 4.0, ("mx9", "mx6"): 2.0, ("mx6", "mx9"): 2.0, ("mx9", "mx9"): 1.0})
    hw = _accel(pe_rate=rate)
    lo = pack([Gemm("lo", 64, 64, 256, 1, OperandFormat("mx6"), OperandFormat("mx6"))])
    assert float(H.evaluate(hw, lo).compute_s[0]) * 1e9 == pytest.approx(float(H.gemm_cycles(64, 64, 256 // 4, 8, 8, "os")), rel=1e-6)
    # A fraction r of K in MX9 (left operand only): K_eff = K·((1-r)/4 + r/2).
    r = 0.25
    mixed = pack([Gemm("mix", 64, 64, 256, 1, OperandFormat("mx6", "mx9", r), OperandFormat("mx6"))])
    k_eff = math.ceil(256 * ((1 - r) / 4 + r / 2))
    assert float(H.evaluate(hw, mixed).compute_s[0]) * 1e9 == pytest.approx(float(H.gemm_cycles(64, 64, k_eff, 8, 8, "os")), rel=1e-6)
    # Both operands mixed: the four pairs weigh (1-ra)(1-rb), ra(1-rb), (1-ra)rb, ra·rb.
    both = pack([Gemm("b", 64, 64, 256, 1, OperandFormat("mx6", "mx9", 0.5), OperandFormat("mx6", "mx9", 0.5))])
    k_eff = math.ceil(256 * (0.25 / 4 + 0.5 / 2 + 0.25 / 1))
    assert float(H.evaluate(hw, both).compute_s[0]) * 1e9 == pytest.approx(float(H.gemm_cycles(64, 64, k_eff, 8, 8, "os")), rel=1e-6)


def test_unsupported_pair_is_infinite():
    rate = {(a, b): 1.0 for a in H.PE_FORMATS for b in H.PE_FORMATS}
    rate[("fp32", "fp32")] = 0.0
    hw = _accel(pe_rate=rate)
    wl = pack([Gemm("a", 8, 8, 8, 1, OperandFormat("fp32"), OperandFormat("fp32")),
               Gemm("b", 8, 8, 8, 1, F16, F16)])
    s = np.asarray(H.evaluate(hw, wl).seconds)
    assert np.isinf(s[0]) and np.isfinite(s[1])


def test_dram_traffic_reuse_and_fusion():
    # Both operands fit: each byte moves once. A: 128·64·2, B: 64·96·2, out: 128·96·2.
    wl = pack([Gemm("g", 128, 96, 64, 1, F16, F16)])
    once = (128 * 64 + 64 * 96 + 128 * 96) * 2
    assert float(H.evaluate(_accel(), wl).dram_bytes[0]) == once
    # Tiny buffers: A rows per block tm = floor(buf_a / (K·2)) = 4, B columns tn = 2; the better blocking wins.
    small = _accel(buf_a_bytes=4 * 64 * 2, buf_b_bytes=2 * 64 * 2)
    a, b, o = 128 * 64 * 2, 64 * 96 * 2, 128 * 96 * 2
    expect = min(a + b * math.ceil(128 / 4), b + a * math.ceil(96 / 2)) + o
    assert float(H.evaluate(small, wl).dram_bytes[0]) == expect
    # Fused attention: the probabilities (left operand of p·v) and scores (output of q·kᵀ) stay on chip.
    attn = pack([Gemm("qk", 256, 256, 64, 4, F16, F16, out_fused=True, kind="attn_qk"),
                 Gemm("pv", 256, 64, 256, 4, F16, F16, a_fused=True, kind="attn_pv")])
    d = np.asarray(H.evaluate(_accel(), attn).dram_bytes)
    assert d[0] == 4 * (256 * 64 + 64 * 256) * 2
    assert d[1] == 4 * (256 * 64 + 256 * 64) * 2
    unfused = np.asarray(H.evaluate(_accel(fuse_attention=0), attn).dram_bytes)
    assert unfused[0] == d[0] + 4 * 256 * 256 * 2 and unfused[1] == d[1] + 4 * 256 * 256 * 2


def test_memory_bound_and_conversion_overlap():
    wl = pack([Gemm("g", 64, 64, 64, 1, OperandFormat("mx6"), OperandFormat("mx6"), a_conv=True)])
    slow_dram = _accel(dram_bytes_per_s=1e6)
    c = H.evaluate(slow_dram, wl)
    assert float(c.seconds[0]) == float(c.memory_s[0]) > float(c.compute_s[0])
    # 64·64 converted elements at 1 element/cycle: 4096 cycles, hidden (overlap) or added (serial).
    conv = _accel(conv_elems_per_cycle=1.0)
    c = H.evaluate(conv, wl)
    assert float(c.conv_s[0]) == pytest.approx(4096e-9)
    assert float(c.seconds[0]) == pytest.approx(max(float(c.compute_s[0]), 4096e-9))
    serial = H.evaluate(H.replace(conv, conv_overlap=0), wl)
    assert float(serial.seconds[0]) == pytest.approx(float(serial.compute_s[0]) + 4096e-9)


def test_energy_components():
    hw = _accel(dram_pj_per_byte=10.0, sram_pj_per_byte=1.0, conv_pj_per_elem=2.0, static_w=3.0)
    wl = pack([Gemm("g", 16, 16, 16, 1, OperandFormat("mx6"), OperandFormat("mx6"), a_conv=True)])
    c = H.evaluate(hw, wl)
    assert float(c.mac_j[0]) == pytest.approx(16**3 * 1e-12)
    assert float(c.dram_j[0]) == pytest.approx(float(c.dram_bytes[0]) * 10e-12)
    assert float(c.conv_j[0]) == pytest.approx(16 * 16 * 2e-12)
    assert float(c.static_j[0]) == pytest.approx(float(c.seconds[0]) * 3.0)
    parts = c.mac_j + c.sram_j + c.dram_j + c.conv_j + c.static_j
    assert float(c.energy_j[0]) == pytest.approx(float(parts[0]))


def test_jit_vmap_over_designs_and_plans_equals_loops():
    gemms = [Gemm("a", 256, 1152, 1152, 1, None, None), Gemm("b", 256, 256, 72, 32, None, None, kind="attn_qk")]
    plans = [(OperandFormat("mx6", "mx9", r), OperandFormat("mx6")) for r in (0.0, 0.05, 0.2)]
    workloads = [pack([g._replace(a=a, b=b) for g in gemms]) for a, b in plans]
    base = presets.mixdit_like()
    designs = [H.replace(base, rows=r, cols=c, dataflow=df) for r, c, df in
               [(128, 128, "os"), (64, 256, "ws"), (32, 32, "is"), (256, 256, "best")]]
    table = jax.jit(jax.vmap(jax.vmap(H.latency, (None, 0)), (0, None)))(H.stack(designs), H.workload.stack(workloads))
    assert table.shape == (4, 3)
    for i, d in enumerate(designs):
        for j, w in enumerate(workloads):
            assert float(table[i, j]) == pytest.approx(float(H.latency(d, w)), rel=1e-6)
    # More MX9 outliers never make it faster.
    assert np.all(np.diff(np.asarray(table), axis=1) >= 0)


def test_mixdit_preset_rates():
    hw = presets.mixdit_like()
    idx = H.PE_FORMATS.index
    assert float(hw.pe_rate[idx("mx6"), idx("mx6")]) == 4.0
    assert float(hw.pe_rate[idx("mx9"), idx("mx6")]) == float(hw.pe_rate[idx("mx6"), idx("mx9")]) == 2.0
    assert float(hw.pe_rate[idx("mx9"), idx("mx9")]) == 1.0
    assert len(presets.MIXDIT_ASSUMPTIONS) >= 5


def test_bad_hardware_arguments():
    with pytest.raises(ValueError, match="rows must be > 0"):
        _accel(rows=0)
    with pytest.raises(ValueError, match="pe_rate must be"):
        _accel(pe_rate=jnp.ones((3, 3)))
    with pytest.raises(ValueError, match="has no field"):
        H.replace(presets.h100(), rows=3)
    with pytest.raises(TypeError, match="one kind"):
        H.stack([presets.h100(), presets.mixdit_like()])
    with pytest.raises(TypeError, match="Accelerator or jdq.hw.GPU"):
        H.evaluate("h100", pack([Gemm("g", 1, 1, 1, 1, F16, F16)]))
