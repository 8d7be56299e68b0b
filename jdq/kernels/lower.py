"""Lowering a plan to kernels: pack weights once, route lowered sites to ``jdq.kernels``.

``quant = jdq.kernels.lower(plan, params)`` returns a :class:`LoweredQuantizer`: the plan bound to
its state (a :class:`~jdq.quant.Quantizer`, so sites that are not lowered keep the fake-quant
path) plus, for every linear site whose transforms a kernel implements exactly, a packed
:class:`jdq.kernels.LoweredWeight`. ``qlinear`` asks ``quant.lowered(site)`` and sends those
sites to :func:`jdq.kernels.lowered_linear`.

A site is lowered when its weight and activation transforms are each a single format cast
(:func:`jdq.quant.casts.cast`, possibly inside a one-element :func:`~jdq.quant.chain`) of a kind
a kernel implements, or the MixDiT pair below:

=============================================  ==============================  =========
weight cast (``axis=-2``, dynamic scaling)     activation cast                 kernel
=============================================  ==============================  =========
``int8`` symmetric, ``granularity='row'``      ``int8`` symmetric, ``'row'``,  ``w8a8``
                                               dynamic, ``rounding='even'``
``fp8_e4m3``, ``'row'``, ``rounding='even'``   ``fp8_e4m3``, ``'row'``,        ``fp8``
                                               dynamic, ``rounding='even'``
``int4`` symmetric, ``'row'`` or ``'group'``   ``int8`` as for ``w8a8``        ``w4a8``
(group 64 or a multiple of 128)
``int8`` symmetric, ``'row'`` or ``'group'``   none (kept in float)            ``w8a16``
``int4`` symmetric, ``'row'`` or ``'group'``   none (kept in float)            ``w4a16``
``mxfp8_e4m3`` (block 32, ``'even'``)          the same format                 ``mxfp8``
``mxint8`` (block 32, ``'even'``)              the same format                 ``mxint8``
:func:`~jdq.quant.outlier_weight` of ``mx6``   :func:`~jdq.quant.outlier_split`  ``mixdit``
(same ratio and channel multiple)              ``granularity='channel'``,
                                               ``hi='mx9'``, ``lo='mx6'``
=============================================  ==============================  =========

(int4 needs ``K % 128 == 0``; groups must tile K; MX kinds need ``K % 32 == 0``.) Anything else
(static scales, other MX formats, element/block outlier splits, smoothing, time groups, ...)
stays on the fake-quant path. The packed weight is computed with :func:`jdq.formats.quantize`,
and ``lower`` checks, site by site, that dequantizing it gives exactly the weight the fake-quant
transform produces (else it raises, naming the site), so a lowered model differs from the
fake-quant one only by the rounding of float arithmetic. The one data-dependent exception is
``mixdit``: its MX6 part is re-encoded as E4M3 with one power-of-two scale per output channel
(:mod:`jdq.kernels.mixdit.ref`), exact unless a channel's blocks span more than 12 binades; such
a site is not lowered, and ``LoweredQuantizer.skipped`` says why.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jdq.tree import flatten_params
from jdq.quant.reader import OperandPlan, describe_transform
from jdq.quant.transform import ACTIVATION_ROLES, Context, Plan, Quantizer, operand_key

__all__ = ["LoweredQuantizer", "lower", "lowerable_kind", "weight_bytes"]


@jax.tree_util.register_pytree_node_class
class LoweredQuantizer(Quantizer):
    """A :class:`~jdq.quant.Quantizer` that also holds packed weights: ``lowered(site)`` answers them.

    ``weights`` maps site -> :class:`jdq.kernels.LoweredWeight`; ``impl`` (static) picks the
    kernel implementation (see :mod:`jdq.kernels.lowered`).
    """

    def __init__(self, plan, state, weights, step=None, num_steps=None, strict=True, impl: str = "auto",
                 skipped=()):
        super().__init__(plan, state, step, num_steps, strict)
        self.weights = dict(weights)
        self.impl = impl
        self.skipped = dict(skipped)  # site -> why a lowerable site stayed fake-quant

    def tree_flatten(self):
        """Children: state, step and packed weights; static: plan, settings, skipped sites."""
        aux = (self.plan, self.num_steps, self.strict, self.impl, tuple(sorted(self.skipped.items())))
        return (self.state, self.step, self.weights), aux

    @classmethod
    def tree_unflatten(cls, aux, children):
        """Rebuild from :meth:`tree_flatten`'s output."""
        plan, num_steps, strict, impl, skipped = aux
        state, step, weights = children
        return cls(plan, state, weights, step, num_steps, strict, impl, skipped)

    def lowered(self, site):
        """The packed weight of ``site``, or ``None`` when the site stays on the fake-quant path."""
        return self.weights.get(site)

    def at_step(self, step, num_steps=None):
        """The same lowered quantizer at sampler step ``step``."""
        return LoweredQuantizer(self.plan, self.state, self.weights, step,
                                num_steps if num_steps is not None else self.num_steps, self.strict, self.impl,
                                self.skipped)

    def with_impl(self, impl: str) -> "LoweredQuantizer":
        """The same quantizer running its lowered sites with kernel implementation ``impl``."""
        return LoweredQuantizer(self.plan, self.state, self.weights, self.step, self.num_steps, self.strict, impl,
                                self.skipped)


