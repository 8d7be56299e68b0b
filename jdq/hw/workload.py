"""Workloads: every GEMM and attention matmul of one model call, as a struct of arrays.

A :class:`Workload` holds one entry per matmul *site* of a model (a linear layer, or one of
the two attention matmuls with all heads and batch elements as ``count`` identical GEMMs):
its shape ``M × K · K × N`` and the format of each operand. An operand may be *mixed*: a
fraction ``*_hi_frac`` of its reduction (K) axis is stored in a higher-precision format (MixDiT's
MX9 outliers among MX6 values). All fields are arrays of one length, so a workload is a pytree
the cost model vectorizes over, and workloads of different plans for one model stack (same
shapes, different formats) for a ``jax.vmap`` over plans.

Where the shapes come from: :func:`from_operands` turns the :class:`jdq.quant.Operand` list that
:func:`jdq.quant.trace_operands` records (abstractly, under ``jax.eval_shape``) into GEMMs; a
*format function* says how each operand is stored: :func:`from_plan` reads a
:class:`jdq.quant.Plan` (a recipe's, ``jdq cost --plan``) through the plan reader
(:func:`jdq.quant.describe`); :func:`uniform` and :func:`mixdit` describe hypothetical stores
(every matmul in one format; MixDiT's outlier fractions) for what-if studies. The models by name
are the families' named configs (:func:`jdq.models.spec.named_configs`).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jdq.hw.hardware import PE_FORMATS, pe_format
from jdq.quant.reader import OperandPlan

#: Kinds of GEMM a workload entry can be (the ``kind`` field).
KINDS = ("linear", "attn_qk", "attn_pv")

#: Roles of the left operand (contraction axis -1) and of the right operand (axis -2).
_LEFT_ROLES = ("act", "post_gelu", "q", "attn_prob")
_RIGHT_ROLES = ("weight", "k", "v")
#: Roles whose operands are produced at run time (and so converted on the fly when quantized).
_RUNTIME_ROLES = ("act", "post_gelu", "q", "k", "v", "attn_prob")

#: Storage bits of the unquantized float formats (the PE classes jdq.formats has no spec for).
FLOAT_BITS = {"fp32": 32.0, "fp16": 16.0, "bf16": 16.0}


def format_bits(name: str) -> float:
    """Storage bits per element of format ``name``: :func:`jdq.formats.get`'s, or a float format's width."""
    from jdq import formats

    cls = pe_format(name)
    if cls in FLOAT_BITS:
        return FLOAT_BITS[cls]
    return float(formats.get(name).bits_per_element)


class OperandFormat(NamedTuple):
    """How one operand is stored: format ``name``, and optionally a fraction ``hi_frac`` of its
    reduction axis in a higher-precision format ``hi_name`` (outliers)."""

    name: str
    hi_name: str | None = None
    hi_frac: float = 0.0

    def validate(self, where: str = "") -> "OperandFormat":
        """Check the fields; return self."""
        pe_format(self.name)
        if self.hi_name is not None:
            pe_format(self.hi_name)
        if not 0.0 <= float(self.hi_frac) <= 1.0:
            raise ValueError(f"{where}: outlier fraction must be in [0, 1], got {self.hi_frac}")
        if self.hi_frac > 0 and self.hi_name is None:
            raise ValueError(f"{where}: outlier fraction {self.hi_frac} given without an outlier format")
        return self


FLOAT16 = OperandFormat("bf16")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Workload:
    """GEMMs of one model call, one entry per site (struct of arrays; ``names`` is static).

    Entry ``g`` is ``count[g]`` independent GEMMs ``(m × k) · (k × n)``. The left operand
    (``a_*``: activations, queries, attention probabilities) and the right operand (``b_*``:
    weights, keys, values) each have a PE format class index (``*_fmt`` into
    :data:`jdq.hw.PE_FORMATS`) and storage bits, and a fraction ``*_hi_frac`` of the K axis in
    the outlier format ``*_hi_fmt``/``*_hi_bits``. ``out_bits``: bits of each output element
    written back. ``a_conv``/``b_conv``: 1 if the operand is quantized at run time (costs the
    accelerator's conversion units). ``a_fused``/``out_fused``: 1 for the attention probabilities
    and scores, which a fused-attention design keeps on chip. ``kind``: index into :data:`KINDS`.
    """

    m: jax.Array
    n: jax.Array
    k: jax.Array
    count: jax.Array
    a_fmt: jax.Array
    a_bits: jax.Array
    a_hi_fmt: jax.Array
    a_hi_bits: jax.Array
    a_hi_frac: jax.Array
    b_fmt: jax.Array
    b_bits: jax.Array
    b_hi_fmt: jax.Array
    b_hi_bits: jax.Array
    b_hi_frac: jax.Array
    out_bits: jax.Array
    a_conv: jax.Array
    b_conv: jax.Array
    a_fused: jax.Array
    out_fused: jax.Array
    kind: jax.Array
    names: tuple[str, ...] = dataclasses.field(default=(), metadata=dict(static=True))

    def __len__(self) -> int:
        return int(np.shape(self.m)[-1])

    @property
    def macs(self) -> jax.Array:
        """Multiply-accumulates per entry (``count · m · n · k``)."""
        return self.count * self.m * self.n * self.k

    def select(self, mask) -> "Workload":
        """The entries where boolean ``mask`` (a NumPy array or list) is true."""
        mask = np.asarray(mask, bool)
        if mask.shape != (len(self),):
            raise ValueError(f"select(): mask has shape {mask.shape}, workload has {len(self)} entries")
        idx = np.nonzero(mask)[0]
        fields = {f.name: getattr(self, f.name)[..., idx] for f in dataclasses.fields(self) if f.name != "names"}
        return Workload(**fields, names=tuple(self.names[i] for i in idx))


_INT_FIELDS = ("a_fmt", "a_hi_fmt", "b_fmt", "b_hi_fmt", "kind")


class Gemm(NamedTuple):
    """One GEMM entry before packing into a :class:`Workload` (plain Python numbers)."""

    name: str
    m: int
    n: int
    k: int
    count: int
    a: OperandFormat
    b: OperandFormat
    out_bits: float = 16.0
    a_conv: bool = False
    b_conv: bool = False
    a_fused: bool = False
    out_fused: bool = False
    kind: str = "linear"


def pack(gemms: Sequence[Gemm]) -> Workload:
    """Pack a list of :class:`Gemm` into a :class:`Workload`."""
    gemms = list(gemms)
    if not gemms:
        raise ValueError("pack(): no GEMMs")
    cols: dict[str, list] = {f.name: [] for f in dataclasses.fields(Workload) if f.name != "names"}
    for g in gemms:
        for dim in ("m", "n", "k", "count"):
            v = getattr(g, dim)
            if not (isinstance(v, (int, np.integer)) and v >= 0):
                raise ValueError(f"GEMM {g.name!r}: {dim} must be a non-negative integer, got {v!r}")
        if g.kind not in KINDS:
            raise ValueError(f"GEMM {g.name!r}: kind {g.kind!r} not in {KINDS}")
        a = OperandFormat(*g.a).validate(f"GEMM {g.name!r} left operand")
        b = OperandFormat(*g.b).validate(f"GEMM {g.name!r} right operand")
        for side, f in (("a", a), ("b", b)):
            hi = f.hi_name if f.hi_name is not None else f.name
            cols[f"{side}_fmt"].append(PE_FORMATS.index(pe_format(f.name)))
            cols[f"{side}_bits"].append(format_bits(f.name))
            cols[f"{side}_hi_fmt"].append(PE_FORMATS.index(pe_format(hi)))
            cols[f"{side}_hi_bits"].append(format_bits(hi))
            cols[f"{side}_hi_frac"].append(float(f.hi_frac))
        for dim in ("m", "n", "k", "count"):
            cols[dim].append(float(getattr(g, dim)))
        cols["out_bits"].append(float(g.out_bits))
        for flag in ("a_conv", "b_conv", "a_fused", "out_fused"):
            cols[flag].append(float(bool(getattr(g, flag))))
        cols["kind"].append(KINDS.index(g.kind))
    arrays = {k: jnp.asarray(v, jnp.int32 if k in _INT_FIELDS else jnp.float32) for k, v in cols.items()}
    return Workload(**arrays, names=tuple(g.name for g in gemms))


def stack(workloads: Sequence[Workload]) -> Workload:
    """Stack workloads of one model (same sites, e.g. several plans) along a new leading axis."""
    workloads = list(workloads)
    if not workloads:
        raise ValueError("stack(): no workloads")
    names = workloads[0].names
    for i, w in enumerate(workloads[1:], 1):
        if w.names != names:
            raise ValueError(f"stack(): workload {i} has other sites than workload 0 "
                             f"({len(w.names)} vs {len(names)} entries)")
    return jax.tree.map(lambda *xs: jnp.stack(xs), *workloads)


def concat(workloads: Sequence[Workload]) -> Workload:
    """Concatenate the entries of several workloads (e.g. a model's denoiser and its text encoder)."""
    workloads = list(workloads)
    fields = {f.name: jnp.concatenate([getattr(w, f.name) for w in workloads], axis=-1)
              for f in dataclasses.fields(Workload) if f.name != "names"}
    return Workload(**fields, names=tuple(n for w in workloads for n in w.names))


# --------------------------------------------------------------------------------------------
# From traced operands
# --------------------------------------------------------------------------------------------

FormatFn = Callable[[Any], OperandFormat]  # Operand -> OperandFormat


def _prod(xs) -> int:
    return int(math.prod(int(x) for x in xs))


def from_operands(operands: Iterable, fmt: FormatFn, *, out_bits: float = 16.0,
                  skip_sites: Sequence[str] = ()) -> Workload:
    """GEMMs of the operands a model exposes (:func:`jdq.quant.trace_operands`), formats from ``fmt``.

    Operands are grouped by site; a site must have one left operand (role ``act``,
    ``post_gelu``, ``q`` or ``attn_prob``; contraction axis -1) and one right operand
    (``weight``, ``k`` or ``v``; axis -2). A 2-D right operand (a weight) folds all leading axes
    of the left one into ``M``; a batched right operand (keys, values) makes the leading axes
    the ``count`` of independent GEMMs. ``fmt(operand)`` returns its :class:`OperandFormat`.
    ``skip_sites``: glob patterns of sites to leave out.
    """
    by_site: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    for op in operands:
        if any(fnmatch.fnmatchcase(op.site, p) for p in skip_sites):
            continue
        if op.site not in by_site:
            by_site[op.site] = {}
            order.append(op.site)
        if op.role in by_site[op.site]:
            raise ValueError(f"site {op.site!r}: role {op.role!r} recorded twice (was the model called twice?)")
        by_site[op.site][op.role] = op
    gemms = []
    for site in order:
        roles = by_site[site]
        left = [roles[r] for r in _LEFT_ROLES if r in roles]
        right = [roles[r] for r in _RIGHT_ROLES if r in roles]
        if len(left) != 1 or len(right) != 1:
            raise ValueError(f"site {site!r}: expected one left operand {_LEFT_ROLES} and one right operand "
                             f"{_RIGHT_ROLES}, found roles {sorted(roles)}")
        a, b = left[0], right[0]
        if a.shape[-1] != b.shape[-2]:
            raise ValueError(f"site {site!r}: contraction sizes differ: {a.role} {a.shape} vs {b.role} {b.shape}")
        k = int(a.shape[-1])
        n = int(b.shape[-1])
        if len(b.shape) == 2:
            m, count = _prod(a.shape[:-1]), 1
            kind = "linear"
        else:
            batch = np.broadcast_shapes(tuple(a.shape[:-2]), tuple(b.shape[:-2]))
            m, count = int(a.shape[-2]) if len(a.shape) >= 2 else 1, _prod(batch)
            kind = "attn_qk" if a.role == "q" else "attn_pv" if a.role == "attn_prob" else "linear"
        fa = OperandFormat(*fmt(a)).validate(f"operand {site}:{a.role}")
        fb = OperandFormat(*fmt(b)).validate(f"operand {site}:{b.role}")
        quantized = lambda f: pe_format(f.name) not in ("fp32", "fp16", "bf16") or f.hi_frac > 0  # noqa: E731
        gemms.append(Gemm(
            name=site, m=m, n=n, k=k, count=count, a=fa, b=fb, out_bits=out_bits,
            a_conv=a.role in _RUNTIME_ROLES and quantized(fa),
            b_conv=b.role in _RUNTIME_ROLES and quantized(fb),
            a_fused=kind == "attn_pv", out_fused=kind == "attn_qk", kind=kind))
    return pack(gemms)


# --------------------------------------------------------------------------------------------
# Format functions: how a plan stores each operand
# --------------------------------------------------------------------------------------------


def uniform(weights: str = "bf16", activations: str | None = None, attention: str | None = None,
            keep_float: Sequence[str] = ()) -> FormatFn:
    """Every weight in ``weights``, every linear input in ``activations`` (default: ``weights``),
    every attention operand in ``attention`` (default: ``activations``); sites matching a
    ``keep_float`` glob stay in BF16."""
    activations = weights if activations is None else activations
    attention = activations if attention is None else attention

    def fmt(op):
        if any(fnmatch.fnmatchcase(op.site, p) for p in keep_float):
            return FLOAT16
        if op.role == "weight":
            return OperandFormat(weights)
        if op.role in ("act", "post_gelu"):
            return OperandFormat(activations)
        return OperandFormat(attention)

    return fmt


def mixdit(linear_outliers: float = 0.05, attn_outliers: float = 0.20, weights: str = "mx6",
           low: str = "mx6", high: str = "mx9", keep_float: Sequence[str] = (),
           outlier_fractions: Mapping[str, float] | None = None) -> FormatFn:
    """MixDiT's plan: activations in ``low`` (MX6) with a fraction in ``high`` (MX9).

    ``linear_outliers``/``attn_outliers``: fraction of MX9 values in linear-layer inputs and in
    attention operands (docs/methods.md §2: 5 % and 20 %, unverified); ``outlier_fractions`` overrides
    them per operand key (``"site:role"``) with measured fractions. Weights use ``weights``
    (MixDiT's weight format is NOT FOUND; MX6 assumed). Sites matching ``keep_float`` stay BF16.
    """
    measured = dict(outlier_fractions or {})

    def fmt(op):
        if any(fnmatch.fnmatchcase(op.site, p) for p in keep_float):
            return FLOAT16
        if op.role == "weight":
            return OperandFormat(weights)
        frac = linear_outliers if op.role in ("act", "post_gelu") else attn_outliers
        frac = float(measured.get(f"{op.site}:{op.role}", frac))
        return OperandFormat(low, high if frac > 0 else None, frac)

    return fmt


def format_of_operand(op: OperandPlan, default: OperandFormat = FLOAT16, measured: float | None = None) -> OperandFormat:
    """The :class:`OperandFormat` of one operand as :func:`jdq.quant.describe` reads it from a plan.

    An outlier split's fraction comes from ``measured`` (a measured fraction), else the plan
    state's ratio; an operand the plan keeps in float uses ``default``.
    """
    if not op.stages:
        return default
    if op.fmt is None:
        raise ValueError(f"operand {op.key!r}: cannot read a format from its transform (stages {op.stages}: none casts); "
                         "give the cost model a format function instead")
    out = op.outliers
    if out is None or out.weight:
        if measured:
            raise ValueError(f"operand {op.key!r}: a measured outlier fraction was given but its format {op.fmt!r} "
                             "has no outlier format")
        return OperandFormat(op.fmt)
    frac = measured if measured is not None else out.ratio_value
    if frac is None:
        raise ValueError(f"operand {op.key!r}: its outlier split ({op.fmt}/{out.hi.name}) keeps the ratio in the plan "
                         "state; pass state= (or measured outlier_fractions=) to from_plan")
    return OperandFormat(op.fmt, out.hi.name if frac > 0 else None, float(frac) if frac > 0 else 0.0)


def from_plan(plan, state: Mapping[str, Any] | None = None, outlier_fractions: Mapping[str, float] | None = None,
              default: OperandFormat = FLOAT16) -> FormatFn:
    """A format function reading each operand's transform ``meta`` in a :class:`jdq.quant.Plan`.

    ``state``: the plan's state (``plan.init(stats)``), where outlier splits keep their ratio.
    ``outlier_fractions``: measured outlier fractions per operand key (``"site:role"``, e.g.
    from :func:`jdq.quant.outliers.outlier_fraction` on calibration data), which take precedence.
    Operands kept in float (or not covered) use ``default``.
    """
    from jdq.quant import describe

    measured = dict(outlier_fractions or {})
    described = describe(plan, state)

    def fmt(op):
        key = f"{op.site}:{op.role}"
        m = measured.get(key)
        return format_of_operand(described[key], default, None if m is None else float(m))

    return fmt


# --------------------------------------------------------------------------------------------
# The published models (jdq.models.spec.named_configs)
# --------------------------------------------------------------------------------------------


def model_operands(name: str, batch: int = 2, config=None) -> tuple:
    """The matmul operands of one call of the named model ``name`` (:func:`jdq.models.spec.named_config`), traced abstractly.

    ``config`` replaces the model's default config (same family); the inputs come from the
    family's :class:`~jdq.models.spec.FamilySpec` (``abstract_inputs``; ``batch`` counts model
    inputs per call: 2 = one image with classifier-free guidance's two halves). No parameters are
    allocated and no FLOPs run (:func:`jdq.quant.trace_operands` under ``jax.eval_shape``).
    """
    from jdq.models import from_config
    from jdq.models.spec import named_config, spec_of
    from jdq.quant import trace_operands

    named = named_config(name)
    if not (isinstance(batch, int) and batch >= 1):
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    cfg = named.config() if config is None else config
    model = from_config(cfg, abstract=True)
    return trace_operands(model.apply, model.params, *spec_of(named.family).abstract_inputs(cfg, batch))


def model_workload(name: str, fmt: FormatFn | None = None, batch: int = 2, config=None, **kwargs) -> Workload:
    """The :class:`Workload` of one call (one denoising step) of model ``name`` with formats ``fmt``
    (default: everything BF16). Extra keyword arguments go to :func:`from_operands`."""
    return from_operands(model_operands(name, batch, config), fmt or uniform("bf16"), **kwargs)
