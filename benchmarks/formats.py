"""jdq.formats: accuracy (SQNR) of every number format, and the speed of each fake-quant cast.

CPU (this machine)::

    python benchmarks/formats.py

(a) SQNR in dB, ``10 log10(sum x^2 / sum (x - cast(x))^2)``, of every format (and the FP8 / INT
scalings worth comparing) on Gaussian and Student-t (nu = 3) data, 1024 x 4096 float32, blocks
and rows along the last axis. Writes ``benchmarks/results/formats.md`` (atomically) and prints
it, with the comparison to the shared-microexponent paper's "MX9 is about 16 dB above FP8 E4M3".

GPU (H100 or H200)::

    python benchmarks/formats.py --device-run [--timing-out $OUT/formats_device.md]

(b) times each fake-quant cast under ``jax.jit`` on a 4096 x 4608 bfloat16 tensor against a plain
copy of the same tensor in the same run (``-x``: one read and one write, like a cast; XLA does not
elide it). One jitted call applies the cast ``--chain`` times in a row, each result materialised
by ``lax.optimization_barrier`` (so XLA neither fuses nor elides the repeats): the time per cast
is then device time, not Python dispatch (a single call of a ~30 µs kernel is dispatch-bound and
hides the difference between a cast and a copy). Median over ``--reps`` repetitions of
``--inner`` back-to-back calls after warm-up; the copy is re-timed just before and after every
cast and the faster of the two is the row's reference (the GPU clock drifts during a run).
Reports GB/s (bytes read + written) and the percentage of the copy's bandwidth. ``--size small``
runs the same on a 256 x 512 tensor (CPU smoke test).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402
import numpy as np  # noqa: E402

import jdq.formats as F  # noqa: E402
from jdq.io import atomic_write_text  # noqa: E402

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
RESULTS_MD = os.path.join(RESULTS_DIR, "formats.md")

#: (label, format name, options). Every name of jdq.formats.names() with its defaults, plus the
#: scalings that matter when comparing with papers.
SQNR_ROWS = [
    *[(n, n, {}) for n in F.names() if not n.startswith("fp8")],
    ("fp8_e4m3 unscaled (direct cast)", "fp8_e4m3", {"granularity": None}),
    ("fp8_e4m3 per-tensor amax/448", "fp8_e4m3", {"granularity": "tensor"}),
    ("fp8_e4m3 per-row amax/448 (default)", "fp8_e4m3", {}),
    ("fp8_e5m2 per-tensor", "fp8_e5m2", {"granularity": "tensor"}),
    ("fp8_e5m2 per-row (default)", "fp8_e5m2", {}),
    ("int8 per-tensor", "int8", {"granularity": "tensor"}),
    ("int8 group 32", "int8", {"granularity": "group", "group_size": 32}),
    ("int4 group 128", "int4", {"granularity": "group", "group_size": 128}),
    ("int4 group 32", "int4", {"granularity": "group", "group_size": 32}),
    ("int4 asym row", "int4", {"symmetric": False}),
    ("mx9 rounded shared exponent", "mx9", {"shared_exponent": "rounded"}),
    ("mx6 'fit' micro-exponent", "mx6", {"microexponent": "fit"}),
    ("mx9 k1=32", "mx9", {"block_size": 32}),
]

#: (label, format name, options, axis) timed by --device-run.
TIMED = [
    *[(n, n, {}, -1) for n in F.names() if n not in ("int7", "int5", "int3", "int2")],
    ("int4 group 128", "int4", {"granularity": "group", "group_size": 128}, -1),
    ("int8 per-tensor", "int8", {"granularity": "tensor"}, -1),
    ("fp8_e4m3 unscaled", "fp8_e4m3", {"granularity": None}, -1),
    ("mxfp4_e2m1 axis=-2 (weight)", "mxfp4_e2m1", {}, -2),
    ("mx9 axis=-2 (weight)", "mx9", {}, -2),
    ("mx6 axis=-2 (weight)", "mx6", {}, -2),
    ("mx4 axis=-2 (weight)", "mx4", {}, -2),
    ("mxint8 axis=-2 (weight)", "mxint8", {}, -2),
    ("int4 group 128 axis=-2 (weight)", "int4", {"granularity": "group", "group_size": 128}, -2),
]


def sqnr_db(x, y):
    """Signal-to-quantization-noise ratio in dB (float64 sums)."""
    x = np.asarray(x, np.float64)
    err = np.sum((x - np.asarray(y, np.float64)) ** 2)
    return float("inf") if err == 0 else 10 * np.log10(np.sum(x**2) / err)


def sqnr_table(shape=(1024, 4096), seed=0):
    """Rows (label, bits/element, SQNR Gaussian, SQNR Student-t) and the raw data used."""
    rng = np.random.default_rng(seed)
    data = {"gauss": rng.standard_normal(shape).astype(np.float32),
            "t3": rng.standard_t(3, shape).astype(np.float32)}
    rows = []
    for label, name, opts in SQNR_ROWS:
        spec = F.get(name, **opts)
        vals = [sqnr_db(x, F.cast(jnp.asarray(x), spec, axis=-1)) for x in data.values()]
        rows.append((label, spec.bits_per_element, *vals))
    return rows, data


def paper_comparison(data):
    """MX9 minus FP8 E4M3 under the FP8 scalings a paper could mean, on both data sets."""
    mx9 = {k: sqnr_db(x, F.cast(jnp.asarray(x), "mx9")) for k, x in data.items()}
    out = []
    for label, opts in [("unscaled (values cast as they are)", {"granularity": None}),
                        ("per-tensor amax/448", {"granularity": "tensor"}),
                        ("per-row amax/448", {}),
                        ("per-32-block power-of-two (= mxfp8_e4m3)", None)]:
        fp8 = {k: sqnr_db(x, F.cast(jnp.asarray(x), "mxfp8_e4m3") if opts is None else F.cast(jnp.asarray(x), "fp8_e4m3", **opts))
               for k, x in data.items()}
        out.append((label, fp8["gauss"], mx9["gauss"] - fp8["gauss"], fp8["t3"], mx9["t3"] - fp8["t3"]))
    # FP8 with a small unscaled range: N(0, sigma^2) with sigma = 2^-6 puts most values in E4M3's
    # subnormals, the regime where an unscaled FP8 loses precision
    x = data["gauss"] * np.float32(2.0**-6)
    fp8_small = sqnr_db(x, F.cast(jnp.asarray(x), "fp8_e4m3", granularity=None))
    return out, mx9, fp8_small


EXPLANATION = """\
**MX9 vs FP8 E4M3.** The shared-microexponent paper (Rouhani et al., ISCA 2023) reports MX9 about
16 dB above FP8 E4M3 in QSNR (second-hand, docs/methods.md §1.2). We measure +{diff_g:.1f} dB on Gaussian
data against per-tensor scaled FP8 and +{diff_blk:.1f} dB against FP8 scaled per 32-element block by a
power of two (MXFP8), so our numbers agree with the paper's ≈ 16 dB to within about 1 dB. The gap
hardly depends on how the FP8 is scaled (table above) because a floating-point format's relative
error does not depend on where its range sits as long as the data avoid its subnormals and its
saturation: FP8 E4M3 (3 mantissa bits) gives ≈ {fp8_g:.1f} dB on any well-scaled data. Per-block
power-of-two (E8M0) scaling costs ≈ 1 dB because it maps each block's max into [256, 512) and maxima
above 448 saturate (the "block-max misalignment" of OCP MX; about a fifth of the blocks). MX9 (7-bit sign-magnitude mantissa, one exponent per 16 values, one shift
bit per pair) gives ≈ {mx9_g:.1f} dB on Gaussian data. The residual depends on the data: MX9 is a
block format, so it loses QSNR when values inside a block span many binades (heavy tails:
{mx9_t:.1f} dB on Student-t, a gap of +{diff_t:.1f} dB to per-tensor FP8 at {fp8_t:.1f} dB), while FP8
does not. The gap reaches 16 dB or more on data whose blocks are more uniform in magnitude than a
Gaussian's, or against an FP8 whose range is badly placed: unscaled E4M3 on N(0, σ = 2⁻⁶) data, where
most values fall into its subnormals, gives only {fp8_small:.1f} dB. The paper's own data (tensors of
its benchmark models) are not available to us, so which of these it measured cannot be checked; the
most likely reading (FP8 with a per-tensor or per-block scale on typical DNN tensors) matches ours.
"""


def render(rows, comparison, mx9, fp8_small, shape):
    """The markdown page written to benchmarks/results/formats.md."""
    lines = [
        "# jdq.formats — SQNR of every format",
        "",
        f"Generated by `python benchmarks/formats.py` on {datetime.date.today().isoformat()} "
        f"({platform.machine()}, jax {jax.__version__}, backend {jax.default_backend()}).",
        f"Data: {shape[0]}×{shape[1]} float32, N(0, 1) and Student-t (ν = 3), seed 0; blocks, groups and "
        "rows along the last axis (the contraction axis). SQNR = 10·log10(Σx² / Σ(x − cast(x))²).",
        "",
        "| format | bits/element | SQNR Gaussian (dB) | SQNR Student-t ν=3 (dB) |",
        "|---|---:|---:|---:|",
    ]
    for label, bits, g, t in rows:
        lines.append(f"| {label} | {bits:.4g} | {g:.2f} | {t:.2f} |")
    lines += [
        "",
        "Bits/element include the amortised shared scales (E8M0 per 32 for MX; 8-bit exponent per 16 and",
        "1-bit micro-exponent per 2 for MX9/6/4; a 16-bit scale per group for grouped INT; per-row and",
        "per-tensor scales counted as 0).",
        "",
        "## MX9 versus FP8 E4M3 (the paper's ≈ 16 dB)",
        "",
        "| FP8 E4M3 scaling | FP8 Gaussian (dB) | MX9 − FP8 Gaussian (dB) | FP8 Student-t (dB) | MX9 − FP8 Student-t (dB) |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, fg, dg, ft, dt in comparison:
        lines.append(f"| {label} | {fg:.2f} | {dg:+.2f} | {ft:.2f} | {dt:+.2f} |")
    per_tensor = comparison[1]
    lines += ["", EXPLANATION.format(
        diff_g=per_tensor[2], diff_t=per_tensor[4], fp8_g=per_tensor[1], fp8_t=per_tensor[3],
        diff_blk=comparison[3][2], mx9_g=mx9["gauss"], mx9_t=mx9["t3"], fp8_small=fp8_small)]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- timing


def time_fn(fn, x, reps, inner, warmup=3):
    """Median seconds per call of jitted ``fn(x)`` (``inner`` async calls per timed repetition)."""
    for _ in range(warmup):
        fn(x).block_until_ready()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            y = fn(x)
        y.block_until_ready()
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


def chained(fn, n: int):
    """``fn`` applied ``n`` times, each result materialised (an optimization barrier in between)."""
    def run(a):
        for _ in range(n):
            a = lax.optimization_barrier(fn(a))
        return a
    return run


def timing_table(shape, reps, inner, chain=20):
    """Markdown table: each cast's device time, GB/s and % of the copy's bandwidth, measured in one run."""
    x = jax.random.normal(jax.random.key(0), shape, jnp.float32).astype(jnp.bfloat16)
    nbytes = 2 * x.size * x.dtype.itemsize  # read + write
    copy = jax.jit(chained(lambda a: -a, chain))

    def per_cast(fn):
        return time_fn(fn, x, reps, inner) / chain

    per_cast(copy)  # warm the GPU clock before the first reference
    dev = jax.devices()[0]
    lines = [
        f"Device: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}; input {shape[0]}×{shape[1]} "
        f"bfloat16; {chain} chained casts per call, median of {reps} repetitions × {inner} calls after warm-up; "
        "copy re-timed around every row.",
        "",
        "| cast | axis | time (µs) | GB/s | copy (µs) | % of copy bandwidth |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    worst = None
    for label, name, opts, axis in TIMED:
        fn = jax.jit(chained(lambda a, name=name, opts=opts, axis=axis: F.cast(a, name, axis=axis, **opts), chain))
        t_before = per_cast(copy)
        t = per_cast(fn)
        t_copy = min(t_before, per_cast(copy))
        share = 100 * t_copy / t
        worst = min(worst or (share, label), (share, label))
        lines.append(f"| {label} | {axis} | {t * 1e6:.1f} | {nbytes / t / 1e9:.1f} | {t_copy * 1e6:.1f} | {share:.0f} |")
    lines += ["", f"Slowest relative to the copy: {worst[1]} at {worst[0]:.0f} % (goal: every cast ≥ 50 %)."]
    return "\n".join(lines)


def main(argv=None):
    """Command line entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device-run", action="store_true", help="time the casts (part b) instead of the SQNR table")
    p.add_argument("--size", choices=["full", "small"], default="full", help="4096×4608 (full) or 256×512 (small)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--inner", type=int, default=3)
    p.add_argument("--chain", type=int, default=20, help="casts per jitted call (device time, not dispatch)")
    p.add_argument("--timing-out", help="also write the timing table (markdown) to this path")
    args = p.parse_args(argv)
    if args.device_run:
        shape = (4096, 4608) if args.size == "full" else (256, 512)
        table = timing_table(shape, args.reps, args.inner, args.chain)
        print(table)
        if args.timing_out:
            atomic_write_text(args.timing_out, table + "\n", parents=True)
        return
    shape = (1024, 4096) if args.size == "full" else (64, 512)
    rows, data = sqnr_table(shape)
    comparison, mx9, fp8_small = paper_comparison(data)
    page = render(rows, comparison, mx9, fp8_small, shape)
    print(page)
    if args.size == "full":
        atomic_write_text(RESULTS_MD, page + "\n", parents=True)


if __name__ == "__main__":
    main()
