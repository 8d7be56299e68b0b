"""Kernel speed: jdq's Pallas kernels against XLA's bf16, int8 and fp8 dots, measured in one run.

Run on a GPU: ``python benchmarks/kernels.py --device-run [--out DIR] [--budget-s S]``. On a CPU
(no GPU) it runs a tiny smoke version (Pallas interpret mode) of the same code paths.

1. **Checks** (before any timing, in a child process so that a kernel that crashes or hangs the
   GPU cannot take the run with it; a crash marks that kernel failed and the checks resume in a
   fresh child): every GPU kernel against its reference on random, never-all-zero inputs, exact
   where the arithmetic is exact (power-of-two scales; see each kernel's reference module).
2. **Table**, in priority order until ``--budget-s`` is spent: DiT-XL/2-256 linears (qkv, proj,
   fc1, fc2; M = 256·batch) at batch 16, 32, 64, PixArt-Σ-1024 (M = 4096), then batch 1, 4, 2, 8;
   first the XLA baselines and W8A8, then FP8, W4A8, MixDiT, MXFP8 / MXINT8, weight-only
   (batch ≤ 4). Only kernels that passed their check are timed.

Variants that split a linear into its parts: ``jdq_w8a8_gemm`` and ``jdq_mixdit_gemm`` (the GEMM
kernel alone on pre-quantized / pre-split operands) next to ``jdq_w8a8`` / ``jdq_mixdit`` (the
whole linear) and ``xla_mixdit_split`` (MixDiT's activation split alone, in XLA);
``jdq_w4a8_channel`` (per-channel scales: no group rescale) next to ``jdq_w4a8`` (groups of 64).
``--weight-only-tiles 64x128,128x64,...`` times W8A16 / W4A16 at batch ≤ 4 once per tile config
(each checked on the device first; configs that do not fit a shape are skipped with the reason).
``--variants`` and ``--layers`` restrict what is checked and timed.

**Roofline.** The run measures the HBM copy bandwidth (``a + 1`` over a large float32 vector) and
gives every timed variant its floor: max(bytes of its operands and output as stored / copy
bandwidth, its GEMM ops / the dense tensor-core peak of its operand type), and the percentage of
that floor it reached (``% of roofline``), with which bound applies.

Times are the median over ``--iters`` CUPTI-measured iterations (summed kernel time, no launch
gaps; ``jax.experimental.mosaic.gpu.profiler.measure``), each iteration over ``--rotate``
independent input sets so that repeated runs do not hit in the L2 cache. Results go to
``kernels.json`` and ``kernels.md`` under ``--out`` (default ``$OUT``, else
``benchmarks/results/latest``); the run ends with a short summary table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# no up-front grab of 75% of GPU memory: the check child processes need memory while this one lives
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "latest")  # raw output; the curated tables are results/*.md
DIT_LAYERS = {"qkv": (1152, 3456), "proj": (1152, 1152), "fc1": (1152, 4608), "fc2": (4608, 1152)}
BATCH_ORDER = (16, 32, 64, "pixart", 1, 4, 2, 8)
PIXART_TOKENS = 4096
BASELINES = ("xla_bf16", "xla_int8", "xla_fp8")
CORE = ("xla_w8a8", "jdq_w8a8", "jdq_w8a8_gemm", "xla_quant", "jdq_quant")
MID = ("jdq_mixdit", "jdq_mixdit_gemm", "xla_mixdit_split", "jdq_fp8", "jdq_w4a8", "jdq_w4a8_channel", "jdq_w4a8_rega",
       "jdq_w4a8_channel_rega")
MX = ("jdq_mxfp8", "jdq_mxint8")
EXTRA = MID + MX
WEIGHT_ONLY = ("jdq_w8a16", "jdq_w4a16")
LABELS = {
    "xla_bf16": "XLA bf16 dot", "xla_int8": "XLA int8 dot", "xla_fp8": "XLA fp8 dot",
    "xla_w8a8": "XLA W8A8 (quant + int8 dot + epilogue)", "jdq_w8a8": "jdq W8A8 linear (token-quant kernel + GEMM)",
    "jdq_w8a8_gemm": "jdq W8A8 GEMM alone", "xla_quant": "XLA per-token int8 quant", "jdq_quant": "jdq one-pass quant",
    "jdq_fp8": "jdq FP8 linear", "jdq_w4a8": "jdq W4A8 linear (g64)", "jdq_w4a8_channel": "jdq W4A8 linear (per channel)",
    "jdq_w4a8_rega": "jdq W4A8 linear (g64, register A)", "jdq_w4a8_channel_rega": "jdq W4A8 linear (per channel, register A)",
    "jdq_mixdit": "jdq MixDiT linear (5% MX9)", "jdq_mixdit_gemm": "jdq MixDiT GEMM alone (pre-split operands)",
    "xla_mixdit_split": "XLA MixDiT activation split (gather + MX9/MX6 + E4M3)",
    "jdq_mxfp8": "jdq MXFP8 linear", "jdq_mxint8": "jdq MXINT8 linear", "jdq_w8a16": "jdq W8A16", "jdq_w4a16": "jdq W4A16 (g128)",
}
# which tensor-core peak bounds each variant's arithmetic (None: no GEMM, memory only; "mixdit": bf16 on
# the outlier channels, fp8 on the rest)
PEAK_CLASS = {"xla_bf16": "bf16", "xla_int8": "int8", "xla_fp8": "fp8", "xla_w8a8": "int8", "jdq_w8a8": "int8",
              "jdq_w8a8_gemm": "int8", "xla_quant": None, "jdq_quant": None, "jdq_fp8": "fp8", "jdq_w4a8": "int8",
              "jdq_w4a8_channel": "int8", "jdq_w4a8_rega": "int8", "jdq_w4a8_channel_rega": "int8", "jdq_mixdit": "mixdit", "jdq_mixdit_gemm": "mixdit", "xla_mixdit_split": None,
              "jdq_mxfp8": "fp8", "jdq_mxint8": "int8", "jdq_w8a16": "bf16", "jdq_w4a16": "bf16"}
# dense tensor-core peaks (ops/s); unknown devices use the H200's (the json records which were used)
PEAKS = {"NVIDIA H200": {"bf16": 989e12, "int8": 1979e12, "fp8": 1979e12},
         "NVIDIA H100 80GB HBM3": {"bf16": 989e12, "int8": 1979e12, "fp8": 1979e12}}
L2_BYTES = 50 * 2**20  # H100 / H200 L2: operand sets smaller than this are re-read from L2, not HBM
MIXDIT_HI_FRAC = 0.05  # outlier channels in the MixDiT variants (MX9 part)
SMEM_BUDGET = 220 * 1024  # the largest stage count that fits is chosen for a sweep config (227 KiB minus slack)


def label_of(name):
    """Table label of a variant (``jdq_w4a16@128x64s4``: a weight-only tile-sweep config)."""
    base, _, cfg = name.partition("@")
    return LABELS[base] + (f" [{cfg}]" if cfg else "")


def mixdit_k_hi(k):
    """Outlier channels of the MixDiT variants for ``k`` input features (a multiple of the 16-block)."""
    return int(round(MIXDIT_HI_FRAC * k / 16)) * 16


# ------------------------------------------------------------------------------------ weight-only tile sweep


def parse_tiles(spec):
    """``"64x128,128x64s3,256x64s2k4,64x64s4r..."`` -> [(tile_m, tile_n, stages or None, split_k, kind)].

    A bare ``"256"`` is tile_m 256, tile_n 128; ``kS`` splits K over S CTAs (default 1); a final
    ``r`` selects the register-A kernel (``Config.kind="rega"``; default ``"smem"``).
    """
    out = []
    for item in filter(None, (t.strip() for t in (spec or "").split(","))):
        kind = "rega" if item.endswith("r") else "smem"
        item = item[:-1] if kind == "rega" else item
        try:
            head, _, split = item.partition("k")
            tiles, _, st = head.partition("s")
            dims = [int(v) for v in tiles.split("x")]
            tm, tn = (dims[0], 128) if len(dims) == 1 else dims
            out.append((tm, tn, int(st) if st else None, int(split) if split else 1, kind))
        except ValueError:
            raise SystemExit(f"--weight-only-tiles: cannot parse {item!r}; want TMxTN[sSTAGES][kSPLIT][r], e.g. 128x64s3k2")
    return out


def sweep_config(tm, tn, stages, bits, split=1, kind="smem"):
    """The weight-only Config for one sweep entry: ``stages`` as given, else the most (≤ 4) that fit shared memory."""
    from jdq.kernels.weight_only.gpu import Config

    if stages is None:
        stages = next((s for s in (4, 3, 2) if Config(tm, tn, 128, s, split, kind).smem_bytes(bits) <= SMEM_BUDGET), 2)
    return Config(tm, tn, 128, stages, split, kind)


def sweep_names(spec):
    """Variant names of the tile sweep: ``jdq_w8a16@TMxTNsS`` and ``jdq_w4a16@TMxTNsS`` per entry."""
    names = []
    for tm, tn, st, split, kind in parse_tiles(spec):
        for base, bits in (("jdq_w8a16", 8), ("jdq_w4a16", 4)):
            c = sweep_config(tm, tn, st, bits, split, kind)
            names.append(f"{base}@{c.tile_m}x{c.tile_n}s{c.stages}" + (f"k{c.split_k}" if c.split_k > 1 else "")
                         + ("r" if kind == "rega" else ""))
    return names


def sweep_parts(name):
    """``jdq_w4a16@128x64s3`` -> (base, bits, group_size or None, Config)."""
    from jdq.kernels.weight_only.gpu import Config

    base, _, cfg = name.partition("@")
    kind = "rega" if cfg.endswith("r") else "smem"
    cfg = cfg[:-1] if kind == "rega" else cfg
    head, _, split = cfg.partition("k")
    tiles, _, st = head.partition("s")
    tm, tn = (int(v) for v in tiles.split("x"))
    bits = 4 if base == "jdq_w4a16" else 8
    return base, bits, (128 if bits == 4 else None), Config(tm, tn, 128, int(st), int(split) if split else 1, kind)


def sweep_invalid(name, m, k, n):
    """Why sweep variant ``name`` cannot run an (M, K, N) GEMM (None when it can)."""
    _, bits, group, cfg = sweep_parts(name)
    if m % cfg.tile_m:
        return f"M={m} is not a multiple of tile_m={cfg.tile_m}"
    if not cfg.supports(n, k, group or k, bits):
        return f"N={n} / K={k} / group {group or k} do not fit tile_n={cfg.tile_n}, tile_k={cfg.tile_k}"
    if cfg.smem_bytes(bits) > 227 * 1024:
        return f"needs {cfg.smem_bytes(bits) // 1024} KiB of shared memory (> 227 KiB)"
    return None


def default_out():
    """``$OUT`` when set (device runs), else ``benchmarks/results/latest``; never the working directory."""
    return os.environ.get("OUT") or RESULTS_DIR


def write_json(path, obj):
    """Atomic JSON write (temp file + rename)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


