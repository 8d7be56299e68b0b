"""An activation and an MX / MX9-MX6-MX4 cast along the last axis in one Mosaic GPU pass over bf16 values.

Computes :func:`jdq.kernels.act_cast.ref.reference`. XLA computes a GELU followed by a block cast as
three passes over the activation (the GELU, a block-max fusion, the cast fusion: 2 reads and a
write more than needed); here each element is read once and written once.

**Data view.** ``x`` (M, K) bf16 is handed to the kernel as ``(M·K/32, 16)`` int32 words, a free
bit cast: each row holds 32 consecutive elements — one MX block of 32, or two MX9 / MX6 / MX4
blocks of 16 — as 16 words of two elements, so a pair (an SMX sub-block) is one word and a scale
block is a row (or half a row) of the tile. Each CTA bulk-copies ``Config.rows`` such rows
(contiguous) into shared memory and works through them in 64-row chunks held in the WGMMA register
layout (each thread 2 rows × 4 words per chunk): the halves of every word come out by shifts (a
bf16 is the upper half of its float32), the activation runs operation by operation in float32, each result rounded to bf16 (a conversion
round trip, as the attention kernel rounds its logits) as the model's bf16 expression is, the
block max is a row reduction of the int32 bits of |x| (a masked one per 8-word half for blocks of
16), the element arithmetic is :mod:`jdq.formats`' own (``mx`` / ``smx.fake_quantize_given_amax``,
so the cast of a bf16 value is bit for bit the library's), and the halves are repacked into words
and written over the chunk's input, then the whole tile is bulk-stored.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from jdq.kernels._mgpu import group_row_max, pl, plgpu, promise_in_bounds, row_block_kernel, store_rows
from jdq.kernels.act_cast.ref import activation_rounded, check

WORDS = 16  # int32 words per kernel row (32 bf16 elements)
CHUNK = 64  # rows per register chunk (the WGMMA layout's row tile)
HI_MASK = -65536  # 0xFFFF0000 as int32


@dataclasses.dataclass(frozen=True)
class Config:
    """Kernel rows (of 32 elements) per CTA: a multiple of 64."""

    rows: int = 256

    def supports(self, n_rows: int) -> str | None:
        """``None`` when ``n_rows`` kernel rows tile by this config, else why not."""
        if self.rows % CHUNK or self.rows <= 0:
            return f"rows={self.rows} is not a positive multiple of {CHUNK}"
        if n_rows % self.rows:
            return f"{n_rows} rows of 32 elements are not a multiple of rows={self.rows}"
        return None


def _to_f32(bits):
    return lax.bitcast_convert_type(bits, jnp.float32)


def _bits(v):
    return lax.bitcast_convert_type(v, jnp.int32)


def unpack_words(words):
    """int32 words of two bf16 values -> ``(lo, hi)``: the even and the odd element as float32 (exact)."""
    return _to_f32(words << 16), _to_f32(words & HI_MASK)


def pack_words(lo, hi):
    """float32 bf16 values ``lo`` / ``hi`` (at most 8 significant bits, so their upper halves are exact) -> int32 words."""
    return ((_bits(lo) >> 16) & 0xFFFF) | (_bits(hi) & HI_MASK)


def cast_words(words, spec, activation, interpret=None):
    """A chunk of int32 words (rows, 16) -> the words of ``cast(activation(x))`` (see the module)."""
    from jdq.formats import _bits as fbits
    from jdq.formats import mx, smx

    lo, hi = unpack_words(words)
    if activation is not None:
        lo, hi = activation_rounded(lo, activation), activation_rounded(hi, activation)
    # a block is block_size / 2 consecutive words of a row: the |x| bits' max over them
    amax = group_row_max(jnp.maximum(fbits.abs_bits(lo), fbits.abs_bits(hi)), spec.block_size // 2, interpret)
    if spec.kind == "mx":
        out_lo, out_hi = mx.fake_quantize_given_amax(lo, amax, spec), mx.fake_quantize_given_amax(hi, amax, spec)
    else:
        out_lo, out_hi = smx.fake_quantize_given_amax(lo, hi, amax, spec), smx.fake_quantize_given_amax(hi, lo, amax, spec)
    return pack_words(out_lo, out_hi)


# jitted: identical calls in a model lower once (see jdq.kernels.w8a8.gpu).
@functools.partial(jax.jit, static_argnames=("spec", "activation", "config", "interpret"))
def act_cast_gpu(x, spec, activation: str | None = None, config: Config = Config(), interpret=False):
    """``cast(activation(x), spec, axis=-1)`` of bf16 ``x`` (M, K), K a multiple of 32, in one pass: (M, K) bf16."""
    check(x, spec, activation)
    if x.ndim != 2:
        raise ValueError(f"act_cast kernel: x must be 2-D (M, K), got shape {x.shape}")
    m, k = x.shape
    n_rows = m * k // 32
    why = config.supports(n_rows)
    if why:
        raise ValueError(f"act_cast kernel: {why}")
    words = lax.bitcast_convert_type(x.reshape(n_rows, WORDS, 2), jnp.int32)
    rows = config.rows
    layout = None if interpret else plgpu.Layout.WGMMA

    def body(w_g, o_g, w_s, bar):
        i = lax.axis_index("r")
        plgpu.copy_gmem_to_smem(w_g.at[pl.ds(i * rows, rows)], w_s, bar.at[0], **promise_in_bounds())
        plgpu.barrier_wait(bar.at[0])
        for c in range(rows // CHUNK):
            sl = w_s.at[pl.ds(c * CHUNK, CHUNK)]
            w = sl[...] if interpret else plgpu.load(sl, (), layout=layout)
            sl[...] = cast_words(w, spec, activation, interpret)
        store_rows(w_s, o_g, i * rows)

    out = row_block_kernel(body, jax.ShapeDtypeStruct((n_rows, WORDS), jnp.int32), n_rows // rows,
                           [plgpu.SMEM((rows, WORDS), jnp.int32), plgpu.Barrier(num_arrivals=1, num_barriers=1)],
                           interpret)(words)
    return lax.bitcast_convert_type(out, jnp.bfloat16).reshape(m, k)


__all__ = ["CHUNK", "Config", "WORDS", "act_cast_gpu", "cast_words", "pack_words", "unpack_words"]
