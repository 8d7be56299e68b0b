"""Calibration statistics: what a quantizer's ``init`` reads, collected from the floating-point model.

One forward pass: a :class:`StatsCollector` is a pass-through quantizer; handed to a model as
``quant=``, it computes :func:`operand_stats` of every operand the model's matmuls see.
:func:`collect_stats` runs one forward pass with it under jit; :func:`stack_stats` stacks several
calls into the ``[steps, ...]`` layout transforms expect and :func:`reduce_steps` collapses that axis.

Along sampler trajectories (``jdq.sampling.calibrate`` drives the loop; this module holds what it
accumulates): :class:`CalibrationSettings` says which conditions, which steps (every step, a
uniform subset, or random (step, sample) pairs), guidance halves together or apart, and which
statistics; :class:`Accumulator` keeps, per operand and per *observed step* (a slot), running
reductions updated inside the jitted sampler loop — never the activations themselves:

* ``"range"``: ``absmax_channel`` / ``min_channel`` / ``max_channel`` (per contraction index) and
  ``absmax`` / ``min`` / ``max`` (whole tensor), by running max / min;
* ``"hist"``: a histogram of ``|x|`` over :data:`HIST_BINS` fixed log2-spaced bins
  (:data:`HIST_RANGE`), by running sums; :func:`percentile` reads a percentile back from it
  (exact to one bin: a factor ``2^(1/4)``);
* ``"hessian"``: the second moment ``Σ xxᵀ`` of a linear layer's input over every calibration
  row (``hessian``, ``(C, C)``) and the row count (``rows``) — pooled over the steps (no step
  axis: GPTQ needs one per layer);
* ``"ssc"``: PTQ4DiT's Spearman-weighted salience, reduced on the fly: for every calibration
  sample ``i`` (one row of one step), ``x_i`` = max over tokens of ``|X_i|`` per channel and
  ``ρ_i`` its Spearman correlation with the weight's per-input-channel ``|max|``; the slot keeps
  ``ssc_num = Σ_i exp(−ρ_i) x_i`` and ``ssc_den = Σ_i exp(−ρ_i)``, so ``ssc_num / ssc_den`` over
  all slots is the softmax(−ρ)-weighted salience of all samples (``ρ ∈ [−1, 1]``, so no overflow);
* ``"split"``: for attention probabilities, TQ-DiT's two-region split errors
  (:func:`jdq.quant.regions.split_errors` at ``split_bits``): ``split_mse`` sums each observed
  sample's mean squared error per candidate split, so its argmin over all slots is the split with
  the least error over the whole calibration set.

Statistics come out as ``{operand key: {name: [S, ...]}}`` with ``"step"`` (``[S]``, the sampler
step of each slot; :mod:`jdq.quant.timegroup` reads it), except the pooled ``"hessian"`` / ``"rows"``.

Memory bound (DiT-XL/2 at 256², 28 blocks, C = 1152, MLP 4608, 256 tokens; 32 samples × 250
steps, every step observed): the accumulators hold no activation, so their size does not depend on
the number of samples. Per slot, ``"range"`` keeps ``3·C + 3`` floats per operand (``C`` its
contraction size); for the 14 operands of a block (4 weights, 4 linear inputs, the adaLN linear's
2, q, k, v, p) over 28 blocks that is 6.1 MiB per step, **1.5 GiB for 250 steps** (0.15 GiB for a
uniform 25). ``"hist"`` adds 60 MiB for 250 steps, ``"ssc"`` 0.25 GiB; ``"hessian"`` is pooled
over the steps, ``Σ C²`` floats: 2.8 GiB for the 28 blocks (restrict ``roles`` or the sites on a
small accelerator). The live activations are those of one sampler step of one chunk
(``batch_size`` samples, doubled with guidance together), as in sampling.
:func:`accumulator_bytes` computes this for any model abstractly.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jdq.quant.stats import operand_stats, reduce_steps  # noqa: F401 - part of this module's API
from jdq.quant.transform import ACTIVATION_ROLES, QuantizerBase, operand_key

Array = jax.Array
Stats = Mapping[str, Array]

STEP_KEY = "step"
#: The statistic groups an :class:`Accumulator` can keep.
STAT_GROUPS = ("range", "hist", "hessian", "ssc", "split")
STEP_SELECTIONS = ("all", "uniform", "random")
CFG_MODES = ("together", "apart")
#: log2 bounds of the ``|x|`` histogram (values below the first edge count in bin 0, above the last in the last).
HIST_RANGE = (-24.0, 16.0)
#: Histogram bins (a quarter octave each over :data:`HIST_RANGE`).
HIST_BINS = 160
_POOLED = ("hessian", "rows")


class StatsCollector(QuantizerBase):
    """A pass-through quantizer that computes :func:`operand_stats` of every operand it sees.

    Use it inside a traced function and return ``collector.stats`` from that same function (see
    :func:`collect_stats`): the statistics are traced values of that trace.
    """

    def __init__(self, stat_fn: Callable[[Array, int], dict] = operand_stats, roles: Sequence[str] | None = None):
        self.stats: dict[str, dict[str, Array]] = {}
        self.stat_fn = stat_fn
        self.roles = None if roles is None else tuple(roles)

    def __call__(self, x, site, role, axis=-1):
        if self.roles is None or role in self.roles:
            key = operand_key(site, role)
            if key in self.stats:
                raise ValueError(f"operand {key!r} was seen twice in one forward pass")
            self.stats[key] = self.stat_fn(x, axis)
        return x


def collect_stats(fn: Callable[..., Any], *args, stat_fn=operand_stats, roles=None, **kwargs):
    """Run ``fn(*args, quant=collector, **kwargs)`` under jit; return ``(output, {key: stats})``.

    The statistics of one call have no step axis; stack calls over steps with
    :func:`stack_stats` to build the ``[steps, ...]`` statistics transforms' ``init`` expects.
    """

    def run(*a):
        collector = StatsCollector(stat_fn, roles)
        out = fn(*a, quant=collector, **kwargs)
        return out, collector.stats

    return jax.jit(run)(*args)


def stack_stats(per_step: Sequence[Mapping[str, Stats]]) -> dict[str, dict[str, Array]]:
    """Stack a list of per-step ``{key: stats}`` into ``{key: stats with a leading step axis}``."""
    if not per_step:
        raise ValueError("stack_stats: no statistics to stack")
    return jax.tree.map(lambda *xs: jnp.stack(xs), *per_step)




# --------------------------------------------------------------------------------------------
# Along sampler trajectories: settings, step selection, streaming accumulators
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CalibrationSettings:
    """What a trajectory calibration observes.

    ``samples``: number of calibration conditions (``None``: all that are given); ``steps``:
    ``"all"`` (every sampler step), ``"uniform"`` (``num_steps`` steps evenly spaced over the
    trajectory, first and last included) or ``"random"`` (``pairs`` random (step, sample) pairs
    drawn without replacement with ``seed``, as TQ-DiT and Q-DiT draw their calibration sets);
    ``cfg``: ``"together"`` (statistics over the joint ``[cond; uncond]`` batch) or ``"apart"``
    (the two halves run as separate calls, each seen alone); ``stats``: the statistic groups
    (:data:`STAT_GROUPS`); ``roles``: the operand roles observed (``None``: all);
    ``batch_size``: calibration samples per compiled trajectory (a chunk; the statistics are
    saved after each, so an interrupted calibration resumes at the next chunk).
    """

    samples: int | None = None
    steps: str = "all"
    num_steps: int | None = None
    pairs: int | None = None
    seed: int = 0
    cfg: str = "together"
    stats: tuple[str, ...] = ("range",)
    roles: tuple[str, ...] | None = None
    batch_size: int = 32
    split_bits: int = 8

    def __post_init__(self):
        object.__setattr__(self, "stats", tuple(self.stats))
        if self.roles is not None:
            object.__setattr__(self, "roles", tuple(self.roles))
        if self.steps not in STEP_SELECTIONS:
            raise ValueError(f"CalibrationSettings: steps must be one of {STEP_SELECTIONS}, got {self.steps!r}")
        if self.steps == "uniform" and not (isinstance(self.num_steps, int) and self.num_steps >= 1):
            raise ValueError(f"CalibrationSettings: steps='uniform' needs num_steps >= 1, got {self.num_steps!r}")
        if self.steps == "random" and not (isinstance(self.pairs, int) and self.pairs >= 1):
            raise ValueError(f"CalibrationSettings: steps='random' needs pairs >= 1, got {self.pairs!r}")
        if self.cfg not in CFG_MODES:
            raise ValueError(f"CalibrationSettings: cfg must be one of {CFG_MODES}, got {self.cfg!r}")
        bad = [s for s in self.stats if s not in STAT_GROUPS]
        if bad or not self.stats:
            raise ValueError(f"CalibrationSettings: unknown statistics {bad or '(none given)'}; known: {STAT_GROUPS}")
        if self.samples is not None and self.samples < 1:
            raise ValueError(f"CalibrationSettings: samples must be >= 1, got {self.samples}")
        if self.batch_size < 1:
            raise ValueError(f"CalibrationSettings: batch_size must be >= 1, got {self.batch_size}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields."""
        d = dataclasses.asdict(self)
        d["stats"] = list(self.stats)
        d["roles"] = None if self.roles is None else list(self.roles)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CalibrationSettings":
        """Inverse of :meth:`to_dict`."""
        d = dict(d)
        d["stats"] = tuple(d.get("stats", ("range",)))
        if d.get("roles") is not None:
            d["roles"] = tuple(d["roles"])
        return cls(**d)


