"""Precision sweeps: a grid of settings as stacked quantizer states, vmapped through one compiled sampler.

A *setting* is a named knob of a recipe (:data:`SETTINGS`): ``ratio`` / ``linear_ratio`` /
``attn_ratio`` (the MixDiT outlier fractions, state of every outlier split), or ``recipe`` (which
plan: structure). A *grid* is the Cartesian product of the values of the varied settings
(:func:`grid`). :func:`build_groups` turns every point into a plan and a state; points whose
plans and state layouts (tree structure, shapes, dtypes) agree form one *group*, whose states
are stacked on a leading point axis and run by :func:`run_group` as ``jax.vmap`` of the whole
jitted sampler (``jdq.sampling.sample``), in chunks of at most :func:`chunk_size` points (sized by
:func:`sweep_bytes`; a call that runs out of memory is retried with half the points), the
chunk split over the local devices when there are several. Each group compiles once; a setting
that changes the plan (``recipe``) or the state's layout starts new groups, and
:attr:`Group.varies` / :func:`structure_report` say which settings did.

Every point of a sweep uses the same sample keys (and so the same initial and per-step noise) as
the floating-point run, so quality metrics vs FP are paired.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from jdq import quant as Q
from jdq import recipes, sharding
from jdq.sampling.loop import sample
from jdq.sweep import bits


class SweepError(ValueError):
    """A sweep that cannot run as asked: unknown setting or value, a setting that changes nothing."""


def _ratio(text: str) -> float:
    v = float(text)
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"must lie in [0, 1], got {v}")
    return v


def _recipe(text: str) -> str:
    if text not in recipes.names():
        raise ValueError(f"unknown recipe; known: {', '.join(recipes.names())}")
    return text


def _roles_ratio(roles):
    def apply(plan, state, value):
        keys = [k for k in plan.quantized_keys if plan.operand(k).role in roles] if roles else plan.quantized_keys
        keys = [k for k in keys if Q.find_stages(plan.transform_for(k).meta, state[k], "outlier_split")
                or Q.find_stages(plan.transform_for(k).meta, state[k], "outlier_weight")]
        if not keys:
            return None
        return Q.set_outlier_ratio(plan, state, value, keys)
    return apply


@dataclasses.dataclass(frozen=True)
class Setting:
    """A knob a sweep can vary: ``parse(text)``; ``apply(plan, state, value) -> state`` (``None``: not applicable).

    ``structural`` settings choose the plan itself (``apply`` is unused); the others rewrite state.
    """

    name: str
    parse: Callable[[str], Any]
    doc: str
    structural: bool = False
    apply: Callable | None = None


#: The settings ``jdq sweep --vary`` knows.
SETTINGS: dict[str, Setting] = {
    "recipe": Setting("recipe", _recipe, "the quantization recipe (structure: each compiles separately)", True),
    "ratio": Setting("ratio", _ratio, "outlier fraction of every outlier split (MixDiT)", apply=_roles_ratio(None)),
    "linear_ratio": Setting("linear_ratio", _ratio, "outlier fraction of linear-layer inputs (act, post_gelu)",
                            apply=_roles_ratio(Q.ACTIVATION_ROLES)),
    "attn_ratio": Setting("attn_ratio", _ratio, "outlier fraction of attention operands (q, k, v, attn_prob)",
                          apply=_roles_ratio(Q.ATTENTION_ROLES)),
}


def parse_vary(specs: Sequence[str]) -> dict[str, list]:
    """``["KEY=V1,V2", …]`` -> ``{KEY: [values]}`` in order; unknown keys or bad values raise :class:`SweepError`."""
    out: dict[str, list] = {}
    for spec in specs:
        key, eq, values = spec.partition("=")
        key = key.strip()
        if not eq or not key or not values.strip():
            raise SweepError(f"--vary {spec!r}: expected KEY=V1,V2,...")
        if key not in SETTINGS and not bits.is_bits_key(key):
            raise SweepError(f"--vary {spec!r}: unknown setting {key!r}; known: {', '.join(SETTINGS)}, "
                             f"bits.SITE, bits[GLOB], {bits.PATTERN}")
        if key in out:
            raise SweepError(f"--vary: setting {key!r} is given twice")
        parse = SETTINGS[key].parse if key in SETTINGS else (lambda text, key=key: bits.parse_value(key, text))
        parsed = []
        for text in values.split(","):
            try:
                v = parse(text.strip())
            except ValueError as e:
                raise SweepError(f"--vary {key}: value {text.strip()!r} {e}") from None
            if v in parsed:
                raise SweepError(f"--vary {key}: value {text.strip()!r} is given twice")
            parsed.append(v)
        out[key] = parsed
    return out


def grid(vary: Mapping[str, Sequence]) -> list[dict]:
    """The Cartesian product of ``vary``'s values, first key slowest, as one dict per point."""
    keys = list(vary)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(vary[k] for k in keys))]


