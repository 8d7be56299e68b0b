"""Lowering a plan to kernels: pack weights once, route lowered sites to ``jdq.kernels``.

``quant = jdq.kernels.lower(plan, params)`` returns a :class:`LoweredQuantizer`: the plan bound to
its state (a :class:`~jdq.quant.Quantizer`, so sites that are not lowered keep the fake-quant
path) plus, for every linear site whose transforms a kernel implements exactly, a packed
:class:`jdq.kernels.LoweredWeight`. ``qlinear`` asks ``quant.lowered(site)`` and sends those
sites to :func:`jdq.kernels.lowered_linear`.

Lowering reads each linear site's weight and activation through the plan reader
(:func:`jdq.quant.describe_transform`) and asks the registered ops (:mod:`jdq.kernels.registry`)
in turn; the first whose ``supports`` accepts the pair packs the weight (its ``pack``). A site
no op accepts keeps the fake-quant path, with every op's reason in ``LoweredQuantizer.declined``
(:meth:`LoweredQuantizer.report`). The ops accept a weight and an activation that are each a
single format cast (:func:`jdq.quant.cast`, possibly inside a one-element :func:`~jdq.quant.chain`)
of a kind a kernel implements, or the MixDiT pair:

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

from jdq.kernels.op import IMPLS, KernelOp
from jdq.kernels.registry import OPS
from jdq.quant.reader import OperandPlan, describe_transform
from jdq.quant.transform import ACTIVATION_ROLES, Context, Plan, Quantizer, operand_key
from jdq.tree import flatten_params

__all__ = ["LoweredQuantizer", "lower", "lowerable_kind", "weight_bytes"]


@jax.tree_util.register_pytree_node_class
class LoweredQuantizer(Quantizer):
    """A :class:`~jdq.quant.Quantizer` that also holds packed weights: ``lowered(site)`` answers them.

    ``weights`` maps site -> :class:`jdq.kernels.LoweredWeight`; ``impl`` (static) picks the
    kernel implementation (see :mod:`jdq.kernels.lowered`).
    """

    def __init__(self, plan, state, weights, step=None, num_steps=None, strict=True, impl: str = "auto",
                 skipped=(), declined=(), attention=()):
        super().__init__(plan, state, step, num_steps, strict)
        self.weights = dict(weights)
        self.impl = impl
        self.skipped = dict(skipped)  # site -> why a lowerable site stayed fake-quant
        self.declined = dict(declined)  # site -> why no kernel accepts it (each op's reason)
        self.attention = frozenset(attention)  # attention sites run by jdq.kernels.fp8_attention

    def tree_flatten(self):
        """Children: state, step and packed weights; static: plan, settings, skipped and declined sites."""
        aux = (self.plan, self.num_steps, self.strict, self.impl, tuple(sorted(self.skipped.items())),
               tuple(sorted(self.declined.items())), tuple(sorted(self.attention)))
        return (self.state, self.step, self.weights), aux

    @classmethod
    def tree_unflatten(cls, aux, children):
        """Rebuild from :meth:`tree_flatten`'s output."""
        plan, num_steps, strict, impl, skipped, declined, attention = aux
        state, step, weights = children
        return cls(plan, state, weights, step, num_steps, strict, impl, skipped, declined, attention)

    def _replace(self, **changes) -> "LoweredQuantizer":
        fields = dict(plan=self.plan, state=self.state, weights=self.weights, step=self.step,
                      num_steps=self.num_steps, strict=self.strict, impl=self.impl, skipped=self.skipped,
                      declined=self.declined, attention=self.attention)
        fields.update(changes)
        return LoweredQuantizer(**fields)

    def lowered(self, site):
        """The packed weight of ``site``, or ``None`` when the site stays on the fake-quant path."""
        return self.weights.get(site)

    def lowered_attention(self, site) -> bool:
        """Whether attention ``site`` (matmuls ``site.qk`` / ``site.pv``) runs :func:`jdq.kernels.fp8_attention`."""
        return site in self.attention

    def at_step(self, step, num_steps=None):
        """The same lowered quantizer at sampler step ``step``."""
        return self._replace(step=step, num_steps=num_steps if num_steps is not None else self.num_steps)

    def with_impl(self, impl: str) -> "LoweredQuantizer":
        """The same quantizer running its lowered sites with kernel implementation ``impl``."""
        return self._replace(impl=impl)

    def report(self) -> str:
        """One line per linear site of the plan: the kernel kind it runs, or why it stays on the fake-quant path."""
        lines = [f"{len(self.weights)} lowered sites, {len(self.attention)} FP8 attention sites ({self.impl})"]
        for site in sorted(set(self.weights) | set(self.skipped) | set(self.declined) | self.attention):
            if site in self.weights:
                lines.append(f"  {site}: {self.weights[site].kind}")
            elif site in self.attention:
                lines.append(f"  {site}: fp8_attention")
            elif site in self.skipped:
                lines.append(f"  {site}: fake-quant (packing declined: {self.skipped[site]})")
            else:
                lines.append(f"  {site}: fake-quant ({self.declined[site]})")
        return "\n".join(lines)


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


