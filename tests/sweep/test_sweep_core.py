"""jdq.sweep core: grids, structure grouping, and the vmapped sampler against one jitted call per point."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdq
from jdq import sweep as S
from jdq.models import dit

EMBEDDED = Path(jdq.__file__).resolve().parent / "assets" / "animal_dit"


def tiny_spec(steps=1, guidance=4.0):
    cfg = dit.Config(input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=3)
    model = dit.from_config(cfg, key=1)
    return S.class_spec(model, np.array([0, 2]), steps=steps, guidance=guidance)


def test_parse_vary_and_grid():
    vary = S.parse_vary(["linear_ratio=0,0.1", "attn_ratio=0.2,0.3,0.4"])
    assert vary == {"linear_ratio": [0.0, 0.1], "attn_ratio": [0.2, 0.3, 0.4]}
    pts = S.grid(vary)
    assert len(pts) == 6 and pts[0] == {"linear_ratio": 0.0, "attn_ratio": 0.2} and pts[1]["attn_ratio"] == 0.3


@pytest.mark.parametrize("spec, message", [
    ("bits=4,8", "unknown setting 'bits'"),
    ("ratio=0.1,2", "value '2' must lie in [0, 1]"),
    ("ratio=0.1,0.1", "given twice"),
    ("recipe=mx6,nope", "unknown recipe"),
    ("ratio", "expected KEY=V1,V2"),
])
def test_parse_vary_errors(spec, message):
    with pytest.raises(S.SweepError, match=message.replace("[", r"\[").replace("]", r"\]")):
        S.parse_vary([spec])


def test_structure_grouping_and_inapplicable_setting():
    spec = tiny_spec()
    ops = S.spec_operands(spec)
    groups = S.build_groups(S.grid({"recipe": ["mixdit"], "linear_ratio": [0.0, 0.1], "attn_ratio": [0.2, 0.5]}), ops)
    rep = S.structure_report(groups)
    assert rep["compilations"] == 1 and rep["vmapped"] == ["linear_ratio", "attn_ratio"] and rep["structural"] == []
    ratios = np.asarray(groups[0].states["blocks.0.attn.qkv:act"]["ratio"])
    np.testing.assert_array_equal(ratios, np.float32([0.0, 0.0, 0.1, 0.1]))
    attn = np.asarray(groups[0].states["blocks.0.attn.qk:q"]["ratio"])
    np.testing.assert_array_equal(attn, np.float32([0.2, 0.5, 0.2, 0.5]))
    groups = S.build_groups(S.grid({"recipe": ["mx6", "mx9", "w8a8"]}), ops)
    rep = S.structure_report(groups)
    assert rep["compilations"] == 3 and rep["structural"] == ["recipe"] and rep["vmapped"] == []
    with pytest.raises(S.SweepError, match="changes nothing in recipe 'w8a8'"):
        S.build_groups([{"ratio": 0.1}], ops, recipe="w8a8")


def test_chunk_size():
    assert S.chunk_size(64, per_point=10, budget=95) == 9
    assert S.chunk_size(64, per_point=10, budget=10_000) == 64
    assert S.chunk_size(64, per_point=10, budget=5) == 1  # at least one point per call
    assert S.chunk_size(64, per_point=10, budget=35, devices=2) == 6  # a multiple of the device count


def _bounds_one_step(a, b):
    # One sampler step: the model sees the same x_T in both runs; only the DDPM update (a handful of
    # float32 multiply-adds on the same model output, fused differently under vmap) may differ: each
    # rounds to 0.5 ulp, so 8 ulp of the largest magnitude bounds the difference.
    return 8 * np.finfo(np.float32).eps * max(np.max(np.abs(a)), np.max(np.abs(b)), 1.0)


def _check_vmapped(spec, points, recipe, chunk, multi_step):
    ops = S.spec_operands(spec)
    (group,) = S.build_groups(points, ops, recipe=recipe)
    got = S.run_group(spec, group, chunk=chunk)
    want = S.run_loop(spec, group)
    for i, (a, b) in enumerate(zip(got, want)):
        if not multi_step:
            assert np.max(np.abs(a - b)) <= _bounds_one_step(a, b), i
        # over several steps a rounding-level difference may flip a quantization rounding and
        # grow, so no element bound holds; what must hold is that point i is point i: its samples
        # are nearer the per-point run of its own setting than to that of any other setting
        dist = [np.mean(np.abs(a - w)) for w in want]
        assert int(np.argmin(dist)) == i, dist
    return got, want


def test_vmapped_equals_per_point_tiny():
    spec = tiny_spec(steps=1)
    _check_vmapped(spec, S.grid({"ratio": [0.0, 0.25, 0.5]}), "mixdit", chunk=2, multi_step=False)


@pytest.mark.slow
def test_vmapped_equals_per_point_embedded():
    model, _ = jdq.models.load(EMBEDDED)
    labels = np.array([0, 3, 6, 9])
    spec1 = S.class_spec(model, labels, steps=1, guidance=4.0, defaults={"clip_denoised": True})
    _check_vmapped(spec1, S.grid({"ratio": [0.0, 0.3]}), "mixdit", chunk=2, multi_step=False)
    spec3 = S.class_spec(model, labels, steps=3, guidance=4.0, defaults={"clip_denoised": True})
    _check_vmapped(spec3, S.grid({"ratio": [0.0, 0.1, 0.5]}), "mixdit", chunk=2, multi_step=True)


_TWO_DEVICES = r"""
import numpy as np, jax
from jdq import sharding, sweep as S
from jdq.models import dit
assert jax.local_device_count() == 2
cfg = dit.Config(input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=3)
spec = S.class_spec(dit.from_config(cfg, key=1), np.array([0, 2]), steps=1, guidance=4.0)
(g,) = S.build_groups(S.grid({"ratio": [0.0, 0.25, 0.5]}), S.spec_operands(spec), recipe="mixdit")
got = S.run_group(spec, g, chunk=S.chunk_size(len(g), 1, budget=10, devices=2), mesh=sharding.batch_mesh())
want = S.run_loop(spec, g)
tol = 8 * np.finfo(np.float32).eps * max(1.0, max(np.max(np.abs(w)) for w in want))
print(max(float(np.max(np.abs(a - b))) for a, b in zip(got, want)) <= tol)
"""


@pytest.mark.slow
def test_points_split_over_two_devices():
    import os
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", _TWO_DEVICES], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "True"