def selection_mask(settings: CalibrationSettings, num_steps: int, num_samples: int) -> np.ndarray:
    """``[num_steps, num_samples]`` bool: which (step, sample) pairs the calibration observes."""
    mask = np.zeros((num_steps, num_samples), bool)
    if settings.steps == "all":
        mask[:] = True
    elif settings.steps == "uniform":
        k = min(settings.num_steps, num_steps)
        mask[np.unique(np.round(np.linspace(0, num_steps - 1, k)).astype(int))] = True
    else:
        total = num_steps * num_samples
        if settings.pairs > total:
            raise ValueError(f"calibration: {settings.pairs} random (step, sample) pairs asked for, but "
                             f"{num_steps} steps × {num_samples} samples have only {total}")
        picks = np.random.default_rng(settings.seed).choice(total, settings.pairs, replace=False)
        mask.reshape(-1)[picks] = True
    return mask


def observed_steps(mask: np.ndarray) -> np.ndarray:
    """The steps with at least one observed sample (the slots, in step order)."""
    return np.flatnonzero(mask.any(axis=1))


def _rows(x, axis, batched: bool):
    """``x`` as ``[B, R, C]`` (batch, rows, contraction channels) or ``[1, R, C]`` for an unbatched operand."""
    x = jnp.moveaxis(jnp.asarray(x, jnp.float32), axis % x.ndim, -1)
    if not batched:
        return x.reshape(1, -1, x.shape[-1])
    return x.reshape(x.shape[0], -1, x.shape[-1])