def point_label(point: Mapping) -> str:
    """A short label of a point: ``"recipe=mixdit ratio=0.1"``."""
    def text(v):
        return "-".join(map(str, v)) if isinstance(v, tuple) else str(v)
    return " ".join(f"{k}={text(v)}" for k, v in point.items()) or "base"


def _layout(state) -> tuple:
    leaves, treedef = jax.tree.flatten(state)
    return (treedef, tuple((tuple(np.shape(a)), jnp.asarray(a).dtype.name) for a in leaves))


@dataclasses.dataclass(eq=False)
class Group:
    """Points that share a plan and a state layout: one compilation. ``states`` is stacked (point axis first)."""

    plan: Q.Plan
    recipe: str
    indices: list[int]
    points: list[dict]
    states: Any
    varies: tuple[str, ...] = ()
    space: Any = None  # the jdq.sweep.bits.BitsSpace of a bit-width sweep

    def __len__(self):
        return len(self.indices)


def build_groups(points: Sequence[Mapping], operands: Sequence[Q.Operand], *, recipe: str | None = None,
                 stats_for: Callable[[str], Any] | None = None, num_steps: int | None = None,
                 bits_family: str = "int", bits_default: int | None = None) -> list[Group]:
    """Plans and stacked states of ``points``, grouped by plan and state layout (one group per compilation).

    ``recipe`` is the default recipe (a point may override it with a ``recipe`` setting);
    ``stats_for(recipe_name)`` returns calibration statistics for calibrated recipes. A state-only
    setting that applies to no operand of its recipe raises :class:`SweepError`. Bit-width
    settings (:mod:`jdq.sweep.bits`: ``bits.SITE``, ``bits[GLOB]``, ``timegroup_bits``, widths of
    ``bits_family``, ``bits_default`` for the layers none names; ``num_steps`` for time groups)
    use the ``bits`` plan instead of a recipe.
    """
    plans: dict[str, tuple[Q.Plan, Any]] = {}
    buckets: dict[tuple, Group] = {}
    space = None
    if any(bits.is_bits_key(k) for p in points for k in p):
        if recipe is not None or any("recipe" in p for p in points):
            raise SweepError("bit-width settings (bits.*, timegroup_bits) choose the formats of the blocks' linear "
                             "layers themselves: do not combine them with a recipe")
        try:
            space = bits.BitsSpace(points, operands, bits_family=bits_family, default=bits_default, num_steps=num_steps)
        except bits.BitsError as e:
            raise SweepError(str(e)) from None
    for index, point in enumerate(points):
        unknown = [k for k in point if k not in SETTINGS and not bits.is_bits_key(k)]
        if unknown:
            raise SweepError(f"unknown setting(s) {unknown}; known: {', '.join(SETTINGS)}")
        if space is not None:
            pattern = point.get(bits.PATTERN)
            name = bits.RECIPE if pattern is None else f"{bits.RECIPE}:{len(pattern)}-groups"
            if name not in plans:
                plans[name] = (space.plan(operands, None if pattern is None else len(pattern)), None)
            plan = plans[name][0]
            state = space.state(plan, point)
            bucket = (name, _layout(state))
            if bucket not in buckets:
                buckets[bucket] = Group(plan, bits.RECIPE, [], [], [], space=space)
            g = buckets[bucket]
            g.indices.append(index)
            g.points.append(dict(point))
            g.states.append(state)
            continue
        name = point.get("recipe", recipe)
        if name is None:
            raise SweepError("no recipe: give --recipe or vary recipe=...")
        if name not in plans:
            try:
                plan = recipes.plan_for(name, operands)
            except recipes.RecipeError as e:
                raise SweepError(str(e)) from None
            stats = stats_for(name) if (stats_for is not None and recipes.get(name).calibrated) else None
            plans[name] = (plan, plan.init(stats))
        plan, state = plans[name]
        for key, value in point.items():
            setting = SETTINGS[key]
            if setting.structural:
                continue
            new = setting.apply(plan, state, value)
            if new is None:
                raise SweepError(f"setting {key}={value} changes nothing in recipe {name!r} (it has no operand "
                                 f"that {key} applies to: {setting.doc})")
            state = new
        bucket = (name, _layout(state))
        if bucket not in buckets:
            buckets[bucket] = Group(plan, name, [], [], [])
        g = buckets[bucket]
        g.indices.append(index)
        g.points.append(dict(point))
        g.states.append(state)
    groups = list(buckets.values())
    keys = list(points[0]) if points else []
    for g in groups:
        g.states = Q.stack_states(g.states)
        g.varies = tuple(k for k in keys if len({repr(p[k]) for p in g.points}) > 1)
    return groups