def shapes_for(batch, layers=None):
    """(label, M, K, N) of the linears (all four, or ``layers``) at ``batch`` (or PixArt-Σ-1024 for ``"pixart"``)."""
    m = PIXART_TOKENS if batch == "pixart" else 256 * batch
    tag = "pixart" if batch == "pixart" else f"dit.b{batch}"
    return [(f"{tag}.{name}", m, k, n) for name, (k, n) in DIT_LAYERS.items() if layers is None or name in layers]


# ------------------------------------------------------------------------------------ timing


def time_ms(fn, sets, iters):
    """Median milliseconds of one ``fn(*args)`` call, averaged over the input ``sets``."""
    g = jax.jit(lambda ss: [fn(*a) for a in ss])
    if jax.default_backend() == "gpu":
        try:
            from jax.experimental.mosaic.gpu import profiler

            _, ts = profiler.measure(g, iterations=iters)(sets)
            if ts:
                return statistics.median(ts) / len(sets)
        except Exception as e:  # noqa: BLE001  (CUPTI unavailable: fall back to the wall clock)
            print("  (CUPTI measure failed, wall clock instead:", type(e).__name__, str(e)[:100], ")", flush=True)
    jax.block_until_ready(g(sets))
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(g(sets))
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts) / len(sets)


# ------------------------------------------------------------------------------------ operands


def base_sets(key, m, k, n, rotate):
    """``rotate`` independent (x bf16 (M, K) with a few large channels, w float32 (K, N), bias) sets."""
    sets = []
    col = jnp.where(jnp.arange(k) % 23 == 5, 12.0, 1.0)  # outlier channels (MixDiT's split has work to do)
    for i in range(rotate):
        k1, k2, k3 = jax.random.split(jax.random.fold_in(key, i), 3)
        x = (jax.random.normal(k1, (m, k), jnp.float32) * col).astype(jnp.bfloat16)
        w = jax.random.normal(k2, (k, n), jnp.float32) / np.sqrt(k)
        b = jax.random.normal(k3, (n,), jnp.float32) * 0.1
        sets.append((x, w, b))
    return sets


def w4a8_rega_config():
    """The register-A W4A8 kernel config timed by the ``*_rega`` variants (untuned)."""
    from jdq.kernels.w4a8.gpu import Config

    return Config(tile_m=128, tile_n=64, stages=4, kind="rega")


def _lowered(kind, w, x_sample=None):
    """A LoweredWeight of ``kind`` for the (K, N) weight ``w`` (MixDiT: outliers from ``x_sample``)."""
    from jdq import formats
    from jdq.kernels import LoweredWeight
    from jdq.kernels.weight_only.ref import pack_int4

    k, n = w.shape
    if kind in ("w4a8", "w4a8_channel", "w4a16", "w8a16"):
        bits, group = (8, None) if kind in ("w8a16", "w4a8_channel") else (4, 64 if kind == "w4a8" else 128)
        if kind == "w4a8_channel":
            bits, kind = 4, "w4a8"
        opts = dict(granularity="group", group_size=group) if group else dict(granularity="row")
        qt = formats.quantize(w, f"int{bits}", axis=-2, **opts)
        scale = jnp.maximum(qt.scale, 2.0**-126)
        scale = scale.T if group else scale.reshape(n, 1)
        codes = pack_int4(qt.codes.T) if bits == 4 else qt.codes.T
        return LoweredWeight(codes, scale, kind, k, n, group)
    if kind in ("mxfp8", "mxint8"):
        fmt = "mxfp8_e4m3" if kind == "mxfp8" else "mxint8"
        qt = formats.quantize(w, fmt, axis=-2)
        codes = qt.codes.T if kind == "mxint8" else lax.bitcast_convert_type(qt.codes.T, jnp.float8_e4m3fn)
        return LoweredWeight(codes, qt.scale, kind, k, n)
    if kind == "mixdit":
        from jdq.kernels.mixdit.ref import pack_weight

        perm = jnp.argsort(-jnp.abs(x_sample.astype(jnp.float32)).max(0), stable=True).astype(jnp.int32)
        k_hi = mixdit_k_hi(k)
        w_hi, w_lo, s_w, _ = pack_weight(w, perm, k_hi)
        return LoweredWeight(w_lo, s_w, "mixdit", k, n, None, {"w_hi": w_hi, "perm": perm},
                             (("k_hi", k_hi), ("hi", formats.get("mx9")), ("lo", formats.get("mx6"))))
    raise ValueError(kind)


