"""Weights quantized once per sampler call, not once per step: hoisting weight fake-quant out of the loop.

A model calls its quantizer on every weight at every step, and a sampler's steps run in a
``lax.scan`` whose body XLA compiles once and does not always hoist invariant casts out of. A
weight's quantized value depends on the weight and the operand's state, not on the step — except
through time groups, where it depends on the step only through each group stage's
``TimeGroups.index(step)``. :func:`hoist_weights` therefore runs the model once outside the loop
with a capturing quantizer that applies every hoistable weight transform (once per *step class*:
the steps whose time-group indices all agree, one class without time groups) and returns a
:class:`HoistedWeights` quantizer that, inside the loop, returns the captured weight of the step's
class and hands every other operand to the plan's quantizer. The capturing forward pass is traced
only for its weights; XLA drops the rest of it (its output is unused).

Under ``jax.vmap`` over stacked plan states this is what makes a weight that depends on the state
(per-layer bit widths as ``selectable`` indices) cost one quantization per point and call, not one
per point and step (for a batched index, ``lax.switch`` evaluates every option, so every step of
the loop would cast every option of every weight); a weight that depends on no state (the
MixDiT recipe's MX6 weights) is quantized once for all points.

Which weights are hoisted: those whose transform's metadata is fully known (every stage, including
the options of a ``selectable``, has jdq metadata: a stateless custom transform, meta ``None``, may
read the step in other ways and is left in the loop), with at most ``max_copies`` step classes
(one captured copy per class is kept alive for the whole loop).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jdq.quant.timegroup import TimeGroups
from jdq.quant.transform import Context, Quantizer, QuantizerBase, operand_key

#: Default most step classes (captured copies) a weight may have to be hoisted.
MAX_COPIES = 4


class _Unknown(Exception):
    pass


def _groupings(meta: Any, out: list, in_select: bool = False) -> list:
    """Every ``TimeGroups`` inside the transform metadata ``meta``; raises ``_Unknown`` on metadata it cannot read."""
    if meta is None:
        if in_select:  # a selectable's None option: the identity
            return out
        raise _Unknown  # a stateless custom transform: it may read the step
    if isinstance(meta, TimeGroups):
        if meta not in out:
            out.append(meta)
        return out
    if isinstance(meta, tuple) and meta and meta[0] == "chain":
        for m in meta[1:]:
            _groupings(m, out)
        return out
    if dataclasses.is_dataclass(meta) and not isinstance(meta, type):
        select = getattr(meta, "kind", None) == "select"
        for f in dataclasses.fields(meta):
            v = getattr(meta, f.name)
            if f.name == "inner":
                _groupings(v, out)
            elif select and f.name == "options":
                for m in v:
                    _groupings(m, out, in_select=True)
            else:
                _scan(v, out)
        return out
    if getattr(meta, "kind", None) is None:
        raise _Unknown
    return out


def _scan(value: Any, out: list) -> None:
    """``TimeGroups`` in a metadata field's value (formats, options, nested metas)."""
    if isinstance(value, TimeGroups):
        if value not in out:
            out.append(value)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        _groupings(value, out)
    elif isinstance(value, (tuple, list)):
        if value and value[0] == "chain":
            _groupings(value, out)
        else:
            for v in value:
                _scan(v, out)


def step_classes(meta: Any, num_steps: int) -> tuple[np.ndarray, list[int]] | None:
    """``(class of every step [num_steps], first step of each class)`` of a transform, or ``None`` if unknown.

    Two steps are in one class when every time-group stage of the transform puts them in the same
    group, so the transform gives the same result at both.
    """
    try:
        groupings = _groupings(meta, [])
    except _Unknown:
        return None
    steps = np.arange(num_steps)
    keys = np.stack([g.index_np(steps) for g in groupings], axis=1) if groupings else np.zeros((num_steps, 1), int)
    _, first, cls = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    order = np.argsort(first)  # number classes by their first step
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return rank[np.asarray(cls).reshape(-1)].astype(np.int32), [int(first[i]) for i in order]