def _choose(w: OperandPlan | None, a: OperandPlan | None) -> tuple[KernelOp | None, str | None, str]:
    """``(op, kind, why)``: the first registered op that accepts the pair, or ``(None, None, every op's reason)``."""
    if w is None:
        return None, None, "weight not quantized"
    reasons = []
    for op in OPS:
        kind, why = op.supports(w, a)
        if kind is not None:
            return op, kind, why
        if why is not None:
            reasons.append(f"{op.name}: {why}")
    if reasons:
        return None, None, "; ".join(reasons)
    if not w.single_cast and not (w.outliers is not None and w.outliers.weight):
        return None, None, "weight transform is not a single format cast"
    if a is not None and not a.single_cast:
        return None, None, "activation transform is not a single format cast"
    return None, None, (f"no kernel takes weight format {w.fmt} with activation "
                        f"{'in float' if a is None else 'format ' + str(a.fmt)}")


def lowerable_kind(plan: Plan, site: str) -> tuple[str | None, str]:
    """``(kind, reason)``: the kernel kind for ``site`` (``None`` if it stays fake-quant) and why (each op's reason)."""
    _, kind, why = _choose(*_site_operands(plan, site))
    return kind, why


def _attention_sites(plan: Plan, state) -> tuple[set, dict]:
    """Attention sites whose four operands are the casts of :mod:`jdq.kernels.fp8_attention`, and why others are not."""
    from jdq.kernels.fp8_attention.api import ROLES, plan_site_reason

    state = state or {}
    by_base: dict[str, dict] = {}
    for o in plan.operands:
        base, _, mm = o.site.rpartition(".")
        if mm in ("qk", "pv") and (mm, o.role) in ROLES:
            t = plan.transform_for(o.key)
            d = None if t is None else describe_transform(t, state.get(o.key), o.key)
            by_base.setdefault(base, {})[(mm, o.role)] = d if d is not None and d.quantized else None
    ok, why = set(), {}
    for base, ops in by_base.items():
        if not any(v is not None for v in ops.values()):
            continue  # attention kept in float: not the op's business
        reason = plan_site_reason(ops)
        if reason is None:
            ok.add(base)
        else:
            why[base] = f"fp8_attention: {reason}"
    return ok, why


def lower(plan: Plan, params, state: Mapping[str, Any] | None = None, *, impl: str = "auto",
          sites=None, check: bool = True, attention: bool = True) -> LoweredQuantizer:
    """Bind ``plan`` to ``state`` (default ``plan.init()``) and pack the weights of lowerable sites.

    ``params``: the model's params (weight of site ``S`` at ``S.kernel``, layout (in, out)).
    ``sites``: restrict lowering to these sites (default: every lowerable one). ``check``: verify
    that each packed weight dequantizes exactly to the fake-quant weight (raises ``ValueError``
    naming the site otherwise). ``attention``: route the attention sites whose q / k / p / v casts
    are those of :func:`jdq.recipes.fp8_attention_rules` to :func:`jdq.kernels.fp8_attention`
    (only when ``sites`` is ``None``).
    """
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
    weights, skipped, declined = {}, {}, {}
    for site in candidates:
        w_op, a_op = _site_operands(plan, site, state)
        op, kind, why = _choose(w_op, a_op)
        if kind is None:
            declined[site] = why
            continue
        name = f"{site}.kernel"
        if name not in flat:
            raise KeyError(f"lower: no weight {name!r} in params for site {site!r}")
        w = flat[name]
        if np.ndim(w) != 2:
            continue
        w_key = operand_key(site, "weight")
        lw, deq = op.pack(jnp.asarray(w), kind, w_op, a_op)
        if lw is None:
            skipped[site] = deq
            continue
        if check or kind == "mixdit":
            fake = plan.transform_for(w_key).apply(jnp.asarray(w), state.get(w_key, ()), Context(site, "weight", -2))
            exact = bool(jnp.all(deq.astype(fake.dtype) == fake))
            if kind == "mixdit" and not exact:
                skipped[site] = "an output channel's MX6 blocks span more than 12 binades: E4M3 re-encoding is not exact"
                continue
            if not exact:
                bad = float(jnp.max(jnp.abs(deq.astype(jnp.float32) - fake.astype(jnp.float32))))
                raise ValueError(f"lower: packed {kind} weight of site {site!r} does not dequantize to the "
                                 f"fake-quant weight (max difference {bad:g}); its cast is not what the kernel computes")
        weights[site] = lw
    attn = set()
    if attention and sites is None:
        attn, attn_why = _attention_sites(plan, state)
        declined.update(attn_why)
    return LoweredQuantizer(plan, dict(state), weights, impl=impl, skipped=skipped, declined=declined, attention=attn)


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
