"""``benchmarks/kernel_profile.py``: a profiler's target runs the case it names, and refuses the ones it cannot build."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest


def test_attention_case_runs_the_kernel_on_the_benchmark_inputs(load_benchmark):
    """The skeleton case computes attention on quant_attention.py's inputs (its checksum is the attention's sum)."""
    kp = load_benchmark("kernel_profile")
    qa = load_benchmark("quant_attention")
    got = kp.main(["--tiny", "--case", "attention:kernel_nocast", "--repeat", "0"])
    q, k, v = qa.qkv(jax.random.key(0), qa.TINY["tiny"])
    want = jax.nn.dot_product_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                                        scale=1 / math.sqrt(q.shape[-1]))
    want = float(np.asarray(want, np.float64).sum())
    assert abs(got - want) < 1e-2 * float(np.abs(np.asarray(want)).sum() + 1.0) and got != 0.0


def test_split_case_is_the_benchmarks_variant(load_benchmark):
    """A split case runs mixdit_fakequant.py's variant on its operand: the one kernel equals the XLA route."""
    kp = load_benchmark("kernel_profile")
    one = kp.main(["--tiny", "--case", "split:linear in (qkv, proj, fc1):split one kernel", "--repeat", "0"])
    route = kp.main(["--tiny", "--case", "split:linear in (qkv, proj, fc1):split", "--repeat", "0"])
    assert one == route != 0.0


@pytest.mark.parametrize("case, message", [
    ("attn:kernel:mx6", "expected attention"),
    ("split:fc2:split", "unknown operand 'fc2'"),
    ("split:fc2 in:nope", "unknown variant 'nope'"),
])
def test_bad_cases_are_named(load_benchmark, case, message):
    kp = load_benchmark("kernel_profile")
    with pytest.raises(SystemExit, match=message):
        kp.main(["--tiny", "--case", case])
