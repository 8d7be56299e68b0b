"""Independent NumPy references for the jdq formats (float64 log2/rint math, ml_dtypes for FP8).

Written from the specs (OCP MX v1.0; AMD Quark's MX9/MX6 emulation rules as recorded in
docs/methods.md §1.2; ViDiT-Q min-max integer quantizer) without using jdq code. Each function takes a
float32 array, quantizes along ``axis`` and returns ``(values, step, limit)``: the dequantized
float32 values, the local grid step of each element and the saturation bound of its scale group
(elements with ``|x| > limit`` must come out as ``±limit``).
Inputs must be finite; float32 subnormal inputs/outputs are outside the scope (XLA flushes them).
"""

import ml_dtypes
import numpy as np

# OCP element formats: ebits, stored mantissa bits, emax, max normal (ebits 0: MXINT8, 6 frac bits)
MX_ELEMENTS = {
    "mxfp8_e4m3": (4, 3, 8, 448.0),
    "mxfp8_e5m2": (5, 2, 15, 57344.0),
    "mxfp6_e3m2": (3, 2, 4, 28.0),
    "mxfp6_e2m3": (2, 3, 2, 7.5),
    "mxfp4_e2m1": (2, 1, 2, 6.0),
    "mxint8": (0, 6, 0, 127 / 64),
}
SMX_MANTISSA = {"mx9": 7, "mx6": 4, "mx4": 2}


def rnd(a, rounding):
    """Round half to even, or half away from zero."""
    return np.rint(a) if rounding == "even" else np.sign(a) * np.floor(np.abs(a) + 0.5)


def floor_log2(a):
    """floor(log2 |a|) exactly (frexp), -1000 for zeros."""
    m, e = np.frexp(np.abs(a))
    return np.where(a == 0, -1000, e - 1)


def _blocked(x, axis, block):
    x = np.moveaxis(np.asarray(x, np.float64), axis, -1)
    n = x.shape[-1]
    pad = (-n) % block
    xb = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)]).reshape(x.shape[:-1] + (-1, block))
    return xb, n


def _unblocked(a, n, axis, shape_last):
    a = a.reshape(a.shape[:-2] + (-1,))[..., :n]
    return np.moveaxis(a, -1, axis)


def mx(x, name, axis=-1, block=32, rounding="even"):
    """OCP MX: E = floor(log2 amax) - emax clamped to [-127, 127]; saturating element rounding."""
    ebits, mbits, emax, max_normal = MX_ELEMENTS[name]
    xb, n = _blocked(x, axis, block)
    amax = np.max(np.abs(xb), axis=-1, keepdims=True)
    e_blk = np.clip(np.where(amax == 0, -127, floor_log2(amax) - emax), -127, 127)
    v = xb / 2.0**e_blk
    if ebits == 0:
        step = np.full_like(v, 2.0**-mbits)
    else:
        emin = 2 - 2 ** (ebits - 1)
        step = 2.0 ** (np.maximum(floor_log2(v), emin) - mbits)
    q = np.clip(rnd(v / step, rounding) * step, -max_normal, max_normal)
    out = q * 2.0**e_blk
    limit = np.broadcast_to(max_normal * 2.0**e_blk, xb.shape)
    return tuple(_unblocked(a, n, axis, None) for a in (out.astype(np.float32), step * 2.0**e_blk, limit))


def smx(x, name, axis=-1, block=16, sub=2, rounding="even"):
    """MX9/MX6/MX4 with Quark's rules (shift decided from exponents before rounding)."""
    m = SMX_MANTISSA[name]
    xb, n = _blocked(x, axis, block)
    xb = np.where(np.abs(xb) < 2.0**-126, 0.0, xb)
    e = floor_log2(xb)
    e_blk = np.max(e, axis=-1, keepdims=True)
    es = e.reshape(e.shape[:-1] + (-1, sub))
    shift = np.all(es < e_blk[..., None], axis=-1, keepdims=True)
    shift = np.broadcast_to(shift, es.shape).reshape(e.shape).astype(np.int64)
    step = 2.0 ** (np.maximum(e_blk, -126) - shift - (m - 1))
    qmax = 2**m - 1
    out = np.clip(rnd(xb / step, rounding), -qmax, qmax) * step
    return tuple(_unblocked(a, n, axis, None) for a in (out.astype(np.float32), step, qmax * step))


