"""Per-device block sizes of the GPU kernels, with a default; measured by ``benchmarks/kernels.py``.

A table maps ``device_kind`` (``jax.devices()[0].device_kind``, e.g. ``"NVIDIA H200"``) to a
list of ``(max_m, config kwargs)`` or ``(max_m, {"min_n": .., "min_k": ..}, config kwargs)`` rows
per op: the first row whose ``max_m`` is at least the GEMM's M (and whose ``min_n`` / ``min_k``,
if any, are at most its N / K) is used. Unknown devices use ``"default"``. The numbers behind
each entry are in ``jdq/kernels/NOTES.md``.

``JDQ_TUNING`` overrides entries of the chosen row at trace time, for A / B measurements without
editing a table: ``JDQ_TUNING="quant_attention_split.keep_logits=False,w8a8.stages=3"`` (``op.key=value``
pairs, comma-separated, each value a Python literal). It is read when an op looks its config up, at trace
time and outside any ``jit`` of the op's own, so within one process each setting compiles its own kernel.
"""

from __future__ import annotations

import ast
import os

from jdq.kernels._mgpu import device_kind, num_sms

INF = 1 << 62

# W8A8 (jdq.kernels.w8a8.gpu.Config). H200, jax 0.11.2, DiT-XL/2 shapes (NOTES.md, run 1): the
# warp-specialised persistent kernel with two 128x64 warpgroup tiles (CTA 128x128) was best or
# within 3% of best on every tuned shape.
W8A8 = {
    "default": [(INF, dict(kind="ws", tile_m=128, tile_n=64, tile_k=128, stages=4, wg_dim="n"))],
    # 2026-12-01 (benchmarks/results/fused_device_run1.md): 5 stages, fc2 b32 69.5 -> 65.1 µs, qkv 63.6 -> 63.2 µs;
    # 128x128 warpgroup tiles, a 256-row CTA, m-minor tile order and the 2-stage "pipe" were slower or equal.
    "NVIDIA H200": [(INF, dict(kind="ws", tile_m=128, tile_n=64, tile_k=128, stages=5, wg_dim="n"))],
    "NVIDIA H100 80GB HBM3": [(INF, dict(kind="ws", tile_m=128, tile_n=64, tile_k=128, stages=4, wg_dim="n"))],
}

# Weight-only W8A16 / W4A16 (jdq.kernels.weight_only.gpu.Config). H200, jax 0.11.2, run 5 tile
# sweep at DiT-XL/2 qkv (N = 3456) and fc2 (N = 1152) (benchmarks/results/kernels_device_run5.md):
# at M = 256 128x64 is fastest for qkv (8.9 / 14.4 µs for W8A16 / W4A16) and 64x64 for fc2
# (22.3 / 38.6 µs; fc2's 1152 columns give 64x128 only 36 CTAs for 132 SMs); at M = 1024 256x64
# (2 stages) is fastest on all four shapes (each CTA along M dequantizes the same weight tile
# again, so fewer M tiles win). Run 9 (split-K sweep, kernels_device_run9.md): at fc2's K = 4608
# a split of K over 3 CTAs is fastest at both M (M = 256: 128x64 k3, W4A16 30.6 -> 17.6 µs;
# M = 1024: 256x64 k3, 62.7 -> 51.3 µs); at K = 1152 (qkv) every split was slower.
# Run 11 (fc1 / proj sweep, kernels_device_run11.md), M = 256: fc1 (N = 4608) 256x64 (W8A16 /
# W4A16 12.5 / 19.2 µs vs 16.8 / 22.4 with 128x64), proj (N = K = 1152) 128x64 k3 (6.5 / 8.1 vs
# 6.9 / 9.7 with 64x64). A split that does not divide a GEMM's K steps falls back to no split
# (jdq.kernels.lowered). Larger M, N between 1152 and 3456, K between 1152 and 4608: not measured.
# 2026-11-22 run 14 (same-run sweep of both kernels, benchmarks/results/kernels_device_run14.md): the
# register-A kernel (kind="rega") is faster for W4A16 at M = 1024 on all four layers (-13 to -22 %)
# and at M = 256 for fc1 / fc2 (-15 / -5 %), within +-5 % for W8A16 (fc2 -7 %); slower at M = 256
# for qkv / proj (+6 / +11 % W4A16), which keep the shared-memory kernel.
WEIGHT_ONLY = {
    "default": [(INF, dict(tile_m=64, tile_n=128, tile_k=128, stages=4))],
    "NVIDIA H200": [(256, {"min_n": 4608}, dict(tile_m=256, tile_n=64, tile_k=128, stages=2, kind="rega")),
                    (256, {"min_n": 3456}, dict(tile_m=128, tile_n=64, tile_k=128, stages=4)),
                    (256, {"min_k": 4608}, dict(tile_m=128, tile_n=64, tile_k=128, stages=4, split_k=3, kind="rega")),
                    (256, dict(tile_m=128, tile_n=64, tile_k=128, stages=4, split_k=3)),
                    (1024, {"min_k": 4608}, dict(tile_m=256, tile_n=64, tile_k=128, stages=2, split_k=3, kind="rega")),
                    (1024, dict(tile_m=256, tile_n=64, tile_k=128, stages=2, kind="rega")),
                    (INF, dict(tile_m=64, tile_n=128, tile_k=128, stages=4))],
}