def _is_token_cast(a: OperandPlan, fmt_kind, bits=None, element=None):
    """Whether an activation is a dynamic per-token (row) cast of the given int / fp8 format."""
    spec = a.spec
    if getattr(spec, "kind", None) != fmt_kind or a.scaling != "dynamic":
        return False
    if spec.granularity != "row" or spec.rounding != "even":
        return False
    if fmt_kind == "int":
        return spec.bits == bits and spec.symmetric
    return spec.element == element


def _mixdit_kind(w: OperandPlan, a: OperandPlan | None) -> tuple[str | None, str]:
    if a is None or a.stages != ("outlier_split",):
        return None, "weight is an outlier_weight but the activation is not an outlier_split"
    if w.stages != ("outlier_weight", "cast"):
        return None, "outlier_weight must wrap a single format cast"
    ao, wo = a.outliers, w.outliers
    if ao.granularity != "channel":
        return None, f"outlier split granularity {ao.granularity!r} has no kernel (needs 'channel')"
    names = (ao.hi.name, ao.lo.name, w.spec.name)
    if names != ("mx9", "mx6", "mx6"):
        return None, f"outlier formats hi/lo/weight {names} have no kernel (needs mx9/mx6/mx6)"
    if any((s.block_size, s.sub_block_size) != (16, 2) for s in (ao.hi, ao.lo, w.spec)):
        return None, "MixDiT kernel needs SMX blocks of 16 with micro-exponent pairs"
    if ao.channel_multiple != wo.channel_multiple or ao.channel_multiple % 16:
        return None, "activation and weight channel multiples differ (or are not multiples of 16)"
    return "mixdit", "MX9 outlier channels + MX6 (FP8 tensor cores)"


def _site_operands(plan: Plan, site: str, state=None) -> tuple[OperandPlan | None, OperandPlan | None]:
    """``(weight, activation)`` of a linear site as :func:`jdq.quant.describe_transform` reads them (``None``: absent / float)."""
    state = state or {}
    w_key = operand_key(site, "weight")
    w_t = plan.transform_for(w_key)
    acts = [o for o in plan.operands if o.site == site and o.role in ACTIVATION_ROLES]
    a_t = plan.transform_for(acts[0].key) if acts else None
    w = None if w_t is None else describe_transform(w_t, state.get(w_key), w_key)
    a = None if a_t is None else describe_transform(a_t, state.get(acts[0].key), acts[0].key)
    return w, a


