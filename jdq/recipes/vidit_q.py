"""ViDiT-Q (arXiv 2406.02540; thu-nics/ViDiT-Q): per-token dynamic activations, timestep-aware channel balancing, metric-decoupled MP.

``vidit-q`` (options, the paper's defaults and their source):

* ``wbits`` / ``abits`` = 8 / 8; the paper's plans are W8A8, W6A6, W4A8 and W4A8-MP
  (``mp_budget``): weights asymmetric min-max per output channel (``per_group: channel``),
  activations asymmetric per token, dynamic (``per_group: token, dynamic: True``). Scales are per
  (sample, token) row, what a per-token kernel computes; the released simulation shares one scale
  per token index across the batch, which this does not reproduce. Because every row has its own
  scale, the conditional and unconditional halves of a guided batch are quantized separately
  (``cfg_split``) by construction;
* ``balance`` = ``None`` picks the plan's: none at W8A8 (``w8a8_dynamic.yaml``), static channel
  balancing at W6A6 (the README's "naive SmoothQuant-like channel balancing", α = 0.625 from
  ``w6a6_naive_cb.yaml``), timestep-aware at W4A8 (``w4a8_timestep_aware_cb.yaml``: α = 0.11 in
  both ranges, ranges ``[[0, 500], [501, 1000]]``, EMA momentum 0.95); or ``"none"``,
  ``"static"`` (one EMA over all steps), ``"timestep"`` (one per range,
  :mod:`jdq.quant.balance_timestep`). ``alpha``: a number or one per range (``None``: the plan's);
  ``ranges``: the time ranges. Balanced: the inputs of every quantized linear; a timestep-aware
  weight is stored once per range (2× its bytes for two ranges); nothing is folded (the
  activation division stays at run time, as in the released ``QuantLayer``);
* the floating-point skip list: outside the blocks (embedders, final layer) and the per-block
  adaLN modulation (the counterpart of ViDiT-Q's ``t_block``; less than 1 % of the compute);
  attention matmuls in floating point (ViDiT-Q quantizes only linear layers);
* ``mp_budget`` (e.g. 4.5 average weight bits; ``None``: uniform) with ``sensitivity`` (a
  ``jdq sensitivity --recipe vidit-q`` JSON): W4A8-MP. Each layer group's units get 4 or 8 bits
  (``mp_candidates``), chosen by :func:`jdq.quant.allocate_bits` within the budget, maximising the
  summed score of the group's own metric (SSIM for FFN / cross-attention, SQNR otherwise), each
  metric's units under the budget separately (the paper assigns each layer group a budget);
  ``weight_bits`` holds the result (``{site: bits}``), filled in by ``tune``. The released
  assignment also varies by time group; one assignment for all steps here;
* ``timesteps`` (filled in from the sampler by ``tune``): the sampler's timesteps the ranges are
  mapped to; before calibration an evenly spaced 999 → 0 schedule of ``steps`` entries stands in;
* calibration: every step (each range needs its own steps), guidance halves together, 32 samples
  (the PixArt configs' ``n_samples: 32``).
"""

from __future__ import annotations

import json

import numpy as np

from jdq import quant as Q
from jdq.quant.balance_timestep import DEFAULT_RANGES, MOMENTUM, range_groups, timestep_balance_pair
from jdq.recipes.core import BLOCKS, Recipe, register
#: Kept in floating point inside the blocks: the adaLN modulation linears.
FLOAT_IN_BLOCKS = r"re:.*\.(adaLN_modulation|norm1\.linear|norm1_context\.linear)"
#: The paper's balancing per plan: (kind, α).
PLAN_BALANCE = {(8, 8): ("none", None), (6, 6): ("static", 0.625), (4, 8): ("timestep", 0.11)}
OPTIONS = dict(wbits=8, abits=8, balance=None, alpha=None, ranges=tuple(map(tuple, DEFAULT_RANGES)), timesteps=None,
               steps=None, mp_budget=None, mp_candidates=(4, 8), sensitivity=None, weight_bits=None)


def balance_of(wbits, abits, balance, alpha):
    """``(kind, α)`` of a plan: the options, or the paper's choice for (wbits, abits)."""
    kind, a = PLAN_BALANCE.get((wbits, abits), ("none", None))
    kind = kind if balance is None else balance
    if kind not in ("none", "static", "timestep"):
        raise ValueError(f"vidit-q: balance must be 'none', 'static' or 'timestep', got {kind!r}")
    a = alpha if alpha is not None else (a if a is not None else 0.5)
    return kind, a


def _timesteps(timesteps, steps):
    if timesteps is not None:
        return tuple(float(t) for t in timesteps)
    n = int(steps) if steps else 2
    return tuple(np.linspace(999, 0, n).tolist())


def weight_cast(bits):
    """Asymmetric min-max integer weights per output channel."""
    return Q.cast(f"int{bits}", granularity="row", symmetric=False)


def act_cast(bits):
    """Asymmetric per-token dynamic integer activations."""
    return Q.cast(f"int{bits}", granularity="row", symmetric=False)


