"""jdq.formats: number formats as pure jnp functions (CPU/GPU/TPU; jit, vmap and grad friendly).

One entry point resolves every format by name::

    y = jdq.formats.cast(x, "mxfp4_e2m1", axis=-1)            # fake-quant, straight-through grad
    qt = jdq.formats.quantize(w, "int4", axis=-2, granularity="group", group_size=128)
    w_hat = jdq.formats.dequantize(qt)                         # == cast(...) bit for bit
    spec = jdq.formats.get("mx9")                              # frozen, hashable spec
    spec.bits_per_element, spec.block_size, spec.kind          # 9.0, 16, 'smx'

Names (see :func:`names`): OCP MX ``mxfp8_e4m3 mxfp8_e5m2 mxfp6_e3m2 mxfp6_e2m3 mxfp4_e2m1
mxint8`` (:mod:`.mx`), shared-microexponent ``mx9 mx6 mx4`` (:mod:`.smx`), uniform integers
``int2`` ... ``int8`` (:mod:`.uniform`), scaled FP8 ``fp8_e4m3 fp8_e5m2`` (:mod:`.fp8`). Each
module's docstring documents its exact rounding, saturation, NaN/Inf/zero and padding rules.

``axis`` is the contraction axis of the operand: MX/SMX blocks and integer groups run along it
(an activation ``(..., C)``: ``axis=-1``; a weight stored ``(in, out)``: ``axis=-2``). Inputs must
have a real floating dtype; results have the input's shape and dtype (computation is float32).
float64 is no exception to the float32 computation: without ``jax_enable_x64`` JAX turns a float64
input into float32 on entry, so the result is float32; with it, the result is float64 holding the
float32 computation's values. The quantized axis must not be empty (a ValueError), nor any axis of
a ``'tensor'``/``'input_channel'``-granularity cast, whose scale reduces over them.
"""

from ._api import (  # registers mx, smx, int, fp8
    cast,
    cast_select,
    check_nonempty,
    check_static_params,
    compute_scale,
    dequantize,
    format_types,
    get,
    names,
    quantize,
)
from . import _bits, fp8, mx, qtensor, smx, uniform  # noqa: F401,E402,I001 - the format modules
from ._registry import FormatKind, kind_of, kinds, register
from .fp8 import FP8Format
from .mx import MXFormat
from .qtensor import QTensor, pack, pack_bits, unpack, unpack_bits
from .smx import SMXFormat
from .uniform import IntFormat

__all__ = [
    "FP8Format", "FormatKind", "IntFormat", "MXFormat", "QTensor", "SMXFormat", "cast", "cast_select", "check_static_params",
    "compute_scale", "dequantize", "format_types", "get", "kind_of", "kinds", "names", "pack", "pack_bits",
    "quantize", "register", "unpack", "unpack_bits",
]
