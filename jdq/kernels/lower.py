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
from jdq.quant.transform import ACTIVATION_ROLES, Context, Plan, Quantizer, find_stages, operand_key

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


def _single_cast(transform):
    """The CastMeta of a transform that is exactly one format cast, else None."""
    if transform is None:
        return None
    stages = find_stages(transform.meta, None)
    if len(stages) != 1 or getattr(stages[0][0], "kind", None) != "cast":
        return None
    return stages[0][0]


def _is_token_cast(a_meta, fmt_kind, bits=None, element=None):
    """Whether an activation cast is a dynamic per-token (row) cast of the given int / fp8 format."""
    a = a_meta.spec
    if getattr(a, "kind", None) != fmt_kind or a_meta.scaling != "dynamic":
        return False
    if a.granularity != "row" or a.rounding != "even":
        return False
    if fmt_kind == "int":
        return a.bits == bits and a.symmetric
    return a.element == element


def _mixdit_kind(w_t, a_t) -> tuple[str | None, str]:
    from jdq.quant.outliers import OutlierMeta

    a_meta, w_meta = a_t.meta, w_t.meta
    if not isinstance(a_meta, OutlierMeta):
        return None, "weight is an outlier_weight but the activation is not an outlier_split"
    inner = w_meta.inner
    if isinstance(inner, tuple) and len(inner) == 2 and inner[0] == "chain":
        inner = inner[1]
    if a_meta.granularity != "channel":
        return None, f"outlier split granularity {a_meta.granularity!r} has no kernel (needs 'channel')"
    names = (getattr(a_meta.hi, "name", None), getattr(a_meta.lo, "name", None), getattr(getattr(inner, "spec", None), "name", None))
    if names != ("mx9", "mx6", "mx6") or getattr(inner, "kind", None) != "cast":
        return None, f"outlier formats hi/lo/weight {names} have no kernel (needs mx9/mx6/mx6)"
    specs = (a_meta.hi, a_meta.lo, inner.spec)
    if any((s.block_size, s.sub_block_size) != (16, 2) for s in specs):
        return None, "MixDiT kernel needs SMX blocks of 16 with micro-exponent pairs"
    if a_meta.channel_multiple != w_meta.channel_multiple or a_meta.channel_multiple % 16:
        return None, "activation and weight channel multiples differ (or are not multiples of 16)"
    return "mixdit", "MX9 outlier channels + MX6 (FP8 tensor cores)"