def structure_report(groups: Sequence[Group]) -> dict:
    """Which settings ran vmapped within one compilation, and which split points into separate compilations.

    A setting is *structural* when two points that differ in it alone landed in different groups.
    """
    points = [(gi, p) for gi, g in enumerate(groups) for p in g.points]
    keys = list(dict.fromkeys(k for _, p in points for k in p))
    structural = set()
    for (ga, a), (gb, b) in itertools.combinations(points, 2):
        if ga != gb and a.keys() == b.keys():
            diff = [k for k in a if repr(a[k]) != repr(b[k])]
            if len(diff) == 1:
                structural.add(diff[0])
    vmapped = {k for g in groups for k in g.varies}
    return {"compilations": len(groups), "vmapped": [k for k in keys if k in vmapped],
            "structural": [k for k in keys if k in structural],
            "groups": [{"recipe": g.recipe, "points": len(g), "varies": list(g.varies)} for g in groups]}


def tree_bytes(tree) -> int:
    """Bytes of every array leaf of ``tree``."""
    return int(sum(np.prod(np.shape(a)) * jnp.asarray(a).dtype.itemsize for a in jax.tree.leaves(tree)))


def point_bytes(operands: Sequence[Q.Operand], state, sample_bytes: int, batch: int, guidance: bool) -> int:
    """The old, loose memory bound of one sweep point (kept for comparison; chunks use :func:`sweep_bytes`).

    One model call is bounded by the sum of every matmul operand it exposes at this batch (as if
    nothing were freed within the call; ``operands`` were traced at batch 1, so each is scaled by the
    batch, doubled with guidance), times 3 for a quantized operand's temporaries (the cast value,
    and the high/low parts of an outlier split); the carry is the sample batch and a sampler memory
    of the same size. The state of one point is ``state`` (unstacked).
    """
    calls = batch * (2 if guidance else 1)
    per_call = sum(int(np.prod(o.shape)) * jnp.dtype(o.dtype).itemsize * (1 if o.role == "weight" else calls)
                   for o in operands)
    return tree_bytes(state) + 2 * sample_bytes * batch + 3 * per_call