def rules(wbits=8, abits=8, balance=None, alpha=None, ranges=DEFAULT_RANGES, timesteps=None, steps=None,
          mp_budget=None, mp_candidates=(4, 8), sensitivity=None, weight_bits=None):
    """The rules of a ViDiT-Q plan (see the module docstring for the options)."""
    kind, a = balance_of(wbits, abits, balance, alpha)
    per_site = dict(weight_bits or {})
    out = [Q.keep_float(FLOAT_IN_BLOCKS, name="adaLN modulation in float")]

    def pair(bits):
        w, x = weight_cast(bits), act_cast(abits)
        if kind == "none":
            return x, w
        if kind == "static":
            if np.ndim(a) != 0:
                raise ValueError("vidit-q: static balancing takes one alpha")
            bal = Q.ChannelBalance(alpha=float(a), salience="ema", momentum=MOMENTUM)
            return bal.act(x), bal.weight(w)
        groups = range_groups(_timesteps(timesteps, steps), ranges)
        return timestep_balance_pair(x, w, groups, a)

    for site, bits in sorted(per_site.items()):  # mixed precision: an explicit width per site
        x, w = pair(int(bits))
        name = f"{site} W{bits}"
        out += [Q.rule(f"re:{_escape(site)}", w, roles=("weight",), name=name + " weight"),
                Q.rule(f"re:{_escape(site)}", x, roles=("act", "post_gelu"), name=name + " input")]
    x, w = pair(wbits)
    out += [Q.rule(BLOCKS, w, roles=("weight",), name=f"int{wbits} weights per output channel"),
            Q.rule(BLOCKS, x, roles=("act", "post_gelu"), name=f"int{abits} inputs per token (dynamic)"
                   + ("" if kind == "none" else f", {kind} channel balancing"))]
    return out


def _escape(site):
    import re

    return re.escape(site)


def calibration(**opts):
    """Every step (each time range needs its own), 32 samples, range statistics."""
    from jdq.quant.calibrate import CalibrationSettings

    return CalibrationSettings(samples=32, steps="all", stats=("range",))


def needs_calibration(**opts) -> bool:
    """Whether a plan's state needs statistics (only balanced plans)."""
    return balance_of(opts.get("wbits", 8), opts.get("abits", 8), opts.get("balance"), opts.get("alpha"))[0] != "none"


def mp_assignment(sensitivity: dict, budget: float, candidates=(4, 8), tolerance: float = 0.02) -> dict[str, int]:
    """``{site: bits}`` from a ``jdq sensitivity`` result: per metric, units' widths maximising their summed score.

    Each metric's units (SSIM: content, SQNR: quality) get the budget (size-weighted mean of
    ``budget`` ± ``tolerance``) on their own. Unmeasured widths of a unit fall back to the nearest
    measured one below (or above).
    """
    units = sensitivity["units"]
    out = {}
    for metric in ("ssim", "sqnr"):
        names = [n for n, u in units.items() if u["metric"] == metric and u.get("weight")]
        if not names:
            continue
        scores = []
        for n in names:
            have = {int(b): v[metric] for b, v in units[n]["weight"].items()}
            row = []
            for b in candidates:
                near = min(have, key=lambda h: (abs(h - b), -h))
                v = have[near]
                row.append(min(float(v), 120.0))  # an exact (inf dB) result caps at float32's own noise
            scores.append(row)
        sizes = [units[n]["weight_size"] for n in names]
        bits = Q.allocate_bits(scores, sizes, [list(candidates)] * len(names), budget, tolerance)
        for n, b in zip(names, bits):
            for site in units[n]["sites"]:
                out[site] = int(b)
    return out


def tune(model, stats, sampler, cond, opts):
    """Fill in the sampler's timesteps and, for ``mp_budget``, the per-site weight widths."""
    opts = dict(opts)
    if sampler is not None:
        opts["timesteps"] = tuple(float(t) for t in np.asarray(sampler.timesteps))
        opts["steps"] = int(sampler.num_steps)
    if opts.get("mp_budget") is not None and opts.get("weight_bits") is None:
        if opts.get("sensitivity") is None:
            raise ValueError("vidit-q: mp_budget needs sensitivity= (a `jdq sensitivity --recipe vidit-q` JSON)")
        with open(opts["sensitivity"]) as f:
            opts["weight_bits"] = mp_assignment(json.load(f), float(opts["mp_budget"]), tuple(opts["mp_candidates"]))
    return opts


def prepare(plan, stats, model, **opts):
    """Linked statistics (both operands' channel maxima) → state; the model's own parameters."""
    opts.pop("sampler", None), opts.pop("cond", None)
    return plan.init(Q.link_stats(stats) if stats else stats), model.params


DESCRIPTION = ("ViDiT-Q: asymmetric per-channel weights, per-token dynamic inputs, (timestep-aware) channel "
               "balancing, metric-decoupled mixed precision")


register(Recipe("vidit-q", DESCRIPTION, rules, calibrated=True, prepare=prepare, calibration=calibration, tune=tune,
                options=OPTIONS))