def lowerable_kind(plan: Plan, site: str) -> tuple[str | None, str]:
    """``(kind, reason)``: the kernel kind for ``site`` (``None`` if it stays fake-quant) and why."""
    w, a = _site_operands(plan, site)
    if w is None:
        return None, "weight not quantized"
    if w.outliers is not None and w.outliers.weight:
        if a is None:
            return None, "an outlier_weight needs an outlier_split activation"
        return _mixdit_kind(w, a)
    if not w.single_cast:
        return None, "weight transform is not a single format cast"
    spec = w.spec
    if a is not None and not a.single_cast:
        return None, "activation transform is not a single format cast"
    if getattr(spec, "kind", None) == "mx":
        if a is None or a.spec != spec:
            return None, f"MX weight {w.fmt} needs the same MX format on the activation"
        if spec.name not in ("mxfp8_e4m3", "mxint8") or spec.block_size != 32 or spec.rounding != "even":
            return None, f"MX format {spec.name} (block {spec.block_size}) has no kernel (mxfp8_e4m3 / mxint8, block 32)"
        return ("mxfp8" if spec.name == "mxfp8_e4m3" else "mxint8"), "MX block-scaled"
    if getattr(spec, "kind", None) == "fp8":
        if w.scaling != "dynamic" or spec.element != "e4m3" or spec.granularity != "row" or spec.rounding != "even":
            return None, f"fp8 weight {w.fmt} ({spec.granularity}, {w.scaling}) is not per-channel E4M3"
        if a is not None and _is_token_cast(a, "fp8", element="e4m3"):
            return "fp8", "E4M3 per-token x E4M3 per-channel"
        return None, "fp8 weights need E4M3 per-token activations"
    if getattr(spec, "kind", None) != "int" or not spec.symmetric or spec.bits not in (4, 8):
        return None, f"weight format {w.fmt} is not symmetric int8/int4"
    if w.scaling != "dynamic" or spec.granularity not in ("row", "group"):
        return None, f"weight scaling {w.scaling}/{spec.granularity} is not per-channel or per-group"
    if a is None:
        return ("w8a16" if spec.bits == 8 else "w4a16"), "weight-only"
    if _is_token_cast(a, "int", bits=8):
        if spec.bits == 8 and spec.granularity == "row":
            return "w8a8", "int8 per-token x int8 per-channel"
        if spec.bits == 4:
            gs = spec.group_size if spec.granularity == "group" else None
            if gs is None or gs == 64 or gs % 128 == 0:
                return "w4a8", "int8 per-token x int4 per-channel/group"
            return None, f"int4 group size {gs} has no W4A8 kernel (64 or a multiple of 128)"
        return None, "int8 activations need int8 per-channel or int4 weights"
    return None, f"activation format {a.fmt} ({a.scaling}) has no kernel"


def _pack(site, kind, w, w_op: OperandPlan):
    """Pack the (K, N) weight ``w`` for ``kind``: ``(LoweredWeight, dequantized (K, N))`` or ``(None, reason)``."""
    from jdq import formats
    from jdq.kernels import LoweredWeight
    from jdq.kernels.weight_only.ref import PACK_BLOCK, pack_int4

    spec = w_op.spec
    k, n = w.shape
    if kind in ("mxfp8", "mxint8"):
        if k % 32:
            return None, f"K={k} is not a multiple of the MX block 32"
        qt = formats.quantize(w, spec, axis=-2)
        codes = qt.codes.T if kind == "mxint8" else jax.lax.bitcast_convert_type(qt.codes.T, jnp.float8_e4m3fn)
        return LoweredWeight(codes, qt.scale, kind, k, n, None), formats.dequantize(qt, jnp.float32)
    qt = formats.quantize(w, spec, axis=-2)
    codes = qt.codes.T  # (N, K)
    scale = jnp.maximum(jnp.asarray(qt.scale, jnp.float32), 2.0**-126)
    if spec.granularity == "row":
        scale = scale.reshape(n, 1)
        group = k
    else:
        group = int(spec.group_size)
        if k % group:
            return None, f"group size {group} does not tile K={k}"
        scale = scale.T  # (N, G)
    if kind == "fp8":
        codes = jax.lax.bitcast_convert_type(codes, jnp.float8_e4m3fn)
    deq = (codes.astype(jnp.float32) * jnp.repeat(scale, group, axis=1)).T
    if kind in ("w8a8", "fp8"):
        lw = LoweredWeight(codes, scale[:, 0], kind, k, n, None)
    elif kind == "w8a16":
        lw = LoweredWeight(codes, scale, "w8a16", k, n, group)
    else:
        if k % PACK_BLOCK:
            return None, f"K={k} is not a multiple of {PACK_BLOCK} (int4 packing)"
        lw = LoweredWeight(pack_int4(codes), scale, kind, k, n, group if spec.granularity == "group" else None)
    return lw, deq


def _pack_mixdit(w, site, plan, state):
    """MixDiT weight: kernel-order permutation, outlier count, bf16 hi / E4M3 lo parts; or (None, reason)."""
    from jdq.kernels import LoweredWeight
    from jdq.kernels.mixdit.ref import pack_weight
    from jdq.quant.outliers import channel_permutation, outlier_count

    w_op, a_op = _site_operands(plan, site, state)
    wo, ao = w_op.outliers, a_op.outliers
    if wo.ratio_per_group or ao.ratio_per_group:
        return None, "outlier ratio has a step axis (time groups): the kernel takes one permutation per site"
    if float(wo.ratio) != float(ao.ratio) or not bool(jnp.all(wo.rank == ao.rank)):
        return None, "activation and weight outlier states differ (ratio or channel ranks): link their statistics"
    k, n = w.shape
    perm = channel_permutation({"ratio": wo.ratio, "rank": wo.rank}, wo.channel_multiple)
    k_hi = int(outlier_count(wo.ratio, k, wo.channel_multiple))
    w_hi, w_lo, s_w, deq = pack_weight(w, perm, k_hi, w_op.spec)
    lw = LoweredWeight(w_lo, s_w, "mixdit", k, n, None, {"w_hi": w_hi, "perm": perm.astype(jnp.int32)},
                       (("k_hi", k_hi), ("hi", ao.hi), ("lo", ao.lo)))
    return lw, deq