def hoisted_bytes(plan: Q.Plan, state, num_steps: int) -> int:
    """Bytes of one point's own quantized weights, kept for the whole sampler call (``jdq.quant.hoist``).

    A weight whose transform has state (a per-layer bit choice) is quantized per point, once per
    step class (time group); a stateless one is shared by every point and not counted.
    """
    from jdq.quant.hoist import MAX_COPIES, step_classes

    total = 0
    for o in plan.operands:
        t = plan.transform_for(o.key)
        if o.role != "weight" or t is None or not jax.tree.leaves(state.get(o.key)):
            continue
        classes = step_classes(t.meta, num_steps)
        if classes is not None and len(classes[1]) <= MAX_COPIES:
            total += len(classes[1]) * int(np.prod(o.shape)) * jnp.dtype(o.dtype).itemsize
    return total


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a vmapped chunk needs: ``shared`` once (values no point's state reaches) plus ``per_point`` per point."""

    per_point: int
    shared: int = 0

    def total(self, points: int) -> int:
        """Bytes of a chunk of ``points`` points."""
        return self.shared + points * self.per_point


def _var_bytes(v) -> int:
    aval = getattr(v, "aval", None)
    shape, dtype = getattr(aval, "shape", None), getattr(aval, "dtype", None)
    if shape is None or dtype is None:
        return 0
    try:
        itemsize = np.dtype(dtype).itemsize
    except TypeError:  # an extended dtype (a PRNG key): its own item size
        itemsize = int(getattr(dtype, "itemsize", 8) or 8)
    return int(np.prod(shape, dtype=np.int64)) * itemsize


def _closed(j):
    return (j.jaxpr, j.consts) if isinstance(j, jcore.ClosedJaxpr) else (j, ())


def _sub_jaxprs(eqn) -> list:
    out = []
    for v in eqn.params.values():
        for x in (v if isinstance(v, (tuple, list)) else (v,)):
            if isinstance(x, (jcore.ClosedJaxpr, jcore.Jaxpr)):
                out.append(x)
    return out


def _scan_layout(eqn):
    """``(body jaxpr, number of consts, number of carries)`` of a scan equation.

    From the parameters where they are named as in jax 0.10 (``jaxpr``, ``num_consts``,
    ``num_carry``); otherwise from the shapes, which every version shares: the body takes consts,
    carries and one slice of each scanned input (one axis fewer than the equation's input), and
    returns the carries and one slice of each stacked output.
    """
    p = eqn.params
    body = p.get("jaxpr") or _sub_jaxprs(eqn)[0]
    if "num_consts" in p and "num_carry" in p:
        return body, p["num_consts"], p["num_carry"]
    j = _closed(body)[0]
    ndim = lambda v: len(getattr(v.aval, "shape", ()))  # noqa: E731
    ncar = p.get("num_carry")
    if ncar is None:
        ncar = 0
        for outer, inner in zip(eqn.outvars, j.outvars):
            if ndim(outer) != ndim(inner):
                break
            ncar += 1
    nxs = 0
    for outer, inner in zip(reversed(eqn.invars), reversed(j.invars)):
        if ndim(outer) != ndim(inner) + 1:
            break
        nxs += 1
    return body, len(eqn.invars) - ncar - nxs, ncar


def _nested(eqn, batched: list[bool], needed: list[bool]) -> tuple[int, int, list[bool]]:
    """``(per-point peak, shared peak, outputs per point)`` of the jaxprs ``eqn`` runs, beyond its inputs.

    ``needed``: which of its outputs are used (a one-to-one call drops the work of the others).
    """
    name, p, nout = eqn.primitive.name, eqn.params, len(eqn.outvars)
    if name == "scan":
        body, nc, ncar = _scan_layout(eqn)
        carry = list(batched[nc:nc + ncar])
        while True:  # a carry is per point once any step makes it so (vmap's fixed point)
            pp, sh, outs = _peak(body, batched[:nc] + carry + list(batched[nc + ncar:]))
            new = [a or b for a, b in zip(carry, outs[:ncar])]
            if new == carry:
                return pp, sh, carry + list(outs[ncar:])
            carry = new
    if name == "while":
        # invars: cond consts, body consts, carry (the outputs); each jaxpr takes its consts + the carry
        ncarry = len(eqn.outvars)
        cond_j, body_j = (p["cond_jaxpr"], p["body_jaxpr"]) if "cond_jaxpr" in p else _sub_jaxprs(eqn)[:2]
        cn = len(_closed(cond_j)[0].invars) - ncarry
        bn = len(_closed(body_j)[0].invars) - ncarry
        carry = list(batched[cn + bn:])
        while True:
            cpp, csh, (pred,) = _peak(cond_j, batched[:cn] + carry)
            bpp, bsh, outs = _peak(body_j, batched[cn:cn + bn] + carry)
            new = [a or b or pred for a, b in zip(carry, outs)]  # a per-point predicate batches the whole carry
            if new == carry:
                return max(cpp, bpp), max(csh, bsh), carry
            carry = new
    if name == "cond":
        branches = p["branches"] if "branches" in p else _sub_jaxprs(eqn)
        runs = [_peak(b, list(batched[1:])) for b in branches]
        outs = [batched[0] or any(r[2][i] for r in runs) for i in range(nout)]
        if not batched[0]:
            return max(r[0] for r in runs), max(r[1] for r in runs), outs
        # a per-point index runs every branch, one after another, and selects among their outputs
        # (vmap turns the cond into a select): one branch's peak plus every branch's outputs
        kept = [0, 0]
        for branch, r in zip(branches, runs):
            for v, b in zip(_closed(branch)[0].outvars, r[2]):
                kept[0 if b else 1] += _var_bytes(v)
        return max(r[0] for r in runs) + kept[0], max(r[1] for r in runs) + kept[1], outs
    subs = _sub_jaxprs(eqn)
    if not subs:
        return 0, 0, [any(batched)] * nout
    runs = []
    for s in subs:
        j, _ = _closed(s)
        if len(j.invars) == len(batched) and len(j.outvars) == nout:
            runs.append(_peak(s, batched, needed=needed))
        else:  # inputs not one-to-one (a custom rule's jaxpr): every value per point if any input is
            runs.append(_peak(s, [any(batched)] * len(j.invars)))
    outs = [any(batched)] * nout
    if len(runs[0][2]) == nout:
        outs = list(runs[0][2])
    return max(r[0] for r in runs), max(r[1] for r in runs), outs


def _peak(jaxpr, batched: Sequence[bool], count_inputs: bool = False,
          needed: Sequence[bool] | None = None) -> tuple[int, int, list[bool]]:
    """``(per-point peak, shared peak, outputs per point)`` of the values ``jaxpr`` makes, run in program order.

    Each value is freed after its last use; the inputs are the caller's (not counted unless
    ``count_inputs``: then per-point inputs are, shared ones are not); ``batched`` says which inputs
    depend on the point (a value is per point when any input of the equation making it is). An
    equation without effects whose outputs nothing uses (``needed``: the outputs used) is dead code
    XLA drops, and is not counted.
    """
    jaxpr = _closed(jaxpr)[0]
    used = {v for v, n in zip(jaxpr.outvars, needed or [True] * len(jaxpr.outvars))
            if n and isinstance(v, jcore.Var)}
    live_eqns = [False] * len(jaxpr.eqns)
    for i in range(len(jaxpr.eqns) - 1, -1, -1):
        e = jaxpr.eqns[i]
        if e.effects or any(v in used for v in e.outvars if isinstance(v, jcore.Var)):
            live_eqns[i] = True
            used.update(v for v in e.invars if isinstance(v, jcore.Var))
    per: dict = {}
    for v, b in zip(jaxpr.invars, batched):
        per[v] = bool(b)
    for v in jaxpr.constvars:
        per[v] = False
    last: dict = {}
    for i, e in enumerate(jaxpr.eqns):
        if not live_eqns[i]:
            continue
        for v in e.invars:
            if isinstance(v, jcore.Var):
                last[v] = i
    end = len(jaxpr.eqns)
    for v in jaxpr.outvars:
        if isinstance(v, jcore.Var):
            last[v] = end
    live = [0, 0]  # per point, shared
    owned: set = set()
    if count_inputs:
        for v in jaxpr.invars:
            if per[v]:
                live[0] += _var_bytes(v)
                owned.add(v)
    live[1] += sum(_var_bytes(v) for v in jaxpr.constvars)
    owned.update(jaxpr.constvars)
    peak = list(live)

    def is_per(v):
        return per.get(v, False) if isinstance(v, jcore.Var) else False

    for i, e in enumerate(jaxpr.eqns):
        if not live_eqns[i]:  # dead code: its outputs only feed other dead code
            for v in e.outvars:
                per[v] = any(is_per(u) for u in e.invars)
            continue
        pp, sh, outs = _nested(e, [is_per(v) for v in e.invars],
                               [isinstance(v, jcore.Var) and v in used for v in e.outvars])
        for v, b in zip(e.outvars, outs):
            per[v] = b
            live[0 if b else 1] += _var_bytes(v)
            owned.add(v)
        peak[0], peak[1] = max(peak[0], live[0] + pp), max(peak[1], live[1] + sh)
        for v in {v for v in (*e.invars, *e.outvars) if isinstance(v, jcore.Var)}:
            if v in owned and last.get(v, -1) <= i:
                live[0 if per[v] else 1] -= _var_bytes(v)
                owned.discard(v)
    return peak[0], peak[1], [is_per(v) for v in jaxpr.outvars]


def jaxpr_bytes(fn: Callable, args: Sequence, per_point: Sequence[bool]) -> MemoryEstimate:
    """The peak live bytes of ``fn(*args)``'s jaxpr run in program order, split into per-point and shared.

    It assumes each value is materialised when made and freed after its last use (no fusion, no
    reuse), a nested jaxpr (jit, custom_jvp/vjp, scan, while, cond) adds its own peak while it runs,
    and under ``jax.vmap`` over the arguments marked in ``per_point`` exactly the values that depend
    on them gain the point axis (so they scale with the chunk; the rest is computed once). Per-point
    arguments count, shared ones (already in memory) do not.
    """
    closed = jax.make_jaxpr(fn)(*args)
    flags = [b for a, b in zip(args, per_point) for _ in jax.tree.leaves(a)]
    pp, sh, _ = _peak(closed, flags, count_inputs=True)
    return MemoryEstimate(int(pp), int(sh))


def sweep_bytes(spec: "SamplerSpec", plan: Q.Plan, state) -> MemoryEstimate:
    """Memory of one vmapped sweep chunk: :func:`jaxpr_bytes` of one point's whole sampler (``state`` unstacked).

    The one-point sampler is what ``vmapped_sampler`` vmaps, so this covers the state, the scan
    carry, the hoisted weights (per point when they depend on the state, shared when not) and the
    guided model call at the sweep's batch; what it assumes is :func:`jaxpr_bytes`'. The runner
    multiplies it by :data:`MEMORY_SAFETY`.
    """
    return jaxpr_bytes(_one_point(spec, plan), (*spec.inputs, state), (False, False, False, False, True))


def available_bytes() -> int:
    """Memory the sweep may use: the device's limit when it reports one, else a quarter of host RAM."""
    stats = getattr(jax.local_devices()[0], "memory_stats", lambda: None)()
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4)
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 2 << 30


