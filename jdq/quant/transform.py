"""Quantization as composable transforms, bound to a model's matmul operands by rules.

The shape follows optax: a :class:`QuantTransform` is a pair of pure functions,

* ``init(stats) -> state``: build the transform's state (a pytree of arrays) from the
  calibration statistics of one operand;
* ``apply(x, state, ctx) -> x``: transform the operand ``x`` (a weight, an activation, a
  query, ...). ``ctx`` is a :class:`Context` naming the site, the operand's role, its
  contraction axis and the sampler's step index.

:func:`chain` composes transforms. A model never sees transforms directly: every matmul in a
jdq model calls a :class:`Quantizer` (or nothing, ``quant=None``) on each operand, naming the
operand by ``site`` (``"blocks.3.mlp.fc1"``) and ``role`` (:data:`ROLES`). Rules bind
transforms to operands by a site pattern and roles; :func:`resolve` matches them once against
the operands a model has (:func:`trace_operands`) and returns a :class:`Plan`. The plan is
static (hashable, safe to close over under ``jax.jit``); its state is a ``dict`` from operand
key (``"site:role"``) to the transform's state, so a whole sampler with quantization inside
compiles once, and ``jax.vmap`` over a stacked state runs a precision sweep in one call.

Statistics (``stats``) are dicts of arrays, collected by :mod:`jdq.quant.calibrate`; they carry
a leading *step* axis (one entry per sampler step or step group that was observed, at least
one); transforms that do not care about time reduce it (``calibrate.reduce_steps``),
time-grouped transforms (``jdq.quant.timegroup``) split it into groups.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp

Array = jax.Array
State = Any
Stats = Mapping[str, Array]

#: Operand roles a model reports. ``act`` is a linear layer's input, ``post_gelu`` the input of
#: the second MLP linear (after GELU), ``q``/``k`` the operands of q·kᵀ, ``attn_prob``/``v`` those
#: of p·v, ``weight`` a linear layer's weight.
ROLES = ("weight", "act", "post_gelu", "q", "k", "v", "attn_prob")
#: Roles of activation-like inputs of linear layers.
ACTIVATION_ROLES = ("act", "post_gelu")
#: Roles of the operands of the two attention matmuls.
ATTENTION_ROLES = ("q", "k", "v", "attn_prob")


class Context(NamedTuple):
    """Where a transform is applied: site path, operand role, contraction axis, step index.

    ``step`` is the sampler's step index (``0`` is the first denoising step; a traced integer
    inside a compiled loop) or ``None`` outside a sampler. ``num_steps`` is the static number of
    steps of the sampler, or ``None``.
    """

    site: str
    role: str
    axis: int = -1
    step: Any = None
    num_steps: int | None = None


class QuantTransform(NamedTuple):
    """A quantization transform: ``init(stats) -> state`` and ``apply(x, state, ctx) -> x``.

    ``meta`` is optional static, hashable metadata describing what the transform does (for
    example the format and granularity of a cast); lowering to kernels and the cost model read
    it. :func:`chain` sets it to the tuple of its parts' ``meta``.
    """

    init: Callable[[Stats], State]
    apply: Callable[[Array, State, Context], Array]
    meta: Any = None


def stateless(apply_fn: Callable[[Array, Context], Array], meta: Any = None) -> QuantTransform:
    """Wrap ``apply_fn(x, ctx)`` (no calibrated state) as a :class:`QuantTransform`."""
    return QuantTransform(init=lambda stats: (), apply=lambda x, state, ctx: apply_fn(x, ctx), meta=meta)


def identity() -> QuantTransform:
    """The transform that leaves its operand unchanged."""
    return stateless(lambda x, ctx: x)


class ChainMeta(tuple):
    """``meta`` of :func:`chain`: the tuple ``("chain", *metas of the parts)`` (equal to, and hashed as, that tuple).

    A chain's state is the plain tuple of its parts' states (as optax's ``chain``); a stateless
    transform's state is ``()``.
    """

    kind = "chain"

    def __new__(cls, parts=()):
        return super().__new__(cls, ("chain",) + tuple(parts))

    @property
    def parts(self) -> tuple:
        """The metas of the chained transforms, in order."""
        return tuple(self[1:])


def chain(*transforms: QuantTransform) -> QuantTransform:
    """Compose transforms left to right; the state is the tuple of their states (meta: :class:`ChainMeta`)."""
    for i, t in enumerate(transforms):
        if not isinstance(t, QuantTransform):
            raise TypeError(f"chain() argument {i} is {type(t).__name__}, not a QuantTransform")

    def init(stats):
        return tuple(t.init(stats) for t in transforms)

    def apply(x, state, ctx):
        for t, s in zip(transforms, state):
            x = t.apply(x, s, ctx)
        return x

    return QuantTransform(init, apply, ChainMeta(t.meta for t in transforms))


# --------------------------------------------------------------------------------------------
# Operands, rules and plans
# --------------------------------------------------------------------------------------------


class Operand(NamedTuple):
    """One matmul operand a model exposes: site path, role, shape, dtype and contraction axis."""

    site: str
    role: str
    shape: tuple[int, ...]
    dtype: Any
    axis: int

    @property
    def key(self) -> str:
        """The operand's key in plans, states and statistics: ``"site:role"``."""
        return operand_key(self.site, self.role)


def operand_key(site: str, role: str) -> str:
    """The key ``"site:role"`` of an operand."""
    return f"{site}:{role}"


@dataclasses.dataclass(frozen=True)
class Rule:
    """Bind ``transform`` to operands whose site matches ``pattern`` and whose role is in ``roles``.

    ``pattern`` is a glob (``fnmatch``: ``*`` matches across dots too, e.g. ``"blocks.*.mlp.fc1"``)
    or, when it starts with ``"re:"``, a regular expression matched against the whole site path.
    ``roles=None`` matches every role. ``transform=None`` marks the operands as deliberately kept
    in floating point (they count as covered). Rules are tried in order; the first match wins.
    """

    pattern: str
    transform: QuantTransform | None
    roles: tuple[str, ...] | None = None
    name: str = ""

    def __post_init__(self):
        if self.roles is not None:
            roles = (self.roles,) if isinstance(self.roles, str) else tuple(self.roles)
            unknown = [r for r in roles if r not in ROLES]
            if unknown:
                raise ValueError(f"Rule {self.label!r}: unknown role(s) {unknown}; known roles: {list(ROLES)}")
            object.__setattr__(self, "roles", roles)
        if self.transform is not None and not isinstance(self.transform, QuantTransform):
            raise TypeError(f"Rule {self.label!r}: transform must be a QuantTransform or None")
        if self.pattern.startswith("re:"):
            try:
                re.compile(self.pattern[3:])
            except re.error as e:
                raise ValueError(f"Rule {self.label!r}: bad regular expression: {e}") from None

    @property
    def label(self) -> str:
        """The rule's name, or its pattern and roles when it has none."""
        return self.name or f"{self.pattern}[{','.join(self.roles) if self.roles else '*'}]"

    def matches(self, site: str, role: str) -> bool:
        """Whether this rule applies to operand (``site``, ``role``)."""
        if self.roles is not None and role not in self.roles:
            return False
        if self.pattern.startswith("re:"):
            return re.fullmatch(self.pattern[3:], site) is not None
        return fnmatch.fnmatchcase(site, self.pattern)


def rule(pattern: str, transform: QuantTransform | None, roles=None, name: str = "") -> Rule:
    """Shorthand for :class:`Rule`."""
    return Rule(pattern, transform, roles, name)


def keep_float(pattern: str, roles=None, name: str = "") -> Rule:
    """A rule that keeps matching operands in floating point (e.g. embedders, final layer)."""
    return Rule(pattern, None, roles, name)


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
    """Rules resolved against a model's operands: which transform quantizes which operand.

    A plan is static metadata (it is hashed by identity and closed over under ``jax.jit``); its
    state, from :meth:`init`, is a ``dict`` from operand key to that operand's transform state.
    """

    rules: tuple[Rule, ...]
    operands: tuple[Operand, ...]
    assignment: Mapping[str, int]  # operand key -> index into rules (only matched operands)

    def transform_for(self, key: str) -> QuantTransform | None:
        """The transform bound to operand ``key`` (``None`` if kept in float or unmatched)."""
        idx = self.assignment.get(key)
        return None if idx is None else self.rules[idx].transform

    @property
    def quantized_keys(self) -> tuple[str, ...]:
        """Keys of operands that have a transform (in model order)."""
        return tuple(o.key for o in self.operands if self.transform_for(o.key) is not None)

    def operand(self, key: str) -> Operand:
        """The :class:`Operand` with this key."""
        for o in self.operands:
            if o.key == key:
                return o
        raise KeyError(f"plan has no operand {key!r}")

    def unmatched_rules(self) -> list[Rule]:
        """Rules that matched no operand (usually a typo in a pattern)."""
        used = set(self.assignment.values())
        return [r for i, r in enumerate(self.rules) if i not in used]

    def uncovered(self) -> list[Operand]:
        """Operands no rule covers (neither quantized nor explicitly kept in float)."""
        return [o for o in self.operands if o.key not in self.assignment]

    def report(self) -> str:
        """A short human-readable summary: counts per rule, unmatched rules, uncovered operands."""
        counts = {}
        for idx in self.assignment.values():
            counts[idx] = counts.get(idx, 0) + 1
        lines = [f"plan: {len(self.operands)} operands, {len(self.quantized_keys)} quantized"]
        for i, r in enumerate(self.rules):
            what = "float" if r.transform is None else "quant"
            lines.append(f"  rule {r.label}: {counts.get(i, 0)} operands ({what})")
        for r in self.unmatched_rules():
            lines.append(f"  unmatched rule: {r.label}")
        unc = self.uncovered()
        if unc:
            lines.append(f"  {len(unc)} uncovered operands, e.g. {', '.join(o.key for o in unc[:5])}")
        return "\n".join(lines)

    def init(self, stats: Mapping[str, Stats] | None = None) -> dict[str, State]:
        """Build the plan's state from per-operand statistics (``{key: stats}``).

        Operands whose transform needs no statistics may be missing from ``stats``; a transform
        that needs them raises a ``KeyError`` naming the statistic, re-raised here with the key.
        """
        stats = {} if stats is None else stats
        state = {}
        for key in self.quantized_keys:
            t = self.transform_for(key)
            try:
                state[key] = t.init(stats.get(key, {}))
            except KeyError as e:
                raise KeyError(f"operand {key!r}: its transform needs statistic {e} (run calibration)") from None
        return state

    def bind(self, state: Mapping[str, State], step=None, num_steps: int | None = None, strict: bool = True) -> "Quantizer":
        """The :class:`Quantizer` a model takes as ``quant=``."""
        missing = [k for k in self.quantized_keys if k not in state]
        if missing:
            raise KeyError(f"state lacks {len(missing)} quantized operand(s), e.g. {missing[:3]}")
        return Quantizer(self, dict(state), step, num_steps, strict)


def resolve(rules: Sequence[Rule], operands: Iterable[Operand]) -> Plan:
    """Match ``rules`` (first match wins) against ``operands`` and return the :class:`Plan`."""
    rules = tuple(rules)
    for i, r in enumerate(rules):
        if not isinstance(r, Rule):
            raise TypeError(f"resolve(): rule {i} is {type(r).__name__}, not a Rule")
    operands = tuple(operands)
    seen = set()
    assignment = {}
    for o in operands:
        if o.key in seen:
            raise ValueError(f"operand {o.key!r} appears twice; sites must be unique")
        seen.add(o.key)
        for i, r in enumerate(rules):
            if r.matches(o.site, o.role):
                assignment[o.key] = i
                break
    return Plan(rules, operands, dict(assignment))


# --------------------------------------------------------------------------------------------
# What models call
# --------------------------------------------------------------------------------------------


class QuantizerBase:
    """Interface of the ``quant=`` argument of jdq models: ``quant(x, site, role, axis) -> x``."""

    def __call__(self, x: Array, site: str, role: str, axis: int = -1) -> Array:  # pragma: no cover
        raise NotImplementedError

    def lowered(self, site: str) -> Any:
        """The lowered (packed) weight of ``site`` for a kernel, or ``None`` (fake-quant path)."""
        return None

    def quantizes(self, site: str, role: str) -> bool:
        """Whether operand (``site``, ``role``) is transformed; ``False`` lets a model take a fused path."""
        return True

    def transform_for(self, site: str, role: str) -> QuantTransform | None:
        """The transform bound to operand (``site``, ``role``) (``None``: none); ``NotImplementedError`` when not known.

        A model may read its static ``meta`` to run a fused kernel that applies the same cast.
        """
        raise NotImplementedError(f"{type(self).__name__} does not expose its transforms")

    def state_for(self, site: str, role: str) -> Any:
        """The state of operand (``site``, ``role``)'s transform; ``NotImplementedError`` when not known.

        With :meth:`transform_for`, what a fused kernel needs to apply a transform with state itself.
        """
        raise NotImplementedError(f"{type(self).__name__} does not expose its state")


@jax.tree_util.register_pytree_node_class
class Quantizer(QuantizerBase):
    """A plan bound to its state (and the sampler's step): what a model's matmuls call.

    A pytree: the state and the step are children, the plan is static. ``strict=True`` makes
    an operand the plan never saw an error (the plan was resolved for another model).
    """

    def __init__(self, plan: Plan, state, step=None, num_steps=None, strict=True):
        self.plan = plan
        self.state = state
        self.step = step
        self.num_steps = num_steps
        self.strict = strict

    def tree_flatten(self):
        """Children: the state and the step; static: the plan, the step count, strictness."""
        return (self.state, self.step), (self.plan, self.num_steps, self.strict)

    @classmethod
    def tree_unflatten(cls, aux, children):
        """Rebuild from :meth:`tree_flatten`'s output."""
        plan, num_steps, strict = aux
        state, step = children
        return cls(plan, state, step, num_steps, strict)

    def at_step(self, step, num_steps: int | None = None) -> "Quantizer":
        """The same quantizer at sampler step ``step`` (may be a traced integer)."""
        return Quantizer(self.plan, self.state, step, num_steps if num_steps is not None else self.num_steps, self.strict)

    def quantizes(self, site, role):
        """Whether the plan binds a transform to operand (``site``, ``role``)."""
        return self.plan.transform_for(operand_key(site, role)) is not None

    def transform_for(self, site, role):
        """The plan's transform of operand (``site``, ``role``), ``None`` when it has none."""
        return self.plan.transform_for(operand_key(site, role))

    def state_for(self, site, role):
        """The state of operand (``site``, ``role``)'s transform (``None`` when it has none)."""
        return self.state.get(operand_key(site, role))

    def __call__(self, x, site, role, axis=-1):
        key = operand_key(site, role)
        if key not in self.plan.assignment:
            if self.strict and not any(o.key == key for o in self.plan.operands):
                raise KeyError(f"operand {key!r} is not in the plan: was the plan resolved for another model?")
            return x
        t = self.plan.rules[self.plan.assignment[key]].transform
        if t is None:
            return x
        return t.apply(x, self.state[key], Context(site, role, axis, self.step, self.num_steps))


class OperandRecorder(QuantizerBase):
    """A pass-through quantizer that records every operand it sees (use under ``jax.eval_shape``)."""

    def __init__(self):
        self.operands: list[Operand] = []

    def __call__(self, x, site, role, axis=-1):
        self.operands.append(Operand(site, role, tuple(x.shape), x.dtype, axis))
        return x


def trace_operands(fn: Callable[..., Any], *args, **kwargs) -> tuple[Operand, ...]:
    """The operands ``fn(*args, quant=recorder, **kwargs)`` exposes, found abstractly (no FLOPs)."""
    recorder = OperandRecorder()
    jax.eval_shape(lambda *a: fn(*a, quant=recorder, **kwargs), *args)
    return tuple(recorder.operands)


# --------------------------------------------------------------------------------------------
# Walking the stages of composed transforms
# --------------------------------------------------------------------------------------------


class WrapsInner:
    """Mixin for the ``meta`` of a wrapper whose state is ``{"inner": <wrapped state>, ...}``.

    Provides the ``inner_state`` / ``replace_inner_state`` pair :func:`map_stages` walks; the
    dataclass using it declares an ``inner`` field (the wrapped transform's ``meta``).
    """

    @staticmethod
    def inner_state(state):
        """The wrapped transform's state."""
        return None if state is None else state["inner"]

    @staticmethod
    def replace_inner_state(state, inner_state):
        """This stage's state with the wrapped transform's state replaced."""
        return None if state is None else dict(state, inner=inner_state)


def map_stages(meta: Any, state: State, fn: Callable[[Any, State, bool], State], stacked: bool = False) -> State:
    """Rebuild ``state`` with ``fn(meta, state, stacked)`` applied to every stage, outermost first.

    Recurses into :func:`chain` parts (meta ``("chain", *metas)``, state tuple) and into wrapped
    transforms: a meta with an ``inner`` attribute and ``inner_state(state)`` /
    ``replace_inner_state(state, inner_state)`` methods. ``stacked`` is true inside a wrapper whose
    meta sets ``stacks_state = True`` (its inner state has a leading axis, e.g. time groups).
    ``state=None`` walks the metas alone (every stage then sees ``state=None``).
    """
    if isinstance(meta, tuple) and meta and meta[0] == "chain":
        parts = (None,) * (len(meta) - 1) if state is None else state
        return tuple(map_stages(m, s, fn, stacked) for m, s in zip(meta[1:], parts))
    state = fn(meta, state, stacked)
    if hasattr(meta, "inner_state"):
        inner = map_stages(meta.inner, meta.inner_state(state), fn, stacked or bool(getattr(meta, "stacks_state", False)))
        state = meta.replace_inner_state(state, inner)
    return state


def find_stages(meta: Any, state: State, kind: str | None = None) -> list[tuple[Any, State, bool]]:
    """``(meta, state, stacked)`` of every stage (with ``meta.kind == kind`` if given), outermost first."""
    found = []

    def visit(m, s, stacked):
        if kind is None or getattr(m, "kind", None) == kind:
            found.append((m, s, stacked))
        return s

    map_stages(meta, state, visit)
    return found