def variant(name, sets, impl, cache=None):
    """``(fn, arg_sets)`` timing variant ``name`` on the base ``sets`` (``cache``: packed weights shared by variants)."""
    from jdq import kernels as K
    from jdq.kernels.token_quant.ref import quantize_rows
    from jdq.kernels.w8a8 import ref as w8

    cache = {} if cache is None else cache
    if name == "xla_bf16":
        return (lambda x, w: jnp.dot(x, w)), [(x, w.astype(jnp.bfloat16)) for x, w, b in sets]
    if name in ("xla_int8", "xla_fp8"):
        dt, acc = (jnp.int8, jnp.int32) if name == "xla_int8" else (jnp.float8_e4m3fn, jnp.bfloat16)
        fn = lambda a, c: lax.dot_general(a, c, (((1,), (1,)), ((), ())), preferred_element_type=acc)  # noqa: E731
        if name == "xla_int8":
            return fn, [(quantize_rows(x)[0], w8.quantize_per_channel(w.T)[0]) for x, w, b in sets]
        return fn, [(x.astype(dt), w.T.astype(dt)) for x, w, b in sets]
    int8_w = [(x,) + w8.quantize_per_channel(w.T) + (b,) for x, w, b in sets]
    if name == "xla_w8a8":
        return (lambda x, wq, ws, b: w8.w8a8_linear(x, wq, ws, b)), int8_w
    if name == "xla_quant":
        return (lambda x: quantize_rows(x, "int8")), [(x,) for x, w, b in sets]
    if name == "jdq_quant":
        return (lambda x: K.quantize_tokens(x, "int8", impl)), [(x,) for x, w, b in sets]
    if name == "jdq_w8a8":
        return (lambda x, wq, ws, b: K.w8a8_matmul(*K.quantize_tokens(x, "int8", impl), wq, ws, b, jnp.bfloat16, impl)), int8_w
    if name == "jdq_w8a8_gemm":
        q = [quantize_rows(x) + (wq, ws, b) for x, wq, ws, b in int8_w]
        return (lambda xq, xs, wq, ws, b: K.w8a8_matmul(xq, xs, wq, ws, b, jnp.bfloat16, impl)), q
    if name == "jdq_fp8":
        f8 = [(x,) + w8.quantize_per_channel_fp8(w.T) + (b,) for x, w, b in sets]
        return (lambda x, wq, ws, b: K.w8a8_matmul(*K.quantize_tokens(x, "fp8_e4m3", impl), wq, ws, b, jnp.bfloat16, impl)), f8
    base, _, cfg_name = name.partition("@")
    rega = base.endswith("_rega")
    base = base[: -len("_rega")] if rega else base
    kind = {"xla_mixdit_split": "mixdit", "jdq_mixdit_gemm": "mixdit"}.get(base, base[len("jdq_"):])
    if kind not in cache:
        cache[kind] = [(x, _lowered(kind, w, x), b) for x, w, b in sets]
    lws = cache[kind]
    if kind == "w4a8" or kind == "w4a8_channel":
        config = w4a8_rega_config() if rega else None
        return (lambda x, lw, b: K.w4a8_matmul(*K.quantize_tokens(x, "int8", impl), lw, b, jnp.bfloat16, impl,
                                               config)), lws
    if base == "xla_mixdit_split":
        from jdq.kernels.mixdit.ref import quantize_activation

        k_hi = lws[0][1].get_meta("k_hi")
        return (lambda x, perm: quantize_activation(x, perm, k_hi)), [(x, lw.aux["perm"]) for x, lw, b in lws]
    if base == "jdq_mixdit_gemm":  # the kernel alone: the activation split is done here, outside the timed function
        from jdq.kernels import tuning
        from jdq.kernels.mixdit.gpu import Config as MCfg, mixdit_matmul_gpu
        from jdq.kernels.mixdit.ref import quantize_activation

        m = sets[0][0].shape[0]
        cfg = MCfg(**tuning.lookup("mixdit", m))
        if not cfg.supports(m, lws[0][1].n):
            raise ValueError(f"mixdit GEMM: M={m} N={lws[0][1].n} do not fit {cfg}")
        pre = [quantize_activation(x, lw.aux["perm"], lw.get_meta("k_hi")) + (lw.aux["w_hi"], lw.codes, lw.scale, b)
               for x, lw, b in lws]
        interp = impl == "gpu_interpret"
        return (lambda xh, xl, sx, wh, wl, sw, b: mixdit_matmul_gpu(xh, xl, sx, wh, wl, sw, b, jnp.bfloat16, cfg,
                                                                    interpret=interp)), pre
    if kind == "mixdit":
        return (lambda x, lw, b: K.mixdit_matmul(x, lw, b, jnp.bfloat16, impl)), lws
    if kind in ("mxfp8", "mxint8"):
        return (lambda x, lw, b: K.mx_matmul(x, lw, b, jnp.bfloat16, impl)), lws
    if cfg_name:  # a tile-sweep config (validated by the caller: the dispatcher would fall back to XLA silently)
        cfg = sweep_parts(name)[3]
        return (lambda x, lw, b: K.weight_only_matmul(x, lw, b, jnp.bfloat16, impl, config=cfg)), lws
    return (lambda x, lw, b: K.weight_only_matmul(x, lw, b, jnp.bfloat16, impl)), lws


# ------------------------------------------------------------------------------------ roofline


def copy_bandwidth_gbs(iters, elems):
    """Measured HBM copy bandwidth (GB/s): ``a + 1`` over float32 vectors of ``elems`` (read + write)."""
    sets = [(jnp.full((elems,), float(i), jnp.float32),) for i in range(2)]
    ms = time_ms(lambda a: a + 1.0, sets, iters)
    return 2 * elems * 4 / ms / 1e6


def _nbytes(tree):
    return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree) if hasattr(a, "dtype"))


