"""Per-time-group precision: each group of sampler steps picks its own format, as state of one compiled sampler.

``time_group_plan`` quantizes the transformer blocks' linear layers (weights and inputs) with
``time_grouped(selectable(cast(f_0), …))``: the state holds one option index per time group, so a
pattern such as ``(mx9, mx6, mx9)`` (high precision in the first and last steps, low in between,
what frameworks hand-code) is a state, every pattern of a sweep runs vmapped through one
compiled sampler (``jdq.sweep.run_group``), and the per-step latency of each option from the cost
model makes the choice an allocation over time groups (``time_group_costs`` +
``jdq.sweep.latency.allocate_latency``: a pattern's latency is the sum over groups of the group's
step count times one step's latency in its format, exactly additive).
"""

from __future__ import annotations

import itertools
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from jdq import quant as Q
from jdq.quant.select import selectable
from jdq.quant.timegroup import TimeGroups, time_grouped
from jdq.recipes import BLOCKS, LINEAR_ACTS


def thirds(num_steps: int) -> TimeGroups:
    """Three time groups: the first, middle and last third of ``num_steps`` steps (each at least one step)."""
    if num_steps < 3:
        raise ValueError(f"thirds: need at least 3 steps, got {num_steps}")
    a = max(1, num_steps // 3)
    return TimeGroups.from_boundaries((a, num_steps - a))


def time_group_plan(operands: Sequence[Q.Operand], formats: Sequence[str], groups: TimeGroups) -> Q.Plan:
    """Block linear layers in ``formats[index[g]]`` during time group ``g`` (indices are state); the rest float."""
    t = time_grouped(selectable(*[Q.cast(f) for f in formats]), groups)
    return Q.resolve([Q.rule(BLOCKS, t, roles=("weight",) + LINEAR_ACTS, name="per-time-group format"),
                      Q.keep_float("*")], operands)


def pattern_state(plan: Q.Plan, pattern: Sequence[int]) -> dict:
    """The plan state with time group ``g`` in option ``pattern[g]`` at every operand."""
    state = plan.init()
    idx = jnp.asarray(pattern, jnp.int32)
    out = {}
    for k, st in state.items():  # time_grouped stacks the selectable state on the group axis
        if st["index"].shape != idx.shape:
            raise ValueError(f"pattern has {idx.shape[0]} groups, the plan {st['index'].shape[0]}")
        out[k] = dict(st, index=idx)
    return out


def patterns(num_options: int, num_groups: int) -> list[tuple[int, ...]]:
    """Every assignment of an option to each group (``num_options ** num_groups``)."""
    return list(itertools.product(range(num_options), repeat=num_groups))


def group_steps(groups: TimeGroups, num_steps: int) -> np.ndarray:
    """Sampler steps in each group (``[num_groups]``)."""
    return np.bincount(groups.index_np(np.arange(num_steps)), minlength=groups.num_groups)


def time_group_costs(hardware, operands: Sequence[Q.Operand], formats: Sequence[str], groups: TimeGroups,
                     num_steps: int, metric: str = "seconds") -> np.ndarray:
    """``[num_groups, len(formats)]``: a group's cost (latency or energy) when its steps run in each format.

    One step's cost is the cost model's total with the block linear layers in that format and the
    rest in BF16; a group costs its step count times that.
    """
    from jdq.hw import OperandFormat
    from jdq.sweep.latency import _evaluate
    from jdq import hw

    per_step = []
    for f in formats:
        def fmt(op, f=f):
            blocks = op.site.startswith("blocks.") and op.role in ("weight",) + LINEAR_ACTS
            return OperandFormat(f) if blocks else hw.workload.FLOAT16
        wl = hw.from_operands(operands, fmt)
        per_step.append(float(getattr(_evaluate(hardware, wl).total(), metric)))
    return group_steps(groups, num_steps)[:, None] * np.asarray(per_step)[None, :]
