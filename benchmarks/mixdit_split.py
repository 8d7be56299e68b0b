"""Where the MixDiT activation split spends its time: gather, casts, E4M3 re-encoding (XLA, one GPU).

GPU (H100 or H200)::

    python benchmarks/mixdit_split.py [--out $OUT/mixdit_split.md]

Times, at DiT-XL/2 b32 shapes (M = 8192; K = 1152 for qkv / fc1 / proj inputs, 4608 for fc2),
``jdq.kernels.mixdit.ref.quantize_activation`` (the split the MixDiT kernel is fed with) against
its parts in the same run: the channel permutation alone (``jnp.take``), the split with the
identity permutation (``jnp.arange``, a constant XLA may simplify), and a plain copy of the
activation. The permutation is what
``jdq.quant.outliers.channel_permutation`` makes (outlier channels first, the rest ascending),
with 5 % outlier channels. Each row: median of repeated jitted calls, and the number of XLA
fusions in the optimized HLO. Single calls: at K = 1152 the copy's time is mostly dispatch (on
an H200 37 µs for ~9 µs of memory traffic), so compare the rows at K = 4608. Prints a markdown
table.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jdq.io import atomic_write_text  # noqa: E402
from jdq.kernels.mixdit import ref  # noqa: E402


def time_call(fn, args, reps=20, inner=5):
    """Median seconds per call of jitted ``fn(*args)``."""
    for _ in range(3):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


def fusion_count(fn, args) -> int:
    """Fusions in the entry computation of ``fn``'s optimized HLO."""
    text = fn.lower(*args).compile().as_text()
    return len(re.findall(r" fusion\(", text[text.find("ENTRY"):]))


def table(m: int = 8192, ks=(1152, 4608), ratio: float = 0.05) -> str:
    """Markdown table of the split and its parts at each K."""
    dev = jax.devices()[0]
    lines = [f"Device: {dev.device_kind}, jax {jax.__version__}; M = {m}, bf16 activations, {ratio:.0%} outlier channels.",
             "", "| K | variant | µs | fusions |", "|---:|---|---:|---:|"]
    for k in ks:
        x = jax.random.normal(jax.random.key(0), (m, k), jnp.float32).astype(jnp.bfloat16)
        k_hi = int(round(ratio * k / 16)) * 16
        hot = np.sort(np.random.default_rng(0).choice(k, k_hi, replace=False))
        perm = jnp.asarray(np.concatenate([hot, np.setdiff1d(np.arange(k), hot)]))
        variants = {
            "copy (−x)": (jax.jit(lambda a, p: -a), (x, perm)),
            "permutation alone (jnp.take)": (jax.jit(lambda a, p: jnp.take(a, p, axis=-1)), (x, perm)),
            "split, identity permutation": (jax.jit(lambda a, p: ref.quantize_activation(a, jnp.arange(k), k_hi)), (x, perm)),
            "split (quantize_activation)": (jax.jit(lambda a, p: ref.quantize_activation(a, p, k_hi)), (x, perm)),
        }
        for label, (fn, args) in variants.items():
            lines.append(f"| {k} | {label} | {time_call(fn, args) * 1e6:.1f} | {fusion_count(fn, args)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    """Command line entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--m", type=int, default=8192, help="rows (tokens × batch); 8192 = DiT-XL/2-256 at batch 32")
    p.add_argument("--out", help="also write the table (markdown) to this path")
    args = p.parse_args(argv)
    text = table(args.m)
    print(text)
    if args.out:
        atomic_write_text(args.out, text + "\n", parents=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