def roofline(name, fn, arg_sets, m, k, n, copy_gbs, peaks):
    """The variant's minimum time: bytes moved (operands + output as stored) at the copy bandwidth vs ops at peak.

    Returns ``{bytes, ops, peak, mem_ms, compute_ms, floor_ms, bound, l2_resident}``; ``l2_resident``
    says that all rotated input sets together fit the L2 cache, so the timed loop may read them
    from L2 faster than the HBM floor assumes.
    """
    args = arg_sets[0]
    out = jax.eval_shape(fn, *args)
    nbytes = _nbytes(args) + _nbytes(out)
    cls = PEAK_CLASS[name.partition("@")[0]]
    ops = 0 if cls is None else 2 * m * n * k
    if cls is None:
        compute_s = 0.0
    elif cls == "mixdit":
        k_hi = mixdit_k_hi(k)
        compute_s = 2 * m * n * k_hi / peaks["bf16"] + 2 * m * n * (k - k_hi) / peaks["fp8"]
    else:
        compute_s = ops / peaks[cls]
    mem_ms = nbytes / copy_gbs / 1e6
    compute_ms = compute_s * 1e3
    return {"bytes": nbytes, "ops": ops, "peak": cls, "mem_ms": mem_ms, "compute_ms": compute_ms,
            "floor_ms": max(mem_ms, compute_ms), "bound": "memory" if mem_ms >= compute_ms else "compute",
            "l2_resident": _nbytes(arg_sets) < L2_BYTES}


# ------------------------------------------------------------------------------------ checks


def _rel(a, b):
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    r = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
    return r if bool(jnp.all(jnp.isfinite(a))) else float("nan")


def _eq(a, b):
    return bool(jnp.all(jnp.asarray(a, jnp.float32) == jnp.asarray(b, jnp.float32)))