# Not yet tuned on a device (defaults from the shared-memory budget and the W8A8 results):
# one-pass per-token quantization (jdq.kernels.token_quant.gpu.Config), MixDiT and MX GEMMs.
TOKEN_QUANT = {"default": [(INF, dict(smem_bytes=72 * 1024))]}
# LayerNorm + modulation + per-token quantization (jdq.kernels.norm_quant.gpu.Config). H200, 2026-12-01
# (benchmarks/results/fused_device_run2.md), qkv input at b32 / PixArt-Sigma-1024: 16 rows per CTA with shared-memory
# passes 23.3 / 11.3 µs, 8 rows in registers 16.9 / 9.4 µs, 4 rows in registers 15.8 / 9.0 µs (24 KiB budget).
NORM_QUANT = {"default": [(INF, dict(smem_bytes=24 * 1024))]}
# W4A8: run 15 (H200, b32, all four layers, kernels_device_run15.md): the register-A kernel halves the
# g64 linear (qkv 463.5 -> 235.7 µs) and equals or beats the shared-memory one per channel (fc2
# 250.9 -> 215.6 µs); its 128x64 (M x N) tile is untuned.
W4A8 = {"default": [(INF, dict(tile_m=128, tile_n=128, stages=3))],
        "NVIDIA H200": [(INF, dict(tile_m=128, tile_n=64, stages=4, kind="rega"))]}
MIXDIT = {"default": [(INF, dict(tile_m=128, tile_n=128, stages=2))]}
# The one-pass MixDiT activation split (jdq.kernels.mixdit.split_gpu.SplitConfig): 80 MX6 values per thread
# (DiT-XL/2 K = 1152 -> 8 rows per CTA, K = 4608 -> 2), unrolled, E4M3 codes by integer ops: the configuration
# checked bit-exact on an H200 (device run 1: 34.6 µs at M = 8192, K = 1152, 1.95x XLA's split); the loop,
# cvt and shared-memory-table variants are not yet timed (benchmarks/mixdit_split.py --split-configs).
MIXDIT_SPLIT = {"default": [(INF, dict(elems_per_thread=80, max_rows=32, spread_banks=True, e4m3="bits"))]}
MX = {"default": [(INF, dict(tile_m=128, tile_n=128, blocks_per_step=4, stages=2))]}
# FP8 attention (jdq.kernels.fp8_attention.gpu.Config), looked up by the key length Lk. H200, jax 0.11.2, 2026-12-02
# (benchmarks/results/fp8_attention_device_run{1,2}.md), kernel alone: DiT-XL/2 b64 (L = 256) 64 x 64 blocks with P.V
# into the running accumulator 77.6 us (cuDNN bf16 77.6; 64 x 64 without 93.5, 128 x 64 91.5, 64 x 128 105.5, the
# warp-specialised kernel 117-137); PixArt-Sigma-1024 (L = 4096) 64 x 128 434.9 us (cuDNN 395.7; 128 x 64 444.5,
# 64 x 64 463.4; the in-place variants were not timed there: run 2's 5 % check threshold rejected them at 5.1 %).
FP8_ATTENTION = {"default": [(1024, dict(block_q=64, block_kv=64, stages=2, acc_in_place=True)),
                             (INF, dict(block_q=64, block_kv=128, stages=2))]}

