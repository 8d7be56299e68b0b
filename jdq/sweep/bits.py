"""Per-layer and per-time-group bit widths as sweep settings: one ``selectable`` plan, the choices its state.

Settings (``jdq sweep --vary``; values are bit widths of ``--bits-family``):

* ``bits.SITE=4,8`` — the linear layer ``SITE`` of the transformer blocks (its weight and its input
  together), e.g. ``bits.blocks.0.attn.qkv``;
* ``bits[GLOB]=4,8`` — every block linear layer whose site matches the glob (``*`` matches across
  dots), e.g. ``bits[blocks.*.mlp.*]``; all of them take the same width at a point;
* ``timegroup_bits=8-4-4-8,8-8-8-8`` — one width per time group, every block linear layer: the
  ``G`` entries of a pattern split the sampler's steps into ``G`` near-equal consecutive groups
  (:func:`even_groups`); a per-layer setting overrides the pattern for its layers (in every group).

Every block linear layer is quantized by ``selectable(cast(f_0), …)`` over the formats of all widths
the sweep uses (and ``--bits-default``, the width of layers no setting names), wrapped in
``time_grouped`` when patterns are swept; which option each layer (and group) takes is state, so
all points with the same number of time groups run vmapped in one compiled sampler. Patterns of
different lengths are different plans (structure): they compile separately.
"""

from __future__ import annotations

import fnmatch
from typing import Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from jdq import quant as Q
from jdq.quant.select import selectable
from jdq.quant.timegroup import TimeGroups, time_grouped
from jdq.recipes import BLOCKS, LINEAR_ACTS

#: The pseudo-recipe name of bit-width sweeps (``Group.recipe``).
RECIPE = "bits"
#: Bit width -> format name, per family (``--bits-family``): dynamic per-row int (weights per output
#: channel, inputs per token), shared-microexponent MX (MX4 / MX6 / MX9), OCP MXFP.
FAMILIES = {
    "int": {b: f"int{b}" for b in range(2, 9)},
    "mx": {4: "mx4", 6: "mx6", 9: "mx9"},
    "mxfp": {4: "mxfp4_e2m1", 6: "mxfp6_e2m3", 8: "mxfp8_e4m3"},
}
PATTERN = "timegroup_bits"


class BitsError(ValueError):
    """A bit-width setting that cannot apply: unknown layer, bad pattern, a width the family lacks."""


def is_bits_key(key: str) -> bool:
    """Whether ``key`` is a bit-width setting (``bits.SITE``, ``bits[GLOB]`` or ``timegroup_bits``)."""
    return key == PATTERN or key.startswith("bits.") or (key.startswith("bits[") and key.endswith("]"))


def parse_value(key: str, text: str):
    """A setting's value: an int width, or a tuple of widths (``8-4-4-8``) for ``timegroup_bits``."""
    text = text.strip()
    if key == PATTERN:
        parts = text.split("-")
        try:
            widths = tuple(int(p) for p in parts)
        except ValueError:
            raise ValueError("is not a pattern of bit widths such as 8-4-4-8") from None
        return widths
    try:
        return int(text)
    except ValueError:
        raise ValueError("is not a bit width (an integer)") from None


def key_pattern(key: str) -> str:
    """The site glob a per-layer key names (``bits.SITE`` -> ``SITE``, ``bits[GLOB]`` -> ``GLOB``)."""
    return key[5:] if key.startswith("bits.") else key[5:-1]


def layer_sites(operands: Sequence[Q.Operand]) -> list[str]:
    """Sites of the block linear layers (those with a weight operand inside the transformer blocks)."""
    rule = Q.rule(BLOCKS, None, roles=("weight",))
    return [o.site for o in operands if o.role == "weight" and rule.matches(o.site, o.role)]


def even_groups(num_steps: int, num_groups: int) -> TimeGroups:
    """``num_groups`` consecutive groups of near-equal length over ``num_steps`` steps (each at least one step)."""
    if not 1 <= num_groups <= num_steps:
        raise BitsError(f"a pattern of {num_groups} time groups needs 1..{num_steps} groups for {num_steps} steps")
    if num_groups == 1:
        return TimeGroups(num_groups=1, table=(0,))
    return TimeGroups.from_boundaries(tuple(int(round(num_steps * k / num_groups)) for k in range(1, num_groups)))


def _check_width(bits_family: str, width: int, what: str):
    allowed = FAMILIES[bits_family]
    if width not in allowed:
        raise BitsError(f"{what}: bit width {width} is not allowed in the {bits_family!r} family; "
                        f"allowed: {', '.join(map(str, sorted(allowed)))}")


def _matched(key: str, sites: Sequence[str]) -> list[str]:
    pat = key_pattern(key)
    if key.startswith("bits."):
        if pat not in sites:
            near = [s for s in sites if s.split(".")[-1] == pat.split(".")[-1]][:3] or list(sites[:3])
            raise BitsError(f"--vary {key}: no linear layer {pat!r} in the model's transformer blocks "
                            f"({len(sites)} layers, e.g. {', '.join(near)})")
        return [pat]
    hit = [s for s in sites if fnmatch.fnmatchcase(s, pat)]
    if not hit:
        raise BitsError(f"--vary {key}: the glob {pat!r} matches no linear layer of the transformer blocks "
                        f"(e.g. {', '.join(sites[:3])})")
    return hit


