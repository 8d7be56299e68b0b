"""The one reader of a plan: what a :class:`~jdq.quant.Plan` does to each operand, as typed values.

A transform's ``meta`` is static and typed (:class:`~jdq.quant.CastMeta`, :class:`~jdq.quant.OutlierMeta`,
:class:`~jdq.quant.OutlierWeightMeta`, :class:`~jdq.quant.TimeGroupMeta`, :class:`~jdq.quant.RegionMeta`,
:class:`~jdq.quant.BalanceMeta`, :class:`~jdq.quant.CenterMeta`, :class:`~jdq.quant.ChainMeta`);
:func:`describe_transform` walks those stages (outermost first, as :func:`~jdq.quant.map_stages`
does) and returns an :class:`OperandPlan`; :func:`describe` does it for every operand of a plan.
Lowering (:func:`jdq.kernels.lower`: which kernel accepts a site) and the cost model
(:func:`jdq.hw.from_plan`: how each operand is stored) both read plans through this module and
nowhere else.

The format of an operand is the one of its last stage that casts: a format cast (its spec), an
outlier split (its low format, with the high format and ratio in :attr:`OperandPlan.outliers`),
an outlier weight (its wrapped cast), a multi-region quantizer (``int<bits>``). Wrappers (time
groups, channel balancing) and pre-processing (token centring) are recorded beside it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from jdq.quant.balance import BalanceMeta
from jdq.quant.casts import CastMeta
from jdq.quant.outliers import OutlierMeta, OutlierWeightMeta
from jdq.quant.regions import RegionMeta
from jdq.quant.smoothing import CenterMeta
from jdq.quant.timegroup import TimeGroupMeta
from jdq.quant.transform import Plan, find_stages

__all__ = ["OperandPlan", "Outliers", "describe", "describe_transform"]


@dataclasses.dataclass(frozen=True)
class Outliers:
    """A magnitude outlier split of one operand (MixDiT): a fraction of it in ``hi``, the rest in ``lo``.

    ``weight``: the weight side of a channel split (:func:`~jdq.quant.outlier_weight`, ``hi`` is
    ``None``: the kernel keeps those weight channels in bf16). ``ratio``: the state's ratio (an
    array, with a leading group axis under time groups), ``None`` when no state was given.
    """

    hi: Any
    lo: Any
    granularity: str
    channel_multiple: int
    block_size: int | None = None
    scope: str | None = None
    ratio: Any = None
    rank: Any = None
    weight: bool = False

    @property
    def ratio_value(self) -> float | None:
        """The ratio as a float (the first time group's when the state has a group axis)."""
        return None if self.ratio is None else float(np.asarray(self.ratio).reshape(-1)[0])

    @property
    def ratio_per_group(self) -> bool:
        """Whether the ratio has a leading (time-group) axis."""
        return self.ratio is not None and np.ndim(self.ratio) != 0


@dataclasses.dataclass(frozen=True)
class OperandPlan:
    """What a plan does to one operand (``key`` = ``"site:role"``); ``fmt is None``: kept in float.

    ``stages``: the kinds of the transform's stages, outermost first (``("cast",)`` for a plain
    cast). ``spec``: the :mod:`jdq.formats` spec of ``fmt`` (``None`` for a multi-region
    quantizer); ``scaling``: ``"dynamic"``, ``"static"``, ``"block"`` or ``"none"`` (a cast's);
    ``granularity``: the cast's or the spec's. ``time_groups``: number of groups, ``regions``:
    the multi-region quantizer's name, ``balance``: the balanced side (``"act"``/``"weight"``),
    ``centered``: tokens centred first (:func:`~jdq.quant.center_tokens`).
    """

    key: str = ""
    stages: tuple[str, ...] = ()
    fmt: str | None = None
    spec: Any = None
    scaling: str | None = None
    granularity: str | None = None
    outliers: Outliers | None = None
    time_groups: int | None = None
    regions: str | None = None
    balance: str | None = None
    centered: bool = False

    @property
    def site(self) -> str:
        """The operand's site."""
        return self.key.rpartition(":")[0]

    @property
    def role(self) -> str:
        """The operand's role."""
        return self.key.rpartition(":")[2]

    @property
    def quantized(self) -> bool:
        """Whether any stage casts the operand."""
        return self.fmt is not None

    @property
    def single_cast(self) -> bool:
        """Whether the transform is exactly one format cast (possibly in a one-element chain)."""
        return self.stages == ("cast",)

    @property
    def bits(self) -> float | None:
        """Average storage bits per element of ``fmt`` (:func:`jdq.formats.get`), ``None`` in float."""
        if self.fmt is None:
            return None
        from jdq import formats

        return float(formats.get(self.fmt).bits_per_element)


def _stage_kind(meta) -> str:
    kind = getattr(meta, "kind", None)
    return kind if isinstance(kind, str) else type(meta).__name__


def describe_transform(transform, state=None, key: str = "") -> OperandPlan:
    """The :class:`OperandPlan` of one transform (and, optionally, its state); ``None`` keeps the operand in float."""
    if transform is None or transform.meta is None:
        return OperandPlan(key)
    fields: dict[str, Any] = {"key": key}
    kinds = []
    for meta, st, _ in find_stages(transform.meta, state):
        if meta is None:
            continue
        kinds.append(_stage_kind(meta))
        if isinstance(meta, CastMeta):
            fields.update(fmt=meta.fmt, spec=meta.spec, scaling=meta.scaling,
                          granularity=getattr(meta.spec, "granularity", meta.granularity))
            if fields.get("outliers") is not None and fields["outliers"].weight and fields["outliers"].lo is None:
                fields["outliers"] = dataclasses.replace(fields["outliers"], lo=meta.spec)
        elif isinstance(meta, OutlierMeta):
            st = st if isinstance(st, Mapping) else {}
            fields.update(fmt=meta.lo.name, spec=meta.lo, scaling="block" if meta.lo.kind in ("mx", "smx") else "dynamic",
                          granularity=getattr(meta.lo, "granularity", None),
                          outliers=Outliers(meta.hi, meta.lo, meta.granularity, meta.channel_multiple, meta.block_size,
                                            meta.scope, st.get("ratio"), st.get("rank")))
        elif isinstance(meta, OutlierWeightMeta):
            st = st if isinstance(st, Mapping) else {}
            fields["outliers"] = Outliers(None, None, "channel", meta.channel_multiple, ratio=st.get("ratio"),
                                          rank=st.get("rank"), weight=True)
        elif isinstance(meta, RegionMeta):
            fields.update(fmt=f"int{meta.bits}", spec=None, scaling="static", granularity="tensor",
                          regions=meta.quantizer)
        elif isinstance(meta, TimeGroupMeta):
            fields["time_groups"] = meta.groups.num_groups
        elif isinstance(meta, BalanceMeta):
            fields["balance"] = meta.side
        elif isinstance(meta, CenterMeta):
            fields["centered"] = True
    return OperandPlan(stages=tuple(kinds), **fields)


def describe(plan: Plan, state: Mapping[str, Any] | None = None) -> dict[str, OperandPlan]:
    """``{operand key: OperandPlan}`` for every operand of ``plan`` (``state``: its ``plan.init(...)``)."""
    state = state or {}
    return {o.key: describe_transform(plan.transform_for(o.key), state.get(o.key), o.key) for o in plan.operands}
