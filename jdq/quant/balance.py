"""Channel balancing (smoothing) with re-parameterisation into the weight: SmoothQuant, ViDiT-Q, PTQ4DiT.

For a linear ``y = x @ W`` (``W``: ``(in, out)``), a positive per-input-channel vector ``s``
leaves the product unchanged: ``y = (x / s) @ (s[:, None] * W)``. Dividing the activation by
``s`` moves its channel outliers into the weight, which usually quantizes better. One rule:

    s_j = a_j^α / w_j^(1−α),    a_j = salience of activation channel j,  w_j = max_k |W[j, k]|

(SmoothQuant's and ViDiT-Q's formula, docs/methods.md §3; PTQ4DiT's ``s_j = sqrt(a_j / (w_j + 1e-8))`` is the same
with ``α = 1/2``, up to the floor ``eps`` of ``a`` and ``w``). A
:class:`ChannelBalance` fixes ``α`` and how ``a_j`` is aggregated over the calibration steps:

* ``"max"``: max over steps (SmoothQuant);
* ``"mean"``: mean over steps;
* ``"ema"``: exponential moving average in step order, ``a ← m·a + (1−m)·a_t``, first entry as
  start (ViDiT-Q, momentum ``m = 0.95``; ViDiT-Q averages the per-batch maxima, we use each
  step's max over the batch, what :func:`jdq.quant.operand_stats` records);
* ``"ssc"``: PTQ4DiT's Spearman-ρ-guided salience calibration as its released code
  (adreamwu/PTQ4DiT, ``models.py``) computes it: for every calibration *sample* ``i``,
  ``a_i`` = max over tokens of ``|X_i|`` per channel and ``ρ_i`` its Spearman rank correlation
  with ``w``; ``η = softmax(−ρ)`` over the samples and ``a = Σ_i η_i a_i`` (samples whose
  salience is complementary to the weight's weigh more). A trajectory calibration with the
  ``"ssc"`` statistics (:mod:`jdq.quant.calibrate`) streams ``Σ exp(−ρ_i) a_i`` and
  ``Σ exp(−ρ_i)`` over every (step, sample) it observes; without them the rows of the per-step
  ``absmax_channel`` stand in for the samples.

Its :meth:`~ChannelBalance.act` and :meth:`~ChannelBalance.weight` wrap the operand's own
quantizer: ``act(inner)`` computes ``inner(x / s)``, ``weight(inner)`` computes ``inner(W · s)``
along the contraction axis, and both hand the *balanced* operand's statistics to
``inner.init`` (per-channel statistics divided / multiplied by ``s``), so a static cast after
balancing is calibrated on what it will see. Both sides need both operands' statistics:
run :func:`link_stats` on the calibration statistics before ``plan.init``.

Re-parameterisation (offline, so the runtime path only divides the activation, or nothing):

* :func:`fold_balance` multiplies each balanced weight by its ``s`` once and marks the weight
  side folded (its ``s`` becomes ``None``: ``apply`` then skips the multiply);
* :func:`pop_act_scales` takes the activation-side ``s`` out of the state (marking it folded)
  for folding into the op before the linear: :func:`fold_into_affine` (a LayerNorm's affine
  ``x·γ + β``) or :func:`fold_into_modulation` (DiT's adaLN ``x·(1+scale) + shift``, folded into
  the adaLN linear that produces ``shift`` and ``scale``). Where no such op exists (``fc2`` after
  GELU) the activation keeps its runtime division.

Timestep-aware balancing (ViDiT-Q) is a balance inside :func:`jdq.quant.timegroup.time_grouped`:
one ``s`` per time group (and so one balanced weight per group: such a weight side cannot be
folded into one weight; :func:`fold_balance` says so).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp

from jdq.quant.casts import along_axis
from jdq.quant.timegroup import STEP_KEY
from jdq.quant.transform import ACTIVATION_ROLES, Plan, QuantTransform, WrapsInner, map_stages, operand_key

SALIENCE_REDUCTIONS = ("max", "mean", "ema", "ssc")
#: Statistic added by :func:`link_stats` to an activation's statistics (the weight's per-input-channel |max|).
WEIGHT_SALIENCE_KEY = "weight_absmax_channel"
#: Statistic added by :func:`link_stats` to a weight's statistics (the activation's per-channel |max|).
ACT_SALIENCE_KEY = "act_absmax_channel"
#: Streamed SSC sums (:mod:`jdq.quant.calibrate`) of an activation, and their copies on the weight (:func:`link_stats`).
SSC_KEYS = ("ssc_num", "ssc_den")
ACT_SSC_KEYS = ("act_ssc_num", "act_ssc_den")


def spearman(a, b):
    """Spearman rank correlation of two vectors along the last axis (ties get average ranks)."""
    def ranks(v):
        less = jnp.sum(v[..., None, :] < v[..., :, None], axis=-1)
        equal = jnp.sum(v[..., None, :] == v[..., :, None], axis=-1)
        return less + (equal + 1) / 2.0

    ra, rb = ranks(jnp.asarray(a, jnp.float32)), ranks(jnp.asarray(b, jnp.float32))
    ra = ra - ra.mean(-1, keepdims=True)
    rb = rb - rb.mean(-1, keepdims=True)
    den = jnp.sqrt(jnp.sum(ra**2, -1) * jnp.sum(rb**2, -1))
    return jnp.where(den > 0, jnp.sum(ra * rb, -1) / jnp.where(den > 0, den, 1.0), 0.0)


@dataclasses.dataclass(frozen=True)
class ChannelBalance:
    """Smoothing factors ``s = a^α / w^(1−α)`` per input channel; see the module docstring.

    ``alpha`` (migration strength), ``salience`` (``"max" | "mean" | "ema" | "ssc"``: how the
    activation salience is aggregated over calibration steps), ``momentum`` (``"ema"`` only),
    ``eps`` (floor of ``a`` and ``w``, so dead channels give a finite ``s``).
    """

    alpha: float = 0.5
    salience: str = "max"
    momentum: float = 0.95
    eps: float = 1e-5

    def __post_init__(self):
        if not 0.0 <= float(self.alpha) <= 1.0:
            raise ValueError(f"ChannelBalance: alpha must lie in [0, 1], got {self.alpha!r}")
        if self.salience not in SALIENCE_REDUCTIONS:
            raise ValueError(f"ChannelBalance: salience must be one of {SALIENCE_REDUCTIONS}, got {self.salience!r}")
        if not 0.0 <= float(self.momentum) < 1.0:
            raise ValueError(f"ChannelBalance: momentum must lie in [0, 1), got {self.momentum!r}")
        if not float(self.eps) > 0:
            raise ValueError(f"ChannelBalance: eps must be positive, got {self.eps!r}")

    def act_salience(self, act_absmax, w_absmax):
        """Aggregate per-step activation salience ``[S, C]`` (or ``[C]``) into ``[C]``."""
        a = jnp.asarray(act_absmax, jnp.float32)
        if a.ndim == 1:
            return a
        if self.salience == "max":
            return a.max(0)
        if self.salience == "mean":
            return a.mean(0)
        if self.salience == "ema":
            m = self.momentum
            out = a[0]
            for t in range(1, a.shape[0]):
                out = m * out + (1 - m) * a[t]
            return out
        rows = a.reshape(-1, a.shape[-1])
        rho = spearman(rows, jnp.broadcast_to(self.weight_salience(w_absmax), rows.shape))
        eta = jax.nn.softmax(-rho)
        return jnp.sum(eta[:, None] * rows, axis=0)

    @staticmethod
    def weight_salience(w_absmax):
        """Per-input-channel weight salience ``[C]`` from ``[C]`` or per-step ``[S, C]`` statistics."""
        w = jnp.asarray(w_absmax, jnp.float32)
        return w if w.ndim == 1 else w.max(0)

    def scales(self, act_absmax, w_absmax):
        """The smoothing factors ``s`` (``[C]``, float32, positive) from activation and weight salience."""
        a = self.act_salience(act_absmax, w_absmax)
        w = self.weight_salience(w_absmax)
        if a.shape != w.shape:
            raise ValueError(f"ChannelBalance: activation salience has shape {a.shape}, weight salience {w.shape}")
        a = jnp.maximum(a, self.eps)
        w = jnp.maximum(w, self.eps)
        return a**self.alpha / w ** (1.0 - self.alpha)

    def act(self, inner: QuantTransform) -> QuantTransform:
        """Activation side: ``inner(x / s)``; state ``{"s": [C] or None (folded), "inner": ...}``.

        Wrap the activation's quantizer (``balance.act(cast(...))``) rather than chaining
        ``chain(balance.act(identity()), cast(...))``: only the wrapper hands ``inner`` the statistics
        of ``x / s`` (a chain gives every part the raw statistics, so a static scale would be wrong).
        ``init`` reads ``"absmax_channel"`` and ``"weight_absmax_channel"`` (see :func:`link_stats`).
        """
        return _balanced(self, "act", inner)

    def weight(self, inner: QuantTransform) -> QuantTransform:
        """Weight side: ``inner(W · s)`` along the contraction axis; state like :meth:`act` (wrap, don't chain).

        ``init`` reads ``"absmax_channel"`` and ``"act_absmax_channel"`` (see :func:`link_stats`).
        """
        return _balanced(self, "weight", inner)


@dataclasses.dataclass(frozen=True)
class BalanceMeta(WrapsInner):
    """``meta`` of a balancing transform: side (``"act"``/``"weight"``), the balance, the inner meta."""

    kind: ClassVar[str] = "balance"
    side: str
    balance: ChannelBalance
    inner: Any


_PER_CHANNEL = ("absmax_channel", "min_channel", "max_channel")


def _rescale_stats(stats, s, divide: bool):
    """Statistics of ``x / s`` (``divide``) or ``x · s`` from those of ``x`` (``s > 0`` per channel)."""
    out = {}
    f = (lambda v: v / s) if divide else (lambda v: v * s)
    for k in _PER_CHANNEL:
        if k in stats:
            out[k] = f(jnp.asarray(stats[k], jnp.float32))
    if "absmax_channel" in out:
        out["absmax"] = out["absmax_channel"].max(-1)
    if "min_channel" in out:
        out["min"] = out["min_channel"].min(-1)
    if "max_channel" in out:
        out["max"] = out["max_channel"].max(-1)
    for k in (STEP_KEY, WEIGHT_SALIENCE_KEY, ACT_SALIENCE_KEY) + SSC_KEYS + ACT_SSC_KEYS:
        if k in stats:
            out[k] = stats[k]
    return out


def _balanced(balance: ChannelBalance, side: str, inner):
    if not isinstance(inner, QuantTransform):
        raise TypeError(f"ChannelBalance.{side}: inner must be a QuantTransform, got {type(inner).__name__}")
    act_key, w_key = ("absmax_channel", WEIGHT_SALIENCE_KEY) if side == "act" else (ACT_SALIENCE_KEY, "absmax_channel")

    num_key, den_key = SSC_KEYS if side == "act" else ACT_SSC_KEYS

    def init(stats):
        act = stats[act_key]
        if balance.salience == "ssc" and num_key in stats:  # streamed softmax(−ρ) sums over every sample
            act = jnp.sum(stats[num_key], axis=0) / jnp.sum(stats[den_key])
        s = balance.scales(act, stats[w_key])
        return {"s": s, "inner": inner.init(_rescale_stats(stats, s, divide=(side == "act")))}

    def apply(x, state, ctx):
        s = state["s"]
        if s is not None:
            if s.shape[-1] != x.shape[ctx.axis]:
                raise ValueError(
                    f"balance at {ctx.site}:{ctx.role}: {s.shape[-1]} factors for {x.shape[ctx.axis]} "
                    f"channels (axis {ctx.axis} of shape {x.shape})"
                )
            sb = along_axis(s, x.ndim, ctx.axis)
            xf = x.astype(jnp.float32)
            x = (xf / sb if side == "act" else xf * sb).astype(x.dtype)
        return inner.apply(x, state["inner"], ctx)

    return QuantTransform(init, apply, BalanceMeta(side, balance, inner.meta))


def link_stats(stats: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Give each linear's activation and weight statistics the other's per-channel |max|.

    For every site with a ``"site:weight"`` and an activation operand (role ``act`` or
    ``post_gelu``), the activation's statistics gain ``"weight_absmax_channel"`` and the weight's
    gain ``"act_absmax_channel"``. Returns a new dict; the input is not modified.
    """
    out = {k: dict(v) for k, v in stats.items()}
    for key in stats:
        site, _, role = key.rpartition(":")
        w = operand_key(site, "weight")
        if role in ACTIVATION_ROLES and w in stats:
            out[key][WEIGHT_SALIENCE_KEY] = stats[w]["absmax_channel"]
            out[w][ACT_SALIENCE_KEY] = stats[key]["absmax_channel"]
            for k, wk in zip(SSC_KEYS, ACT_SSC_KEYS):
                if k in stats[key]:
                    out[w][wk] = stats[key][k]
    return out


# --------------------------------------------------------------------------------------------
# Re-parameterisation
# --------------------------------------------------------------------------------------------


def fold_into_weight(w, s, axis: int = -2):
    """``W · s`` along ``axis`` (the input channel; ``-2`` for jdq's ``(in, out)`` weights)."""
    return (jnp.asarray(w, jnp.float32) * along_axis(s, jnp.ndim(w), axis)).astype(jnp.result_type(w))


def fold_into_affine(scale, shift, s):
    """Fold ``x / s`` into a preceding affine ``x·scale + shift`` (LayerNorm γ, β): ``(scale/s, shift/s)``."""
    return scale / s, (None if shift is None else shift / s)


def fold_into_modulation(w_shift, b_shift, w_scale, b_scale, s):
    """Fold ``x / s`` into adaLN ``x·(1 + scale) + shift`` with ``shift = c@w_shift + b_shift``, ``scale = c@w_scale + b_scale``.

    Returns ``(w_shift/s, b_shift/s, w_scale/s, (1 + b_scale)/s − 1)`` (weights ``(cond, C)``, so
    ``s`` divides their columns), after which ``modulate(x, shift', scale') = modulate(x, shift, scale) / s``.
    """
    return w_shift / s, b_shift / s, w_scale / s, (1.0 + b_scale) / s - 1.0


def fold_balance(plan: Plan, state: Mapping[str, Any], weights: Mapping[str, Any]):
    """Fold every weight-side balance of ``plan`` into ``weights`` (``{site: W}``): returns ``(weights', state')``.

    In ``state'`` the folded stages have ``s = None``, so their ``apply`` no longer multiplies:
    ``plan.bind(state')`` with ``weights'`` computes what ``plan.bind(state)`` does with
    ``weights``. Raises ``KeyError`` for a balanced site missing from ``weights`` and
    ``ValueError`` for a time-grouped weight balance (one ``s`` per group cannot fold into one W).
    """
    new_weights = dict(weights)
    new_state = dict(state)
    for key in plan.quantized_keys:
        op = plan.operand(key)
        if op.role != "weight":
            continue
        found = []

        def take(meta, st, grouped, op=op, found=found):
            if not isinstance(meta, BalanceMeta) or meta.side != "weight" or st["s"] is None:
                return st
            if grouped:
                raise ValueError(
                    f"{op.key}: a time-grouped weight balance has one s per group and cannot be folded "
                    "into a single weight; keep it at runtime"
                )
            found.append(st["s"])
            return dict(st, s=None)

        new_state[key] = map_stages(plan.transform_for(key).meta, state[key], take)
        for s in found:
            if op.site not in new_weights:
                raise KeyError(f"fold_balance: no weight given for balanced site {op.site!r}")
            new_weights[op.site] = fold_into_weight(new_weights[op.site], s, op.axis)
    return new_weights, new_state


def pop_act_scales(plan: Plan, state: Mapping[str, Any], sites=None):
    """Take the activation-side ``s`` out of ``state`` for folding into the preceding op.

    Returns ``({site: s}, state')``; in ``state'`` those stages have ``s = None`` (no runtime
    division). ``sites`` limits this to some sites (default: every balanced activation).
    Raises ``ValueError`` for a time-grouped activation balance.
    """
    scales = {}
    new_state = dict(state)
    for key in plan.quantized_keys:
        op = plan.operand(key)
        if op.role == "weight" or (sites is not None and op.site not in sites):
            continue

        def take(meta, st, grouped, op=op):
            if not isinstance(meta, BalanceMeta) or meta.side != "act" or st["s"] is None:
                return st
            if grouped:
                raise ValueError(f"{op.key}: a time-grouped activation balance cannot be folded into one op")
            scales[op.site] = st["s"]
            return dict(st, s=None)

        new_state[key] = map_stages(plan.transform_for(key).meta, state[key], take)
    return scales, new_state
