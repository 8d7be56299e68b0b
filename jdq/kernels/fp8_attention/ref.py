"""FP8 E4M3 flash attention, pure jnp reference: exactly the arithmetic of the Mosaic GPU kernel (:mod:`.gpu`).

Operands, quantized by :func:`quantize_operands` from ``q``, ``k``, ``v`` (B, L, H, D) — the casts of
the ``w8a8-fp8attn`` plan (:func:`jdq.recipes.fp8_attention_rules`), every scale one the kernel applies
outside its MMAs:

* ``q``: E4M3 per query token (over D): codes ``qc`` (BH, Lq, Dp), scales ``qs`` (BH, Lq);
* ``k``: centred over the key tokens first (``jdq.quant.center_tokens``: float32 mean, back to k's
  dtype), then E4M3 per key token: ``kc`` (BH, Lk, Dp), ``ks`` (BH, Lk);
* ``v``: E4M3 per channel (over the key tokens), stored **transposed** ``vtc`` (BH, Dp, Lk) — the
  8-bit WGMMA reads its B operand only K-major, and p·v contracts over keys — scales ``vs`` (BH, Dp);

``Dp`` is D zero-padded to a multiple of 32 (the 8-bit WGMMA's K step; DiT's 72 -> 96): zero
columns add nothing to q·kᵀ and give zero output columns, sliced off. The codes are those of
:func:`jdq.kernels.token_quant.ref.quantize_rows` (the fake-quant casts bit for bit), computed by
:func:`e4m3_codes`.

The attention (:func:`attention_from_codes`), per (batch·head, query row), over key blocks of
``block_kv`` in order, all float32, logits in base-2 units (``log2 e`` folded into the row scale):

    s   = (qc · kcᵀ) · (qs · scale · log2 e)[:, None] · ks[None, :]
    m'  = max(m, rowmax s);  α = 2^(m − m');  P = 2^(s − m')          (P in [0, 1])
    l   = α · l + rowsum P                                            (unquantized P)
    acc = α · acc + E4M3(P · 448) · vtcᵀ                              (P static scale 1/448)
    out = acc · (1/448) · vs[None, :] / l

**The probabilities' scale** is static: ``P = 2^(s − m')`` lies in [0, 1] with its row maximum
exactly 1 in the block holding the running maximum, so ``P · 448`` uses E4M3's whole range with no
per-block amax. It equals the plan's per-query-row dynamic cast of the normalized probabilities
``p = P / l`` (scale ``max p / 448 = 1/(448 l)``) whenever a row's running maximum is already its
final one; a block seen before the final maximum is quantized on the grid of its own maximum, then
rescaled by ``α ≤ 1``: the same relative rounding (2⁻⁴, E4M3's 3 mantissa bits), only the subnormal
floor differs (at ``2⁻⁹/448`` of the running maximum instead of the final one). Tests bound the
difference (``tests/kernels/test_fp8_attention.py``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jdq.formats import _bits
from jdq.kernels.token_quant.ref import MIN_SCALE

P_SCALE = 448.0  # the probabilities' static scale: E4M3's largest value
LOG2E = math.log2(math.e)
D_MULTIPLE = 32  # 8-bit WGMMA K step


def padded_dim(d: int, multiple: int = D_MULTIPLE) -> int:
    """The head dim zero-padded to a multiple of ``multiple`` (72 -> 96)."""
    return -(-d // multiple) * multiple


def center_keys(k):
    """``k`` (B, L, H, D) minus its mean over the L key tokens (float32, back to k's dtype): ``jdq.quant.center_tokens``."""
    kf = k.astype(jnp.float32)
    return (kf - jnp.mean(kf, axis=1, keepdims=True)).astype(k.dtype)


def _heads_first(x, dp):
    """(B, L, H, D) -> (B·H, L, Dp), zero-padded along D."""
    b, l, h, d = x.shape
    x = jnp.swapaxes(x, 1, 2).reshape(b * h, l, d)
    return jnp.pad(x, ((0, 0), (0, 0), (0, dp - d))) if dp != d else x


def e4m3_codes(x, axis: int):
    """Dynamic E4M3 codes and float32 scales of ``x`` along ``axis`` (kept, size 1): :func:`quantize_rows`'s values.

    The arithmetic of :mod:`jdq.formats.fp8` — ``s = max(amax · f32(1/448), 2⁻¹²⁶)``, codes
    ``round(x · (1/s))`` to nearest even, saturating at ±448 — with the rounding done by the
    float32 -> ``float8_e4m3fn`` conversion (one instruction on a GPU) after a clip to ±448,
    instead of ``jdq.formats``' portable bit-level encoding: the same codes bit for bit
    (``tests/kernels/test_fp8_attention.py``), a few operations per element instead of dozens.
    """
    xf = x.astype(jnp.float32)
    s = jnp.maximum(jnp.max(jnp.abs(xf), axis=axis, keepdims=True) * np.float32(1.0 / P_SCALE), np.float32(MIN_SCALE))
    codes = jnp.clip(xf * (1.0 / s), -P_SCALE, P_SCALE).astype(jnp.float8_e4m3fn)
    return codes, s


def quantize_operands(q, k, v, d_pad: int | None = None):
    """The kernel's operands of ``q``, ``k``, ``v`` (B, L, H, D): ``(qc, qs, kc, ks, vtc, vs)`` (see the module docstring).

    Quantized in the (B, L, H, D) layout (reductions over D or L, no transposed copy of the bf16
    operands), then the 1-byte codes padded and laid out heads first (v transposed): XLA fuses the
    layout change into the quantizing fusion's output.
    """
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"fp8 attention: q {q.shape}, k {k.shape}, v {v.shape} must be (B, L, H, D) with k, v alike")
    b, lq, h, d = q.shape
    lk = k.shape[1]
    dp = padded_dim(d) if d_pad is None else d_pad
    if dp < d or dp % D_MULTIPLE:
        raise ValueError(f"fp8 attention: d_pad={dp} must be a multiple of {D_MULTIPLE} and >= D={d}")
    pad_d = ((0, 0), (0, 0), (0, 0), (0, dp - d))
    qc, qs = e4m3_codes(q, -1)
    kc, ks = e4m3_codes(center_keys(k), -1)
    vc, vs = e4m3_codes(v, 1)  # per channel: over the key tokens
    qc = jnp.swapaxes(jnp.pad(qc, pad_d), 1, 2).reshape(b * h, lq, dp)
    kc = jnp.swapaxes(jnp.pad(kc, pad_d), 1, 2).reshape(b * h, lk, dp)
    vtc = jnp.transpose(jnp.pad(vc, pad_d), (0, 2, 3, 1)).reshape(b * h, dp, lk)
    qs = jnp.swapaxes(qs[..., 0], 1, 2).reshape(b * h, lq)
    ks = jnp.swapaxes(ks[..., 0], 1, 2).reshape(b * h, lk)
    vs = jnp.pad(vs[:, 0], ((0, 0), (0, 0), (0, dp - d)), constant_values=MIN_SCALE).reshape(b * h, dp)
    return qc, qs, kc, ks, vtc, vs