def _hist(absx, weight):
    """Weighted histogram of ``|x|`` (any shape, weight broadcastable) over the fixed log2 bins."""
    lo, hi = HIST_RANGE
    pos = (jnp.log2(jnp.maximum(absx, 2.0**lo)) - lo) / (hi - lo) * HIST_BINS
    idx = jnp.clip(jnp.floor(pos).astype(jnp.int32), 0, HIST_BINS - 1)
    w = jnp.broadcast_to(weight, absx.shape).astype(jnp.float32)
    return jnp.zeros((HIST_BINS,), jnp.float32).at[idx.reshape(-1)].add(w.reshape(-1))


def percentile(hist, q: float):
    """The ``q``-th percentile (0..100) of ``|x|`` from a :data:`HIST_BINS` histogram (``[..., BINS]``): a bin's upper edge."""
    hist = jnp.asarray(hist, jnp.float32)
    cdf = jnp.cumsum(hist, -1)
    total = cdf[..., -1:]
    k = jnp.argmax(cdf >= (q / 100.0) * total, axis=-1)
    lo, hi = HIST_RANGE
    return 2.0 ** (lo + (k + 1) * (hi - lo) / HIST_BINS)


def _combine(name: str, a, b):
    if name.startswith("min"):
        return jnp.minimum(a, b)
    if name.startswith(("max", "absmax")):
        return jnp.maximum(a, b)
    return a + b  # histograms, second moments, counts, SSC sums


def _identity(name: str) -> float:
    if name.startswith("min"):
        return float("inf")
    if name.startswith(("max", "absmax")):
        return float("-inf")
    return 0.0


def _empty(name: str, shape, dtype=jnp.float32):
    return jnp.full(shape, _identity(name), dtype)


