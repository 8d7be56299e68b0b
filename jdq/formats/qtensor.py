"""QTensor: a quantized array as a pytree of code/scale arrays, and bit packing of its codes.

Field layout (``n`` = logical length of ``axis``; "x's shape" = ``shape``):

=========  =====================================================================================
field      content
=========  =====================================================================================
codes      element codes, x's shape (or the packed shape, see below).
           ``mx``: OCP element bits (fp8/fp6/fp4: sign|exponent|mantissa in the low bits of a
           uint8); MXINT8: int8 two's complement of ``round(P * 64)`` in [-127, 127].
           ``smx``: uint8 sign-magnitude ``(sign << m) | |q|``.
           ``int``: int8 signed codes (symmetric) or uint8 codes with a zero point (asymmetric).
           ``fp8``: uint8 OCP FP8 bit pattern (NaN = 0x7F/0xFF).
scale      ``mx``: uint8 E8M0 bytes (``2**(byte - 127)``, 0xFF = NaN), x's shape with ``axis`` ->
           ``ceil(n / block_size)``. ``smx``: uint8 shared-exponent bytes, same shape rule with
           ``block_size = k1``. ``int``/``fp8``: float32 scales in the static-scale shape of
           :mod:`jdq.formats.uniform` (None for the unscaled FP8 cast).
zero       ``int`` asymmetric: float32 integer-valued zero points, scale's shape; else None.
micro      ``smx``: uint8 micro-exponent bits (0/1), x's shape with ``axis`` ->
           ``ceil(n / k1) * k1 / k2``; else None.
=========  =====================================================================================

Static (non-array) metadata: ``fmt`` (the format spec from :func:`jdq.formats.get`), ``axis``
(non-negative), ``shape`` (logical shape of the original array), ``dtype`` (its dtype, the default
of :func:`jdq.formats.dequantize`), ``packed``.

Packing (``packed=True``): ``codes`` (and ``micro``) are bit-packed along ``axis`` into uint8:
the b-bit codes of consecutive elements along the axis form a little-endian bit stream, element
``i`` in bits ``[i*b, (i+1)*b)``; the axis is zero-padded to a multiple of ``8 / gcd(8, b)``
codes (a whole number of bytes: 2 codes for 4-bit, 4 for 6-bit, 8 for 3-bit). For 4-bit
codes, byte ``j`` = ``code[2j] | code[2j+1] << 4``. Signed codes are stored as their low ``b``
bits (two's complement) and sign-extended on unpacking. 8-bit codes are left as they are.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class QTensor:
    """Quantized array: ``codes``, ``scale``, ``zero``, ``micro`` arrays + static format metadata."""

    codes: jax.Array
    scale: Any
    zero: Any
    micro: Any
    fmt: Any
    axis: int
    shape: tuple
    dtype: Any
    packed: bool = False

    @property
    def ndim(self) -> int:
        """Number of logical dimensions."""
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of all array fields as stored (packed or not)."""
        return sum(int(a.size) * a.dtype.itemsize for a in (self.codes, self.scale, self.zero, self.micro) if a is not None)


jax.tree_util.register_dataclass(
    QTensor,
    data_fields=["codes", "scale", "zero", "micro"],
    meta_fields=["fmt", "axis", "shape", "dtype", "packed"],
)


@functools.partial(jax.jit, static_argnums=(1, 2))
def pack_bits(codes, bits, axis):
    """Pack the low ``bits`` bits of integer ``codes`` along ``axis`` into a uint8 bit stream."""
    c = jnp.moveaxis(codes, axis, -1)
    n = c.shape[-1]
    per = 8 // math.gcd(8, bits)  # elements per whole number of bytes
    pad = (-n) % per
    c = c.astype(jnp.int32) & ((1 << bits) - 1)
    if pad:
        c = jnp.pad(c, [(0, 0)] * (c.ndim - 1) + [(0, pad)])
    stream = (c[..., None] >> jnp.arange(bits, dtype=jnp.int32)) & 1
    stream = stream.reshape(c.shape[:-1] + ((n + pad) * bits // 8, 8))
    packed = jnp.sum(stream << jnp.arange(8, dtype=jnp.int32), axis=-1).astype(jnp.uint8)
    return jnp.moveaxis(packed, -1, axis)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def unpack_bits(packed, bits, n, axis, signed=False):
    """Inverse of :func:`pack_bits`: ``n`` codes along ``axis`` (int8 if ``signed`` else uint8)."""
    p = jnp.moveaxis(packed, axis, -1).astype(jnp.int32)
    stream = (p[..., None] >> jnp.arange(8, dtype=jnp.int32)) & 1
    stream = stream.reshape(p.shape[:-1] + (p.shape[-1] * 8 // bits, bits))[..., :n, :]
    c = jnp.sum(stream << jnp.arange(bits, dtype=jnp.int32), axis=-1)
    if signed:
        c = jnp.where(c >= 1 << (bits - 1), c - (1 << bits), c)
    return jnp.moveaxis(c.astype(jnp.int8 if signed else jnp.uint8), -1, axis)


def _signed(fmt) -> bool:
    from ._registry import kind_of

    return kind_of(fmt).signed_codes(fmt)


@jax.jit
def pack(qt: QTensor) -> QTensor:
    """Bit-pack ``codes`` (and SMX ``micro`` bits) along the axis; see the module docstring."""
    if qt.packed:
        return qt
    b = qt.fmt.element_bits
    codes = qt.codes if b == 8 else pack_bits(qt.codes, b, qt.axis)
    micro = None if qt.micro is None else pack_bits(qt.micro, 1, qt.axis)
    return dataclasses.replace(qt, codes=codes, micro=micro, packed=True)


@jax.jit
def unpack(qt: QTensor) -> QTensor:
    """Undo :func:`pack` exactly."""
    if not qt.packed:
        return qt
    b = qt.fmt.element_bits
    n = qt.shape[qt.axis] if qt.shape else 1
    codes = qt.codes if b == 8 else unpack_bits(qt.codes, b, n, qt.axis, signed=_signed(qt.fmt))
    micro = qt.micro
    if micro is not None:
        n_micro = -(-n // qt.fmt.block_size) * (qt.fmt.block_size // qt.fmt.sub_block_size)
        micro = unpack_bits(micro, 1, n_micro, qt.axis)
    return dataclasses.replace(qt, codes=codes, micro=micro, packed=False)

