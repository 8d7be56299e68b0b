"""Time-grouped state: any transform's state stacked on a leading group axis, picked by step.

Diffusion activations drift over the sampling trajectory, so several papers keep one set of
quantization parameters per *time group*:

* TQ-DiT (TGQ): 250 DDPM steps in 25 groups of 10 consecutive steps, group
  ``min(step // 10, 24)`` (:meth:`TimeGroups.uniform`);
* ViDiT-Q: time *ranges* of the diffusion timestep, e.g. ``t ∈ [0, 500]`` and ``[501, 1000]``
  (:meth:`TimeGroups.from_timesteps`, which turns the sampler's per-step timesteps into a
  per-step table), or any partition of the step indices (:meth:`TimeGroups.from_boundaries`).

:func:`time_grouped` wraps a transform: its state is the inner state of every group stacked on
a new leading axis, and ``apply`` picks the group of ``ctx.step`` with a dynamic index, so one
jitted sampler serves every step. ``init`` splits the calibration statistics' leading step axis
by group and builds each group's state from that group's steps only.

Which step each statistics entry belongs to: statistics may carry a ``"step"`` entry (integer
array ``[S]``, the sampler step index of each of the ``S`` entries, as a calibration that
observes only some steps should record); without it, entry ``i`` is step ``i``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jdq.quant.transform import Context, QuantTransform

#: Statistics entry naming the sampler step index of each entry of the leading step axis.
STEP_KEY = "step"


@dataclasses.dataclass(frozen=True)
class TimeGroups:
    """A static map from sampler step index to time group (hashable; lives in ``meta``).

    Exactly one of ``group_len`` (group ``min(step // group_len, num_groups - 1)``),
    ``boundaries`` (sorted first steps of groups ``1 .. G-1``: group = number of boundaries
    ``<= step``) or ``table`` (group of every step; steps past its end use its last entry) is
    set. Negative steps fall in group 0.
    """

    num_groups: int
    group_len: int | None = None
    boundaries: tuple[int, ...] | None = None
    table: tuple[int, ...] | None = None

    def __post_init__(self):
        given = [n for n in ("group_len", "boundaries", "table") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(f"TimeGroups: give exactly one of group_len, boundaries, table; got {given or 'none'}")
        if not isinstance(self.num_groups, int) or self.num_groups < 1:
            raise ValueError(f"TimeGroups: num_groups must be a positive int, got {self.num_groups!r}")
        if self.group_len is not None and (not isinstance(self.group_len, int) or self.group_len < 1):
            raise ValueError(f"TimeGroups: group_len must be a positive int, got {self.group_len!r}")
        if self.boundaries is not None:
            b = tuple(int(v) for v in self.boundaries)
            if any(x >= y for x, y in zip(b, b[1:])) or (b and b[0] < 1):
                raise ValueError(f"TimeGroups: boundaries must be strictly increasing step indices >= 1, got {b}")
            if len(b) + 1 != self.num_groups:
                raise ValueError(f"TimeGroups: {len(b)} boundaries make {len(b) + 1} groups, not num_groups={self.num_groups}")
            object.__setattr__(self, "boundaries", b)
        if self.table is not None:
            t = tuple(int(v) for v in self.table)
            if not t or min(t) < 0 or max(t) >= self.num_groups:
                raise ValueError(f"TimeGroups: table entries must lie in [0, {self.num_groups}), got {t}")
            object.__setattr__(self, "table", t)

    @classmethod
    def uniform(cls, num_groups: int, group_len: int) -> "TimeGroups":
        """TQ-DiT TGQ: groups of ``group_len`` consecutive steps, the last group open-ended."""
        return cls(num_groups=num_groups, group_len=group_len)

    @classmethod
    def from_boundaries(cls, boundaries: Sequence[int]) -> "TimeGroups":
        """Groups starting at step 0 and at each of ``boundaries`` (sorted step indices)."""
        boundaries = tuple(int(b) for b in boundaries)
        return cls(num_groups=len(boundaries) + 1, boundaries=boundaries)

    @classmethod
    def from_table(cls, table: Sequence[int]) -> "TimeGroups":
        """An explicit group index for every step."""
        table = tuple(int(g) for g in table)
        return cls(num_groups=max(table) + 1 if table else 1, table=table)

    @classmethod
    def from_timesteps(cls, timesteps: Sequence[float], ranges: Sequence[Sequence[float]]) -> "TimeGroups":
        """ViDiT-Q time ranges: step ``i`` belongs to the range ``[lo, hi]`` (inclusive) holding ``timesteps[i]``.

        ``timesteps`` are the sampler's diffusion timesteps, one per step in sampling order;
        ``ranges`` the ``[lo, hi]`` intervals of group 0, 1, ... (e.g. ``[[0, 500], [501, 1000]]``).
        """
        ts = np.asarray(timesteps, dtype=np.float64).reshape(-1)
        table = []
        for i, t in enumerate(ts):
            hits = [g for g, (lo, hi) in enumerate(ranges) if lo <= t <= hi]
            if not hits:
                raise ValueError(f"TimeGroups.from_timesteps: timestep {t} of step {i} lies in no range of {list(map(list, ranges))}")
            table.append(hits[0])
        return cls(num_groups=len(ranges), table=tuple(table))

    def index(self, step) -> jax.Array:
        """The group index (int32) of ``step``, a Python int or a traced integer (works under jit/vmap)."""
        step = jnp.asarray(step, jnp.int32)
        if self.group_len is not None:
            g = step // self.group_len
        elif self.boundaries is not None:
            g = jnp.searchsorted(jnp.asarray(self.boundaries, jnp.int32), step, side="right")
        else:
            table = jnp.asarray(self.table, jnp.int32)
            g = table[jnp.clip(step, 0, len(self.table) - 1)]
        return jnp.clip(g, 0, self.num_groups - 1).astype(jnp.int32)

    def index_np(self, steps) -> np.ndarray:
        """:meth:`index` for concrete steps, in numpy (used by ``init``)."""
        steps = np.asarray(steps, np.int64)
        if self.group_len is not None:
            g = steps // self.group_len
        elif self.boundaries is not None:
            g = np.searchsorted(np.asarray(self.boundaries), steps, side="right")
        else:
            g = np.asarray(self.table)[np.clip(steps, 0, len(self.table) - 1)]
        return np.clip(g, 0, self.num_groups - 1)


@dataclasses.dataclass(frozen=True)
class TimeGroupMeta:
    """``meta`` of a :func:`time_grouped` transform: the group map and the inner transform's meta."""

    kind: ClassVar[str] = "time_grouped"
    stacks_state: ClassVar[bool] = True
    groups: TimeGroups
    inner: Any

    @staticmethod
    def inner_state(state):
        """The inner transform's state (stacked on the group axis)."""
        return state

    @staticmethod
    def replace_inner_state(state, inner_state):
        """This wrapper's state with the inner state replaced."""
        return inner_state


def stack_states(states: Sequence[Any]) -> Any:
    """Stack states of one transform (same structure) on a new leading axis (time groups, vmap sweeps)."""
    if not states:
        raise ValueError("stack_states: no states to stack")
    return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


def unstack_state(state: Any, index) -> Any:
    """Entry ``index`` (may be traced) of a state stacked by :func:`stack_states`."""
    return jax.tree.map(lambda a: a[index], state)


def _num_steps(stats) -> int:
    return next((int(np.shape(v)[0]) for k, v in stats.items() if k != STEP_KEY and np.ndim(v)), 0)


def split_stats_by_group(stats, groups: TimeGroups, allow_empty: bool = False) -> list[dict | None]:
    """Split statistics with a leading step axis into one statistics dict per time group.

    A group with no calibration step raises ``ValueError`` naming it (or, with ``allow_empty``,
    is ``None``).
    """
    stats = dict(stats)
    steps = stats.pop(STEP_KEY, None)
    lengths = {k: np.shape(v)[0] if np.ndim(v) else None for k, v in stats.items()}
    bad = [k for k, n in lengths.items() if n is None]
    if bad:
        raise ValueError(f"time_grouped: statistics {bad} have no leading step axis (use jdq.quant.stack_stats)")
    distinct = set(lengths.values())
    if len(distinct) > 1:
        raise ValueError(f"time_grouped: statistics disagree on the number of steps: {lengths}")
    n = distinct.pop() if distinct else (0 if steps is None else int(np.shape(steps)[0]))
    steps = np.arange(n) if steps is None else np.asarray(steps).reshape(-1)
    if steps.shape[0] != n:
        raise ValueError(f"time_grouped: '{STEP_KEY}' has {steps.shape[0]} entries but the statistics have {n} steps")
    group_of = groups.index_np(steps)
    out = []
    for g in range(groups.num_groups):
        idx = np.nonzero(group_of == g)[0]
        if stats and idx.size == 0:
            if allow_empty:
                out.append(None)
                continue
            raise ValueError(
                f"time_grouped: group {g} of {groups.num_groups} has no calibration statistics "
                f"(observed steps {steps.tolist()}); calibrate at least one step of every group"
            )
        sub = {k: jnp.asarray(v)[idx] for k, v in stats.items()}
        if stats:
            sub[STEP_KEY] = jnp.asarray(steps[idx])
        out.append(sub)
    return out


def time_grouped(inner: QuantTransform, groups: TimeGroups | None = None, **group_kwargs) -> QuantTransform:
    """Give ``inner`` one state per time group, stacked on a leading axis and picked by ``ctx.step``.

    ``groups`` is a :class:`TimeGroups`; or pass its fields (``num_groups=25, group_len=10``,
    ``boundaries=(10, 20)``, ``table=...``). ``apply`` needs ``ctx.step`` (bind the quantizer with
    ``step=`` / ``at_step``) and raises ``ValueError`` naming the site otherwise.
    """
    if not isinstance(inner, QuantTransform):
        raise TypeError(f"time_grouped: inner must be a QuantTransform, got {type(inner).__name__}")
    if groups is None:
        if "boundaries" in group_kwargs and "num_groups" not in group_kwargs:
            group_kwargs["num_groups"] = len(tuple(group_kwargs["boundaries"])) + 1
        if "table" in group_kwargs and "num_groups" not in group_kwargs:
            group_kwargs["num_groups"] = max(group_kwargs["table"]) + 1
        groups = TimeGroups(**group_kwargs)
    elif group_kwargs:
        raise TypeError(f"time_grouped: pass either groups or its fields, not both ({sorted(group_kwargs)})")

    def init(stats):
        states = []
        for g, sub in enumerate(split_stats_by_group(stats, groups, allow_empty=True)):
            if sub is not None:
                states.append(inner.init(sub))
                continue
            try:  # a group no calibration step reached: fine if the inner transform needs no statistics
                states.append(inner.init({}))
            except KeyError:
                raise ValueError(
                    f"time_grouped: group {g} of {groups.num_groups} has no calibration statistics "
                    f"(observed steps {np.asarray(stats.get(STEP_KEY, np.arange(_num_steps(stats)))).tolist()}); "
                    "calibrate at least one step of every group"
                ) from None
        return stack_states(states)

    def apply(x, state, ctx: Context):
        if ctx.step is None:
            raise ValueError(
                f"time-grouped transform at {ctx.site}:{ctx.role} needs the sampler step; "
                "bind the quantizer with plan.bind(state, step=...) or quantizer.at_step(i)"
            )
        return inner.apply(x, unstack_state(state, groups.index(ctx.step)), ctx)

    return QuantTransform(init, apply, TimeGroupMeta(groups, inner.meta))


@dataclasses.dataclass(frozen=True)
class PerTimeGroupMeta:
    """``meta`` of :func:`per_time_group`: the group map, the option picked in each group, the options' metas."""

    kind: ClassVar[str] = "per_time_group"
    groups: TimeGroups
    picks: tuple[int, ...]
    options: tuple[Any, ...]


def per_time_group(options: Sequence[QuantTransform], groups: TimeGroups, picks: Sequence[int]) -> QuantTransform:
    """``options[picks[g]]`` during time group ``g`` (a per-time-group bit width, ViDiT-Q's mixed precision).

    Unlike :func:`time_grouped`, every option's state is built from *all* the statistics (the
    options differ in what they are, e.g. their bit width, not in the steps they were calibrated
    on); ``picks`` is static, so the choice per group is part of the plan. ``apply`` needs ``ctx.step``.
    """
    options = tuple(options)
    picks = tuple(int(p) for p in picks)
    if not isinstance(groups, TimeGroups):
        raise TypeError(f"per_time_group: groups must be TimeGroups, got {type(groups).__name__}")
    if not options or not all(isinstance(o, QuantTransform) for o in options):
        raise TypeError("per_time_group: options must be one or more QuantTransforms")
    if len(picks) != groups.num_groups or any(not 0 <= p < len(options) for p in picks):
        raise ValueError(f"per_time_group: picks must give an option index in [0, {len(options)}) for each of the "
                         f"{groups.num_groups} groups, got {picks}")

    def init(stats):
        return {"options": tuple(o.init(stats) for o in options)}

    def apply(x, state, ctx: Context):
        if ctx.step is None:
            raise ValueError(f"per-time-group transform at {ctx.site}:{ctx.role} needs the sampler step; "
                             "bind the quantizer with plan.bind(state, step=...) or quantizer.at_step(i)")
        branches = [lambda x, o=o, s=s: o.apply(x, s, ctx).astype(x.dtype) for o, s in zip(options, state["options"])]
        return jax.lax.switch(jnp.asarray(picks, jnp.int32)[groups.index(ctx.step)], branches, x)

    return QuantTransform(init, apply, PerTimeGroupMeta(groups, picks, tuple(o.meta for o in options)))