def lowerable_kind(plan: Plan, site: str) -> tuple[str | None, str]:
    """``(kind, reason)``: the kernel kind for ``site`` (``None`` if it stays fake-quant) and why."""
    from jdq.quant.outliers import OutlierWeightMeta

    w_t = plan.transform_for(operand_key(site, "weight"))
    if w_t is None:
        return None, "weight not quantized"
    acts = [o for o in plan.operands if o.site == site and o.role in ACTIVATION_ROLES]
    a_t = plan.transform_for(acts[0].key) if acts else None
    if isinstance(w_t.meta, OutlierWeightMeta):
        if a_t is None:
            return None, "an outlier_weight needs an outlier_split activation"
        return _mixdit_kind(w_t, a_t)
    w_meta = _single_cast(w_t)
    if w_meta is None:
        return None, "weight transform is not a single format cast"
    spec = w_meta.spec
    a_meta = None if a_t is None else _single_cast(a_t)
    if a_t is not None and a_meta is None:
        return None, "activation transform is not a single format cast"
    if getattr(spec, "kind", None) == "mx":
        if a_meta is None or a_meta.spec != spec:
            return None, f"MX weight {w_meta.fmt} needs the same MX format on the activation"
        if spec.name not in ("mxfp8_e4m3", "mxint8") or spec.block_size != 32 or spec.rounding != "even":
            return None, f"MX format {spec.name} (block {spec.block_size}) has no kernel (mxfp8_e4m3 / mxint8, block 32)"
        return ("mxfp8" if spec.name == "mxfp8_e4m3" else "mxint8"), "MX block-scaled"
    if getattr(spec, "kind", None) == "fp8":
        if w_meta.scaling != "dynamic" or spec.element != "e4m3" or spec.granularity != "row" or spec.rounding != "even":
            return None, f"fp8 weight {w_meta.fmt} ({spec.granularity}, {w_meta.scaling}) is not per-channel E4M3"
        if a_meta is not None and _is_token_cast(a_meta, "fp8", element="e4m3"):
            return "fp8", "E4M3 per-token x E4M3 per-channel"
        return None, "fp8 weights need E4M3 per-token activations"
    if getattr(spec, "kind", None) != "int" or not spec.symmetric or spec.bits not in (4, 8):
        return None, f"weight format {w_meta.fmt} is not symmetric int8/int4"
    if w_meta.scaling != "dynamic" or spec.granularity not in ("row", "group"):
        return None, f"weight scaling {w_meta.scaling}/{spec.granularity} is not per-channel or per-group"
    if a_t is None:
        return ("w8a16" if spec.bits == 8 else "w4a16"), "weight-only"
    if _is_token_cast(a_meta, "int", bits=8):
        if spec.bits == 8 and spec.granularity == "row":
            return "w8a8", "int8 per-token x int8 per-channel"
        if spec.bits == 4:
            gs = spec.group_size if spec.granularity == "group" else None
            if gs is None or gs == 64 or gs % 128 == 0:
                return "w4a8", "int8 per-token x int4 per-channel/group"
            return None, f"int4 group size {gs} has no W4A8 kernel (64 or a multiple of 128)"
        return None, "int8 activations need int8 per-channel or int4 weights"
    return None, f"activation format {a_meta.fmt} ({a_meta.scaling}) has no kernel"


def _pack(site, kind, w, w_meta):
    """Pack the (K, N) weight ``w`` for ``kind``: ``(LoweredWeight, dequantized (K, N))`` or ``(None, reason)``."""
    from jdq import formats
    from jdq.kernels import LoweredWeight
    from jdq.kernels.weight_only.ref import PACK_BLOCK, pack_int4

    spec = w_meta.spec
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


def _pack_mixdit(w, w_key, a_key, plan, state):
    """MixDiT weight: kernel-order permutation, outlier count, bf16 hi / E4M3 lo parts; or (None, reason)."""
    from jdq.kernels import LoweredWeight
    from jdq.kernels.mixdit.ref import pack_weight
    from jdq.quant.outliers import _count, channel_permutation

    w_meta, a_meta = plan.transform_for(w_key).meta, plan.transform_for(a_key).meta
    w_st, a_st = state[w_key], state[a_key]
    if np.ndim(w_st["ratio"]) != 0 or np.ndim(a_st["ratio"]) != 0:
        return None, "outlier ratio has a step axis (time groups): the kernel takes one permutation per site"
    if float(w_st["ratio"]) != float(a_st["ratio"]) or not bool(jnp.all(w_st["rank"] == a_st["rank"])):
        return None, "activation and weight outlier states differ (ratio or channel ranks): link their statistics"
    k, n = w.shape
    perm = channel_permutation(w_st, w_meta.channel_multiple)
    k_hi = int(_count(w_st["ratio"], k, w_meta.channel_multiple))
    inner = w_meta.inner[1] if isinstance(w_meta.inner, tuple) else w_meta.inner
    w_hi, w_lo, s_w, deq = pack_weight(w, perm, k_hi, inner.spec)
    lw = LoweredWeight(w_lo, s_w, "mixdit", k, n, None, {"w_hi": w_hi, "perm": perm.astype(jnp.int32)},
                       (("k_hi", k_hi), ("hi", a_meta.hi), ("lo", a_meta.lo)))
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
            a_key = [o.key for o in plan.operands if o.site == site and o.role in ACTIVATION_ROLES][0]
            lw, deq = _pack_mixdit(jnp.asarray(w), w_key, a_key, plan, state)
        else:
            lw, deq = _pack(site, kind, jnp.asarray(w), _single_cast(w_t))
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
