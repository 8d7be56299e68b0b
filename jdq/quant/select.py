"""A transform whose state picks one of several transforms: per-layer precision as state, not structure.

``selectable(t_0, …, t_{n-1})`` applies ``t_k`` with ``k = state["index"]`` (an int32 scalar; its
other state entries are the options' states, ``state["options"][k]``). Because the choice is state,
plans that differ only in which option each operand takes share one compiled program: a stack
of index states runs under ``jax.vmap`` (a bit-width sweep, a sensitivity scan, an allocation's
candidates), and under ``time_grouped`` each time group picks its own option. Inside ``jax.vmap``
``lax.switch`` on a batched index evaluates every option and selects, so a vmapped call costs the
sum of its options; one unbatched call runs only the chosen one.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jdq.quant.transform import QuantTransform, identity


@dataclasses.dataclass(frozen=True)
class SelectMeta:
    """``meta`` of :func:`selectable`: the options' metas (``None`` for an identity option)."""

    kind: ClassVar[str] = "select"
    options: tuple[Any, ...]


def selectable(*options: QuantTransform | None, default: int = 0) -> QuantTransform:
    """Apply ``options[state["index"]]``; ``None`` is an identity option (keep the operand in float).

    State: ``{"index": int32, "options": (state_0, …)}``; ``default`` is the index ``init`` sets.
    """
    opts = tuple(identity() if o is None else o for o in options)
    if not opts:
        raise ValueError("selectable: give at least one option")
    for i, o in enumerate(opts):
        if not isinstance(o, QuantTransform):
            raise TypeError(f"selectable: option {i} is {type(o).__name__}, not a QuantTransform or None")
    if not 0 <= default < len(opts):
        raise ValueError(f"selectable: default {default} is not an option index (0..{len(opts) - 1})")

    def init(stats):
        return {"index": jnp.int32(default), "options": tuple(o.init(stats) for o in opts)}

    def apply(x, state, ctx):
        branches = [lambda x, s=s, o=o: o.apply(x, s, ctx) for o, s in zip(opts, state["options"])]
        return jax.lax.switch(jnp.clip(state["index"], 0, len(opts) - 1), branches, x)

    return QuantTransform(init, apply, SelectMeta(tuple(None if o is None else o.meta for o in options)))


def set_index(state, keys, index):
    """``state`` (a plan state) with the ``index`` of the selectable transforms of operands ``keys`` set."""
    out = dict(state)
    for k in keys:
        out[k] = dict(out[k], index=jnp.asarray(index, jnp.int32))
    return out