class _Capture(QuantizerBase):
    """Applies the hoistable weight transforms of ``quant`` once per step class and records them; the rest pass through."""

    def __init__(self, quant: Quantizer, num_steps: int, max_copies: int):
        self.quant = quant
        self.num_steps = num_steps
        self.max_copies = max_copies
        self.weights: dict[str, Any] = {}
        self.tables: dict[str, np.ndarray] = {}

    def lowered(self, site):
        return self.quant.lowered(site)

    def quantizes(self, site, role):
        return self.quant.quantizes(site, role)

    def __call__(self, x, site, role, axis=-1):
        plan = self.quant.plan
        key = operand_key(site, role)
        t = plan.transform_for(key)
        if role != "weight" or t is None or site in self.weights:
            return x
        classes = step_classes(t.meta, self.num_steps)
        if classes is None or len(classes[1]) > self.max_copies:
            return x
        table, firsts = classes
        copies = [t.apply(x, self.quant.state[key], Context(site, role, axis, s, self.num_steps)) for s in firsts]
        self.weights[site] = copies[0] if len(copies) == 1 else jnp.stack(copies)
        self.tables[site] = table
        return copies[0]


@jax.tree_util.register_pytree_node_class
class HoistedWeights(QuantizerBase):
    """A quantizer whose hoisted weights were quantized before the loop; other operands go to ``quant``.

    ``weights[site]`` is the quantized weight (stacked on a leading class axis when ``tables[site]``,
    the class of every step, has more than one class). A pytree (the weights and ``quant`` are
    children), with ``at_step`` like :class:`~jdq.quant.Quantizer`.
    """

    def __init__(self, quant, weights: dict, tables: dict, step=None):
        self.quant = quant
        self.weights = weights
        self.tables = tables
        self.step = step

    def tree_flatten(self):
        """Children: the inner quantizer, the weights, the step; static: the class tables."""
        tables = tuple((k, tuple(int(v) for v in t)) for k, t in sorted(self.tables.items()))
        return (self.quant, self.weights, self.step), tables

    @classmethod
    def tree_unflatten(cls, aux, children):
        """Rebuild from :meth:`tree_flatten`'s output."""
        quant, weights, step = children
        return cls(quant, weights, {k: np.asarray(t, np.int32) for k, t in aux}, step)

    def at_step(self, step, num_steps: int | None = None) -> "HoistedWeights":
        """The same quantizer at sampler step ``step`` (may be traced)."""
        return HoistedWeights(self.quant.at_step(step, num_steps), self.weights, self.tables, step)

    def lowered(self, site):
        """The inner quantizer's lowered weight of ``site``."""
        return self.quant.lowered(site)

    def quantizes(self, site, role):
        """Whether the inner quantizer transforms operand (``site``, ``role``)."""
        return self.quant.quantizes(site, role)

    def transform_for(self, site, role):
        """The inner quantizer's transform of operand (``site``, ``role``) (hoisted weights: not exposed)."""
        if role == "weight" and site in self.weights:
            raise NotImplementedError(f"the weight of {site} is hoisted")
        return self.quant.transform_for(site, role)

    def state_for(self, site, role):
        """The inner quantizer's state of operand (``site``, ``role``) (hoisted weights: not exposed)."""
        if role == "weight" and site in self.weights:
            raise NotImplementedError(f"the weight of {site} is hoisted")
        return self.quant.state_for(site, role)

    def __call__(self, x, site, role, axis=-1):
        if role == "weight" and site in self.weights:
            w, table = self.weights[site], self.tables[site]
            if int(table.max()) == 0:
                return w
            if self.step is None:
                raise ValueError(f"hoisted time-grouped weight {site} needs the sampler step (use at_step)")
            cls = jnp.asarray(table)[jnp.clip(jnp.asarray(self.step, jnp.int32), 0, len(table) - 1)]
            return jax.lax.dynamic_index_in_dim(w, cls, axis=0, keepdims=False)
        return self.quant(x, site, role, axis)


def hoist_weights(fn: Callable, params, x, t, cond, quant, num_steps: int, *, max_copies: int = MAX_COPIES):
    """``quant`` with its hoistable weights quantized now (``fn(params, x, t, cond, quant=…)`` traced once to find them).

    ``x``, ``t``, ``cond``: any valid model input (a batch of one suffices: only the weights are
    used). Returns ``quant`` unchanged when it is not a plan :class:`~jdq.quant.Quantizer` or
    nothing can be hoisted.
    """
    if not isinstance(quant, Quantizer):
        return quant
    cap = _Capture(quant, num_steps, max_copies)
    fn(params, x, t, cond, quant=cap)
    if not cap.weights:
        return quant
    return HoistedWeights(quant, cap.weights, cap.tables)