def _check_codes(qc, qs, kc, ks, vtc, vs):
    bh, lq, dp = qc.shape
    lk = kc.shape[1]
    want = {"kc": (bh, lk, dp), "vtc": (bh, dp, lk), "qs": (bh, lq), "ks": (bh, lk), "vs": (bh, dp)}
    got = {"kc": kc.shape, "vtc": vtc.shape, "qs": qs.shape, "ks": ks.shape, "vs": vs.shape}
    bad = {n: (got[n], want[n]) for n in want if got[n] != want[n]}
    if bad:
        raise ValueError(f"fp8 attention operands: shapes (got, want) {bad} for qc {qc.shape}")
    for name, c in (("qc", qc), ("kc", kc), ("vtc", vtc)):
        if c.dtype != jnp.float8_e4m3fn:
            raise TypeError(f"fp8 attention: {name} must be float8_e4m3fn codes, got {c.dtype}")
    return bh, lq, lk, dp


def attention_from_codes(qc, qs, kc, ks, vtc, vs, scale: float, block_kv: int = 64, out_dtype=jnp.bfloat16):
    """The kernel's online-softmax FP8 attention over key blocks of ``block_kv``: (BH, Lq, Dp) in ``out_dtype``.

    Keys beyond a multiple of ``block_kv`` are a last block padded with logits −∞ (P = 0).
    """
    bh, lq, lk, dp = _check_codes(qc, qs, kc, ks, vtc, vs)
    nblk = -(-lk // block_kv)
    pad = nblk * block_kv - lk
    kf = jnp.pad(kc.astype(jnp.float32), ((0, 0), (0, pad), (0, 0)))
    vf = jnp.pad(vtc.astype(jnp.float32), ((0, 0), (0, 0), (0, pad)))
    ksp = jnp.pad(ks, ((0, 0), (0, pad)))
    valid = jnp.arange(nblk * block_kv) < lk
    qf = qc.astype(jnp.float32)
    rs = qs * np.float32(scale * LOG2E)  # row scale, base-2 units
    hi = jax.lax.Precision.HIGHEST

    def step(j, carry):
        acc, m, l = carry
        sl = jax.lax.dynamic_slice_in_dim
        kb, vb = sl(kf, j * block_kv, block_kv, 1), sl(vf, j * block_kv, block_kv, 2)
        s = jnp.einsum("bqd,bkd->bqk", qf, kb, precision=hi)
        s = s * rs[:, :, None] * sl(ksp, j * block_kv, block_kv, 1)[:, None, :]
        s = jnp.where(sl(valid, j * block_kv, block_kv, 0)[None, None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, :, None])
        l = l * alpha + jnp.sum(p, axis=-1)
        # E4M3 rounding by arithmetic: on a GPU, XLA drops an f32 -> float8 -> f32 round trip
        p8 = _bits.round_to_float_grid(p * np.float32(P_SCALE), 4, 3, 448.0, "even")
        acc = acc * alpha[:, :, None] + jnp.einsum("bqk,bdk->bqd", p8, vb, precision=hi)
        return acc, m_new, l

    init = (jnp.zeros((bh, lq, dp), jnp.float32), jnp.full((bh, lq), -jnp.inf, jnp.float32),
            jnp.zeros((bh, lq), jnp.float32))
    acc, _, l = jax.lax.fori_loop(0, nblk, step, init)
    out = acc * np.float32(1.0 / P_SCALE) * vs[:, None, :] / l[:, :, None]
    return out.astype(out_dtype)


def unpack_output(o, b: int, h: int, d: int):
    """(B·H, L, Dp) -> (B, L, H, D): drop the padded columns, heads back after tokens."""
    bh, l, _ = o.shape
    return jnp.swapaxes(o[:, :, :d].reshape(b, h, l, d), 1, 2)


def fp8_attention_ref(q, k, v, scale: float | None = None, block_kv: int = 64, d_pad: int | None = None):
    """FP8 attention of ``q``, ``k``, ``v`` (B, L, H, D) as the kernel computes it (quantize, attend, unpack); q's dtype."""
    b, _, h, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    ops = quantize_operands(q, k, v, d_pad)
    return unpack_output(attention_from_codes(*ops, scale, block_kv, q.dtype), b, h, d)


__all__ = ["D_MULTIPLE", "LOG2E", "P_SCALE", "attention_from_codes", "center_keys", "e4m3_codes", "fp8_attention_ref",
           "padded_dim", "quantize_operands", "unpack_output"]
