"""What every lowered GEMM op shares: the packed weight, the op record, implementation dispatch.

An op folder ``jdq/kernels/<op>/`` (tokamax's shape) holds ``ref.py`` (pure jnp), ``gpu.py``
(Mosaic GPU), ``tpu.py`` (Pallas TPU) and ``api.py``, which defines one :class:`KernelOp`:

* ``supports(w, a)``: whether the op computes a linear site whose weight and activation a plan
  treats as :class:`jdq.quant.OperandPlan` ``w`` / ``a`` (``a`` is ``None`` when the activation
  stays in float). It returns ``(kind, why)``: the :class:`LoweredWeight` kind it would run, or
  ``None`` and the reason it declines (shown by :meth:`jdq.kernels.LoweredQuantizer.report`), or
  ``(None, None)`` when the site is not its business at all (another weight format);
* ``pack(w, kind, w_op, a_op)``: the packed :class:`LoweredWeight` of a (K, N) weight and its
  dequantized (K, N) values (lowering checks they equal the fake-quant weight), or
  ``(None, reason)``;
* ``linear(x, lw, bias, impl, **epilogue)``: the lowered matmul of ``x`` (M, K), quantizing
  ``x`` itself the way the plan's activation transform does;
* ``implementations``: ``{"gpu" | "tpu" | "xla": runner}`` used by :func:`dispatch`.

The ops are listed once, in :mod:`jdq.kernels.registry`; :func:`jdq.kernels.lower` and
:func:`jdq.kernels.lowered_linear` loop over that list.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

#: ``impl`` values: ``"auto"`` (the GPU kernels on a GPU, the TPU kernels on a TPU, XLA elsewhere),
#: ``"xla"`` (the references), ``"gpu"``, ``"gpu_xla_quant"`` (GPU GEMMs with XLA's per-token
#: quantization), ``"gpu_interpret"`` (GPU kernels in Pallas interpret mode), ``"tpu"``, ``"tpu_interpret"``.
IMPLS = ("auto", "xla", "gpu", "gpu_xla_quant", "gpu_interpret", "tpu", "tpu_interpret")


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


@dataclasses.dataclass(frozen=True)
class KernelOp:
    """One lowered GEMM op (see the module docstring): its kinds, ``supports``, ``pack``, ``linear``.

    ``fuses_block_ops``: ``linear`` takes the ``norm`` / ``residual`` / ``split`` / ``activation``
    around the matmul itself (else :func:`jdq.kernels.lowered_linear` applies them around it).
    """

    name: str
    kinds: tuple[str, ...]
    supports: Callable[[Any, Any], tuple[str | None, str | None]]
    pack: Callable[..., tuple[Any, Any]]
    linear: Callable[..., Any]
    implementations: Mapping[str, Callable[..., Any]] = dataclasses.field(default_factory=dict)
    fuses_block_ops: bool = False


def resolve_impl(impl: str) -> str:
    """``impl`` with ``"auto"`` resolved for the default backend; an unknown value is an error listing :data:`IMPLS`."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        backend = jax.default_backend()
        return "gpu" if backend == "gpu" else ("tpu" if backend == "tpu" else "xla")
    return impl


def _auto_is_gpu() -> bool:
    return resolve_impl("auto") == "gpu"


def fills_gpu(ctas: int) -> bool:
    """Whether a kernel grid of ``ctas`` CTAs has at least one per SM of the default GPU."""
    from jdq.kernels._mgpu import num_sms

    return ctas >= num_sms()


def size_route(impl: str, ctas: int) -> str:
    """``impl``, except that ``"auto"`` on a GPU is ``"gpu"`` for a grid that fills the GPU (:func:`fills_gpu`), else ``"xla"``.

    The fake-quant ops whose kernels lose on small inputs use it (``row_select``, ``quant_attention``):
    at DiT-XL/2 batch 1 with CFG their grids of 8 and 128 CTAs left an H200 mostly idle and each
    kernel call cut XLA's stream of fusions (RESULTS §3 "Fourteenth round"). An explicit impl is kept.
    """
    if impl == "auto" and _auto_is_gpu():
        return "gpu" if fills_gpu(ctas) else "xla"
    return impl


def route_choice(env_name: str, extra: tuple[str, ...] = ()) -> str:
    """The environment's choice for a fake-quant kernel route: ``"auto"`` (default), ``"xla"``, ``"kernel"`` or one of ``extra``."""
    import os

    choice = os.environ.get(env_name, "auto")
    allowed = ("auto", "xla", "kernel", *extra)
    if choice not in allowed:
        raise ValueError(f"{env_name}={choice!r}; use {', '.join(allowed[:-1])} or {allowed[-1]}")
    return choice


