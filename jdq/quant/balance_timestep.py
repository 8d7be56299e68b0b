"""Timestep-aware channel balancing (ViDiT-Q): one smoothing vector, and so one balanced weight, per time range.

ViDiT-Q (thu-nics/ViDiT-Q, ``QuantLayer.forward``) keeps the EMA (momentum 0.95) of each input
channel's activation |max| separately for each range of the diffusion timestep (default
``[[0, 500], [501, 1000]]``), with its own migration strength ``α_r`` per range, and balances
with ``s_j = a_j^α_r / w_j^(1−α_r)`` (:class:`jdq.quant.ChannelBalance`). Its weight quantizer is
re-initialised per range: the balanced weight ``W · s_r`` differs per range, so each range has its
own quantized copy.

Here the ranges become :class:`jdq.quant.TimeGroups` through the sampler's own timesteps
(:func:`range_groups`), and :func:`timestep_balance` wraps a balance of either side in one state
per range, stacked on a leading axis and picked by the sampler step inside the compiled loop
(the layout of :func:`jdq.quant.time_grouped`, whose meta it carries, so :func:`jdq.quant.fold_balance`
refuses to fold it into one weight). Each range's state is built from the calibration steps of
that range only, in step order (the EMA runs over them alone).

Memory (:func:`per_range_weight_bytes`): the activation side stores ``R`` vectors of ``C_in``
floats (negligible); the weight side stores ``R`` smoothing vectors plus the per-range
quantization scales in the plan state, and a deployment that packs the weights holds ``R``
quantized copies of every balanced weight — ``R ×`` the weight memory of those layers (2× for
the default two ranges: W4A8 with two ranges stores as many weight bytes as W8A8 with one).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from jdq.quant.balance import BalanceMeta, ChannelBalance, _balanced
from jdq.quant.timegroup import TimeGroupMeta, TimeGroups, split_stats_by_group, stack_states, unstack_state
from jdq.quant.transform import Context, QuantTransform

#: ViDiT-Q's default time ranges of the diffusion timestep (inclusive).
DEFAULT_RANGES = ((0, 500), (501, 1000))
#: ViDiT-Q's EMA momentum of the channel maxima.
MOMENTUM = 0.95


def range_groups(timesteps: Sequence[float], ranges: Sequence[Sequence[float]] = DEFAULT_RANGES) -> TimeGroups:
    """Time groups of the sampler's steps: step ``i`` is in the range ``[lo, hi]`` holding ``timesteps[i]``.

    Timesteps are rounded to the nearest integer first (a respaced sampler's fractional timestep
    499.6 falls in ``[501, 1000]`` only if it rounds there; ViDiT-Q compares integer timesteps),
    and a timestep between two ranges (e.g. 500.4 with ``[0, 500]``, ``[501, 1000]``) goes to the
    nearer range end.
    """
    ts = np.rint(np.asarray(timesteps, np.float64).reshape(-1))
    ranges = [tuple(float(v) for v in r) for r in ranges]
    if not ranges or any(len(r) != 2 or r[0] > r[1] for r in ranges):
        raise ValueError(f"range_groups: ranges must be [lo, hi] pairs with lo <= hi, got {ranges}")
    table = []
    for t in ts:
        dist = [0.0 if lo <= t <= hi else min(abs(t - lo), abs(t - hi)) for lo, hi in ranges]
        table.append(int(np.argmin(dist)))
    missing = sorted(set(range(len(ranges))) - set(table))
    if missing:
        raise ValueError(f"range_groups: no sampler step falls in range(s) {[list(ranges[g]) for g in missing]} "
                         f"(timesteps {ts.astype(int).tolist()}); drop the range or sample more steps")
    return TimeGroups(num_groups=len(ranges), table=tuple(table))


@dataclasses.dataclass(frozen=True)
class RangeBalanceMeta(TimeGroupMeta):
    """``meta`` of :func:`timestep_balance`: a time-grouped balance whose α may differ per range."""

    alphas: tuple[float, ...] = ()


def timestep_balance(side: str, inner: QuantTransform, groups: TimeGroups, alphas: float | Sequence[float] = 0.5, *,
                     momentum: float = MOMENTUM, salience: str = "ema", eps: float = 1e-5) -> QuantTransform:
    """Balance one operand side (``"act"`` or ``"weight"``) with one ``s`` (and ``inner`` state) per time range.

    ``alphas``: one α for every range, or one per range (ViDiT-Q's ``alpha: [0.11, 0.11]``).
    Statistics need a leading step axis (and both operands' channel maxima:
    :func:`jdq.quant.link_stats`); each range's state comes from its own steps only.
    """
    if side not in ("act", "weight"):
        raise ValueError(f"timestep_balance: side must be 'act' or 'weight', got {side!r}")
    if not isinstance(groups, TimeGroups):
        raise TypeError(f"timestep_balance: groups must be TimeGroups (see range_groups), got {type(groups).__name__}")
    alphas = (float(alphas),) * groups.num_groups if np.ndim(alphas) == 0 else tuple(float(a) for a in alphas)
    if len(alphas) != groups.num_groups:
        raise ValueError(f"timestep_balance: {len(alphas)} alphas for {groups.num_groups} time ranges")
    parts = [_balanced(ChannelBalance(a, salience, momentum, eps), side, inner) for a in alphas]

    def init(stats):
        subs = split_stats_by_group(stats, groups)
        return stack_states([p.init(sub) for p, sub in zip(parts, subs)])

    def apply(x, state, ctx: Context):
        if ctx.step is None:
            raise ValueError(f"timestep-aware balance at {ctx.site}:{ctx.role} needs the sampler step; "
                             "bind the quantizer with plan.bind(state, step=...) or quantizer.at_step(i)")
        # the apply of a balance does not depend on α, so the first part's serves every range
        return parts[0].apply(x, unstack_state(state, groups.index(ctx.step)), ctx)

    balance = ChannelBalance(alphas[0], salience, momentum, eps)
    return QuantTransform(init, apply, RangeBalanceMeta(groups, BalanceMeta(side, balance, inner.meta), alphas))


def timestep_balance_pair(act_inner: QuantTransform, weight_inner: QuantTransform, groups: TimeGroups,
                          alphas: float | Sequence[float] = 0.5, **kwargs) -> tuple[QuantTransform, QuantTransform]:
    """``(activation transform, weight transform)`` of one timestep-aware balanced linear (same α and ranges)."""
    return (timestep_balance("act", act_inner, groups, alphas, **kwargs),
            timestep_balance("weight", weight_inner, groups, alphas, **kwargs))


def per_range_weight_bytes(weight_shapes: Sequence[Sequence[int]], bits: float, num_ranges: int) -> dict[str, int]:
    """Packed weight bytes of balanced layers with one quantized copy per range (scales not counted).

    Returns ``{"one_copy": B, "per_range": num_ranges · B}`` where ``B = Σ numel · bits / 8``.
    """
    one = int(sum(int(np.prod(s)) for s in weight_shapes) * bits // 8)
    return {"one_copy": one, "per_range": one * int(num_ranges)}
