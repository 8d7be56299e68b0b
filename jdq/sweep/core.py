"""Precision sweeps: a grid of settings as stacked quantizer states, vmapped through one compiled sampler.

A *setting* is a named knob of a recipe (:data:`SETTINGS`): ``ratio`` / ``linear_ratio`` /
``attn_ratio`` (the MixDiT outlier fractions, state of every outlier split), or ``recipe`` (which
plan: structure). A *grid* is the Cartesian product of the values of the varied settings
(:func:`grid`). :func:`build_groups` turns every point into a plan and a state; points whose
plans and state layouts (tree structure, shapes, dtypes) agree form one *group*, whose states
are stacked on a leading point axis and run by :func:`run_group` as ``jax.vmap`` of the whole
jitted sampler (``jdq.sampling.sample``), in chunks of at most :func:`chunk_size` points, the
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
    """A conservative memory estimate of one sweep point: its state, the scan carry, and one model call.

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


def available_bytes() -> int:
    """Memory the sweep may use: the device's limit when it reports one, else a quarter of host RAM."""
    stats = getattr(jax.local_devices()[0], "memory_stats", lambda: None)()
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4)
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 2 << 30


#: Default most points per vmapped call on a CPU backend: benchmarks/RESULTS.md §10 (2026-12-02,
#: second round) measured the embedded model's per-point run time at 4 points per call equal to a
#: loop's and 1.5-2x slower at 8-64, whose intermediates no longer stay in the caches.
CPU_MAX_CHUNK = 4


def chunk_size(num_points: int, per_point: int, budget: int | None = None, max_chunk: int | None = None,
               devices: int = 1) -> int:
    """Points per vmapped call: as many as ``budget`` bytes hold (a multiple of ``devices``), at most ``num_points``."""
    budget = available_bytes() if budget is None else int(budget)
    fit = max(1, budget // max(1, per_point)) * devices
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


def run_group(spec: SamplerSpec, group: Group, *, chunk: int, mesh=None,
              on_chunk: Callable[[int, np.ndarray], None] | None = None,
              skip: Callable[[int], bool] | None = None) -> list[np.ndarray | None]:
    """Samples of every point of ``group`` (list in group order), ``chunk`` points per vmapped call.

    ``mesh``: a :func:`jdq.sharding.batch_mesh` to split each chunk's points over devices
    (``chunk`` must then be a multiple of its size). ``on_chunk(start, samples)`` is called after
    each chunk (e.g. to write it); ``skip(start)`` true skips a chunk already done (its entries are
    ``None``).
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
    for start in range(0, len(group), chunk):
        if skip is not None and skip(start):
            continue
        n = min(chunk, len(group) - start)
        states = jax.tree.map(lambda a: a[start:start + n], group.states)
        states = sharding.shard_batch(_pad_points(states, chunk), mesh)
        x = np.asarray(run(*inputs, states))[:n]
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
