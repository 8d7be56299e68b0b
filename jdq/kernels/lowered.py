"""Packed weights for the kernels, and ``lowered_linear``: the speed path of ``qlinear``.

A :class:`LoweredWeight` is what :func:`jdq.kernels.lower` stores per lowered site: the packed
weight arrays in the layout its kernel reads, plus static metadata. :func:`lowered_linear`
quantizes the activation the way the plan's activation transform does and runs the kernel.

Kinds and layouts (``K`` in features, ``N`` out features):

========  ==============================================  ========================================
kind      arrays                                          semantics
========  ==============================================  ========================================
w8a8      ``codes`` (N, K) int8, ``scale`` (N,) f32       int8 per-token activations
                                                          (:mod:`jdq.kernels.w8a8.ref`)
fp8       ``codes`` (N, K) float8_e4m3fn, ``scale`` (N,)  E4M3 per-token activations, per-channel
                                                          weights (same kernel and reference)
w4a8      ``codes`` (N, K/2) packed int4, ``scale``       int8 per-token activations, int4 weights
          (N, G), ``group_size``                          per channel or group
                                                          (:mod:`jdq.kernels.w4a8.ref`)
w8a16     ``codes`` (N, K) int8, ``scale`` (N, G) f32     bf16/f32 activations; ``G`` groups of
                                                          ``group_size`` along K (``G = 1``: per
                                                          channel)
w4a16     ``codes`` (N, K/2) int8 packed, ``scale``       as w8a16 with 4-bit codes packed two per
          (N, G) f32                                      byte (:mod:`jdq.kernels.weight_only.ref`)
mixdit    ``codes`` (N, K_lo) E4M3, ``scale`` (N,),       MX9 outlier channels + MX6 rest
          ``aux`` {``w_hi`` (N, K_hi) bf16, ``perm``      (:mod:`jdq.kernels.mixdit.ref`);
          (K,) int32}, ``meta`` ``k_hi``                  ``k_hi`` outlier channels
mxfp8     ``codes`` (N, K) E4M3, ``scale`` (K/32, N)      MXFP8 E4M3 activations and weights,
          uint8 E8M0                                      blocks of 32 (:mod:`jdq.kernels.mx.ref`)
mxint8    ``codes`` (N, K) int8, ``scale`` (K/32, N)      MXINT8 activations and weights
          uint8 E8M0
========  ==============================================  ========================================

Implementations (``impl``): ``"auto"`` (the Mosaic GPU kernels on a GPU, XLA elsewhere), ``"xla"``
(the references in jnp: XLA's int8 / fp8 dots), ``"gpu"``, ``"gpu_xla_quant"`` (the GPU GEMM kernels
with the per-token activation quantization left to XLA), ``"gpu_interpret"`` (the GPU kernels in
Pallas GPU interpret mode, on a CPU), ``"tpu"``, ``"tpu_interpret"`` (the Pallas TPU kernels of every
kind, ``<op>/tpu.py``; tiles from ``tuning.TPU_GEMM`` shrunk to divide N and K, M zero-padded;
tested in interpret mode only, no TPU was available). On the GPU path the per-token activation
quantization of w8a8 / fp8 / w4a8 runs in the one-pass kernel of :mod:`jdq.kernels.token_quant`;
shapes a kernel cannot tile fall back to the XLA reference (same result).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jdq.kernels.activations import activate

KINDS = ("w8a8", "fp8", "w4a8", "w8a16", "w4a16", "mixdit", "mxfp8", "mxint8")
IMPLS = ("auto", "xla", "gpu", "gpu_xla_quant", "gpu_interpret", "tpu", "tpu_interpret")
MX_FORMAT = {"mxfp8": "mxfp8_e4m3", "mxint8": "mxint8"}


@dataclasses.dataclass(frozen=True)
class LoweredWeight:
    """A packed weight: ``codes``/``scale`` (and ``aux``) arrays; static ``kind``, ``k``, ``n``, ``group_size``, ``meta``."""

    codes: jax.Array
    scale: jax.Array
    kind: str
    k: int
    n: int
    group_size: int | None = None
    aux: Any = None  # dict of further arrays (kind-specific), or None
    meta: tuple = ()  # static (name, value) pairs (kind-specific)

    @property
    def nbytes(self) -> int:
        """Bytes of the packed arrays as stored."""
        arrays = [self.codes, self.scale] + jax.tree.leaves(self.aux)
        return sum(int(a.size) * jnp.dtype(a.dtype).itemsize for a in arrays)

    def get_meta(self, name: str):
        """The static metadata entry ``name``."""
        return dict(self.meta)[name]


jax.tree_util.register_dataclass(LoweredWeight, data_fields=["codes", "scale", "aux"],
                                 meta_fields=["kind", "k", "n", "group_size", "meta"])


def _interpret_w8a8_config():
    from jdq.kernels.w8a8.gpu import Config

    return Config("pipe", 128, 128, 128, 2)


def _resolve_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        backend = jax.default_backend()
        return "gpu" if backend == "gpu" else ("tpu" if backend == "tpu" else "xla")
    return impl


def _on_gpu(impl):
    return impl in ("gpu", "gpu_xla_quant", "gpu_interpret")


def _on_tpu(impl):
    return impl in ("tpu", "tpu_interpret")


def _largest_tile(dim: int, cap: int, multiple: int, ok=lambda t: True) -> int:
    """The largest multiple of ``multiple`` that is ≤ ``cap``, divides ``dim`` and passes ``ok``; else ``dim``."""
    for t in range(min(cap, dim) // multiple * multiple, 0, -multiple):
        if dim % t == 0 and ok(t):
            return t
    return dim


def _tpu_tiles(m: int, n: int, k: int, k_multiple: int = 128, group: int | None = None) -> dict:
    """Tiles for a Pallas TPU GEMM: the tuning table's, shrunk so that tn / tk divide N / K (M is padded to tm)."""
    from jdq.kernels import tuning

    t = tuning.lookup("tpu_gemm", m)
    fits_group = (lambda tk: tk % group == 0 or group % tk == 0) if group else (lambda tk: True)
    return dict(tm=min(t["tm"], m), tn=_largest_tile(n, t["tn"], 128),
                tk=_largest_tile(k, t["tk"], k_multiple, fits_group))