def check_list(small: bool, wo_tiles: str | None = None):
    """``[(name, fn)]``: each ``fn(interpret) -> dict`` with ``ok`` (bool) and the measured facts.

    ``wo_tiles`` (the ``--weight-only-tiles`` spec) adds one check per weight-only sweep config,
    named ``weight_only.<variant name>``.
    """
    from jdq.kernels import tuning
    from jdq.kernels.mixdit import ref as mref
    from jdq.kernels.mixdit.gpu import Config as MCfg, mixdit_matmul_gpu
    from jdq.kernels.mx import ref as xref
    from jdq.kernels.mx.gpu import Config as XCfg, mx_matmul_gpu
    from jdq.kernels.token_quant.gpu import Config as TCfg, quantize_rows_gpu
    from jdq.kernels.token_quant.ref import quantize_rows
    from jdq.kernels.w4a8 import ref as fref
    from jdq.kernels.w4a8.gpu import Config as FCfg, w4a8_matmul_gpu
    from jdq.kernels.w8a8 import ref as wref
    from jdq.kernels.w8a8.gpu import Config as WCfg, w8a8_matmul_gpu
    from jdq.kernels.weight_only import ref as oref
    from jdq.kernels.weight_only.gpu import Config as OCfg, weight_only_matmul_gpu

    m, k, n = (128, 256, 128) if small else (1024, 1152, 1536)
    keys = jax.random.split(jax.random.key(42), 8)
    pow2 = lambda kk, s: 2.0 ** jax.random.randint(kk, s, -12, -4).astype(jnp.float32)  # noqa: E731
    bias = jnp.round(jax.random.normal(keys[7], (n,)) * 64) / 64
    checks = []

    def tq(fmt, dtype, kk):
        def run(interp):
            x = (jax.random.normal(keys[0], (m, kk)) * jnp.linspace(0.05, 40, kk)).astype(dtype).at[3].set(0)
            cfg = TCfg(smem_bytes=8 * 1024) if small else TCfg(**tuning.lookup("token_quant", m))
            q, s = quantize_rows_gpu(x, fmt, cfg, interpret=interp)
            q2, s2 = quantize_rows(x, fmt)
            diff = jnp.abs(q.astype(jnp.float32) - q2.astype(jnp.float32))
            frac = float(jnp.mean((diff > 0).astype(jnp.float32)))
            return {"ok": _eq(s, s2) and frac == 0.0, "scales_exact": _eq(s, s2), "code_mismatch_frac": frac}
        return run
    checks += [("token_quant.int8.bf16", tq("int8", jnp.bfloat16, k)), ("token_quant.fp8.bf16", tq("fp8_e4m3", jnp.bfloat16, k)),
               ("token_quant.int8.K4608", tq("int8", jnp.bfloat16, 4 * k))]

    def w8(cfg, fp8=False):
        def run(interp):
            if fp8:  # small-integer codes: exact float32 sums in any order
                xq = jax.random.randint(keys[0], (m, k), -8, 9).astype(jnp.float8_e4m3fn)
                wq = jax.random.randint(keys[1], (n, k), -8, 9).astype(jnp.float8_e4m3fn)
            else:
                xq = jax.random.randint(keys[0], (m, k), -127, 128, jnp.int8)
                wq = jax.random.randint(keys[1], (n, k), -127, 128, jnp.int8)
            xs, ws = pow2(keys[2], (m,)), pow2(keys[3], (n,))
            got = w8a8_matmul_gpu(xq, xs, wq, ws, bias, jnp.float32, cfg, interpret=interp)
            want = wref.w8a8_matmul(xq, xs, wq, ws, bias, jnp.float32)
            xs2 = jax.random.uniform(keys[2], (m,), jnp.float32, 1e-3, 2e-2)
            got2 = w8a8_matmul_gpu(xq, xs2, wq, ws, bias, jnp.bfloat16, cfg, interpret=interp)
            rel = _rel(got2, wref.w8a8_matmul(xq, xs2, wq, ws, bias, jnp.float32))
            exact = _eq(got, want)
            return {"ok": (exact or fp8) and rel < 1e-2, "exact": exact, "relerr_bf16": rel}
        return run
    if small:
        w8cfg = WCfg("pipe", 64, 64, 128, 2)
        ws_cfg = WCfg("ws", 64, 64, 128, 2, wg_dim="n", num_sms=2)
    else:
        w8cfg = WCfg("pipe", 128, 128, 128, 2)
        ws_cfg = WCfg(**tuning.lookup("w8a8", m))
    checks += [("w8a8.int8.ws", w8(ws_cfg)), ("w8a8.int8.pipe", w8(w8cfg)), ("w8a8.fp8.ws", w8(ws_cfg, True)),
               ("w8a8.fp8.pipe", w8(w8cfg, True))]

    def w4(group, config=None):
        def run(interp):
            xq = jax.random.randint(keys[0], (m, k), -127, 128, jnp.int8)
            packed = oref.pack_int4(jax.random.randint(keys[1], (n, k), -7, 8).astype(jnp.int8))
            xs, ws = pow2(keys[2], (m,)), pow2(keys[3], (n, 1 if group is None else k // group))
            cfg = config or (FCfg(64, 128, 2) if small else FCfg(**tuning.lookup("w4a8", m)))
            got = w4a8_matmul_gpu(xq, xs, packed, ws, bias, group, jnp.float32, cfg, interpret=interp)
            want = fref.w4a8_matmul(xq, xs, packed, ws, bias, group, jnp.float32)
            return {"ok": _eq(got, want), "exact": _eq(got, want), "relerr": _rel(got, want)}
        return run
    checks += [("w4a8.channel", w4(None)), ("w4a8.g64", w4(64)), ("w4a8.g128", w4(128))]
    if not small:
        checks += [("w4a8.channel.rega", w4(None, w4a8_rega_config())), ("w4a8.g64.rega", w4(64, w4a8_rega_config()))]

    def wo(bits, group, sweep=None):
        def run(interp):
            x = jax.random.normal(keys[0], (m, k)).astype(jnp.bfloat16)
            qmax = 127 if bits == 8 else 7
            codes = jax.random.randint(keys[1], (n, k), -qmax, qmax + 1).astype(jnp.int8)
            packed = codes if bits == 8 else oref.pack_int4(codes)
            scale = jax.random.uniform(keys[2], (n, k // group), jnp.float32, 0.01, 0.02)
            if sweep:
                why = sweep_invalid(sweep, m, k, n)
                if why:
                    return {"ok": False, "skipped": why}
                cfg = sweep_parts(sweep)[3]
            else:
                cfg = OCfg(64, 128, 128, 2) if small else OCfg(**tuning.lookup("weight_only", m, n=n, k=k))
            got = weight_only_matmul_gpu(x, packed, scale, bias, bits, group, jnp.float32, cfg, interpret=interp)
            want = oref.weight_only_matmul(x, packed, scale, bias, bits, group, jnp.float32)
            if cfg.kind == "rega" and group < k:  # rega rounds the group-scaled weight to bf16 (its docstring)
                w_bf = oref.dequantize(packed, scale, bits, group).astype(jnp.bfloat16).astype(jnp.float32)
                want = jnp.matmul(x.astype(jnp.float32), w_bf.T, precision=jax.lax.Precision.HIGHEST)
                want = want if bias is None else want + bias
            rel = _rel(got, want)
            return {"ok": rel < 1e-4, "relerr": rel}
        return run
    checks += [("weight_only.w8a16", wo(8, k)), ("weight_only.w4a16.g128", wo(4, 128))]
    for sw in sweep_names(wo_tiles):
        bits = 4 if sw.startswith("jdq_w4a16") else 8
        checks.append((f"weight_only.{sw}", wo(bits, 128 if bits == 4 else k, sw)))

    def mix(k_hi):
        def run(interp):
            x = jax.random.normal(keys[0], (m, k)) * jnp.where(jnp.arange(k) % 23 == 5, 12.0, 1.0)
            w = jax.random.normal(keys[1], (k, n)) / 16
            perm = jnp.argsort(-jnp.abs(x).max(0), stable=True)
            x_hi, x_lo, s_x = mref.quantize_activation(x, perm, k_hi)
            w_hi, w_lo, s_w, _ = mref.pack_weight(w, perm, k_hi)
            cfg = MCfg(64, 128, 2) if small else MCfg(**tuning.lookup("mixdit", m))
            got = mixdit_matmul_gpu(x_hi, x_lo, s_x, w_hi, w_lo, s_w, bias, jnp.float32, cfg, interpret=interp)
            rel = _rel(got, mref.mixdit_matmul(x_hi, x_lo, s_x, w_hi, w_lo, s_w, bias, jnp.float32))
            return {"ok": rel < 1e-3, "relerr": rel}
        return run
    checks += [("mixdit.k_hi64", mix(64)), ("mixdit.k_hi0", mix(0))]

    def mix_split(run_interp):
        """The one-pass activation split kernel == XLA's split, bit for bit (bf16 x, both permutation styles)."""
        from jdq.kernels.mixdit import split_gpu

        x = (jax.random.normal(keys[0], (m, k)) * jnp.where(jnp.arange(k) % 23 == 5, 12.0, 1.0)).astype(jnp.bfloat16)
        k_hi = mixdit_k_hi(k)
        by_mag = jnp.argsort(-jnp.abs(x.astype(jnp.float32)).max(0), stable=True).astype(jnp.int32)
        hot = jnp.sort(by_mag[:k_hi])
        rest = jnp.sort(by_mag[k_hi:])
        out = {}
        for name, perm in (("plan_order", jnp.concatenate([hot, rest])), ("magnitude_order", by_mag)):
            got = split_gpu.split_activation_gpu(x, split_gpu.gather_table(perm, k_hi), k_hi,
                                                 split_gpu.SplitConfig(**tuning.lookup("mixdit_split", m)),
                                                 interpret=run_interp)
            want = mref.quantize_activation(x, perm, k_hi)
            out[name] = sum(int(jnp.sum(lax.bitcast_convert_type(g, jnp.uint8) != lax.bitcast_convert_type(w, jnp.uint8)))
                            for g, w in zip(got, want))
        return {"ok": not any(out.values()), "mismatched_bytes": out}
    checks.append(("mixdit.split", mix_split))

    def mx(fmt):
        def run(interp):
            x = jax.random.normal(keys[0], (m, k)) * (2.0 ** jax.random.randint(keys[4], (m, k // 32), -8, 8)).repeat(32, 1)
            w = jax.random.normal(keys[1], (n, k))
            xq, xs = xref.quantize_operand(x, fmt)
            wq, ws = xref.quantize_operand(w, fmt)
            cfg = XCfg(64, 128, 4, 2) if small else XCfg(**tuning.lookup("mx", m))
            got = mx_matmul_gpu(xq, xs, wq, ws, bias, jnp.float32, cfg, interpret=interp)
            want = xref.mx_matmul(xq, xs, wq, ws, bias, jnp.float32)
            rel = _rel(got, want)
            return {"ok": (_eq(got, want) if fmt == "mxint8" else rel < 1e-3), "exact": _eq(got, want), "relerr": rel}
        return run
    checks += [("mx.mxint8", mx("mxint8")), ("mx.mxfp8", mx("mxfp8_e4m3"))]
    return checks


def selected_checks(small, wo_tiles, only):
    """The check list, restricted to the names in ``only`` (None: all)."""
    return [(nm, fn) for nm, fn in check_list(small, wo_tiles) if only is None or nm in only]


def run_checks_child(out_dir, start, small, wo_tiles=None, only=None):
    """Child process: run checks from index ``start``, one JSON line per check (flushed) in checks.jsonl."""
    interp = jax.default_backend() != "gpu"
    path = os.path.join(out_dir, "checks.jsonl")
    for i, (name, fn) in enumerate(selected_checks(small, wo_tiles, only)):
        if i < start:
            continue
        with open(path, "a") as f:
            f.write(json.dumps({"index": i, "name": name, "started": True}) + "\n")
        t0 = time.time()
        if os.environ.get("JDQ_BENCH_CRASH") == name:  # exercises the crash recovery (CPU smoke test)
            os._exit(3)
        try:
            res = fn(interp)
        except Exception as e:  # noqa: BLE001
            res = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:400]}", "trace": traceback.format_exc()[-1500:]}
        res.update(index=i, name=name, seconds=round(time.time() - t0, 1))
        with open(path, "a") as f:
            f.write(json.dumps(res, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
        print(f"check {name:24s} ok={res['ok']}  " + "  ".join(f"{k}={v}" for k, v in res.items()
              if k not in ("ok", "index", "name", "trace")), flush=True)


def run_checks(out_dir, budget_s, small, wo_tiles=None, only=None):
    """Run the checks (``only``: those names) in child processes, resuming after a crash; return ``{name: result}``."""
    path = os.path.join(out_dir, "checks.jsonl")
    if os.path.exists(path):
        os.remove(path)
    t_end = time.time() + budget_s
    start = 0
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", PYTHONUNBUFFERED="1")
    results = {}
    while time.time() < t_end:
        cmd = [sys.executable, os.path.abspath(__file__), "--check-child", "--out", out_dir, "--start", str(start)]
        if small:
            cmd.append("--small")
        if wo_tiles:
            cmd += ["--weight-only-tiles", wo_tiles]
        if only is not None:
            cmd += ["--only-checks", ",".join(sorted(only)) or "-"]
        try:
            rc = subprocess.run(cmd, env=env, timeout=max(5.0, t_end - time.time())).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        lines = [json.loads(s) for s in open(path)] if os.path.exists(path) else []
        done = {r["name"]: r for r in lines if "ok" in r}
        started = [r for r in lines if r.get("started")]
        results.update(done)
        if rc == 0:
            break
        pending = [r for r in started if r["name"] not in done]
        if not pending:
            break
        bad = pending[-1]
        results[bad["name"]] = {"ok": False, "error": f"child process ended ({rc}) during this check", "index": bad["index"]}
        print(f"check {bad['name']}: the child process ended ({rc}); resuming after it", flush=True)
        start = bad["index"] + 1
    return results


# ------------------------------------------------------------------------------------ main


KERNEL_OF = {"jdq_w8a8": ("w8a8.int8.ws", "token_quant.int8.bf16"), "jdq_w8a8_gemm": ("w8a8.int8.ws",),
             "jdq_quant": ("token_quant.int8.bf16", "token_quant.int8.K4608"),
             "jdq_fp8": ("w8a8.fp8.ws", "token_quant.fp8.bf16"), "jdq_w4a8": ("w4a8.g64", "token_quant.int8.bf16"),
             "jdq_w4a8_channel": ("w4a8.channel", "token_quant.int8.bf16"),
             "jdq_w4a8_rega": ("w4a8.g64.rega", "token_quant.int8.bf16"),
             "jdq_w4a8_channel_rega": ("w4a8.channel.rega", "token_quant.int8.bf16"),
             "jdq_mixdit": ("mixdit.k_hi64", "mixdit.split"), "jdq_mixdit_gemm": ("mixdit.k_hi64",), "jdq_mxfp8": ("mx.mxfp8",),
             "jdq_mxint8": ("mx.mxint8",), "jdq_w8a16": ("weight_only.w8a16",), "jdq_w4a16": ("weight_only.w4a16.g128",)}


def kernel_of(name):
    """The device checks that must pass before variant ``name`` is timed."""
    if "@" in name:
        return (f"weight_only.{name}",)
    return KERNEL_OF.get(name, ())


def variant_filter(chosen, sweep):
    """A ``keep(names)`` for :func:`plan_phases`: only the ``chosen`` variants (None: all); with a ``sweep``
    (its variant names), each weight-only kernel is replaced by its sweep configs."""
    def keep(names):
        out = []
        for nm in names:
            if nm in WEIGHT_ONLY and sweep:
                out += [sw for sw in sweep if sw.partition("@")[0] == nm and (chosen is None or nm in chosen)]
            elif chosen is None or nm in chosen:
                out.append(nm)
        return tuple(out)
    return keep


def plan_phases(batches_arg, on_gpu, keep=tuple):
    """``[(variant names, batches)]`` in timing order; ``keep`` filters (and expands) each name tuple."""
    if not on_gpu:
        return [(keep(BASELINES + CORE + EXTRA + WEIGHT_ONLY), ["tiny"])]
    batches = [b if b == "pixart" else int(b) for b in batches_arg.split(",")]
    big = [b for b in batches if b in (16, 32, 64)]
    small_b = [b for b in batches if b in (1, 2, 4)]
    rest = [b for b in batches if b not in big]
    phases = [  # the goals first: W8A8 at batch >= 16, MixDiT, W4A16 at batch 1-4
        (BASELINES + CORE, big), (MID, big), (("xla_bf16",) + WEIGHT_ONLY, small_b),
        (BASELINES + CORE, rest), (MX, big + [b for b in rest if b == "pixart"]),
        (MID, [b for b in rest if b == "pixart"])]
    return [(keep(names), bl) for names, bl in phases]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device-run", action="store_true", help="full run on a GPU")
    p.add_argument("--out", default=None, help="folder for results (default $OUT, else benchmarks/results/latest)")
    p.add_argument("--iters", type=int, default=8)
    p.add_argument("--rotate", type=int, default=3)
    p.add_argument("--budget-s", type=float, default=330.0, help="stop starting new work after this long (checks included)")
    p.add_argument("--check-budget-s", type=float, default=110.0)
    p.add_argument("--batches", default=",".join(map(str, BATCH_ORDER)), help="priority order, e.g. 16,32,64,pixart,1")
    p.add_argument("--layers", default=",".join(DIT_LAYERS), help="DiT linears to time, e.g. qkv,fc2")
    p.add_argument("--variants", default=None,
                   help="time only these variants (comma list; default all) and check only their kernels; "
                        "the tile sweep runs when jdq_w8a16 / jdq_w4a16 are selected")
    p.add_argument("--weight-only-tiles", default=None, metavar="TMxTN[sS],...",
                   help="time W8A16 / W4A16 at batch <= 4 with each of these tile configs (e.g. 64x128,128x64,256x64; "
                        "stages: the most <= 4 that fit shared memory unless given), instead of the tuned one")
    p.add_argument("--copy-mib", type=int, default=256, help="vector size of the copy-bandwidth measurement")
    p.add_argument("--summarize", metavar="DIR", help="print the short tables of kernels.json / e2e.json in DIR and exit")
    p.add_argument("--check-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--small", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--only-checks", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.summarize:
        print_summaries(args.summarize)
        return 0
    out_dir = args.out or default_out()
    os.makedirs(out_dir, exist_ok=True)
    if args.check_child:
        only = None if args.only_checks is None else set(args.only_checks.split(",")) - {"-"}
        run_checks_child(out_dir, args.start, args.small, args.weight_only_tiles, only)
        return 0
    layers = [x for x in args.layers.split(",") if x]
    if not layers or any(x not in DIT_LAYERS for x in layers):
        raise SystemExit(f"--layers {args.layers!r}: each must be one of {list(DIT_LAYERS)}")
    sweep = sweep_names(args.weight_only_tiles)
    known = set(LABELS)
    chosen = None if args.variants is None else [x for x in args.variants.split(",") if x]
    if chosen is not None and (not chosen or any(x not in known for x in chosen)):
        raise SystemExit(f"--variants {args.variants!r}: unknown {sorted(set(chosen) - known) or 'none given'}; "
                         f"known: {sorted(known)}")


    t_start = time.time()
    on_gpu = jax.default_backend() == "gpu"
    if args.device_run and not on_gpu:
        raise SystemExit("--device-run needs a GPU")
    small = not on_gpu
    if not on_gpu:  # smoke: one tiny shape, every variant once
        args.rotate, args.iters = 1, 1
    phases = plan_phases(args.batches, on_gpu, variant_filter(chosen, sweep))
    only = None
    if chosen is not None:
        only = {c for names, _ in phases for nm in names for c in kernel_of(nm)}
    checks = run_checks(out_dir, args.check_budget_s if on_gpu else 600, small, args.weight_only_tiles, only)
    kind = jax.devices()[0].device_kind
    peaks = PEAKS.get(kind, PEAKS["NVIDIA H200"])
    results = {"jax": jax.__version__, "device": kind, "checks": checks, "rows": {}, "peaks": peaks,
               "peaks_from": kind if kind in PEAKS else "NVIDIA H200 (device not in PEAKS)", "argv": sys.argv[1:]}
    passed = {name for name, r in checks.items() if r.get("ok")}
    print(f"jax {jax.__version__}  device {results['device']}  checks passed {len(passed)}/{len(checks)}"
          f"  [{time.time() - t_start:.0f}s]", flush=True)
    copy_elems = (args.copy_mib if on_gpu else 4) * 2**20 // 4
    results["copy_gbs"] = copy_bandwidth_gbs(args.iters, copy_elems)
    print(f"copy bandwidth {results['copy_gbs']:.0f} GB/s ({args.copy_mib if on_gpu else 4} MiB float32 a+1)"
          f"  [{time.time() - t_start:.0f}s]", flush=True)
    json_path = os.path.join(out_dir, "kernels.json")
    write_json(json_path, results)
    impl = "gpu" if on_gpu else "gpu_interpret"
    key = jax.random.key(0)
    stop = False
    for names, batch_list in phases:
        for batch in batch_list:
            shape_list = [("tiny", 128, 256, 128)] if batch == "tiny" else shapes_for(batch, layers)
            for label, m, k, n in shape_list:
                if time.time() - t_start > args.budget_s:
                    stop = True
                    break
                sets = base_sets(key, m, k, n, args.rotate)
                row = results["rows"].setdefault(label, {"m": m, "k": k, "n": n})
                roof = row.setdefault("roof", {})
                cache = {}
                for name in names:
                    if name in row or any(c not in passed for c in kernel_of(name)):
                        continue
                    if time.time() - t_start > args.budget_s:  # a sweep shape holds many variants: stop between them
                        stop = True
                        break
                    if "@" in name:
                        why = sweep_invalid(name, m, k, n)
                        if why:
                            row[name + "_skipped"] = why
                            print(f"  {label} {name} skipped: {why}", flush=True)
                            continue
                    try:
                        fn, ss = variant(name, sets, impl, cache)
                        row[name] = time_ms(fn, ss, args.iters)
                        roof[name] = roofline(name, fn, ss, m, k, n, results["copy_gbs"], peaks)
                    except Exception as e:  # noqa: BLE001
                        row[name + "_error"] = f"{type(e).__name__}: {str(e)[:200]}"
                        print(f"  {label} {name} failed: {row[name + '_error']}", flush=True)
                        continue
                    if "@" in name:  # the tuned config also fills the plain column (summary, speed-up table)
                        from jdq.kernels import tuning

                        base, _, _, cfg = sweep_parts(name)
                        if dataclasses.asdict(cfg) == tuning.lookup("weight_only", m, n=n, k=k):
                            row[base], roof[base] = row[name], roof[name]
                write_json(json_path, results)
                print(f"{label:16s} " + "  ".join(f"{c}={row[c] * 1e3:.1f}us({_pct(row, c)})" for c in names
                                                  if isinstance(row.get(c), float)) + f"  [{time.time() - t_start:.0f}s]",
                      flush=True)
            if stop:
                break
        if stop:
            print(f"budget of {args.budget_s:.0f}s reached", flush=True)
            break
    results["seconds"] = time.time() - t_start
    write_json(json_path, results)
    md = render_markdown(results)
    with open(os.path.join(out_dir, "kernels.md.tmp"), "w") as f:
        f.write(md)
    os.replace(os.path.join(out_dir, "kernels.md.tmp"), os.path.join(out_dir, "kernels.md"))
    print(summary(results))
    return 0


# ------------------------------------------------------------------------------------ tables


def _us(r, c):
    return f"{r[c] * 1e3:.1f}" if isinstance(r.get(c), float) else "-"


def _x(r, base, c):
    return f"{r[base] / r[c]:.2f}" if isinstance(r.get(base), float) and isinstance(r.get(c), float) else "-"


def _pct(r, c):
    """Percent of the roofline floor that variant ``c`` reached in row ``r`` ('-' when unknown)."""
    f = r.get("roof", {}).get(c)
    return f"{100 * f['floor_ms'] / r[c]:.0f}%" if f and isinstance(r.get(c), float) else "-"


def _timed(r):
    """Variant names timed in row ``r`` (plain weight-only columns that only alias a sweep config left out)."""
    names = [c for c in r if isinstance(r.get(c), float) and c not in ("m", "k", "n")]
    if any("@" in c for c in names):
        names = [c for c in names if c not in WEIGHT_ONLY]
    return names


def roofline_rows(results):
    """Markdown lines: each timed variant against its roofline floor."""
    out = ["", f"## Roofline (copy bandwidth measured in this run: {results.get('copy_gbs', float('nan')):.0f} GB/s; "
           f"dense peaks {', '.join(f'{k} {v / 1e12:.0f}' for k, v in results.get('peaks', {}).items())} T/s)", "",
           "floor = max(bytes moved / copy bandwidth, ops / peak); bytes = operands + output as stored; "
           "% = floor / measured time. L2: all rotated input sets fit the 50 MiB L2, so the HBM floor may be beaten.", "",
           "| shape | variant | µs | MB moved | GOP | HBM floor µs | compute floor µs | bound | % of roofline | GB/s | TOP/s | L2 |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, r in results["rows"].items():
        for c in _timed(r):
            f = r.get("roof", {}).get(c)
            if not f:
                continue
            t = r[c]
            out.append(f"| {label} | {label_of(c)} | {t * 1e3:.1f} | {f['bytes'] / 1e6:.1f} | {f['ops'] / 1e9:.1f} | "
                       f"{f['mem_ms'] * 1e3:.1f} | {f['compute_ms'] * 1e3:.1f} | {f['bound']} | {_pct(r, c)} | "
                       f"{f['bytes'] / t / 1e6:.0f} | {f['ops'] / t / 1e9:.0f} | {'yes' if f['l2_resident'] else 'no'} |")
    return out


def sweep_rows(results):
    """Markdown lines: the weight-only tile sweep (one line per shape, kernel and config; skipped ones with the reason)."""
    out = ["", "## Weight-only tile sweep", "",
           "CTAs = (M/tile_m)·(N/tile_n) (132 SMs); regs = float32 accumulator (+ group carry) registers per thread.", "",
           "| shape | kernel | tile_m×tile_n, stages | CTAs | regs | smem KiB | µs | ×XLA bf16 | % of roofline |",
           "|---|---|---|---|---|---|---|---|---|"]
    any_row = False
    for label, r in results["rows"].items():
        for c in sorted({c.removesuffix("_skipped") for c in r if "@" in c and not c.endswith("_error")}):
            base, bits, group, cfg = sweep_parts(c)
            cell = f"| {label} | {LABELS[base]} | {cfg.tile_m}×{cfg.tile_n}, {cfg.stages} | "
            if c + "_skipped" in r:
                out.append(cell + f"- | - | - | skipped: {r[c + '_skipped']} | - | - |")
            else:
                ctas = (r["m"] // cfg.tile_m) * (r["n"] // cfg.tile_n)
                out.append(cell + f"{ctas} | {cfg.acc_registers(group is not None)} | {cfg.smem_bytes(bits) / 1024:.0f} | "
                           f"{_us(r, c)} | {_x(r, 'xla_bf16', c)} | {_pct(r, c)} |")
            any_row = True
    return out if any_row else []


def render_markdown(results):
    """Full markdown tables: checks, then per shape µs, TFLOP/s and ratios to the XLA baselines, roofline, tile sweep."""
    out = [f"jax {results['jax']}, {results['device']}. Times in µs (median of CUPTI iterations); "
           "ratio = time(XLA) / time(jdq).", "", "## Device checks", "", "| kernel | ok | facts |", "|---|---|---|"]
    for name, r in sorted(results["checks"].items(), key=lambda kv: kv[1].get("index", 0)):
        facts = ", ".join(f"{k}={v}" for k, v in r.items() if k not in ("ok", "index", "name", "trace"))
        out.append(f"| {name} | {r.get('ok')} | {facts} |")
    rows = results["rows"]
    cols = [c for c in BASELINES + CORE + EXTRA + WEIGHT_ONLY if any(isinstance(r.get(c), float) for r in rows.values())]
    out += ["", "## Times (µs)", "", "| shape | M | K | N | " + " | ".join(LABELS[c] for c in cols) + " |",
            "|---|---|---|---|" + "---|" * len(cols)]
    for label, r in rows.items():
        out.append(f"| {label} | {r['m']} | {r['k']} | {r['n']} | " + " | ".join(_us(r, c) for c in cols) + " |")
    jcols = [c for c in cols if c.startswith("jdq_") and c != "jdq_quant"]
    out += ["", "## Speed-up over XLA bf16 / int8 / fp8 dots (TFLOP/s of the jdq op in brackets)", "",
            "| shape | " + " | ".join(LABELS[c] for c in jcols) + " |", "|---|" + "---|" * len(jcols)]
    for label, r in rows.items():
        fl = 2 * r["m"] * r["n"] * r["k"]
        cells = []
        for c in jcols:
            if not isinstance(r.get(c), float):
                cells.append("-")
                continue
            cells.append(f"{_x(r, 'xla_bf16', c)} / {_x(r, 'xla_int8', c)} / {_x(r, 'xla_fp8', c)} ({fl / r[c] / 1e9:.0f})")
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    quant = [(label, r) for label, r in rows.items() if isinstance(r.get("jdq_quant"), float)]
    if quant:
        out += ["", "## Per-token quantization alone", "",
                "| shape | XLA µs | jdq one-pass µs | speed-up | jdq GB/s (x read + codes written) |", "|---|---|---|---|---|"]
    for label, r in quant:
        gbs = r["m"] * r["k"] * 3 / r["jdq_quant"] / 1e6
        out.append(f"| {label} | {_us(r, 'xla_quant')} | {_us(r, 'jdq_quant')} | {_x(r, 'xla_quant', 'jdq_quant')} | {gbs:.0f} |")
    mix = [(label, r) for label, r in rows.items() if isinstance(r.get("jdq_mixdit"), float)]
    if mix:
        out += ["", "## MixDiT split: linear = XLA activation split + GEMM", "",
                "| shape | linear µs | GEMM alone µs | split alone µs | split share of linear | GEMM ×XLA bf16 |",
                "|---|---|---|---|---|---|"]
        for label, r in mix:
            share = (f"{100 * r['xla_mixdit_split'] / r['jdq_mixdit']:.0f}%"
                     if isinstance(r.get("xla_mixdit_split"), float) else "-")
            out.append(f"| {label} | {_us(r, 'jdq_mixdit')} | {_us(r, 'jdq_mixdit_gemm')} | {_us(r, 'xla_mixdit_split')} | "
                       f"{share} | {_x(r, 'xla_bf16', 'jdq_mixdit_gemm')} |")
    if any(r.get("roof") for r in rows.values()):
        out += roofline_rows(results)
    out += sweep_rows(results)
    return "\n".join(out) + "\n"


SUMMARY_COLS = ("jdq_w8a8", "jdq_w8a8_gemm") + tuple(c for c in EXTRA if c.startswith("jdq_")) + WEIGHT_ONLY


def summary(results):
    """A short table (printed last): check results, ×bf16 and % of roofline of each jdq op per shape, best sweep configs."""
    bad = [n for n, r in results["checks"].items() if not r.get("ok")]
    rows = results["rows"]
    cols = [c for c in SUMMARY_COLS if any(isinstance(r.get(c), float) for r in rows.values())] or list(SUMMARY_COLS[:2])
    head = "shape            " + " ".join(f"{c[4:]:>12s}" for c in cols)
    lines = ["", f"SUMMARY  jax {results['jax']}  {results['device']}  checks failed: {bad or 'none'}",
             head + "   (speed-up over XLA bf16 dot)"]
    for label, r in rows.items():
        lines.append(f"{label:16s} " + " ".join(f"{_x(r, 'xla_bf16', c):>12s}" for c in cols))
    if any(r.get("roof") for r in rows.values()):
        lines += ["", f"% of roofline (copy {results.get('copy_gbs', float('nan')):.0f} GB/s, dense peaks)",
                  "shape            " + f"{'xla_bf16':>12s} " + " ".join(f"{c[4:]:>12s}" for c in cols)
                  + f" {'mixdit_split':>12s}"]
        for label, r in rows.items():
            lines.append(f"{label:16s} " + " ".join(f"{_pct(r, c):>12s}" for c in ("xla_bf16",) + tuple(cols)
                                                      + ("xla_mixdit_split",)))
    best = []
    for label, r in rows.items():
        for base in WEIGHT_ONLY:
            timed = [(r[c], c) for c in r if c.startswith(base + "@") and isinstance(r.get(c), float)]
            if timed:
                t, c = min(timed)
                best.append(f"{label:16s} {base[4:]:6s} best {c.partition('@')[2]:10s} {t * 1e3:7.1f} us  "
                            f"x bf16 {_x(r, 'xla_bf16', c):>5s}  roofline {_pct(r, c):>4s}  "
                            f"(tuned {_us(r, base)} us)")
    if best:
        lines += ["", "weight-only tile sweep: best config per shape"] + best
    return "\n".join(lines)


def print_summaries(folder):
    """The short kernel summary and the end-to-end table, from the JSON files of a run in ``folder``."""
    kj, ej = os.path.join(folder, "kernels.json"), os.path.join(folder, "e2e.json")
    if os.path.exists(kj):
        print(summary(json.load(open(kj))))
    else:
        print(f"(no {kj})")
    if os.path.exists(ej):
        e = json.load(open(ej))
        print(f"\nE2E  DiT-XL/2 step, batch {e.get('batch')} + CFG, {e.get('device')}, jax {e.get('jax')}")
        for name, v in e.get("times", {}).items():
            sk = v.get("speedup_kernel")
            print(f"  {name:18s} wall {v['wall_ms']:8.2f} ms  kernels {v.get('kernel_ms') or float('nan'):8.2f} ms  "
                  f"x bf16 wall {v.get('speedup_wall', float('nan')):.2f} kernel {sk if sk is None else round(sk, 2)}")
        for k, v in e.get("weight_bytes", {}).items():
            base = e["weight_bytes"]["bf16"]["bytes"]
            print(f"  weights {k:10s} {v['bytes'] / 2**20:8.1f} MiB  {base / v['bytes']:.2f}x smaller than bf16")
        print("  checks: " + ", ".join(f"{k}={v if not isinstance(v, float) else f'{v:.2e}'}" for k, v in e.items()
                                       if k.startswith("relerr") or k == "finite"))
    else:
        print(f"(no {ej})")


if __name__ == "__main__":
    sys.exit(main())
