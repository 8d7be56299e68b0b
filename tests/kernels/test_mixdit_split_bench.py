"""benchmarks/mixdit_split.py on a CPU: shapes, operands and the markdown table; the --tiny smoke run (slow)."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def ms(load_benchmark):
    return load_benchmark("mixdit_split")


def test_shapes_and_operands(ms):
    labels = [s[0] for s in ms.shapes("dit.b32,pixart")]
    assert labels[:4] == ["dit.b32.qkv", "dit.b32.proj", "dit.b32.fc1", "dit.b32.fc2"] and len(labels) == 8
    assert {(m, k, n) for _, m, k, n in ms.shapes("pixart")} >= {(4096, 4608, 1152), (4096, 1152, 3456)}
    assert ms.k_hi_of(1152) == 64 and ms.k_hi_of(4608) == 224
    with pytest.raises(SystemExit, match="not one of"):
        ms.shapes("dit.b7")
    lw, sets = ms.operands(128, 256, 128, 2)
    perm = np.asarray(lw.aux["perm"])
    k_hi = lw.get_meta("k_hi")
    assert sorted(perm.tolist()) == list(range(256)) and np.all(np.diff(perm[k_hi:]) > 0)  # rest ascending
    x = np.asarray(sets[0][0], np.float32)
    assert np.abs(x[:, perm[:k_hi]]).mean() > 5 * np.abs(x[:, perm[k_hi:]]).mean()  # the outliers come first
    assert len(sets) == 2 and sets[0][0].dtype == jnp.bfloat16


def test_render_reports_ratios_and_failures(ms):
    ok = {"ok": True, "mismatches": {"x_hi": 0, "x_lo": 0, "s_x": 0}}
    rows = [{"label": "a", "M": 8192, "K": 1152, "N": 3456, "split_check": ok, "floor_us": 7.0, "xla_split": 60.0,
             "kernel_split": 10.0, "linear_kernel_split": 80.0, "linear_xla_split": 130.0, "xla_bf16": 86.0,
             "linears_equal": True},
            {"label": "b", "M": 8192, "K": 4608, "N": 1152, "split_check": {"ok": False, "error": "MosaicError: x"},
             "xla_split": 300.0, "kernel_split": "skipped (split check failed)", "xla_bf16": 100.0}]
    md = ms.render({"meta": {"device": "d", "jax": "j", "copy_gbs": 4200.0, "iters": 1, "rotate": 1, "impl": "gpu"},
                    "rows": rows})
    assert "| a | 8192 | 1152→3456 | 60.0 | 10.0 | 6.00× | 70 % | 80.0 | 130.0 | 86.0 | 1.07× | 0.66× |" in md
    assert "split FAILED: MosaicError: x" in md and "b kernel_split: skipped" in md
    sweep = [{"key": "8192x1152@e48n", "M": 8192, "K": 1152, "config": "e48n", "rows": 4, "floor_us": 7.0, "us": 14.0}]
    md = ms.render({"meta": {"device": "d", "jax": "j", "copy_gbs": 4200.0, "iters": 1, "rotate": 1, "impl": "gpu"},
                    "rows": [], "sweep": sweep, "checks": {"8192x1152@e48n": {"ok": True}}})
    assert "| 8192×1152 | e48n | 4 | 14.0 | 50 % | bit-exact |" in md
    cfg = ms.parse_config("e48ncr4")
    assert (cfg.elems_per_thread, cfg.spread_banks, cfg.e4m3, cfg.max_rows) == (48, False, "cvt", 4)
    assert ms.parse_config("e80").e4m3 == "bits" and not ms.parse_config("e80").loop
    assert ms.parse_config("e160l").loop and ms.parse_config("e160l").elems_per_thread == 160
    assert ms.parse_config("e160lt").table_smem and not ms.parse_config("e160l").table_smem
    with pytest.raises(SystemExit, match="split-configs"):
        ms.parse_config("fast")


@pytest.mark.slow  # ~45 s: the interpreted split and GEMM kernels compile on the CPU
def test_tiny_smoke_run(tmp_path):
    out = str(tmp_path)
    env = dict(os.environ, PYTHONPATH=ROOT)
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "mixdit_split.py"), "--tiny", "--out", out],
                   check=True, env=env, timeout=600)
    res = json.load(open(os.path.join(out, "mixdit_split.json")))
    [row] = res["rows"]
    assert row["split_check"]["ok"] and row["linears_equal"] is True
    assert all(isinstance(row[v], float) for v in ("xla_split", "kernel_split", "linear_kernel_split", "xla_bf16"))
    assert "split bit-exact, linears equal" in open(os.path.join(out, "mixdit_split.md")).read()