def _pad_rows(a, multiple):
    m = a.shape[0]
    pad = (-m) % multiple
    return (jnp.pad(a, ((0, pad),) + ((0, 0),) * (a.ndim - 1)), m) if pad else (a, m)


def quantize_tokens(x, fmt: str = "int8", impl: str = "auto", config=None):
    """Per-token quantization of ``x`` (M, K) to ``fmt`` (``"int8"``/``"fp8_e4m3"``): the one-pass kernel or XLA."""
    from jdq.kernels.token_quant.ref import quantize_rows

    impl = _resolve_impl(impl)
    if impl in ("gpu", "gpu_interpret") and x.ndim == 2 and x.dtype in (jnp.bfloat16, jnp.float32):
        from jdq.kernels import tuning
        from jdq.kernels.token_quant.gpu import Config, quantize_rows_gpu

        cfg = config or Config(**tuning.lookup("token_quant", x.shape[0]))
        if cfg.supports(x.shape[0], x.shape[1], jnp.dtype(x.dtype).itemsize):
            return quantize_rows_gpu(x, fmt, cfg, interpret=impl == "gpu_interpret")
    return quantize_rows(x, fmt)


def norm_quantize_tokens(x, norm, fmt: str = "int8", impl: str = "auto", config=None):
    """Codes and scales of ``norm(x)`` for ``x`` (B, L, K) with the fused kernel, or ``None`` where it does not apply.

    ``norm`` has ``shift`` / ``scale`` (B, K) and ``eps`` (``jdq.models.layers.AdaNorm``); the
    kernel (:mod:`jdq.kernels.norm_quant`) runs for ``impl`` ``"gpu"`` / ``"gpu_interpret"`` when
    the rows per CTA divide the L tokens of a sample.
    """
    impl = _resolve_impl(impl)
    if impl not in ("gpu", "gpu_interpret") or x.ndim != 3 or x.dtype not in (jnp.bfloat16, jnp.float32):
        return None
    from jdq.kernels import tuning
    from jdq.kernels.norm_quant.gpu import Config, norm_quantize_rows_gpu

    b, l, k = x.shape
    cfg = config or Config(**tuning.lookup("norm_quant", b * l))
    if norm.shift.shape != (b, k) or not cfg.supports(b * l, k, jnp.dtype(x.dtype).itemsize, l):
        return None
    return norm_quantize_rows_gpu(x.reshape(b * l, k), norm.shift, norm.scale, l, float(norm.eps), fmt, cfg,
                                  interpret=impl == "gpu_interpret")