def trajectory_stats(x, axis: int, role: str, weight_rows, groups: Sequence[str], split_bits: int = 8) -> dict[str, Array]:
    """One call's statistics of operand ``x`` with per-row weights ``weight_rows`` (``[B]`` 0/1, ``None`` for a weight).

    Returns the ``"range"``/``"hist"``/``"hessian"`` statistics (an unobserved row contributes
    nothing) and, for ``"ssc"``, the per-sample channel salience ``sample_absmax`` (``[B, C]``),
    which :class:`TrajectoryCollector` turns into the SSC sums once the weight is known.
    """
    batched = role != "weight"
    r = _rows(x, axis, batched)  # [B, R, C]
    m = (jnp.ones((r.shape[0],), jnp.float32) if weight_rows is None or not batched
         else jnp.asarray(weight_rows, jnp.float32))
    seen = m[:, None, None] > 0
    out = {}
    if "range" in groups:
        absmax_s = jnp.max(jnp.where(seen, jnp.abs(r), -jnp.inf), axis=1)  # [B, C]
        min_s = jnp.min(jnp.where(seen, r, jnp.inf), axis=1)
        max_s = jnp.max(jnp.where(seen, r, -jnp.inf), axis=1)
        out.update(absmax_channel=absmax_s.max(0), min_channel=min_s.min(0), max_channel=max_s.max(0))
        out.update(absmax=out["absmax_channel"].max(), min=out["min_channel"].min(), max=out["max_channel"].max())
    if "hist" in groups:
        out["hist"] = _hist(jnp.abs(r), m[:, None, None])
    if "hessian" in groups and role in ACTIVATION_ROLES:
        flat = (r * jnp.sqrt(m)[:, None, None]).reshape(-1, r.shape[-1])
        out["hessian"] = jnp.matmul(flat.T, flat, precision=jax.lax.Precision.HIGHEST)
        out["rows"] = jnp.sum(m) * r.shape[1]
    if "split" in groups and role == "attn_prob":
        from jdq.quant.regions import split_errors

        per_sample = jax.vmap(lambda xi: split_errors(xi, split_bits))(jnp.asarray(x, jnp.float32))  # [B, K]
        out["split_mse"] = jnp.sum(per_sample * m[:, None], axis=0)
    if "ssc" in groups and role in ACTIVATION_ROLES:
        out["sample_absmax"] = jnp.max(jnp.abs(r), axis=1)
        out["sample_weight"] = m
    return out


class TrajectoryCollector(QuantizerBase):
    """A pass-through quantizer recording :func:`trajectory_stats` of every operand (one sampler step).

    ``rows``: the per-row observation weights of the batch the model is called with (``None``:
    all rows). An operand seen in several calls of one step (guidance halves apart) has its
    statistics combined; :meth:`finish` returns the step's ``{key: stats}`` with the SSC sums.
    """

    def __init__(self, groups: Sequence[str], roles: Sequence[str] | None = None, split_bits: int = 8):
        self.groups = tuple(groups)
        self.split_bits = split_bits
        self.roles = None if roles is None else tuple(roles)
        self.rows = None
        self.stats: dict[str, dict[str, Array]] = {}

    def __call__(self, x, site, role, axis=-1):
        if self.roles is None or role in self.roles or role == "weight" and "ssc" in self.groups:
            key = operand_key(site, role)
            new = trajectory_stats(x, axis, role, self.rows, self.groups, self.split_bits)
            old = self.stats.get(key)
            if old is None:
                self.stats[key] = new
            elif role == "weight":
                pass  # the same weight again (a second guidance half)
            else:
                merged = {}
                for k, v in new.items():
                    merged[k] = jnp.concatenate([old[k], v]) if k.startswith("sample_") else _combine(k, old[k], v)
                self.stats[key] = merged
        return x

    def finish(self) -> dict[str, dict[str, Array]]:
        """The step's statistics: per-sample salience turned into PTQ4DiT's SSC sums (needs the site's weight)."""
        from jdq.quant.balance import spearman

        out = {}
        for key, st in self.stats.items():
            site, _, role = key.rpartition(":")
            if self.roles is not None and role not in self.roles:
                continue  # a weight recorded only for SSC
            st = dict(st)
            if "sample_absmax" in st:
                x, m = st.pop("sample_absmax"), st.pop("sample_weight")
                w = self.stats.get(operand_key(site, "weight"))
                if w is not None and "absmax_channel" in w:
                    rho = spearman(x, jnp.broadcast_to(w["absmax_channel"], x.shape))
                    e = jnp.exp(-rho) * m
                    st["ssc_num"] = jnp.sum(e[:, None] * x, axis=0)
                    st["ssc_den"] = jnp.sum(e)
            out[key] = st
        return out