# Fake-quant attention (jdq.kernels.quant_attention.gpu.Config), looked up by Lk: 64 keys per step (a pair cast,
# MX9 / MX6 / MX4, takes 32 when the row's block_kv is not a multiple of 32); pass 2 recomputes q.k^T: keeping pass
# 1's logits was not faster (H200, DiT-XL/2 b64, results/quant_attention_device_run6: MX6 366.6-371.7 µs kept against
# 353.6-356.6 recomputed, MXFP8 348.2-361.7 against 349.1-350.2).
QUANT_ATTENTION = {"default": [(INF, dict(block_q=64, block_kv=64, stages=2))]}
# MixDiT's probability split (ProbCast "split"): pass 1 in 16-key WGMMA tiles, 32 keys per step, pass 1's logits kept
# for pass 2 (H200, DiT-XL/2 b64, results/quant_attention_device_run6: 495.0 µs against 515.4 recomputed, 547.6 for
# the untiled 64-key config), the blocks ranked by a sorting network and pass 1 streamed in 32-key chunks
# (results/quant_attention_device_run9: 406.0 µs against 495.6 without either, 453.6 ranked only, 504.3 streamed only).
QUANT_ATTENTION_SPLIT = {"default": [(INF, dict(block_q=64, block_kv=32, stages=2, split_tiles=True, keep_logits=True,
                                                sort_ranks=True, split_stream=True))]}

# Pallas TPU GEMMs (every kind): maximal tiles; jdq.kernels.lowered shrinks tn / tk to the largest
# multiple of 128 (MX: of 32) that divides N / K (DiT K = 1152 -> tk 384) and pads M to tm. Not timed
# (no TPU was available): 256 / 512 follow the MXU-friendly sizes of the Pallas TPU matmul guide.
TPU_GEMM = {"default": [(INF, dict(tm=256, tn=256, tk=512))]}

TABLES = {"w8a8": W8A8, "weight_only": WEIGHT_ONLY, "token_quant": TOKEN_QUANT, "norm_quant": NORM_QUANT, "w4a8": W4A8, "mixdit": MIXDIT,
          "mixdit_split": MIXDIT_SPLIT, "mx": MX, "fp8_attention": FP8_ATTENTION,
          "quant_attention": QUANT_ATTENTION, "quant_attention_split": QUANT_ATTENTION_SPLIT, "tpu_gemm": TPU_GEMM}


def lookup(op: str, m: int, device: str | None = None, n: int | None = None, k: int | None = None) -> dict:
    """Config kwargs of ``op`` for an (m, k) x (k, n) GEMM on ``device`` (default: the current one).

    Rows with a ``min_n`` / ``min_k`` apply only when ``n`` / ``k`` is given and at least that.
    """
    if op not in TABLES:
        raise KeyError(f"no tuning table for op {op!r}; known: {sorted(TABLES)}")
    return {**_row(op, m, device, n, k), **overrides().get(op, {})}


def overrides(spec: str | None = None) -> dict:
    """``{op: {key: value}}`` parsed from ``spec`` (default: ``$JDQ_TUNING``); a bad entry raises naming it."""
    spec = os.environ.get("JDQ_TUNING", "") if spec is None else spec
    out: dict = {}
    for item in filter(None, (x.strip() for x in spec.split(","))):
        name, eq, text = item.partition("=")
        op, dot, key = name.strip().partition(".")
        if not (eq and dot and key):
            raise ValueError(f"JDQ_TUNING: {item!r} is not op.key=value")
        if op not in TABLES:
            raise ValueError(f"JDQ_TUNING: {item!r} names no tuning table; known: {sorted(TABLES)}")
        try:
            value = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            raise ValueError(f"JDQ_TUNING: the value of {item!r} is not a Python literal") from None
        out.setdefault(op, {})[key.strip()] = value
    return out


def _row(op, m, device, n, k):
    table = TABLES[op]
    rows = table.get(device or device_kind(), table["default"])
    given = {"min_n": n, "min_k": k}
    for row in rows:
        max_m, kw = row[0], row[-1]
        cond = row[1] if len(row) == 3 else {}
        if m <= max_m and all(given[key] is not None and given[key] >= v for key, v in cond.items()):
            out = dict(kw)
            if op == "w8a8" and out.get("kind") == "ws":
                out.setdefault("num_sms", num_sms())
            return out
    return dict(rows[-1][-1])


__all__ = ["FP8_ATTENTION", "MIXDIT", "MIXDIT_SPLIT", "MX", "NORM_QUANT", "QUANT_ATTENTION", "QUANT_ATTENTION_SPLIT", "TABLES", "TOKEN_QUANT", "TPU_GEMM", "W4A8", "W8A8",
           "WEIGHT_ONLY", "lookup", "overrides"]