def _interpret_ws_config():
    from jdq.kernels.w8a8.gpu import Config

    return Config("ws", 64, 64, 128, 2, wg_dim="n", num_sms=2)


def _w8a8_extras_fit(cfg, m, n, residual, gate, split) -> bool:
    """Whether the fused residual / split epilogue of the ``ws`` kernel applies to an (M, N) output."""
    cm, cn = cfg.cta_tile()
    if cfg.kind != "ws" or m % cm:
        return False
    if split > 1 and (n % split or (n // split) % cn):
        return False
    return residual is None or (m % gate.shape[0] == 0 and (m // gate.shape[0]) % cfg.tile_m == 0)


def w8a8_matmul(xq, xs, wq, ws, b, out_dtype, impl: str = "auto", config=None, activation: str | None = None,
                residual=None, gate=None, split: int = 1):
    """Dispatch the W8A8 GEMM (int8 or E4M3 operands, already quantized) to an implementation.

    GPU kernels need K and N to be multiples of the tile; M is zero-padded. Shapes the kernel
    cannot tile go to the XLA reference (same result: int8 accumulation is exact). ``activation``
    (see ``jdq.kernels.activations.ACTIVATIONS``) runs in the GPU kernel's epilogue where it is in
    :data:`jdq.kernels.w8a8.gpu.FUSED_ACTIVATIONS`, else on the output. ``residual`` (M, N) with
    ``gate`` (G, N): the output is :func:`jdq.kernels.w8a8.ref.gated_residual` of it; ``split`` > 1:
    a tuple of the column parts (:func:`~jdq.kernels.w8a8.ref.split_columns`); both in the GPU
    epilogue where the ``ws`` kernel's tiles fit, else in XLA.
    """
    from jdq.kernels.w8a8 import ref

    impl = _resolve_impl(impl)
    m, k = xq.shape
    n = wq.shape[0]

    def finish(y, act):
        y = activate(y, act)
        if residual is not None:
            y = ref.gated_residual(y, residual, gate, out_dtype)
        return ref.split_columns(y, split) if split > 1 else y

    if _on_gpu(impl):
        from jdq.kernels import tuning
        from jdq.kernels.w8a8.gpu import FUSED_ACTIVATIONS, Config, w8a8_matmul_gpu

        extras = residual is not None or split > 1
        if config is None and impl == "gpu_interpret":  # one warpgroup ("pipe"): far fewer simulated threads
            ws_cfg = _interpret_ws_config()
            config = ws_cfg if extras and _w8a8_extras_fit(ws_cfg, m, n, residual, gate, split) else _interpret_w8a8_config()
        cfg = config or Config(**tuning.lookup("w8a8", m))
        cm, cn = cfg.cta_tile()
        if n % cn == 0 and k % cfg.tile_k == 0:
            bb = jnp.zeros((n,), jnp.float32) if b is None else b
            fused = activation if activation in FUSED_ACTIVATIONS else None
            interp = impl == "gpu_interpret"
            if extras and fused == activation and _w8a8_extras_fit(cfg, m, n, residual, gate, split):
                return w8a8_matmul_gpu(xq, xs, wq, ws, bb, out_dtype, cfg, interpret=interp, activation=fused,
                                       residual=residual, gate=gate, split=split)
            xq_p, m0 = _pad_rows(xq, cm)
            xs_p, _ = _pad_rows(xs, cm)
            out = w8a8_matmul_gpu(xq_p, xs_p, wq, ws, bb, out_dtype, cfg, interpret=interp, activation=fused)
            return finish(out[:m0], None if fused else activation)
    elif _on_tpu(impl):
        from jdq.kernels.w8a8.tpu import w8a8_matmul_tpu

        tiles = _tpu_tiles(m, n, k)
        (xq_p, m0), (xs_p, _) = _pad_rows(xq, tiles["tm"]), _pad_rows(xs, tiles["tm"])
        out = w8a8_matmul_tpu(xq_p, xs_p, wq, ws, b, out_dtype, interpret=impl == "tpu_interpret", **tiles)
        return finish(out[:m0], activation)
    return finish(ref.w8a8_matmul(xq, xs, wq, ws, b, out_dtype), activation)


def w4a8_matmul(xq, xs, lw: "LoweredWeight", b, out_dtype, impl: str = "auto", config=None):
    """Dispatch the W4A8 GEMM (int8 activation codes, packed int4 weight) to an implementation."""
    from jdq.kernels.w4a8 import ref

    impl = _resolve_impl(impl)
    gs = lw.group_size or lw.k
    if _on_gpu(impl):
        from jdq.kernels import tuning
        from jdq.kernels.w4a8.gpu import Config, w4a8_matmul_gpu

        cfg = config or Config(**tuning.lookup("w4a8", xq.shape[0]))
        if cfg.supports(cfg.tile_m, lw.n, lw.k, gs):
            xq_p, m0 = _pad_rows(xq, cfg.tile_m)
            xs_p, _ = _pad_rows(xs, cfg.tile_m)
            out = w4a8_matmul_gpu(xq_p, xs_p, lw.codes, lw.scale, b, gs, out_dtype, cfg, interpret=impl == "gpu_interpret")
            return out[:m0]
    elif _on_tpu(impl):
        from jdq.kernels.w4a8.tpu import w4a8_matmul_tpu

        tiles = _tpu_tiles(xq.shape[0], lw.n, lw.k, k_multiple=256, group=gs)
        (xq_p, m0), (xs_p, _) = _pad_rows(xq, tiles["tm"]), _pad_rows(xs, tiles["tm"])
        out = w4a8_matmul_tpu(xq_p, xs_p, lw.codes, lw.scale, b, gs, out_dtype, interpret=impl == "tpu_interpret", **tiles)
        return out[:m0]
    return ref.w4a8_matmul(xq, xs, lw.codes, lw.scale, b, gs, out_dtype)


def weight_only_matmul(x, lw: LoweredWeight, b, out_dtype, impl: str = "auto", config=None):
    """Dispatch a W8A16 / W4A16 GEMM to an implementation (XLA reference where no kernel fits)."""
    from jdq.kernels.weight_only import ref

    impl = _resolve_impl(impl)
    bits = 4 if lw.kind == "w4a16" else 8
    if _on_gpu(impl):
        from jdq.kernels import tuning
        from jdq.kernels.weight_only.gpu import Config, weight_only_matmul_gpu

        cfg = config or Config(**tuning.lookup("weight_only", x.shape[0], n=lw.n, k=lw.k))
        if cfg.split_k > 1 and not cfg.supports(lw.n, lw.k, lw.group_size or lw.k, bits):
            cfg = dataclasses.replace(cfg, split_k=1)  # a tuned split that does not divide this K
        if cfg.supports(lw.n, lw.k, lw.group_size or lw.k, bits):
            x_p, m0 = _pad_rows(x, cfg.tile_m)
            out = weight_only_matmul_gpu(x_p, lw.codes, lw.scale, b, bits, lw.group_size or lw.k, out_dtype, cfg,
                                         interpret=impl == "gpu_interpret")
            return out[:m0]
    elif _on_tpu(impl):
        from jdq.kernels.weight_only.tpu import weight_only_matmul_tpu

        gs = lw.group_size or lw.k
        tiles = _tpu_tiles(x.shape[0], lw.n, lw.k, k_multiple=256 if bits == 4 else 128, group=gs)
        x_p, m0 = _pad_rows(x, tiles["tm"])
        out = weight_only_matmul_tpu(x_p, lw.codes, lw.scale, b, bits, gs, out_dtype, interpret=impl == "tpu_interpret",
                                     **tiles)
        return out[:m0]
    return ref.weight_only_matmul(x, lw.codes, lw.scale, b, bits, lw.group_size or lw.k, out_dtype)


def mixdit_matmul(x, lw: LoweredWeight, b, out_dtype, impl: str = "auto", config=None):
    """Quantize ``x`` (M, K) the MixDiT way and run the mixed GEMM (:mod:`jdq.kernels.mixdit`)."""
    from jdq.kernels.mixdit import ref

    impl = _resolve_impl(impl)
    x_hi, x_lo, s_x = ref.quantize_activation(x, lw.aux["perm"], lw.get_meta("k_hi"), lw.get_meta("hi"), lw.get_meta("lo"))
    w_hi = lw.aux["w_hi"]
    if _on_gpu(impl):
        from jdq.kernels import tuning
        from jdq.kernels.mixdit.gpu import Config, mixdit_matmul_gpu

        cfg = config or Config(**tuning.lookup("mixdit", x.shape[0]))
        if cfg.supports(cfg.tile_m, lw.n):
            (xh, m0), (xl, _), (sx, _) = (_pad_rows(a, cfg.tile_m) for a in (x_hi, x_lo, s_x))
            out = mixdit_matmul_gpu(xh, xl, sx, w_hi, lw.codes, lw.scale, b, out_dtype, cfg,
                                    interpret=impl == "gpu_interpret")
            return out[:m0]
    elif _on_tpu(impl):
        from jdq.kernels.mixdit.tpu import mixdit_matmul_tpu

        tiles = _tpu_tiles(x.shape[0], lw.n, x_lo.shape[1])
        (xh, m0), (xl, _), (sx, _) = (_pad_rows(a, tiles["tm"]) for a in (x_hi, x_lo, s_x))
        out = mixdit_matmul_tpu(xh, xl, sx, w_hi, lw.codes, lw.scale, b, out_dtype, tm=tiles["tm"], tn=tiles["tn"],
                                tk_lo=tiles["tk"], interpret=impl == "tpu_interpret")
        return out[:m0]
    return ref.mixdit_matmul(x_hi, x_lo, s_x, w_hi, lw.codes, lw.scale, b, out_dtype)


def mx_matmul(x, lw: LoweredWeight, b, out_dtype, impl: str = "auto", config=None):
    """MX-quantize ``x`` (M, K) along K and run the block-scaled GEMM (:mod:`jdq.kernels.mx`)."""
    from jdq.kernels.mx import ref

    impl = _resolve_impl(impl)
    fmt = MX_FORMAT[lw.kind]
    xq, xs = ref.quantize_operand(x, fmt)
    ws = ref.block_scales(lw.scale, fmt)
    if _on_gpu(impl):
        from jdq.kernels import tuning
        from jdq.kernels.mx.gpu import Config, mx_matmul_gpu

        cfg = config or Config(**tuning.lookup("mx", x.shape[0]))
        if cfg.supports(cfg.tile_m, lw.n, lw.k):
            xq_p, m0 = _pad_rows(xq, cfg.tile_m)
            xs_p, _ = _pad_rows(xs.T, cfg.tile_m)
            out = mx_matmul_gpu(xq_p, xs_p.T, lw.codes, ws, b, out_dtype, cfg, interpret=impl == "gpu_interpret")
            return out[:m0]
    elif _on_tpu(impl):
        from jdq.kernels.mx.tpu import mx_matmul_tpu

        tiles = _tpu_tiles(x.shape[0], lw.n, lw.k, k_multiple=32)
        xq_p, m0 = _pad_rows(xq, tiles["tm"])
        xs_p, _ = _pad_rows(xs.T, tiles["tm"])
        out = mx_matmul_tpu(xq_p, xs_p.T, lw.codes, ws, b, out_dtype, interpret=impl == "tpu_interpret", **tiles)
        return out[:m0]
    return ref.mx_matmul(xq, xs, lw.codes, ws, b, out_dtype)


def lowered_linear(x, lowered: LoweredWeight, b=None, *, site: str, quant: Any = None, act_role: str = "act",
                   activation: str | None = None, norm: Any = None, residual: Any = None, split: int = 1):
    """``qlinear``'s speed path: ``residual(act(norm(x) @ W + b))`` with ``W`` the packed weight of ``site``.

    ``x`` is (…, K) in the model's compute dtype; the output has ``x``'s dtype. The activation is
    quantized here, the way the plan's activation transform does (per token for w8a8 / fp8 /
    w4a8, per block for the MX kinds, the outlier split for mixdit). ``activation`` (a name in
    ``jdq.kernels.activations.ACTIVATIONS``) is fused into the W8A8 / FP8 GPU kernel's epilogue where
    it can be, else applied to the output.

    The ops around the linear in an adaLN block (``jdq.models.layers.AdaNorm`` /
    ``GatedResidual``; any callable with the same attributes): ``norm`` (``shift``, ``scale`` (B, K),
    ``eps``; ``x`` (B, L, K)) is computed inside the per-token quantization by
    :mod:`jdq.kernels.norm_quant` for W8A8 / FP8 on the GPU, else called; ``residual`` (``x``
    (B, L, N), ``gate`` (B, N)) is added in the W8A8 / FP8 GPU epilogue, else called; ``split``
    > 1 returns the output's column parts as a tuple (written as separate buffers by the W8A8 / FP8
    GPU kernel).
    """
    if not isinstance(lowered, LoweredWeight):
        raise TypeError(f"lowered_linear at {site!r}: expected a LoweredWeight, got {type(lowered).__name__}")
    if x.shape[-1] != lowered.k:
        raise ValueError(f"lowered_linear at {site!r}: input has {x.shape[-1]} features, the weight expects {lowered.k}")
    impl = getattr(quant, "impl", "auto")
    lead = x.shape[:-1]
    bias = None if b is None else jnp.asarray(b, jnp.float32)
    kind = lowered.kind
    if kind in ("w8a8", "fp8"):
        fmt = "int8" if kind == "w8a8" else "fp8_e4m3"
        q = None if norm is None else norm_quantize_tokens(x, norm, fmt, impl)
        if q is None:
            x = x if norm is None else norm(x)
            q = quantize_tokens(x.reshape(-1, lowered.k), fmt, impl)
        res, gate = (None, None) if residual is None else (residual.x.reshape(-1, lowered.n), residual.gate)
        y = w8a8_matmul(*q, lowered.codes, lowered.scale, bias, x.dtype, impl, activation=activation, residual=res,
                        gate=gate, split=split)
        if split > 1:
            return tuple(part.reshape(*lead, lowered.n // split) for part in y)
        return y.reshape(*lead, lowered.n)
    if norm is not None:
        x = norm(x)
    x2 = x.reshape(-1, lowered.k)
    if kind == "w4a8":
        xq, xs = quantize_tokens(x2, "int8", impl)
        y = w4a8_matmul(xq, xs, lowered, bias, x.dtype, impl)
    elif kind in ("w8a16", "w4a16"):
        y = weight_only_matmul(x2, lowered, bias, x.dtype, impl)
    elif kind == "mixdit":
        y = mixdit_matmul(x2, lowered, bias, x.dtype, impl)
    elif kind in MX_FORMAT:
        y = mx_matmul(x2, lowered, bias, x.dtype, impl)
    else:
        raise ValueError(f"lowered_linear at {site!r}: unknown kind {kind!r}; known: {KINDS}")
    y = activate(y, activation).reshape(*lead, lowered.n)
    y = y if residual is None else residual(y)
    return tuple(jnp.split(y, split, axis=-1)) if split > 1 else y


__all__ = ["IMPLS", "KINDS", "LoweredWeight", "lowered_linear", "mixdit_matmul", "mx_matmul", "norm_quantize_tokens",
           "quantize_tokens",
           "w4a8_matmul", "w8a8_matmul", "weight_only_matmul"]
