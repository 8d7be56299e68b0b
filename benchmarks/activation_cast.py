"""How XLA fuses a linear's MX activation cast with its producer: formulations of one cast, timed on the GPU.

A fake-quant MX step (``paper_recipes_gpu.py``) spends most of its distance from the bf16 step in
the casts of the linears' inputs: XLA splits each into a block-max fusion and a cast fusion (and,
for the MX9 / MX6 word form through 16-bit halves — ``words_u16``, the library's form before
2026-12-03 — a third pass after a GELU that writes the halves). This script
times bit-identical formulations of the same cast between the producer and the consumer GEMM of
a DiT-XL/2 block at batch 32 + CFG (64 × 256 tokens): ``fc2`` (fc1 GEMM + bias → GELU-tanh → cast
→ fc2 GEMM, K = 4608) and ``qkv`` (LayerNorm + adaLN modulation → cast → qkv GEMM, K = 1152).
Each row is the chain's wall time minus the chain without the cast (the same run), the kernels
it ran (CUPTI), whether the formulation's cast of the materialised producer output equals the
library's bit for bit, and whether the whole chain's output does (it need not: where XLA fuses the
producer into the cast it may keep the producer's bf16 result in float32).

Since 2026-12-03 the library's form ('library') is device run 1's 'words_bits' (halves by shifts); since
the eighth session of that day its FP elements round by the float32 adder (``words_scaled_rounding``
is the library's form with the rounding before). Row ``one_pass`` (fc2 only) is the GELU and the cast in one
Mosaic GPU kernel (``jdq.kernels.act_cast``, what a fake-quant MLP runs on a GPU since then): its time
includes the GELU's, which the other rows leave to the chain without the cast.

``python3 benchmarks/activation_cast.py --device-run`` (GPU; ``results/activation_cast_device_run*.json``);
``--tiny`` runs small shapes on a CPU.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jdq import formats  # noqa: E402
from jdq.formats import _bits, mx, smx  # noqa: E402


def smx_words_reduced(x, fmt, reduce=True):
    """The word form through 16-bit halves (before 2026-12-03), the block max as a reduce or unrolled."""
    k1, nsub = fmt.block_size, fmt.block_size // 2
    lead, n = x.shape[:-1], x.shape[-1]
    w = lax.bitcast_convert_type(x.reshape(*lead, n // 2, 2), jnp.uint32).reshape(*lead, n // k1, nsub)
    lo, hi = (lax.bitcast_convert_type(h.astype(jnp.uint16), x.dtype).astype(jnp.float32) for h in (w & 0xFFFF, w >> 16))
    ab_lo, ab_hi = _bits.abs_bits(lo), _bits.abs_bits(hi)
    pm = jnp.maximum(ab_lo, ab_hi)
    amax = jnp.max(pm, axis=-1, keepdims=True) if reduce else _bits.unrolled_max(pm, pm.ndim - 1, nsub)
    return _smx_from_halves(x, lo, hi, amax, fmt)


def _smx_from_halves(x, lo, hi, amax, fmt):
    m = fmt.mantissa_bits
    lead, n = x.shape[:-1], x.shape[-1]
    ab_lo, ab_hi = _bits.abs_bits(lo), _bits.abs_bits(hi)
    lo_f, hi_f = smx._flush(lo, ab_lo), smx._flush(hi, ab_hi)
    bad, e_blk, e_calc = smx._block_exponent(amax, fmt, m)
    step = e_calc - smx._micro_shift(ab_lo, ab_hi, lo_f, hi_f, e_blk, e_calc, fmt, m) - (m - 1)

    def half(v):
        return jnp.where(bad, jnp.nan, _bits.mul_pow2(smx._codes(v, step, fmt, m), step)).astype(x.dtype)

    return jnp.stack([half(lo_f), half(hi_f)], axis=-1).reshape(x.shape)


def smx_strided(x, fmt, reduce=False):
    """Even / odd elements as strided slices of the bf16 input (no 32-bit word), output interleaved by a stack."""
    k1, nsub = fmt.block_size, fmt.block_size // 2
    lead, n = x.shape[:-1], x.shape[-1]
    xb = x.reshape(*lead, n // k1, nsub, 2)
    lo, hi = xb[..., 0].astype(jnp.float32), xb[..., 1].astype(jnp.float32)
    pm = jnp.maximum(_bits.abs_bits(lo), _bits.abs_bits(hi))
    amax = jnp.max(pm, axis=-1, keepdims=True) if reduce else _bits.unrolled_max(pm, pm.ndim - 1, nsub)
    return _smx_from_halves(x, lo, hi, amax, fmt)


def smx_rows(x, fmt):
    """The library's word form on a 2-d view whose rows are the blocks."""
    return formats.cast(x.reshape(-1, fmt.block_size), fmt, axis=-1).reshape(x.shape)


