"""benchmarks/kernels.py on a CPU: the new variants compute what they claim (Pallas GPU interpret mode),
the roofline arithmetic, the tile-sweep options, and a tiny end-to-end smoke run (checks in child
processes with crash recovery, timing, json / markdown / summary)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "benchmarks", "kernels.py")


@pytest.fixture(scope="module")
def kb(load_benchmark):
    return load_benchmark("kernels")


@pytest.fixture(scope="module")
def sets(kb):
    return kb.base_sets(jax.random.key(0), 128, 256, 128, 1)


def _run(kb, name, sets, impl="gpu_interpret", cache=None):
    fn, ss = kb.variant(name, sets, impl, cache)
    return jax.jit(fn)(*ss[0]), fn, ss


def _rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.slow
def test_mixdit_gemm_and_split_compose_to_the_linear(kb, sets):
    cache = {}
    linear, _, _ = _run(kb, "jdq_mixdit", sets, cache=cache)
    gemm, _, gemm_args = _run(kb, "jdq_mixdit_gemm", sets, cache=cache)
    split, _, _ = _run(kb, "xla_mixdit_split", sets, cache=cache)
    # the GEMM alone gets exactly the operands the linear's split makes: same kernel, same output
    np.testing.assert_array_equal(np.asarray(gemm, np.float32), np.asarray(linear, np.float32))
    for got, want in zip(split, gemm_args[0][:3]):
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    ref, _, _ = _run(kb, "jdq_mixdit", sets, impl="xla", cache=cache)
    assert _rel(linear, ref) < 1e-2
    assert gemm_args[0][0].shape[1] == 64 and kb.mixdit_k_hi(256) == 16  # 16 outlier channels, padded to a 64-tile


def test_w4a8_channel_variant_is_per_channel(kb, sets):
    cache = {}
    got, _, args = _run(kb, "jdq_w4a8_channel", sets, cache=cache)
    lw = args[0][1]
    assert lw.kind == "w4a8" and lw.group_size is None and lw.scale.shape == (128, 1)
    want, _, _ = _run(kb, "jdq_w4a8_channel", sets, impl="xla", cache=cache)
    assert _rel(got, want) < 1e-2
    g64, _, args64 = _run(kb, "jdq_w4a8", sets, cache=cache)
    assert args64[0][1].group_size == 64 and _rel(g64, want) > 0  # a different quantization of the same weight


def test_weight_only_sweep_variant_uses_its_tiles(kb, sets):
    name = "jdq_w4a16@128x64s2"
    base, bits, group, cfg = kb.sweep_parts(name)
    assert (base, bits, group, cfg.tile_m, cfg.tile_n, cfg.stages) == ("jdq_w4a16", 4, 128, 128, 64, 2)
    got, _, _ = _run(kb, name, sets)
    want, _, _ = _run(kb, "jdq_w4a16", sets, impl="xla")
    assert _rel(got, want) < 1e-2
    got_r, _, _ = _run(kb, "jdq_w4a16@128x64s2r", sets)  # the register-A kernel (interpret: A via shared memory)
    assert kb.sweep_parts("jdq_w4a16@128x64s2r")[3].kind == "rega" and _rel(got_r, want) < 1e-2


def test_sweep_options(kb):
    assert kb.parse_tiles("64x128, 128x64s3,256") == [(64, 128, None, 1, "smem"), (128, 64, 3, 1, "smem"),
                                                       (256, 128, None, 1, "smem")]
    assert kb.parse_tiles("256x64s2k3,64x64k4") == [(256, 64, 2, 3, "smem"), (64, 64, None, 4, "smem")]  # split-K
    assert kb.parse_tiles("256x64s2k3r") == [(256, 64, 2, 3, "rega")]  # register-A kernel
    assert kb.sweep_parts(kb.sweep_names("256x64s2k3r")[1])[3].kind == "rega"
    assert kb.sweep_names("256x64s2k3") == ["jdq_w8a16@256x64s2k3", "jdq_w4a16@256x64s2k3"]
    assert kb.sweep_parts("jdq_w4a16@256x64s2k3")[3].split_k == 3
    assert "tile_k" in kb.sweep_invalid("jdq_w4a16@256x64s2k5", 256, 4608, 1152)  # 4608 / 128 steps do not split in 5
    with pytest.raises(SystemExit, match="cannot parse 'axb'"):
        kb.parse_tiles("axb")
    # stages: the most (<= 4) that fit the shared-memory budget, per weight width
    assert kb.sweep_names("128x128,256x64") == ["jdq_w8a16@128x128s3", "jdq_w4a16@128x128s3",
                                                "jdq_w8a16@256x64s2", "jdq_w4a16@256x64s2"]
    assert kb.sweep_invalid("jdq_w4a16@256x64s2", 256, 4608, 1152) is None
    assert "tile_m=256" in kb.sweep_invalid("jdq_w4a16@256x64s2", 128, 256, 128)
    assert "tile_n=128" in kb.sweep_invalid("jdq_w8a16@64x128s4", 256, 1152, 1088)
    assert "shared memory" in kb.sweep_invalid("jdq_w8a16@128x128s4", 256, 1152, 1152)
    assert kb.kernel_of("jdq_w4a16@64x128s4") == ("weight_only.jdq_w4a16@64x128s4",)


def test_roofline_arithmetic(kb):
    peaks = kb.PEAKS["NVIDIA H200"]
    m, k, n = 256, 4608, 1152
    x = jnp.zeros((m, k), jnp.bfloat16)
    w = jnp.zeros((k, n), jnp.bfloat16)
    f = kb.roofline("xla_bf16", lambda a, b: jnp.dot(a, b), [(x, w)], m, k, n, 4000.0, peaks)
    nbytes = 2 * (m * k + k * n + m * n)
    assert f["bytes"] == nbytes and f["ops"] == 2 * m * n * k
    assert f["mem_ms"] == pytest.approx(nbytes / 4e12 * 1e3)
    assert f["compute_ms"] == pytest.approx(2 * m * n * k / 989e12 * 1e3)
    assert f["bound"] == "memory" and f["floor_ms"] == f["mem_ms"] and f["l2_resident"]
    # MixDiT: the outlier channels at the bf16 peak, the rest at the fp8 peak; a split has no GEMM
    mf = kb.roofline("jdq_mixdit_gemm", lambda a, b: jnp.dot(a, b), [(x, w)], 8192, k, n, 4000.0, peaks)
    k_hi = kb.mixdit_k_hi(k)
    assert k_hi == 224
    assert mf["compute_ms"] == pytest.approx((2 * 8192 * n * k_hi / 989e12 + 2 * 8192 * n * (k - k_hi) / 1979e12) * 1e3)
    sf = kb.roofline("jdq_w4a16@64x128s4", lambda a, b: jnp.dot(a, b), [(x, w)], m, k, n, 4000.0, peaks)
    assert sf["peak"] == "bf16"
    qf = kb.roofline("xla_mixdit_split", lambda a: a * 2, [(x,)], m, k, n, 4000.0, peaks)
    assert qf["ops"] == 0 and qf["bound"] == "memory" and qf["bytes"] == 4 * m * k


@pytest.mark.slow
def test_smoke_run_with_sweep_and_a_crashing_check(tmp_path):
    out = str(tmp_path)
    env = dict(os.environ, JDQ_BENCH_CRASH="weight_only.jdq_w4a16@64x128s4")
    cmd = [sys.executable, SCRIPT, "--out", out, "--variants", "xla_bf16,jdq_mixdit_gemm,jdq_w4a8_channel,jdq_w4a16",
           "--weight-only-tiles", "64x128,128x64s2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    res = json.load(open(os.path.join(out, "kernels.json")))
    checks = res["checks"]
    # only the checks of the chosen variants ran; the crash is recorded and the checks after it resumed
    assert set(checks) == {"token_quant.int8.bf16", "w4a8.channel", "mixdit.k_hi64",
                           "weight_only.jdq_w4a16@64x128s4", "weight_only.jdq_w4a16@128x64s2"}
    assert not checks["weight_only.jdq_w4a16@64x128s4"]["ok"] and "child process ended" in checks[
        "weight_only.jdq_w4a16@64x128s4"]["error"]
    assert all(checks[c]["ok"] for c in checks if "64x128" not in c)
    row = res["rows"]["tiny"]
    timed = {c for c, v in row.items() if isinstance(v, float)}
    assert timed == {"xla_bf16", "jdq_mixdit_gemm", "jdq_w4a8_channel", "jdq_w4a16@128x64s2"}
    assert res["copy_gbs"] > 0
    for c in timed:
        f = row["roof"][c]
        assert f["floor_ms"] > 0 and f["bytes"] > 0
    md = open(os.path.join(out, "kernels.md")).read()
    assert "## Roofline" in md and "## Weight-only tile sweep" in md and "| tiny | jdq W4A16 (g128) | 128×64, 2 | 2 |" in md
    summ = subprocess.run([sys.executable, SCRIPT, "--summarize", out], capture_output=True, text=True, timeout=120)
    assert "% of roofline" in summ.stdout and "w4a16  best 128x64s2" in summ.stdout, summ.stdout


def test_device_plan_of_the_issue5_command(kb):
    """The phases and checks of the device command in the report (order = priority under the budget)."""
    chosen = ("xla_bf16,jdq_w8a8,jdq_w8a8_gemm,jdq_mixdit,jdq_mixdit_gemm,xla_mixdit_split,jdq_w4a8,jdq_w4a8_channel,"
              "jdq_w8a16,jdq_w4a16").split(",")
    sweep = kb.sweep_names("64x64,128x64,256x64,64x128,128x128")
    phases = [(n, b) for n, b in kb.plan_phases("32,1,4", True, kb.variant_filter(chosen, sweep)) if n and b]
    assert phases[0] == (("xla_bf16", "jdq_w8a8", "jdq_w8a8_gemm"), [32])
    assert phases[1] == (("jdq_mixdit", "jdq_mixdit_gemm", "xla_mixdit_split", "jdq_w4a8", "jdq_w4a8_channel"), [32])
    assert phases[2] == (("xla_bf16",) + tuple(sw for sw in sweep if sw.startswith("jdq_w8a16"))
                         + tuple(sw for sw in sweep if sw.startswith("jdq_w4a16")), [1, 4])
    assert len(phases[2][0]) == 11 and "jdq_w4a16@256x64s2" in phases[2][0] and "jdq_w8a16@128x128s3" in phases[2][0]
    checks = {c for names, _ in phases for nm in names for c in kb.kernel_of(nm)}
    assert {"token_quant.int8.bf16", "w8a8.int8.ws", "w4a8.g64", "w4a8.channel", "mixdit.k_hi64", "mixdit.split"} < checks
    assert len(checks) == 6 + 10
    names = {nm for nm, _ in kb.check_list(False, "64x64,128x64,256x64,64x128,128x128")}
    assert checks <= names  # every needed check exists, and the device check shape fits every sweep config:
    assert all(kb.sweep_invalid(sw, 1024, 1152, 1536) is None for sw in sweep)
    for m in (256, 1024):  # ... and every timed shape (b1, b4; qkv, fc2)
        assert all(kb.sweep_invalid(sw, m, k, n) is None for sw in sweep for k, n in ((1152, 3456), (4608, 1152)))
    assert [s for s in kb.shapes_for(32, ["qkv", "fc2"])] == [("dit.b32.qkv", 8192, 1152, 3456), ("dit.b32.fc2", 8192, 4608, 1152)]


def test_e2e_profile_categories_and_table(load_benchmark):
    """benchmarks/e2e.py --profile: kernel names fall in the right category; the table sums them."""
    e2e = load_benchmark("e2e")
    cat = e2e.kernel_category
    assert cat("nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NNT") == cat("sm90_xmma_gemm_bf16bf16") == "GEMM (cuBLAS / XLA dot)"
    assert cat("cudnn_generated_fort_native_sdpa_sm90_flash_fprop") == "attention (cuDNN)"
    assert cat("mosaic_gpu_kernel_w8a8_matmul_gpu") == "Pallas (jdq kernels)"
    assert cat("loop_multiply_fusion_3") == "other (XLA fusions, copies)"
    res = {"jax": "x", "device": "d", "batch": 1, "model_evals": 2, "compile_s": {"bf16": 3.25},
           "profile": {"bf16": {"kernels": [["nvjet_a", 4.0, 2.0], ["fusion_1", 8.0, 0.5]],
                                "categories": {"GEMM (cuBLAS / XLA dot)": 2.0, "other (XLA fusions, copies)": 0.5}}}}
    md = e2e.render_markdown(res)
    assert "| bf16 | 2.00 | 0.50 | 2.50 |" in md and "bf16 3.2" in md and "4 calls: `nvjet_a`" in md