def backend_of(impl: str) -> str:
    """``"gpu"``, ``"tpu"`` or ``"xla"``: where a (resolved) ``impl`` runs."""
    if impl in ("gpu", "gpu_xla_quant", "gpu_interpret"):
        return "gpu"
    if impl in ("tpu", "tpu_interpret"):
        return "tpu"
    return "xla"


def dispatch(implementations: Mapping[str, Callable[..., Any]], impl: str, *args, **kwargs):
    """Run ``args`` on the implementation ``impl`` selects, falling back to ``"xla"`` where it declines.

    A runner takes ``(*args, impl=<resolved impl>, **kwargs)`` and returns the result, or ``None``
    when it cannot take these shapes (the XLA reference computes the same result).
    """
    impl = resolve_impl(impl)
    backend = backend_of(impl)
    if backend != "xla" and backend in implementations:
        out = implementations[backend](*args, impl=impl, **kwargs)
        if out is not None:
            return out
    return implementations["xla"](*args, impl=impl, **kwargs)


def largest_tile(dim: int, cap: int, multiple: int, ok=lambda t: True) -> int:
    """The largest multiple of ``multiple`` that is ≤ ``cap``, divides ``dim`` and passes ``ok``; else ``dim``."""
    for t in range(min(cap, dim) // multiple * multiple, 0, -multiple):
        if dim % t == 0 and ok(t):
            return t
    return dim


def tpu_tiles(m: int, n: int, k: int, k_multiple: int = 128, group: int | None = None) -> dict:
    """Tiles for a Pallas TPU GEMM: the tuning table's, shrunk so that tn / tk divide N / K (M is padded to tm)."""
    from jdq.kernels import tuning

    t = tuning.lookup("tpu_gemm", m)
    fits_group = (lambda tk: tk % group == 0 or group % tk == 0) if group else (lambda tk: True)
    return dict(tm=min(t["tm"], m), tn=largest_tile(n, t["tn"], 128),
                tk=largest_tile(k, t["tk"], k_multiple, fits_group))


def pad_rows(a, multiple):
    """``(a zero-padded to a multiple of `multiple` rows, the original row count)``."""
    m = a.shape[0]
    pad = (-m) % multiple
    return (jnp.pad(a, ((0, pad),) + ((0, 0),) * (a.ndim - 1)), m) if pad else (a, m)


def scaled_codes(w, spec, fp8: bool = False):
    """Codes (N, K) and float32 scales (N, G) of a (K, N) weight cast per output channel or group along K.

    Returns ``(codes, scale, group, dequantized (K, N))``, or a string saying why the format's
    groups do not tile K. ``fp8``: the codes as ``float8_e4m3fn`` (else the format's integers).
    The shared packing of the int / FP8 kernels (``w8a8``, ``w4a8``, ``weight_only``).
    """
    from jdq import formats

    k, n = w.shape
    qt = formats.quantize(w, spec, axis=-2)
    codes = qt.codes.T  # (N, K)
    scale = jnp.maximum(jnp.asarray(qt.scale, jnp.float32), 2.0**-126)
    if spec.granularity == "row":
        scale = scale.reshape(n, 1)
        group = k
    else:
        group = int(spec.group_size)
        if k % group:
            return f"group size {group} does not tile K={k}"
        scale = scale.T  # (N, G)
    if fp8:
        codes = jax.lax.bitcast_convert_type(codes, jnp.float8_e4m3fn)
    deq = (codes.astype(jnp.float32) * jnp.repeat(scale, group, axis=1)).T
    return codes, scale, group, deq


def single_casts(w, a) -> bool:
    """Whether a weight and its activation (``None``: float) are each one format cast, the shape the cast kernels take."""
    return w.single_cast and (a is None or a.single_cast)


def int_weight_reason(w) -> str | None:
    """Why an int weight cast is not one the int kernels pack (symmetric int8 / int4, dynamic, per channel or group)."""
    spec = w.spec
    if not spec.symmetric or spec.bits not in (4, 8):
        return f"weight format {w.fmt} is not symmetric int8/int4"
    if w.scaling != "dynamic" or spec.granularity not in ("row", "group"):
        return f"weight scaling {w.scaling}/{spec.granularity} is not per-channel or per-group"
    return None


def is_token_cast(a, fmt_kind: str, bits: int | None = None, element: str | None = None) -> bool:
    """Whether an activation is a dynamic per-token (row) cast of the given int / fp8 format, rounding to even."""
    spec = a.spec
    if getattr(spec, "kind", None) != fmt_kind or a.scaling != "dynamic":
        return False
    if spec.granularity != "row" or spec.rounding != "even":
        return False
    if fmt_kind == "int":
        return spec.bits == bits and spec.symmetric
    return spec.element == element
