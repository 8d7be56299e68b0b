"""The W8A8 / FP8 op: int8 (or E4M3) per-token activations × per-channel weights, with the block's ops fused.

Kinds ``w8a8`` (``codes`` (N, K) int8, ``scale`` (N,) f32) and ``fp8`` (``codes`` (N, K)
float8_e4m3fn). On the GPU the activation's LayerNorm + modulation runs inside its per-token
quantization (:mod:`jdq.kernels.norm_quant`), the GELU / SiLU, gated residual and q/k/v split in
the GEMM epilogue (:mod:`.gpu`); elsewhere those run in XLA around the reference (:mod:`.ref`).
"""

from __future__ import annotations

import jax.numpy as jnp

from jdq.kernels.activations import activate
from jdq.kernels.norm_quant.api import norm_quantize_tokens
from jdq.kernels.op import (
    KernelOp,
    LoweredWeight,
    dispatch,
    int_weight_reason,
    is_token_cast,
    pad_rows,
    scaled_codes,
    single_casts,
    tpu_tiles,
)
from jdq.kernels.token_quant.api import quantize_tokens


def supports(w, a):
    """``("w8a8" | "fp8", why)`` for int8-per-channel × int8-per-token or E4M3 × E4M3 sites; else why not (or ``(None, None)``)."""
    if not single_casts(w, a) or getattr(w.spec, "kind", None) not in ("int", "fp8"):
        return None, None
    spec = w.spec
    if spec.kind == "fp8":
        if w.scaling != "dynamic" or spec.element != "e4m3" or spec.granularity != "row" or spec.rounding != "even":
            return None, f"fp8 weight {w.fmt} ({spec.granularity}, {w.scaling}) is not per-channel E4M3"
        if a is not None and is_token_cast(a, "fp8", element="e4m3"):
            return "fp8", "E4M3 per-token x E4M3 per-channel"
        return None, "fp8 weights need E4M3 per-token activations"
    if a is None or spec.bits == 4 and is_token_cast(a, "int", bits=8):
        return None, None  # weight-only, or int4 weights: other ops'
    why = int_weight_reason(w)
    if why is not None:
        return None, why
    if not is_token_cast(a, "int", bits=8):
        return None, f"activation format {a.fmt} ({a.scaling}) has no kernel"
    if spec.bits == 8 and spec.granularity == "row":
        return "w8a8", "int8 per-token x int8 per-channel"
    return None, "int8 activations need int8 per-channel or int4 weights"


def pack(w, kind, w_op, a_op):
    """``(LoweredWeight, dequantized (K, N))`` of a (K, N) weight, or ``(None, reason)``."""
    k, n = w.shape
    packed = scaled_codes(w, w_op.spec, fp8=kind == "fp8")
    if isinstance(packed, str):
        return None, packed
    codes, scale, _, deq = packed
    return LoweredWeight(codes, scale[:, 0], kind, k, n, None), deq


def _interpret_config():
    from jdq.kernels.w8a8.gpu import Config

    return Config("pipe", 128, 128, 128, 2)


def _interpret_ws_config():
    from jdq.kernels.w8a8.gpu import Config

    return Config("ws", 64, 64, 128, 2, wg_dim="n", num_sms=2)


