"""Metric-decoupled sensitivity (MixDQ, ViDiT-Q): quantize one layer (or layer group) at a time, per bit width.

Each *unit* — one linear layer (MixDQ) or one block's layer group (ViDiT-Q: attention,
cross-attention, FFN) — is quantized alone, at each candidate bit width, once for its weights and
once for its input activations (the rest of the model in floating point), and the generated
samples are compared with the floating-point samples of the same noise:

* **content** units (FFN and cross-attention, which MixDQ finds shape *what* is drawn): SSIM of
  the images (:func:`jdq.metrics.paired.ssim`);
* **quality** units (everything else: self-attention, adaLN modulation): SQNR of the output,
  ``10·log10(‖y‖² / ‖y − ŷ‖²)`` dB (:func:`sqnr`).

Higher is less sensitive for both, so the scores feed :func:`jdq.quant.allocate_bits` directly,
one program per metric (the two scales do not mix). MixDQ measures SQNR on the UNet output of its
one-step sampler; with several steps the output here is the sampler's final sample, which
includes the error carried along the trajectory.

A sweep compiles once per (side, bit width): every unit's quantizer is a :func:`switchable`
stage whose on/off flag is in the plan state, so changing which unit is quantized changes only
the state, not the compiled sampler.

Per time group (ViDiT-Q measures each layer group in each of 4 timestep groups): with
``groups`` (:class:`jdq.quant.TimeGroups`) the flag is one entry per time group, picked by the
sampler step, so a unit is quantized during one group's steps only (:func:`switch_on` with
``group=``); the quantizer itself (and its calibration) is the one of the whole trajectory.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, ClassVar, Sequence

import jax.numpy as jnp
import numpy as np

from jdq.quant.casts import cast
from jdq.quant.timegroup import TimeGroups
from jdq.quant.transform import ACTIVATION_ROLES, Operand, Plan, QuantTransform, WrapsInner, keep_float, resolve, rule

#: Layer groups, as ViDiT-Q groups a block's linears.
GROUPS = ("attention", "cross_attention", "ffn", "adaln")
#: MixDQ's content-related groups (SSIM of images); the others are quality-related (SQNR).
CONTENT_GROUPS = ("cross_attention", "ffn")
#: Transformer-block sites of every family (as the recipes' skip list: embedders and final layer stay float).
_BLOCK = re.compile(r"^((?:blocks|transformer_blocks|joint_transformer_blocks|single_transformer_blocks)\.\d+)\.(.+)$")
_GROUP_OF = (
    (re.compile(r"(^|\.)attn2\."), "cross_attention"),
    (re.compile(r"(^|\.)(mlp|ff|ff_context)\."), "ffn"),
    (re.compile(r"(^|\.)(attn|attn1)\."), "attention"),
    (re.compile(r"(^|\.)(adaLN_modulation|norm1|norm1_context)(\.|$)"), "adaln"),
)


def layer_group(site: str) -> str | None:
    """The layer group of a linear site inside a transformer block (``None`` outside the blocks)."""
    m = _BLOCK.match(site)
    if m is None:
        return None
    rest = m.group(2) + "."
    for pattern, group in _GROUP_OF:
        if pattern.search(rest):
            return group
    return None


def metric_of(group: str) -> str:
    """``"ssim"`` for content groups, ``"sqnr"`` for quality groups (MixDQ's decoupling)."""
    return "ssim" if group in CONTENT_GROUPS else "sqnr"


def linear_sites(operands: Sequence[Operand]) -> list[str]:
    """Sites of the linear layers inside transformer blocks (those with a weight operand), in model order."""
    return [o.site for o in operands if o.role == "weight" and layer_group(o.site) is not None]


def units(operands: Sequence[Operand], by: str = "layer") -> dict[str, tuple[str, ...]]:
    """Units of a sweep: ``{name: sites}``, one per linear (``by="layer"``) or per block and group (``"group"``).

    A group unit is named ``"<block>/<group>"``, e.g. ``"blocks.3/ffn"``.
    """
    sites = linear_sites(operands)
    if by == "layer":
        return {s: (s,) for s in sites}
    if by != "group":
        raise ValueError(f"units: by must be 'layer' or 'group', got {by!r}")
    out: dict[str, list[str]] = {}
    for s in sites:
        out.setdefault(f"{_BLOCK.match(s).group(1)}/{layer_group(s)}", []).append(s)
    return {k: tuple(v) for k, v in out.items()}


def unit_group(name: str) -> str:
    """The layer group of a unit name from :func:`units`."""
    return name.rpartition("/")[2] if "/" in name else layer_group(name)


@dataclasses.dataclass(frozen=True)
class SwitchMeta(WrapsInner):
    """``meta`` of :func:`switchable`: the wrapped transform's meta."""

    kind: ClassVar[str] = "switchable"
    inner: Any


def switchable(inner: QuantTransform, groups: TimeGroups | None = None) -> QuantTransform:
    """``inner`` when the state's ``"on"`` flag is 1, the operand unchanged when 0 (the default).

    The flag is an array in the state, so a sweep toggles units without recompiling. With
    ``groups`` the flag has one entry per time group and the sampler step picks it (``ctx.step``
    is then required).
    """
    if groups is not None and not isinstance(groups, TimeGroups):
        raise TypeError(f"switchable: groups must be TimeGroups, got {type(groups).__name__}")
    shape = () if groups is None else (groups.num_groups,)

    def init(stats):
        return {"on": jnp.zeros(shape, jnp.float32), "inner": inner.init(stats)}

    def apply(x, state, ctx):
        on = state["on"]
        if groups is not None:
            if ctx.step is None:
                raise ValueError(f"switchable at {ctx.site}:{ctx.role} is per time group and needs the sampler step")
            on = on[groups.index(ctx.step)]
        return jnp.where(on > 0, inner.apply(x, state["inner"], ctx).astype(x.dtype), x)

    return QuantTransform(init, apply, SwitchMeta(inner.meta))


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    """How units are quantized in a sweep: integer weights per output channel; activations per token or per tensor.

    ``act_granularity``: ``"row"`` (per token, dynamic: ViDiT-Q) or ``"tensor"`` (static from
    calibration: MixDQ).
    """

    weight_bits: tuple[int, ...] = (2, 4, 8)
    act_bits: tuple[int, ...] = (4, 8)
    act_granularity: str = "tensor"
    by: str = "layer"

    def __post_init__(self):
        for b in self.weight_bits + self.act_bits:
            if not (isinstance(b, (int, np.integer)) and 2 <= b <= 8):
                raise ValueError(f"SweepSpec: bit widths must be integers in [2, 8], got {b!r}")
        if self.act_granularity not in ("row", "tensor"):
            raise ValueError(f"SweepSpec: act_granularity must be 'row' or 'tensor', got {self.act_granularity!r}")
        if self.by not in ("layer", "group"):
            raise ValueError(f"SweepSpec: by must be 'layer' or 'group', got {self.by!r}")

    @property
    def calibrated(self) -> bool:
        """Whether the activation quantizer needs calibration statistics."""
        return self.act_granularity == "tensor"

    def quantizer(self, side: str, bits: int) -> QuantTransform:
        """The cast of ``side`` (``"weight"`` / ``"act"``) at ``bits``."""
        if side == "weight":
            return cast(f"int{bits}", granularity="row")
        return cast(f"int{bits}", granularity=self.act_granularity, static=self.act_granularity == "tensor")


def sweep_plan(operands: Sequence[Operand], spec: SweepSpec, side: str, bits: int,
               groups: TimeGroups | None = None) -> Plan:
    """A plan with a :func:`switchable` ``side`` quantizer at ``bits`` on every block linear (all off).

    ``groups``: one on/off flag per time group (see :func:`switchable`).
    """
    if side not in ("weight", "act"):
        raise ValueError(f"sweep_plan: side must be 'weight' or 'act', got {side!r}")
    sites = linear_sites(operands)
    pattern = "re:(" + "|".join(re.escape(s) for s in sites) + ")"
    roles = ("weight",) if side == "weight" else ACTIVATION_ROLES
    return resolve([rule(pattern, switchable(spec.quantizer(side, bits), groups), roles=roles, name=f"{side} int{bits}"),
                    keep_float("*")], operands)


def switch_on(plan: Plan, state, sites: Sequence[str], group: int | None = None):
    """``state`` with the switchable stages of ``sites`` turned on (all others off).

    ``group``: on during that time group only (a plan built with ``groups``); ``None``: every step.
    """
    sites = set(sites)
    out = {}
    for key, st in state.items():
        shape = np.shape(st["on"])
        if group is not None and (not shape or not 0 <= group < shape[0]):
            raise ValueError(f"switch_on: group {group} is not a time group of this plan "
                             f"({shape[0] if shape else 'no'} groups)")
        on = np.zeros(shape, np.float32)
        if plan.operand(key).site in sites:
            if group is None:
                on[...] = 1.0
            else:
                on[group] = 1.0
        out[key] = dict(st, on=jnp.asarray(on))
    return out


def contiguous_groups(num_steps: int, num_groups: int) -> TimeGroups:
    """``num_groups`` time groups of consecutive sampler steps, as equal as possible (ViDiT-Q: 4 of 20 steps)."""
    if not (isinstance(num_groups, (int, np.integer)) and 1 <= num_groups <= num_steps):
        raise ValueError(f"contiguous_groups: need 1 <= num_groups <= num_steps ({num_steps}), got {num_groups!r}")
    edges = np.linspace(0, num_steps, int(num_groups) + 1)
    return TimeGroups.from_table(tuple(int(np.searchsorted(edges, i, side="right") - 1) for i in range(num_steps)))


def sqnr(reference, test) -> float:
    """Signal-to-quantization-noise ratio ``10·log10(‖ref‖² / ‖ref − test‖²)`` in dB (``inf`` if equal)."""
    ref = np.asarray(reference, np.float64)
    err = float(np.sum((ref - np.asarray(test, np.float64)) ** 2))
    sig = float(np.sum(ref**2))
    return float("inf") if err == 0.0 else 10.0 * np.log10(sig / err)


@dataclasses.dataclass(frozen=True)
class SelectMeta:
    """``meta`` of :func:`selectable`: the candidates' metas (index ``-1`` in the state: floating point)."""

    kind: ClassVar[str] = "selectable"
    options: tuple


def selectable(options: Sequence[QuantTransform]) -> QuantTransform:
    """One of ``options`` picked by the state's ``"pick"`` index (``-1``: the operand unchanged).

    Every option is computed and one selected, so a search over per-layer choices (MixDQ's ranking
    of candidate bit assignments) changes only the state, never the compiled sampler.
    """
    options = tuple(options)

    def init(stats):
        return {"pick": jnp.asarray(-1, jnp.int32), "options": tuple(o.init(stats) for o in options)}

    def apply(x, state, ctx):
        out = x
        for i, (o, st) in enumerate(zip(options, state["options"])):
            out = jnp.where(state["pick"] == i, o.apply(x, st, ctx).astype(x.dtype), out)
        return out

    return QuantTransform(init, apply, SelectMeta(tuple(o.meta for o in options)))


def pick(plan: Plan, state, choice: dict[str, int]):
    """``state`` of a plan of :func:`selectable` stages with site ``s`` set to option ``choice[s]`` (others ``-1``)."""
    out = {}
    for key, st in state.items():
        out[key] = dict(st, pick=jnp.asarray(choice.get(plan.operand(key).site, -1), jnp.int32))
    return out