class BitsSpace:
    """The bit-width settings of a grid resolved on a model: the formats (options), the layers, checks."""

    def __init__(self, points: Sequence[Mapping], operands: Sequence[Q.Operand], *, bits_family: str = "int",
                 default: int | None = None, num_steps: int | None = None):
        if bits_family not in FAMILIES:
            raise BitsError(f"unknown bit family {bits_family!r}; known: {', '.join(FAMILIES)}")
        self.bits_family = bits_family
        self.default = max(FAMILIES[bits_family]) if default is None else int(default)
        _check_width(bits_family, self.default, "--bits-default")
        self.sites = layer_sites(operands)
        if not self.sites:
            raise BitsError("the model has no linear layers in transformer blocks to set bit widths of")
        self.num_steps = num_steps
        widths = {self.default}
        self.layers: dict[str, list[str]] = {}
        for p in points:
            for key, value in p.items():
                if not is_bits_key(key):
                    continue
                if key == PATTERN:
                    if num_steps is not None:
                        even_groups(num_steps, len(value))  # raises on a bad length
                    for w in value:
                        _check_width(bits_family, w, f"--vary {key}={'-'.join(map(str, value))}")
                    widths.update(value)
                else:
                    _check_width(bits_family, value, f"--vary {key}")
                    widths.add(value)
                    if key not in self.layers:
                        self.layers[key] = _matched(key, self.sites)
        seen: dict[str, str] = {}
        for key, sites in self.layers.items():
            for s in sites:
                if s in seen:
                    raise BitsError(f"layer {s!r} is set by both --vary {seen[s]} and --vary {key}")
                seen[s] = key
        self.widths = sorted(widths)
        self.formats = [FAMILIES[bits_family][w] for w in self.widths]

    def _cast(self, fmt: str):
        return Q.cast(fmt, granularity="row") if self.bits_family == "int" else Q.cast(fmt)

    def plan(self, operands: Sequence[Q.Operand], num_groups: int | None) -> Q.Plan:
        """Block linear layers (weight and input) in ``selectable`` formats, time-grouped for ``num_groups``; the rest float."""
        t = selectable(*[self._cast(f) for f in self.formats])
        if num_groups is not None:
            if self.num_steps is None:
                raise BitsError("timegroup_bits needs the sampler's step count")
            t = time_grouped(t, even_groups(self.num_steps, num_groups))
        return Q.resolve([Q.rule(BLOCKS, t, roles=("weight",) + LINEAR_ACTS, name="bit widths as state"),
                          Q.keep_float("*")], operands)

    def widths_of(self, point: Mapping, sites: Sequence[str] | None = None) -> dict[str, tuple[int, ...]]:
        """Per layer site, its width in every time group (one entry without a pattern)."""
        pattern = point.get(PATTERN)
        base = tuple(pattern) if pattern is not None else (self.default,)
        out = {s: base for s in (self.sites if sites is None else sites)}
        for key, value in point.items():
            if key != PATTERN and is_bits_key(key):
                pat = key_pattern(key)
                for s in out:
                    if (s == pat) if key.startswith("bits.") else fnmatch.fnmatchcase(s, pat):
                        out[s] = (int(value),) * len(base)
        return out

    def state(self, plan: Q.Plan, point: Mapping) -> dict:
        """The plan state of ``point``: each layer's operands take the option index of its width (per group)."""
        widths = self.widths_of(point)
        grouped = PATTERN in point
        state = plan.init()
        out = {}
        for key, st in state.items():
            site = key.rsplit(":", 1)[0]
            idx = [self.widths.index(w) for w in widths[site]]
            out[key] = dict(st, index=jnp.asarray(idx if grouped else idx[0], jnp.int32))
        return out

    def step_formats(self, point: Mapping, cost_operands: Sequence[Q.Operand], num_steps: int) -> list[tuple[int, dict]]:
        """``[(steps in group, {site: format})]`` of ``point`` on (possibly other) cost-model operands."""
        sites = layer_sites(cost_operands)
        widths = self.widths_of(point, sites)
        pattern = point.get(PATTERN)
        if pattern is None:
            return [(num_steps, {s: FAMILIES[self.bits_family][w[0]] for s, w in widths.items()})]
        groups = even_groups(num_steps, len(pattern))
        counts = np.bincount(groups.index_np(np.arange(num_steps)), minlength=len(pattern))
        return [(int(counts[g]), {s: FAMILIES[self.bits_family][w[g]] for s, w in widths.items()}) for g in range(len(pattern))]


def point_cost(hardware, cost_operands: Sequence[Q.Operand], space: BitsSpace, point: Mapping, num_steps: int) -> dict:
    """``{"seconds", "energy_j"}`` of all ``num_steps`` steps of ``point`` by the cost model (block linears in their formats)."""
    from jdq import hw
    from jdq.sweep.latency import _evaluate

    seconds = energy = 0.0
    for steps, fmts in space.step_formats(point, cost_operands, num_steps):
        if steps == 0:
            continue

        def fmt(op, fmts=fmts):
            f = fmts.get(op.site)
            return hw.OperandFormat(f) if f is not None and op.role in ("weight",) + LINEAR_ACTS else hw.workload.FLOAT16
        total = _evaluate(hardware, hw.from_operands(cost_operands, fmt)).total()
        seconds += steps * float(total.seconds)
        energy += steps * float(total.energy_j)
    return {"seconds": seconds, "energy_j": energy}