def _extras_fit(cfg, m, n, residual, gate, split) -> bool:
    """Whether the fused residual / split epilogue of the ``ws`` kernel applies to an (M, N) output."""
    cm, cn = cfg.cta_tile()
    if cfg.kind != "ws" or m % cm:
        return False
    if split > 1 and (n % split or (n // split) % cn):
        return False
    return residual is None or (m % gate.shape[0] == 0 and (m // gate.shape[0]) % cfg.tile_m == 0)


def _finish(y, activation, residual, gate, split, out_dtype):
    from jdq.kernels.w8a8 import ref

    y = activate(y, activation)
    if residual is not None:
        y = ref.gated_residual(y, residual, gate, out_dtype)
    return ref.split_columns(y, split) if split > 1 else y


def _gpu(xq, xs, wq, ws, b, out_dtype, *, impl, config, activation, residual, gate, split):
    from jdq.kernels import tuning
    from jdq.kernels.w8a8.gpu import FUSED_ACTIVATIONS, Config, w8a8_matmul_gpu

    m, k = xq.shape
    n = wq.shape[0]
    extras = residual is not None or split > 1
    if config is None and impl == "gpu_interpret":  # one warpgroup ("pipe"): far fewer simulated threads
        ws_cfg = _interpret_ws_config()
        config = ws_cfg if extras and _extras_fit(ws_cfg, m, n, residual, gate, split) else _interpret_config()
    cfg = config or Config(**tuning.lookup("w8a8", m))
    cm, cn = cfg.cta_tile()
    if n % cn or k % cfg.tile_k:
        return None
    bb = jnp.zeros((n,), jnp.float32) if b is None else b
    fused = activation if activation in FUSED_ACTIVATIONS else None
    interp = impl == "gpu_interpret"
    if extras and fused == activation and _extras_fit(cfg, m, n, residual, gate, split):
        return w8a8_matmul_gpu(xq, xs, wq, ws, bb, out_dtype, cfg, interpret=interp, activation=fused,
                               residual=residual, gate=gate, split=split)
    xq_p, m0 = pad_rows(xq, cm)
    xs_p, _ = pad_rows(xs, cm)
    out = w8a8_matmul_gpu(xq_p, xs_p, wq, ws, bb, out_dtype, cfg, interpret=interp, activation=fused)
    return _finish(out[:m0], None if fused else activation, residual, gate, split, out_dtype)


def _tpu(xq, xs, wq, ws, b, out_dtype, *, impl, config, activation, residual, gate, split):
    from jdq.kernels.w8a8.tpu import w8a8_matmul_tpu

    tiles = tpu_tiles(xq.shape[0], wq.shape[0], xq.shape[1])
    (xq_p, m0), (xs_p, _) = pad_rows(xq, tiles["tm"]), pad_rows(xs, tiles["tm"])
    out = w8a8_matmul_tpu(xq_p, xs_p, wq, ws, b, out_dtype, interpret=impl == "tpu_interpret", **tiles)
    return _finish(out[:m0], activation, residual, gate, split, out_dtype)


def _xla(xq, xs, wq, ws, b, out_dtype, *, impl, config, activation, residual, gate, split):
    from jdq.kernels.w8a8 import ref

    return _finish(ref.w8a8_matmul(xq, xs, wq, ws, b, out_dtype), activation, residual, gate, split, out_dtype)


IMPLEMENTATIONS = {"gpu": _gpu, "tpu": _tpu, "xla": _xla}


def w8a8_matmul(xq, xs, wq, ws, b, out_dtype, impl: str = "auto", config=None, activation: str | None = None,
                residual=None, gate=None, split: int = 1):
    """The W8A8 GEMM (int8 or E4M3 operands, already quantized) on the implementation ``impl`` selects.

    GPU kernels need K and N to be multiples of the tile; M is zero-padded. Shapes the kernel
    cannot tile go to the XLA reference (same result: int8 accumulation is exact). ``activation``
    (a name in :data:`jdq.kernels.activations.ACTIVATIONS`) runs in the GPU kernel's epilogue where
    it is in :data:`jdq.kernels.w8a8.gpu.FUSED_ACTIVATIONS`, else on the output. ``residual`` (M, N)
    with ``gate`` (G, N): the output is :func:`jdq.kernels.w8a8.ref.gated_residual` of it;
    ``split`` > 1: a tuple of the column parts (:func:`~jdq.kernels.w8a8.ref.split_columns`); both
    in the GPU epilogue where the ``ws`` kernel's tiles fit, else in XLA.
    """
    return dispatch(IMPLEMENTATIONS, impl, xq, xs, wq, ws, b, out_dtype, config=config, activation=activation,
                    residual=residual, gate=gate, split=split)


def linear(x, lw: LoweredWeight, bias, *, impl, activation=None, norm=None, residual=None, split=1):
    """``residual(act(norm(x) @ W + b))`` for ``x`` (…, K): per-token quantization (fused with ``norm`` where it can be) and the GEMM."""
    lead = x.shape[:-1]
    fmt = "int8" if lw.kind == "w8a8" else "fp8_e4m3"
    q = None if norm is None else norm_quantize_tokens(x, norm, fmt, impl)
    if q is None:
        x = x if norm is None else norm(x)
        q = quantize_tokens(x.reshape(-1, lw.k), fmt, impl)
    res, gate = (None, None) if residual is None else (residual.x.reshape(-1, lw.n), residual.gate)
    y = w8a8_matmul(*q, lw.codes, lw.scale, bias, x.dtype, impl, activation=activation, residual=res, gate=gate,
                    split=split)
    if split > 1:
        return tuple(part.reshape(*lead, lw.n // split) for part in y)
    return y.reshape(*lead, lw.n)


OP = KernelOp("w8a8", ("w8a8", "fp8"), supports, pack, linear, IMPLEMENTATIONS, fuses_block_ops=True)
