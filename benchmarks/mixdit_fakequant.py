"""Where MixDiT's fake-quant step spends its time: the outlier split of each operand of a DiT-XL/2 block.

::

    python benchmarks/mixdit_fakequant.py [--batch 64] [--json OUT.json] [--tiny]
    python benchmarks/mixdit_fakequant.py --step [MODEL_DIR] [--batch 32]

For every quantized operand of one DiT-XL/2 256 block at ``--batch`` model evaluations (64: batch 32
with CFG) — the inputs of qkv / proj / fc1 (1152 wide) and fc2 (4608), and the attention operands
q, kᵀ, the probabilities p and v — times, in the same run on the default device:

* ``copy``: ``x * 2`` (the memory floor of one pass);
* ``mx6``: one MX6 cast (what the ``mx6`` recipe does to the operand);
* ``mask sorted`` / ``mask unrolled`` / ``mask radix dN``: the block selection alone (block maxima +
  top-k mask) by each of ``jdq.quant.outliers``' forms of ``rank < k``: a stable argsort and a
  threshold, the rank count as one elementwise term per row entry (what ``top_mask`` takes for
  short rows; timed on rows of up to ``_UNROLLED_RANK_MAX`` blocks), or the radix selection with
  N threshold bits per pass (what a CPU takes for longer rows), its counts reduced over the row's
  last axis or (``col``) over a middle axis with the candidates minor, or ``mask kernel``: the
  ``jdq.kernels.row_select`` threshold (what a GPU takes for rows of more than 16 blocks);
* ``split masked``: the split as defined, ``where(m, mx9(where(m, x, 0)), mx6(where(m, 0, x)))``;
* ``split``: ``jdq.quant.outliers.outlier_split(...).apply`` as the recipe runs it (whole-block
  selections take ``jdq.formats.cast_select``: one pass with a per-element mantissa width);
  ``split kernel``: the same with the ``row_select`` selection; ``split one kernel``: the whole split
  as ``jdq.kernels.split_cast`` (block maxima, selection and cast in one kernel, as a GPU model's
  linear inputs run it now); ``gelu + split kernel`` / ``gelu + split one kernel``: fc2's input from
  fc1's output, XLA's GELU then the ``row_select`` split, or the one kernel with the GELU inside
  (linear inputs only; their values are checked equal to the routes they replace).

``--step`` instead times the whole denoiser of a saved model (default: the embedded one) at
``--batch`` samples with CFG (2 × batch evaluations): the ``mixdit`` recipe's fake-quant step against
the unquantized one, medians of 7 calls after compiling (the compile time is printed too).

The ratio of the recipe (5 % of the linear inputs' blocks, 20 % of the attention operands') is
used. Each time is per evaluation: the median of ``--reps`` jitted calls that each chain ``--inner``
dependent evaluations in a loop (so a launch is amortised); the ``per step`` row sums the operands ×
28 blocks. Prints a markdown table; ``--json`` writes it.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jdq import formats  # noqa: E402
from jdq import quant as Q  # noqa: E402
from jdq.io import atomic_write_text  # noqa: E402
from jdq.kernels import row_select  # noqa: E402
from jdq.kernels.split_cast import split_cast  # noqa: E402
from jdq.quant import outliers  # noqa: E402

DEPTH = 28
RADIX_DIGITS = (2, 4, 6)  # threshold bits per pass of the timed radix selections
LINEAR_RATIO, ATTN_RATIO = 0.05, 0.20  # the mixdit recipe's


def operands(batch, tokens=256, dim=1152, heads=16):
    """``{name: (shape, axis, ratio, sites per block)}`` of one DiT block's quantized activations."""
    hd = dim // heads
    return {
        "linear in (qkv, proj, fc1)": ((batch, tokens, dim), -1, LINEAR_RATIO, 3),
        "fc2 in": ((batch, tokens, 4 * dim), -1, LINEAR_RATIO, 1),
        "q": ((batch, heads, tokens, hd), -1, ATTN_RATIO, 1),
        "k^T": ((batch, heads, hd, tokens), -2, ATTN_RATIO, 1),
        "p": ((batch, heads, tokens, tokens), -1, ATTN_RATIO, 1),
        "v": ((batch, heads, tokens, hd), -2, ATTN_RATIO, 1),
    }


