"""Packed weights for the kernels, and ``lowered_linear``: the speed path of ``qlinear``.

A :class:`LoweredWeight` (:mod:`jdq.kernels.op`) is what :func:`jdq.kernels.lower` stores per
lowered site: the packed weight arrays in the layout its kernel reads, plus static metadata.
:func:`lowered_linear` hands the site to the op that runs its kind (:mod:`jdq.kernels.registry`),
which quantizes the activation the way the plan's activation transform does and runs its kernel.

Kinds and layouts (``K`` in features, ``N`` out features; each op's ``api.py`` is their home):

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

from typing import Any

import jax.numpy as jnp

from jdq.kernels.activations import activate
from jdq.kernels.op import IMPLS, LoweredWeight
from jdq.kernels.registry import KINDS, op_for_kind

__all__ = ["IMPLS", "KINDS", "LoweredWeight", "lowered_linear"]


def lowered_linear(x, lowered: LoweredWeight, b=None, *, site: str, quant: Any = None, act_role: str = "act",
                   activation: str | None = None, norm: Any = None, residual: Any = None, split: int = 1):
    """``qlinear``'s speed path: ``residual(act(norm(x) @ W + b))`` with ``W`` the packed weight of ``site``.

    ``x`` is (…, K) in the model's compute dtype; the output has ``x``'s dtype. The op of the
    weight's kind quantizes the activation the way the plan's activation transform does (per
    token for w8a8 / fp8 / w4a8, per block for the MX kinds, the outlier split for mixdit).
    ``activation`` (a name in ``jdq.kernels.activations.ACTIVATIONS``) is fused into the W8A8 /
    FP8 GPU kernel's epilogue where it can be, else applied to the output.

    The ops around the linear in an adaLN block (``jdq.models.layers.AdaNorm`` /
    ``GatedResidual``; any callable with the same attributes): ``norm`` (``shift``, ``scale`` (B, K),
    ``eps``; ``x`` (B, L, K)) is computed inside the per-token quantization by
    :mod:`jdq.kernels.norm_quant` for W8A8 / FP8 on the GPU, else called; ``residual`` (``x``
    (B, L, N), ``gate`` (B, N)) is added in the W8A8 / FP8 GPU epilogue, else called; ``split``
    > 1 returns the output's column parts as a tuple (written as separate buffers by the W8A8 / FP8
    GPU kernel). An op that does not take these itself (``KernelOp.fuses_block_ops``) gets them
    applied around its matmul here.
    """
    if not isinstance(lowered, LoweredWeight):
        raise TypeError(f"lowered_linear at {site!r}: expected a LoweredWeight, got {type(lowered).__name__}")
    if x.shape[-1] != lowered.k:
        raise ValueError(f"lowered_linear at {site!r}: input has {x.shape[-1]} features, the weight expects {lowered.k}")
    try:
        op = op_for_kind(lowered.kind)
    except ValueError as e:
        raise ValueError(f"lowered_linear at {site!r}: {e}") from None
    impl = getattr(quant, "impl", "auto")
    bias = None if b is None else jnp.asarray(b, jnp.float32)
    if op.fuses_block_ops:
        return op.linear(x, lowered, bias, impl=impl, activation=activation, norm=norm, residual=residual, split=split)
    lead = x.shape[:-1]
    if norm is not None:
        x = norm(x)
    y = op.linear(x.reshape(-1, lowered.k), lowered, bias, x.dtype, impl)
    y = activate(y, activation).reshape(*lead, lowered.n)
    y = y if residual is None else residual(y)
    return tuple(jnp.split(y, split, axis=-1)) if split > 1 else y
