"""Lowering a plan to kernels: pack weights once, route lowered sites to ``jdq.kernels``.

``quant = jdq.quant.lower(plan, params)`` returns a :class:`LoweredQuantizer`: the plan bound to
its state (a :class:`~jdq.quant.Quantizer`, so sites that are not lowered keep the fake-quant
path) plus, for every linear site whose transforms a kernel implements exactly, a packed
:class:`jdq.kernels.LoweredWeight`. ``qlinear`` asks ``quant.lowered(site)`` and sends those
sites to :func:`jdq.kernels.lowered_linear`.

A site is lowered when its weight and activation transforms are each a single format cast
(:func:`jdq.quant.casts.cast`, possibly inside a one-element :func:`~jdq.quant.chain`) of a kind
a kernel implements:

=============================================  ==============================  =========
weight cast (``axis=-2``, dynamic scaling)     activation cast                 kernel
=============================================  ==============================  =========
``int8`` symmetric, ``granularity='row'``      ``int8`` symmetric, ``'row'``,  ``w8a8``
                                               dynamic, ``rounding='even'``
``int8`` symmetric, ``'row'`` or ``'group'``   none (kept in float)            ``w8a16``
``int4`` symmetric, ``'row'`` or ``'group'``   none (kept in float)            ``w4a16``
=============================================  ==============================  =========

(int4 needs ``K % 128 == 0``; groups must tile K.) Anything else (static scales, MX formats,
outlier splits, smoothing, time groups, ...) stays on the fake-quant path. The packed weight is
computed with :func:`jdq.formats.quantize`, and ``lower`` checks, site by site, that dequantizing
it gives exactly the weight the fake-quant transform produces (else it raises, naming the site),
so a lowered model differs from the fake-quant one only by the rounding of float arithmetic.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jdq.quant.transform import ACTIVATION_ROLES, Context, Plan, Quantizer, find_stages, operand_key

__all__ = ["LoweredQuantizer", "lower", "lowerable_kind", "weight_bytes"]


@jax.tree_util.register_pytree_node_class
class LoweredQuantizer(Quantizer):
    """A :class:`~jdq.quant.Quantizer` that also holds packed weights: ``lowered(site)`` answers them.

    ``weights`` maps site -> :class:`jdq.kernels.LoweredWeight`; ``impl`` (static) picks the
    kernel implementation (see :mod:`jdq.kernels.lowered`).
    """

    def __init__(self, plan, state, weights, step=None, num_steps=None, strict=True, impl: str = "auto"):
        super().__init__(plan, state, step, num_steps, strict)
        self.weights = dict(weights)
        self.impl = impl

    def tree_flatten(self):
        return (self.state, self.step, self.weights), (self.plan, self.num_steps, self.strict, self.impl)

    @classmethod
    def tree_unflatten(cls, aux, children):
        plan, num_steps, strict, impl = aux
        state, step, weights = children
        return cls(plan, state, weights, step, num_steps, strict, impl)

    def lowered(self, site):
        return self.weights.get(site)

    def at_step(self, step, num_steps=None):
        return LoweredQuantizer(self.plan, self.state, self.weights, step,
                                num_steps if num_steps is not None else self.num_steps, self.strict, self.impl)

    def with_impl(self, impl: str) -> "LoweredQuantizer":
        """The same quantizer running its lowered sites with kernel implementation ``impl``."""
        return LoweredQuantizer(self.plan, self.state, self.weights, self.step, self.num_steps, self.strict, impl)


def _single_cast(transform):
    """The CastMeta of a transform that is exactly one format cast, else None."""
    if transform is None:
        return None
    stages = find_stages(transform.meta, None)
    if len(stages) != 1 or getattr(stages[0][0], "kind", None) != "cast":
        return None
    return stages[0][0]


def lowerable_kind(plan: Plan, site: str) -> tuple[str | None, str]:
    """``(kind, reason)``: the kernel kind for ``site`` (``None`` if it stays fake-quant) and why."""
    w_t = plan.transform_for(operand_key(site, "weight"))
    if w_t is None:
        return None, "weight not quantized"
    w_meta = _single_cast(w_t)
    if w_meta is None:
        return None, "weight transform is not a single format cast"
    spec = w_meta.spec
    if getattr(spec, "kind", None) != "int" or not spec.symmetric or spec.bits not in (4, 8):
        return None, f"weight format {w_meta.fmt} is not symmetric int8/int4"
    if w_meta.scaling != "dynamic" or spec.granularity not in ("row", "group"):
        return None, f"weight scaling {w_meta.scaling}/{spec.granularity} is not per-channel or per-group"
    acts = [o for o in plan.operands if o.site == site and o.role in ACTIVATION_ROLES]
    a_t = plan.transform_for(acts[0].key) if acts else None
    if a_t is None:
        return ("w8a16" if spec.bits == 8 else "w4a16"), "weight-only"
    a_meta = _single_cast(a_t)
    if a_meta is None:
        return None, "activation transform is not a single format cast"
    a = a_meta.spec
    if (getattr(a, "kind", None) == "int" and a.bits == 8 and a.symmetric and a.granularity == "row"
            and a.rounding == "even" and a_meta.scaling == "dynamic"):
        if spec.bits == 8 and spec.granularity == "row":
            return "w8a8", "int8 per-token x int8 per-channel"
        return None, "int8 activations need int8 per-channel weights"
    return None, f"activation format {a_meta.fmt} ({a_meta.scaling}) has no kernel"


def _flat(params) -> dict[str, Any]:
    from jdq.models.base import flatten_params

    return flatten_params(params)


def _pack(site, kind, w, w_meta):
    """Pack the (K, N) weight ``w`` for ``kind``; return the LoweredWeight and its dequantized (K, N) value."""
    from jdq import formats
    from jdq.kernels import LoweredWeight
    from jdq.kernels.weight_only.ref import PACK_BLOCK, pack_int4

    spec = w_meta.spec
    k, n = w.shape
    qt = formats.quantize(w, spec, axis=-2)
    codes = qt.codes.T  # (N, K) int8
    scale = jnp.maximum(jnp.asarray(qt.scale, jnp.float32), 2.0**-126)
    if spec.granularity == "row":
        scale = scale.reshape(n, 1)
        group = k
    else:
        group = int(spec.group_size)
        if k % group:
            return None, None
        scale = scale.T  # (N, G)
    deq = (codes.astype(jnp.float32) * jnp.repeat(scale, group, axis=1)).T
    if kind == "w8a8":
        lw = LoweredWeight(codes, scale[:, 0], "w8a8", k, n, None)
    elif kind == "w8a16":
        lw = LoweredWeight(codes, scale, "w8a16", k, n, group)
    else:
        if k % PACK_BLOCK:
            return None, None
        lw = LoweredWeight(pack_int4(codes), scale, "w4a16", k, n, group)
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
    flat = _flat(params)
    candidates = sorted({o.site for o in plan.operands if o.role == "weight"})
    if sites is not None:
        unknown = sorted(set(sites) - set(candidates))
        if unknown:
            raise KeyError(f"lower: sites {unknown[:5]} have no weight operand in the plan")
        candidates = [s for s in candidates if s in set(sites)]
    weights = {}
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
        lw, deq = _pack(site, kind, jnp.asarray(w), _single_cast(w_t))
        if lw is None:
            continue
        if check:
            fake = w_t.apply(jnp.asarray(w), state.get(w_key, ()), Context(site, "weight", -2))
            if not bool(jnp.all(deq.astype(fake.dtype) == fake)):
                bad = float(jnp.max(jnp.abs(deq.astype(jnp.float32) - fake.astype(jnp.float32))))
                raise ValueError(f"lower: packed {kind} weight of site {site!r} does not dequantize to the "
                                 f"fake-quant weight (max difference {bad:g}); its cast is not what the kernel computes")
        weights[site] = lw
    return LoweredQuantizer(plan, dict(state), weights, impl=impl)


def weight_bytes(params, quant: LoweredQuantizer | None = None, dtype=jnp.bfloat16) -> dict[str, int]:
    """Bytes of the linear weights (``*.kernel``, 2-D) stored in ``dtype``, or packed where ``quant`` lowered them.

    Returns ``bytes`` (all linear weights), ``lowered_sites``, ``lowered_bytes`` (the packed
    ones) and ``lowered_dense_bytes`` (the same weights stored in ``dtype``).
    """
    flat = _flat(params)
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
