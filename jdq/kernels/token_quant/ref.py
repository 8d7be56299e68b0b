"""Per-token (row) dynamic quantization, pure jnp reference: what the W8A8 / FP8 GEMMs consume.

``quantize_rows(x, fmt)`` returns ``(codes, scales)`` for ``x`` (M, K):

* ``fmt="int8"``: symmetric int8 codes in ``[-127, 127]``;
* ``fmt="fp8_e4m3"``: OCP E4M3 codes (``jnp.float8_e4m3fn``), saturating at ±448;

and one float32 scale per row, ``max(amax · float32(1/qmax), 2^-126)`` (``qmax`` = 127 or 448).
The codes are those of :func:`jdq.formats.quantize` with ``granularity='row'`` along the last
axis (``round(x · (1/s))``, round-half-to-even, clipped), so a kernel that reproduces this
function reproduces the fake-quant cast bit for bit: ``codes · scale == formats.cast(x, fmt)``.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

#: fmt -> (code dtype, largest code magnitude)
FORMATS = {"int8": (jnp.int8, 127.0), "fp8_e4m3": (jnp.float8_e4m3fn, 448.0)}
MIN_SCALE = 2.0**-126


def check_format(fmt: str) -> str:
    """``fmt`` if it is a supported code format, else a ValueError listing them."""
    if fmt not in FORMATS:
        raise ValueError(f"token quantization: fmt must be one of {tuple(FORMATS)}, got {fmt!r}")
    return fmt


def quantize_rows(x, fmt: str = "int8"):
    """Dynamic symmetric per-row quantization of ``x`` (…, K): codes (…, K) and float32 scales (…,)."""
    from jdq import formats

    check_format(fmt)
    qt = formats.quantize(x, fmt, axis=-1, granularity="row")
    codes = qt.codes if fmt == "int8" else lax.bitcast_convert_type(qt.codes, jnp.float8_e4m3fn)
    scale = jnp.maximum(jnp.asarray(qt.scale, jnp.float32), MIN_SCALE)
    return codes, jnp.squeeze(scale, -1)


__all__ = ["FORMATS", "MIN_SCALE", "check_format", "quantize_rows"]