def _groups(x, granularity, axis, group_size):
    """float32 array in a layout where scales broadcast, the reduce axes, and an undo function."""
    x = np.asarray(x, np.float32)
    granularity = {"token": "row", "output_channel": "row"}.get(granularity, granularity)
    if granularity == "group":
        xb, n = _blocked(x, axis, group_size)
        return xb.astype(np.float32), (-1,), lambda a: _unblocked(a, n, axis, None)
    xm = np.moveaxis(x, axis, -1)
    red = {"tensor": tuple(range(x.ndim)), "row": (-1,), "input_channel": tuple(range(x.ndim - 1))}[granularity]
    return xm, red, lambda a: np.moveaxis(a, -1, axis)


def uniform_int(x, bits, axis=-1, symmetric=True, granularity="row", group_size=None, rounding="even"):
    """Min-max INT-b in float32 arithmetic (ViDiT-Q style when asymmetric), reciprocal-multiply form."""
    xw, red, undo = _groups(x, granularity, axis, group_size)
    tiny = np.float32(2.0**-126)
    if symmetric:
        qmax = np.float32(2 ** (bits - 1) - 1)
        s = np.maximum(np.max(np.abs(xw), axis=red, keepdims=True) * np.float32(1 / qmax), tiny)
        q = np.clip(rnd(xw * (np.float32(1) / s), rounding), -qmax, qmax)
        out, limit = q * s, qmax * s
    else:
        qmax = np.float32(2**bits - 1)
        lo = np.minimum(np.min(xw, axis=red, keepdims=True), np.float32(0))
        hi = np.maximum(np.max(xw, axis=red, keepdims=True), np.float32(0))
        s = np.maximum((hi - lo) * np.float32(1 / qmax), tiny)
        z = rnd(-lo * (np.float32(1) / s), rounding)
        q = np.clip(rnd(xw * (np.float32(1) / s), rounding) + z, 0, qmax)
        out, limit = (q - z) * s, np.maximum(-lo, hi) + s
    step = np.broadcast_to(s, xw.shape)
    return undo(out.astype(np.float32)), undo(step.astype(np.float64)), undo(np.broadcast_to(limit, xw.shape))


FP8 = {"fp8_e4m3": (ml_dtypes.float8_e4m3fn, 448.0, 3), "fp8_e5m2": (ml_dtypes.float8_e5m2, 57344.0, 2)}


def fp8(x, name, axis=-1, granularity="row", group_size=None):
    """Scaled FP8 via ml_dtypes casts (round-half-even), saturating."""
    dt, max_normal, mbits = FP8[name]
    x = np.asarray(x, np.float32)
    if granularity is None:
        q = np.clip(x, -max_normal, max_normal).astype(dt).astype(np.float32)
        return q, 2.0 ** (np.maximum(floor_log2(x), -6 if mbits == 3 else -14) - mbits), np.full(x.shape, max_normal)
    xw, red, undo = _groups(x, granularity, axis, group_size)
    s = np.maximum(np.max(np.abs(xw), axis=red, keepdims=True) * np.float32(1 / max_normal), np.float32(2.0**-126))
    v = xw * (np.float32(1) / s)
    q = np.clip(v, -max_normal, max_normal).astype(dt).astype(np.float32)
    step = 2.0 ** (np.maximum(floor_log2(v), -6 if mbits == 3 else -14) - mbits) * s
    return undo((q * s).astype(np.float32)), undo(step), undo(np.broadcast_to(max_normal * s, xw.shape))