#: Factor on :func:`sweep_bytes` when sizing chunks. 1.0: the estimate itself was at least 1.14x
#: the temporaries + outputs (+ the states) that XLA's ``memory_analysis()`` reports of the vmapped
#: program in every configuration measured (benchmarks/RESULTS.md §10, issue #16: on the CPU two
#: tiny DiTs 2.6-2.8x and the embedded model 1.49-2.11x at 1, 4 and 16 points; DiT-XL/2 against the
#: H200 run's analysis 1.14x at 1 and 1.49x at 20 points), and a call that does not fit after all
#: is retried with half the points (:func:`run_group`).
MEMORY_SAFETY = 1.0


#: Default most points per vmapped call on a CPU backend: benchmarks/RESULTS.md §10 (2026-12-02,
#: second round) measured the embedded model's per-point run time at 4 points per call equal to a
#: loop's and 1.5-2x slower at 8-64, whose intermediates no longer stay in the caches.
CPU_MAX_CHUNK = 4


def chunk_size(num_points: int, per_point: int, budget: int | None = None, max_chunk: int | None = None,
               devices: int = 1, shared: int = 0) -> int:
    """Points per vmapped call: as many as ``budget`` bytes hold (a multiple of ``devices``), at most ``num_points``.

    ``shared``: bytes each device's call needs once, whatever its number of points (taken off ``budget``).
    """
    budget = available_bytes() if budget is None else int(budget)
    fit = max(1, (budget - int(shared)) // max(1, per_point)) * devices
    n = min(num_points, fit, max_chunk or num_points)
    return max(devices, (n // devices) * devices) if devices > 1 else max(1, n)


def _unstack(tree, i):
    return jax.tree.map(lambda a: a[i], tree)


def _pad_points(tree, size):
    n = jax.tree.leaves(tree)[0].shape[0]
    if n == size:
        return tree
    idx = np.minimum(np.arange(size), n - 1)  # repeat the last point; its results are dropped
    return jax.tree.map(lambda a: jnp.asarray(a)[idx], tree)


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """What every point samples: denoiser, params, sampler, conditions, keys, shape, guidance (hashable by id)."""

    fn: Any
    params: Any
    sampler: Any
    cond: Any
    keys: Any
    shape: tuple
    uncond: Any = None
    guidance: float = 1.0
    guided_channels: int | None = None

    def run(self, quant=None):
        """Samples of one quantizer (or floating point with ``quant=None``)."""
        return sample(self.fn, self.params, self.sampler, self.cond, self.keys, self.shape, uncond=self.uncond,
                      guidance=self.guidance, guided_channels=self.guided_channels, quant=quant)

    @property
    def inputs(self) -> tuple:
        """The array inputs of :func:`vmapped_sampler`'s function: params, conditions, keys, unconditional input."""
        return (self.params, self.cond, self.keys, self.uncond)


def _one_point(spec: SamplerSpec, plan: Q.Plan) -> Callable:
    def one(params, cond, keys, uncond, state):
        return sample(spec.fn, params, spec.sampler, cond, keys, spec.shape, uncond=uncond, guidance=spec.guidance,
                      guided_channels=spec.guided_channels, quant=plan.bind(state))
    return one


def vmapped_sampler(spec: SamplerSpec, plan: Q.Plan) -> Callable:
    """``fn(*spec.inputs, states [P, …]) -> samples [P, B, *shape]``: the whole sampler vmapped over stacked states, jitted.

    Params, conditions and keys are arguments (not constants closed over), so XLA does not fold the
    weights' quantization into the program at compile time. The sampler quantizes the weights once
    per call, before its loop (``jdq.sampling.sample(hoist_weights=True)``): a weight whose
    transform has no state is quantized once for every point, one that depends on the state (a
    per-layer bit choice) once per point, neither at every step.
    """
    return jax.jit(jax.vmap(_one_point(spec, plan), in_axes=(None, None, None, None, 0)))


def looped_sampler(spec: SamplerSpec, plan: Q.Plan) -> Callable:
    """``fn(*spec.inputs, state) -> samples [B, *shape]``: the same sampler for one state, jitted (a loop calls it per point)."""
    return jax.jit(_one_point(spec, plan))


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is XLA's report that a program did not fit (``RESOURCE_EXHAUSTED`` / out of memory)."""
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def run_group(spec: SamplerSpec, group: Group, *, chunk: int, mesh=None,
              on_chunk: Callable[[int, np.ndarray], None] | None = None,
              skip: Callable[[int], bool] | None = None,
              on_oom: Callable[[int, int, int, BaseException], None] | None = None) -> list[np.ndarray | None]:
    """Samples of every point of ``group`` (list in group order), ``chunk`` points per vmapped call.

    ``mesh``: a :func:`jdq.sharding.batch_mesh` to split each chunk's points over devices
    (``chunk`` must then be a multiple of its size). ``on_chunk(start, samples)`` is called after
    each chunk (e.g. to write it); ``skip(start)`` true skips a chunk already done (its entries are
    ``None``). A vmapped call that runs out of memory (:func:`is_out_of_memory`) is retried with
    half as many points per call (down to one, or the mesh's size; then the error is raised), and
    so are the calls after it; ``on_oom(start, size, new_size, error)`` is told. Chunks stay
    ``chunk`` points (what ``on_chunk`` and ``skip`` see), each run as several smaller calls.
    """
    out: list[np.ndarray | None] = [None] * len(group)
    if not jax.tree.leaves(group.states):  # a stateless plan: every point is the same program and result
        x = np.asarray(spec.run(group.plan.bind(group.states)))[None]
        for start in range(0, len(group), chunk):
            if skip is None or not skip(start):
                n = min(chunk, len(group) - start)
                out[start:start + n] = [x[0]] * n
                if on_chunk is not None:
                    on_chunk(start, np.repeat(x, n, axis=0))
        return out
    run = vmapped_sampler(spec, group.plan)
    inputs = sharding.replicate(spec.inputs, mesh)
    least = 1 if mesh is None else int(mesh.size)
    size = chunk  # points per vmapped call: the chunk, or less after an out-of-memory error
    for start in range(0, len(group), chunk):
        if skip is not None and skip(start):
            continue
        n = min(chunk, len(group) - start)
        parts, done = [], 0
        while done < n:
            m = min(size, n - done)
            states = jax.tree.map(lambda a: a[start + done:start + done + m], group.states)
            states = sharding.shard_batch(_pad_points(states, size), mesh)
            try:
                parts.append(np.asarray(run(*inputs, states))[:m])
            except Exception as e:  # XLA reports an out-of-memory as a runtime error
                if not is_out_of_memory(e) or size <= least:
                    raise
                new = max(least, (size // 2) // least * least)
                if on_oom is not None:
                    on_oom(start + done, size, new, e)
                size = new
                continue
            done += m
        x = np.concatenate(parts)
        for j in range(n):
            out[start + j] = x[j]
        if on_chunk is not None:
            on_chunk(start, x)
    return out


def run_loop(spec: SamplerSpec, group: Group) -> list[np.ndarray]:
    """Samples of every point of ``group`` one jitted call per point (the reference the vmapped run must match)."""
    run = looped_sampler(spec, group.plan)
    return [np.asarray(run(*spec.inputs, _unstack(group.states, i))) for i in range(len(group))]


def class_spec(model, labels, *, steps: int, sampler: str | None = None, guidance: float | None = None,
               seed: int = 0, clip_denoised: bool | None = None, defaults: Mapping | None = None) -> SamplerSpec:
    """A :class:`SamplerSpec` sampling a class-conditional DiT for ``labels`` (keys of ``seed``, as ``jdq sample``)."""
    from jdq.sampling.generate import Denoiser, guided_channels, null_condition, resolve_sampler, sample_shape
    from jdq.sampling.loop import sample_keys

    defaults = dict(defaults or {})
    guidance = float(defaults.get("guidance", 1.0) if guidance is None else guidance)
    clip = bool(defaults.get("clip_denoised", False) if clip_denoised is None else clip_denoised)
    smp = resolve_sampler(model, sampler or defaults.get("sampler"), steps, clip_denoised=clip)
    labels = jnp.asarray(np.asarray(labels, np.int32))
    uncond = null_condition(model, labels) if guidance != 1.0 else None
    return SamplerSpec(Denoiser(model, model.family), model.params, smp, labels, sample_keys(seed, labels.shape[0]),
                       sample_shape(model), uncond, guidance, guided_channels(model))


def spec_operands(spec: SamplerSpec) -> tuple[Q.Operand, ...]:
    """The matmul operands of one denoiser call of ``spec`` at batch 1 (abstract trace)."""
    x = jnp.zeros((1,) + tuple(spec.shape), jnp.float32)
    c = jax.tree.map(lambda a: a[:1], spec.cond)
    return Q.trace_operands(spec.fn, spec.params, x, jnp.zeros((1,), jnp.float32), c)