def mx_reduced_rows(x, fmt):
    """OCP MX with the blocks as the rows of a 2-d view (a row reduction XLA may fuse as a normalisation)."""
    xb = x.reshape(-1, fmt.block_size).astype(jnp.float32)
    amax = jnp.max(_bits.abs_bits(xb), axis=-1, keepdims=True)
    return mx.fake_quantize_given_amax(xb, jnp.broadcast_to(amax, xb.shape), fmt).astype(x.dtype).reshape(x.shape)


def mx_unrolled(x, fmt):
    """OCP MX with the block max as elementwise maxima of slices (no reduce)."""
    lead, n = x.shape[:-1], x.shape[-1]
    xb = x.reshape(*lead, n // fmt.block_size, fmt.block_size).astype(jnp.float32)
    ab = _bits.abs_bits(xb)
    amax = _bits.unrolled_max(ab, ab.ndim - 1, fmt.block_size)
    return mx.fake_quantize_given_amax(xb, jnp.broadcast_to(amax, xb.shape), fmt).astype(x.dtype).reshape(x.shape)


def mx_words(x, fmt):
    """OCP MX on 32-bit words of two bf16 elements: the block max unrolled over block / 2 words."""
    lead, n = x.shape[:-1], x.shape[-1]
    nw = fmt.block_size // 2
    w = lax.bitcast_convert_type(x.reshape(*lead, n // 2, 2), jnp.uint32).reshape(*lead, n // fmt.block_size, nw)
    lo, hi = (lax.bitcast_convert_type(h.astype(jnp.uint16), x.dtype).astype(jnp.float32) for h in (w & 0xFFFF, w >> 16))
    pm = jnp.maximum(_bits.abs_bits(lo), _bits.abs_bits(hi))
    amax = _bits.unrolled_max(pm, pm.ndim - 1, nw)

    def half(v):
        out = mx.fake_quantize_given_amax(v, jnp.broadcast_to(amax, v.shape), fmt).astype(x.dtype)
        return lax.bitcast_convert_type(out, jnp.uint16).astype(jnp.uint32)

    words = half(lo) | (half(hi) << 16)
    return lax.bitcast_convert_type(words.reshape(*lead, n // 2), x.dtype).reshape(x.shape)


def mx_words_scaled_rounding(x, fmt):
    """The library's word form with the element rounding before 2026-12-03 (scale each value's grid step to 1,
    round, scale back) instead of the float32 adder's rounding."""
    ebits, mbits, _, max_normal = mx.ELEMENTS[fmt.element]
    emin = 2 - 2 ** (ebits - 1)
    lo, hi = _bits.bf16_word_halves(x, fmt.block_size // 2)
    amax = _bits.unrolled_max(jnp.maximum(_bits.abs_bits(lo), _bits.abs_bits(hi)), lo.ndim - 1, fmt.block_size // 2)
    e, is_nan = mx._exponent_from_amax(jnp.broadcast_to(amax, lo.shape), fmt)

    def half(v):
        p = _bits._round_to_float_grid_scaled(_bits.mul_pow2(v, -e), emin, mbits, max_normal, "even")
        return jnp.where(is_nan, jnp.nan, _bits.mul_pow2(p, e))

    return _bits.bf16_from_word_halves(half(lo), half(hi), x.shape)


def variants(name):
    """{label: cast function} for format ``name``; 'library' is jdq.formats.cast."""
    fmt = formats.get(name)
    out = {"library": lambda x: formats.cast(x, fmt, axis=-1)}
    if fmt.kind == "smx":
        out.update({"partner": lambda x: smx._fake_quantize_partner(x, fmt, x.ndim - 1),
                    "words_u16": lambda x: smx_words_reduced(x, fmt, reduce=False),
                    "words_reduce": lambda x: smx_words_reduced(x, fmt),
                    "strided_unrolled": lambda x: smx_strided(x, fmt),
                    "strided_reduce": lambda x: smx_strided(x, fmt, reduce=True),
                    "rows": lambda x: smx_rows(x, fmt)})
    elif fmt.kind == "mx":
        out.update({"rows_reduce": lambda x: mx_reduced_rows(x, fmt),
                    "unrolled": lambda x: mx_unrolled(x, fmt),
                    "words": lambda x: mx_words(x, fmt)})
        if mx.ELEMENTS[fmt.element][0] > 0:  # FP elements (MXINT8 rounds on a fixed grid)
            out["words_scaled_rounding"] = lambda x: mx_words_scaled_rounding(x, fmt)
    return out


def chains(tokens, d, hidden):
    """The two producer → cast → GEMM chains as functions of (cast, inputs), and their inputs."""
    ks = jax.random.split(jax.random.key(0), 6)
    bf = jnp.bfloat16
    a = jax.random.normal(ks[0], (tokens, d), bf)
    w1 = (jax.random.normal(ks[1], (d, hidden), jnp.float32) / d**0.5).astype(bf)
    b1 = (0.02 * jax.random.normal(ks[2], (hidden,), jnp.float32)).astype(bf)
    w2 = (jax.random.normal(ks[3], (hidden, d), jnp.float32) / hidden**0.5).astype(bf)
    shift, scale = ((0.3 * jax.random.normal(k, (d,), jnp.float32)).astype(bf) for k in ks[4:6])
    wq = w1[:, : 3 * d]

    def fc2(cast, a, w1, b1, w2):
        h = jax.nn.gelu(a @ w1 + b1, approximate=True)
        return cast(h) @ w2

    def qkv(cast, a, shift, scale, wq):
        mu = jnp.mean(a.astype(jnp.float32), -1, keepdims=True)
        var = jnp.mean(jnp.square(a.astype(jnp.float32) - mu), -1, keepdims=True)
        n = ((a.astype(jnp.float32) - mu) * lax.rsqrt(var + 1e-6)).astype(bf)
        return cast(n * (1 + scale) + shift) @ wq

    return {"fc2": (fc2, (a, w1, b1, w2)), "qkv": (qkv, (a, shift, scale, wq))}


def _producer(fn, inputs):
    """The chain's cast input (its producer's output), materialised."""
    seen = []
    fn(lambda h: seen.append(h) or h, *inputs)
    return seen[0]


@functools.lru_cache(maxsize=None)
def _sibling(name):
    """Another script of benchmarks/ as a module (its timing and profiling helpers)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"jdq_benchmark_{name}", os.path.join(os.path.dirname(__file__), f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def kernels_of(fn, args):
    """CUPTI kernels of one call: (count, [(name, µs)...] slowest first); None off a GPU."""
    if jax.default_backend() != "gpu":
        return None
    rows = _sibling("e2e").kernel_breakdown(fn, args)["kernels"]  # [[name, calls, ms]...], slowest first
    return len(rows), [(n[:50], round(ms * 1e3, 1)) for n, _, ms in rows]


def one_pass_row(res, name, inputs, h, base_ms, want, want_cast, iters, timed_ms, rows=None):
    """The fc2 chain with the GELU and the cast in one kernel (``jdq.kernels.act_cast``): time, kernels, and the
    share of its cast outputs equal to the library's cast of XLA's GELU (``share_equal``, the model's unfused
    path) and to ``act_cast.reference`` compiled by XLA (``share_equal_to_reference``: the same function)."""
    from jdq.kernels.act_cast import act_cast, reference, supports_cast
    from jdq.kernels.act_cast.gpu import Config

    fmt = formats.get(name)
    if supports_cast(fmt):
        return
    a, w1, b1, w2 = inputs
    cfg = None if rows is None else Config(rows=rows)
    label = "one_pass" if rows is None else f"one_pass_r{rows}"
    f = jax.jit(lambda a, w1, b1, w2: act_cast(a @ w1 + b1, fmt, "gelu_tanh", config=cfg) @ w2)
    try:
        out = np.asarray(jax.block_until_ready(f(*inputs)).astype(jnp.float32))
        ms = timed_ms(f, inputs, iters)
    except Exception as e:  # noqa: BLE001
        print(f"  {name:11s} {label:17s} FAILED {type(e).__name__}: {str(e)[:300]}")
        return
    pre = jax.jit(lambda a, w1, b1: a @ w1 + b1)(a, w1, b1)
    got = np.asarray(jax.jit(lambda p: act_cast(p, fmt, "gelu_tanh", config=cfg))(pre).astype(jnp.float32))
    ref = np.asarray(jax.jit(lambda p: reference(p, fmt, "gelu_tanh"))(pre).astype(jnp.float32))
    same = lambda u, v: float(np.mean((u == v) | (np.isnan(u) & np.isnan(v))))  # noqa: E731
    ks = kernels_of(f, inputs)
    row = {"chain": "fc2", "format": name, "variant": label, "ms": ms, "cast_us": (ms - base_ms) * 1e3,
           "share_equal": same(got, want_cast), "share_equal_to_reference": same(got, ref),
           "cast_equal_to_library": bool(np.array_equal(got, want_cast, equal_nan=True)),
           "chain_share_equal": same(out, want), "chain_equal_to_library": bool(np.array_equal(out, want, equal_nan=True)),
           "relerr_vs_library": float(np.linalg.norm(np.nan_to_num(got - want_cast)) / np.linalg.norm(np.nan_to_num(want_cast))),
           "kernels": ks}
    res["rows"].append(row)
    kt = "" if ks is None else f"  {ks[0]} kernels: " + ", ".join(f"{n} {us}" for n, us in ks[1][:5])
    print(f"  {name:11s} {label:17s} +{row['cast_us']:8.1f} us (GELU included)  equal share {row['share_equal']:.6f}"
          f" (to its reference {row['share_equal_to_reference']:.6f}, relerr {row['relerr_vs_library']:.2e}){kt}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device-run", action="store_true", help="DiT-XL/2 shapes on a GPU")
    p.add_argument("--tiny", action="store_true", help="small shapes (a CPU check of the script)")
    p.add_argument("--formats", default="mx6,mxint8,mxfp8_e4m3")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--out", default=None)
    p.add_argument("--variants", default="", help="comma list of variants to time (default: all); one_pass is the kernel")
    p.add_argument("--one-pass-rows", default="", help="extra act_cast kernel rows per CTA to time, e.g. 128,512")
    args = p.parse_args(argv)
    keep = {v for v in args.variants.split(",") if v}
    if not (args.device_run or args.tiny):
        raise SystemExit("give --device-run (GPU) or --tiny")
    timed_ms = _sibling("paper_recipes_gpu").timed_ms
    tokens, d, hidden = (16384, 1152, 4608) if args.device_run else (256, 64, 256)
    res = {"jax": jax.__version__, "device": jax.devices()[0].device_kind, "tokens": tokens, "d": d,
           "hidden": hidden, "rows": []}
    print(f"jax {jax.__version__} {jax.devices()[0].device_kind}: tokens {tokens}, d {d}, hidden {hidden}")
    for chain, (fn, inputs) in chains(tokens, d, hidden).items():
        base = jax.jit(lambda *a, fn=fn: fn(lambda h: h, *a))
        base_ms = timed_ms(base, inputs, args.iters)
        print(f"{chain}: without the cast {base_ms * 1e3:8.1f} us")
        h = jax.jit(lambda *a, fn=fn: _producer(fn, a))(*inputs)
        for name in [f for f in args.formats.split(",") if f]:
            want, want_cast = None, None
            for label, cast in variants(name).items():
                if keep and label not in keep and label != "library":  # the library's row is the comparison
                    continue
                f = jax.jit(lambda *a, fn=fn, cast=cast: fn(cast, *a))
                try:
                    out = np.asarray(jax.block_until_ready(f(*inputs)).astype(jnp.float32))
                    ms = timed_ms(f, inputs, args.iters)
                except Exception as e:  # noqa: BLE001
                    print(f"  {name:11s} {label:17s} FAILED {type(e).__name__}: {str(e)[:200]}")
                    continue
                got_cast = np.asarray(jax.jit(cast)(h).astype(jnp.float32))
                want = out if want is None else want
                want_cast = got_cast if want_cast is None else want_cast
                equal = bool(np.array_equal(got_cast, want_cast, equal_nan=True))
                chain_equal = bool(np.array_equal(out, want, equal_nan=True))
                ks = kernels_of(f, inputs)
                row = {"chain": chain, "format": name, "variant": label, "ms": ms, "cast_us": (ms - base_ms) * 1e3,
                       "cast_equal_to_library": equal,
                       "chain_equal_to_library": chain_equal, "kernels": ks}
                res["rows"].append(row)
                kt = "" if ks is None else f"  {ks[0]} kernels: " + ", ".join(f"{n} {us}" for n, us in ks[1][:5])
                print(f"  {name:11s} {label:17s} +{row['cast_us']:8.1f} us  cast equal {equal} (chain {chain_equal}){kt}")
            if chain == "fc2" and (not keep or "one_pass" in keep):
                for rows in [None] + [int(r) for r in args.one_pass_rows.split(",") if r]:
                    one_pass_row(res, name, inputs, h, base_ms, want, want_cast, args.iters, timed_ms, rows)
        res[f"{chain}_base_ms"] = base_ms
    out_dir = args.out or os.environ.get("OUT")
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "activation_cast.json"), "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