def block_maxima(x, axis, block):
    """Per-row block maxima of |x| along ``axis`` (rows: every other index), as the split's selection sees them."""
    moved = jnp.moveaxis(x, axis, -1)
    mag = jnp.abs(moved if moved.dtype in (jnp.bfloat16, jnp.float16) else moved.astype(jnp.float32))  # as outlier_mask
    n = mag.shape[-1]
    pad = (-n) % block
    if pad:
        mag = jnp.pad(mag, [(0, 0)] * (mag.ndim - 1) + [(0, pad)])
    return mag.reshape(mag.shape[:-1] + ((n + pad) // block, block)).max(-1)


def variants(axis, ratio):
    """``{name: fn(x)}`` of the timed computations for one operand."""
    t = outliers.outlier_split(ratio)
    state = t.init({})
    ctx = Q.Context("blocks.0.attn.qkv", "act", axis)

    def mask_with(top):
        def f(x):
            v = block_maxima(x, axis, t.meta.block_size)
            return top(v, outliers.outlier_count(state["ratio"], v.shape[-1]))
        return f

    def masked(x):
        m = outliers.outlier_mask(t.meta, x, state, axis)
        zero = jnp.zeros((), x.dtype)
        return jnp.where(m, formats.cast(jnp.where(m, x, zero), "mx9", axis=axis),
                         formats.cast(jnp.where(m, zero, x), "mx6", axis=axis))

    # the "kernel" variants run the kernel at any size (impl="auto" takes the sort below a CTA per SM)
    kernel_top = functools.partial(row_select.top_mask, impl="gpu" if jax.default_backend() == "gpu" else "auto")
    return {
        "copy": lambda x: x * 2,
        "mx6": lambda x: formats.cast(x, "mx6", axis=axis),
        "mask sorted": mask_with(outliers._top_mask_sorted),
        "mask unrolled": mask_with(outliers._top_mask_unrolled),
        "mask kernel": mask_with(kernel_top),
        **{f"mask radix d{d}": mask_with(functools.partial(outliers._top_mask_radix, digit_bits=d)) for d in RADIX_DIGITS},
        **{f"mask radix col d{d}": mask_with(functools.partial(outliers._top_mask_radix, digit_bits=d, candidates_minor=True))
           for d in RADIX_DIGITS},
        "split masked": masked,
        "split": lambda x: t.apply(x, state, ctx),
        "split kernel": lambda x: outliers.split_dynamic(t.meta, x, state, axis, top=kernel_top),
        "split one kernel": lambda x: split_cast(x, state["ratio"], t.meta),
        "gelu + split kernel": lambda x: outliers.split_dynamic(t.meta, jax.nn.gelu(x, approximate=True), state, axis,
                                                                top=kernel_top),
        "gelu + split one kernel": lambda x: split_cast(x, state["ratio"], t.meta, "gelu_tanh"),
    }


#: Variants that only linear inputs (a split along the last axis of a 1152- or 4608-wide row) take.
LINEAR_ONLY = ("split one kernel", "gelu + split kernel", "gelu + split one kernel")


def chained(fn, inner):
    """``inner`` dependent applications of ``fn`` in one jitted loop (a mask output: x's sign flips if any is set).

    One call then costs ``inner`` evaluations and one dispatch, so the per-evaluation time of an
    operand of a few MB is its work, not the launch.
    """
    def body(_, x):
        y = fn(x)
        return jnp.where(jnp.any(y), x, -x) if y.dtype == jnp.bool_ else y

    return jax.jit(lambda x: jax.lax.fori_loop(0, inner, body, x))


def median_ms(fn, x, reps, inner):
    """Median wall milliseconds per evaluation of ``fn(x)`` (``inner`` chained per call, one warm-up call)."""
    return median_ms_call(chained(fn, inner), (x,), reps) / inner


def run(batch, reps, inner, tiny=False, only=None):
    """``{"device", "batch", "rows": [{operand, shape, sites, times: {variant: ms}}], "per_step": {variant: ms}}``."""
    ops = operands(batch, tokens=16, dim=64, heads=4) if tiny else operands(batch)
    rows, per_step = [], {}
    for i, (name, (shape, axis, ratio, sites)) in enumerate(ops.items()):
        x = (jax.random.normal(jax.random.key(i), shape, jnp.float32) * 2.0).astype(jnp.bfloat16)
        times = {}
        linear = name.startswith(("linear", "fc2"))
        n_blocks = -(-shape[axis] // 16)
        for vname, f in variants(axis, ratio).items():
            if vname == "mask unrolled" and n_blocks > outliers._UNROLLED_RANK_MAX:
                continue
            if only is not None and vname not in only:
                continue
            if vname in LINEAR_ONLY and not linear:
                continue
            times[vname] = median_ms(f, x, reps, inner)
        vs = variants(axis, ratio)
        same = bool(jnp.array_equal(jax.jit(vs["split"])(x), jax.jit(vs["split masked"])(x)))
        kernel_same = bool(jnp.array_equal(jax.jit(vs["mask kernel"])(x), jax.jit(vs["mask sorted"])(x)))
        row = {"operand": name, "shape": list(shape), "axis": axis, "ratio": ratio, "sites": sites,
               "times": times, "split_equals_masked": same, "mask_kernel_equals_sorted": kernel_same}
        if linear:  # the one kernel's values against the route it replaces, bit for bit
            row["one_kernel_equals_split"] = bool(jnp.array_equal(jax.jit(vs["split one kernel"])(x), jax.jit(vs["split"])(x)))
            row["gelu_one_kernel_equals"] = bool(jnp.array_equal(jax.jit(vs["gelu + split one kernel"])(x),
                                                                 jax.jit(vs["gelu + split kernel"])(x)))
        rows.append(row)
        for vname, ms in times.items():
            per_step[vname] = per_step.get(vname, 0.0) + ms * sites * DEPTH
        print(f"{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in times.items())
              + f"; equal={same}, mask kernel == sorted: {kernel_same}"
              + (f", one kernel == split: {row['one_kernel_equals_split']}, gelu one kernel == gelu + split: "
                 f"{row['gelu_one_kernel_equals']}" if linear else ""), flush=True)
    return {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(), "jax": jax.__version__,
            "batch": batch, "inner": inner, "depth": DEPTH, "rows": rows, "per_step": per_step}


def step_times(model_dir, batch, reps=7):
    """``{"mixdit_ms", "unquantized_ms", "compile_s"}``: the denoiser at ``batch`` samples with CFG, mixdit vs none."""
    from jdq import models, recipes
    from jdq.sampling.generate import Denoiser, sample_shape

    model = models.load(model_dir)[0]
    q = recipes.quantize(model, "mixdit", cond=jnp.zeros((1,), jnp.int32), calib_samples=1)
    fn = Denoiser(model, model.family)
    b = 2 * batch
    x = jax.random.normal(jax.random.key(0), (b,) + sample_shape(model), jnp.float32)
    t = jnp.full((b,), 500.0, jnp.float32)
    y = jnp.arange(b, dtype=jnp.int32) % model.config.num_classes
    quantized = jax.jit(lambda p, qq, x: fn(p, x, t, y, quant=qq))
    plain = jax.jit(lambda p, x: fn(p, x, t, y))
    t0 = time.perf_counter()
    jax.block_until_ready(quantized(q.params, q.quantizer, x))
    compile_s = time.perf_counter() - t0
    return {"mixdit_ms": median_ms_call(quantized, (q.params, q.quantizer, x), reps),
            "unquantized_ms": median_ms_call(plain, (model.params, x), reps), "compile_s": compile_s}


def median_ms_call(f, args, reps):
    """Median wall milliseconds of ``f(*args)`` after one warm-up call."""
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def render(res):
    """The markdown table of :func:`run`'s result."""
    names = list(res["rows"][0]["times"])
    head = (f"{res['device']} ({res['backend']}), jax {res['jax']}; batch {res['batch']}; ms per evaluation "
            f"(median; {res['inner']} chained per call)\n\n")
    lines = ["| operand | shape | sites | " + " | ".join(names) + " | split == masked | one kernel == split (no GELU / GELU) |",
             "|---|---|---:|" + "---:|" * len(names) + "---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['operand']} | {'×'.join(map(str, r['shape']))} (axis {r['axis']}) | {r['sites']} | "
                     + " | ".join(f"{r['times'][n]:.3f}" if n in r["times"] else "-" for n in names)
                     + f" | {r['split_equals_masked']} | "
                     + (f"{r['one_kernel_equals_split']} / {r['gelu_one_kernel_equals']}" if "one_kernel_equals_split" in r
                        else "-") + " |")
    lines.append(f"| **per step** (× {res['depth']} blocks) | | | "
                 + " | ".join(f"**{res['per_step'][n]:.2f}**" if all(n in r["times"] for r in res["rows"]) else "-"
                              for n in names) + " | | |")
    return head + "\n".join(lines) + "\n"


def main(argv=None):
    """Time the variants and print (and with ``--json`` write) the table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=None,
                    help="model evaluations per operand (default 64: batch 32 with CFG); with --step samples (default 32)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--inner", type=int, default=10, help="evaluations chained in one call")
    ap.add_argument("--json", default=None)
    ap.add_argument("--tiny", action="store_true", help="small shapes (a CPU smoke test)")
    ap.add_argument("--variants", default=None, help="comma list of the variants to time (default: all)")
    ap.add_argument("--step", nargs="?", const="", default=None, metavar="MODEL_DIR",
                    help="time the whole denoiser step of a saved model instead (default: the embedded one)")
    args = ap.parse_args(argv)
    if (args.batch is not None and args.batch < 1) or min(args.reps, args.inner) < 1:
        ap.error("--batch, --reps and --inner must be >= 1")
    if args.step is not None:
        from jdq.cli._common import DEFAULT_MODEL

        batch = args.batch or 32
        r = step_times(args.step or str(DEFAULT_MODEL), batch)
        print(f"{jax.devices()[0].device_kind}: batch {batch} + CFG: mixdit {r['mixdit_ms']:.1f} ms, unquantized "
              f"{r['unquantized_ms']:.1f} ms (x{r['mixdit_ms'] / r['unquantized_ms']:.2f}); compile {r['compile_s']:.1f} s")
        return 0
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    only = None
    if args.variants:
        only = [v.strip() for v in args.variants.split(",") if v.strip()]
        known = set(variants(-1, LINEAR_RATIO))
        if set(only) - known:
            ap.error(f"--variants: unknown {sorted(set(only) - known)}; known: {sorted(known)}")
    res = run(args.batch or 64, args.reps, args.inner, args.tiny, only)
    md = render(res)
    print(md)
    if args.json:
        atomic_write_text(args.json, json.dumps(res, indent=1))
        atomic_write_text(os.path.splitext(args.json)[0] + ".md", md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
