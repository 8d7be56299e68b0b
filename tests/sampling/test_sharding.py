"""Data-parallel sampling over 8 (emulated) CPU devices gives the images of one device.

Runs in a subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` so the rest of
the test session keeps its single CPU device.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(r"""
    import json
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_default_matmul_precision", "highest")
    from jdq import sharding
    from jdq.sampling import ddpm, dpm_solver_pp_2m, sample, sample_keys
    from jdq.sampling.generate import generate_classes
    from jdq.models import dit
    from tests.sampling import toy

    out = {"devices": len(jax.devices())}
    mesh = sharding.batch_mesh()
    params = toy.init()
    labels = jnp.arange(16, dtype=jnp.int32) % 3
    keys = sample_keys(5, 16)
    null = jnp.full((1,), 3, jnp.int32)
    for name, s in (("ddpm", ddpm(6)), ("dpm", dpm_solver_pp_2m(5))):
        one = sample(toy.apply, params, s, labels, keys, toy.SHAPE, uncond=null, guidance=2.0)
        many = sample(toy.apply, sharding.replicate(params, mesh), s, sharding.shard_batch(labels, mesh),
                      sharding.shard_batch(keys, mesh), toy.SHAPE, uncond=sharding.replicate(null, mesh), guidance=2.0)
        out[name] = {"max_abs_diff": float(np.max(np.abs(np.asarray(one) - np.asarray(many)))),
                     "equal": bool(np.array_equal(np.asarray(one), np.asarray(many))),
                     "out_devices": len(many.sharding.device_set)}
    # the model-aware front end: a small DiT, 11 samples in batches of 4 (padded to the mesh)
    cfg = dit.Config(input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=3)
    model = dit.from_config(cfg, key=1)
    lab = np.arange(11) % 3
    a = generate_classes(model, lab, sampler="ddim", steps=4, guidance=3.0, seed=2, batch_size=4, progress=False)
    b = generate_classes(model, lab, sampler="ddim", steps=4, guidance=3.0, seed=2, batch_size=4, mesh=mesh,
                         progress=False)
    c = generate_classes(model, lab, sampler="ddim", steps=4, guidance=3.0, seed=2, batch_size=16, mesh=mesh,
                         progress=False)
    out["generate"] = {"ab": float(np.max(np.abs(a - b))), "ac": float(np.max(np.abs(a - c))), "shape": list(b.shape)}
    print("RESULT" + json.dumps(out))
""")


@pytest.mark.slow
def test_eight_device_sampling_equals_one_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
    res = json.loads(line[len("RESULT"):])
    assert res["devices"] == 8
    for name in ("ddpm", "dpm"):
        assert res[name]["out_devices"] == 8  # the result really is spread over 8 devices
        assert res[name]["equal"], res  # bit-identical images
    assert res["generate"]["shape"] == [11, 8, 8, 1]
    assert res["generate"]["ab"] == 0.0 and res["generate"]["ac"] == 0.0, res