class Accumulator:
    """Running reductions of per-step statistics into slots (a pytree of arrays, updated inside jit).

    :meth:`empty` builds the state from one step's abstract statistics; :meth:`update` folds a
    step's statistics into slot ``slot`` (an out-of-range slot, for an unobserved step, is
    dropped); :meth:`merge` combines two states (two chunks of samples).
    """

    @staticmethod
    def empty(step_stats, num_slots: int):
        """Identity elements (``-inf`` for maxima, ``+inf`` for minima, ``0`` for sums) for ``num_slots`` slots."""
        def leaf(path, v):
            name = path[-1].key
            shape = tuple(v.shape) if name in _POOLED else (num_slots,) + tuple(v.shape)
            return _empty(name, shape)

        return jax.tree_util.tree_map_with_path(leaf, step_stats)

    @staticmethod
    def update(acc, step_stats, slot):
        """Fold one step's statistics into slot ``slot`` (traced int; ``>= num_slots`` drops the step)."""
        def leaf(path, a, v):
            name = path[-1].key
            if name in _POOLED:
                return a + v  # pooled over the steps: no slot axis
            cur = a.at[slot].get(mode="fill", fill_value=_identity(name))
            return a.at[slot].set(_combine(name, cur, v), mode="drop")

        return jax.tree_util.tree_map_with_path(leaf, acc, step_stats)

    @staticmethod
    def merge(a, b):
        """Combine two accumulator states of the same layout."""
        return jax.tree_util.tree_map_with_path(lambda p, x, y: _combine(p[-1].key, x, y), a, b)


def finalize(acc, steps: np.ndarray) -> dict[str, dict[str, Array]]:
    """The statistics ``{key: {name: [S, ...]}}`` (with ``"step"``) from an accumulator state over the observed ``steps``."""
    out = {}
    for key, st in acc.items():
        d = {k: jnp.asarray(v) for k, v in st.items()}
        d[STEP_KEY] = jnp.asarray(steps, jnp.int32)
        out[key] = d
    return out


def accumulator_bytes(step_stats, num_slots: int) -> int:
    """Bytes of an accumulator with ``num_slots`` slots for one step's (abstract) statistics."""
    total = 0
    for path, v in jax.tree_util.tree_flatten_with_path(step_stats)[0]:
        n = int(np.prod(v.shape)) * 4
        total += n if path[-1].key in _POOLED else n * num_slots
    return total


# --------------------------------------------------------------------------------------------
# Saving and resuming
# --------------------------------------------------------------------------------------------


def save_stats(path, stats: Mapping[str, Mapping[str, Any]], metadata: Mapping[str, Any] | None = None) -> None:
    """Write ``{key: {name: array}}`` to a safetensors file (atomically), ``metadata`` as JSON in its header."""
    from safetensors.numpy import save

    from jdq.io import atomic_write

    flat = {f"{key}/{name}": np.array(v) for key, st in stats.items() for name, v in st.items()}
    meta = {"jdq_stats": json.dumps(dict(metadata or {}), sort_keys=True)}
    data = save(flat, metadata=meta)

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write)


def load_stats(path) -> tuple[dict[str, dict[str, Array]], dict[str, Any]]:
    """Read :func:`save_stats`'s file: ``(stats, metadata)``; a truncated or foreign file raises ``ValueError``."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = json.loads((f.metadata() or {}).get("jdq_stats", "null"))
            if meta is None:
                raise ValueError("no jdq statistics header")
            stats: dict[str, dict[str, Any]] = {}
            for name in f.keys():
                key, _, stat = name.rpartition("/")
                stats.setdefault(key, {})[stat] = jnp.asarray(f.get_tensor(name))
    except (OSError, ValueError, json.JSONDecodeError, Exception) as e:  # noqa: BLE001 - safetensors raises its own types
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"{path}: not a readable jdq statistics file (truncated or foreign?): {e}") from None
    return stats, meta