def lower(plan: Plan, params, state: Mapping[str, Any] | None = None, *, impl: str = "auto",
          sites=None, check: bool = True) -> LoweredQuantizer:
    """Bind ``plan`` to ``state`` (default ``plan.init()``) and pack the weights of lowerable sites.

    ``params``: the model's params (weight of site ``S`` at ``S.kernel``, layout (in, out)).
    ``sites``: restrict lowering to these sites (default: every lowerable one). ``check``: verify
    that each packed weight dequantizes exactly to the fake-quant weight (raises ``ValueError``
    naming the site otherwise).
    """
    from jdq.kernels import IMPLS

    if impl not in IMPLS:
        raise ValueError(f"lower: impl must be one of {IMPLS}, got {impl!r}")
    state = plan.init() if state is None else state
    flat = flatten_params(params)
    candidates = sorted({o.site for o in plan.operands if o.role == "weight"})
    if sites is not None:
        unknown = sorted(set(sites) - set(candidates))
        if unknown:
            raise KeyError(f"lower: sites {unknown[:5]} have no weight operand in the plan")
        candidates = [s for s in candidates if s in set(sites)]
    weights, skipped = {}, {}
    for site in candidates:
        kind, _ = lowerable_kind(plan, site)
        if kind is None:
            continue
        name = f"{site}.kernel"
        if name not in flat:
            raise KeyError(f"lower: no weight {name!r} in params for site {site!r}")
        w = flat[name]
        if np.ndim(w) != 2:
            continue
        w_key = operand_key(site, "weight")
        w_t = plan.transform_for(w_key)
        if kind == "mixdit":
            lw, deq = _pack_mixdit(jnp.asarray(w), site, plan, state)
        else:
            lw, deq = _pack(site, kind, jnp.asarray(w), describe_transform(w_t, None, w_key))
        if lw is None:
            skipped[site] = deq
            continue
        if check or kind == "mixdit":
            fake = w_t.apply(jnp.asarray(w), state.get(w_key, ()), Context(site, "weight", -2))
            exact = bool(jnp.all(deq.astype(fake.dtype) == fake))
            if kind == "mixdit" and not exact:
                skipped[site] = "an output channel's MX6 blocks span more than 12 binades: E4M3 re-encoding is not exact"
                continue
            if not exact:
                bad = float(jnp.max(jnp.abs(deq.astype(jnp.float32) - fake.astype(jnp.float32))))
                raise ValueError(f"lower: packed {kind} weight of site {site!r} does not dequantize to the "
                                 f"fake-quant weight (max difference {bad:g}); its cast is not what the kernel computes")
        weights[site] = lw
    return LoweredQuantizer(plan, dict(state), weights, impl=impl, skipped=skipped)


def weight_bytes(params, quant: LoweredQuantizer | None = None, dtype=jnp.bfloat16) -> dict[str, int]:
    """Bytes of the linear weights (``*.kernel``, 2-D) stored in ``dtype``, or packed where ``quant`` lowered them.

    Returns ``bytes`` (all linear weights), ``lowered_sites``, ``lowered_bytes`` (the packed
    ones) and ``lowered_dense_bytes`` (the same weights stored in ``dtype``).
    """
    flat = flatten_params(params)
    total = lowered = packed = dense = 0
    for name, w in flat.items():
        if not name.endswith(".kernel") or np.ndim(w) != 2:
            continue
        lw = None if quant is None else quant.lowered(name[: -len(".kernel")])
        size = int(np.prod(np.shape(w))) * jnp.dtype(dtype).itemsize
        if lw is not None:
            total += lw.nbytes
            lowered += 1
            packed += lw.nbytes
            dense += size
        else:
            total += size
    return {"bytes": total, "lowered_sites": lowered, "lowered_bytes": packed, "lowered_dense_bytes": dense}
