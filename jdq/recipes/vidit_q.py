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
  units the plan keeps in floating point (the adaLN group) take no part. ``weight_bits`` holds
  the result (``{site: bits}``), filled in by ``tune``;
* per time group (the paper's released assignment varies by its 4 timestep groups): a
  sensitivity measured with ``jdq sensitivity --time-groups G`` has one unit per (layer group,
  time group), each weighted in the budget by its weights × its group's steps (the mean is over
  weight *uses*), and ``weight_bits`` then maps a site to one width per time group
  (:func:`jdq.quant.per_time_group`). The groups are ``G`` runs of consecutive sampler steps
  (:func:`jdq.quant.sensitivity.contiguous_groups` of the recipe's sampler, so a sampler with
  another step count keeps the groups' shares of the trajectory). A layer stores one quantized
  copy per distinct width it takes;
* ``mp_search`` = ``"paper"`` (default, as above) or ``"noise"`` (not in the paper): one program
  over every unit minimising the summed output noise power ``Σ 10^(−SQNR/10)`` (additive for
  independent perturbations, unlike a sum of decibels or of SSIMs across metrics), the mean at
  most ``mp_budget``;
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
               steps=None, mp_budget=None, mp_candidates=(4, 8), sensitivity=None, weight_bits=None, mp_search="paper")


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
          mp_budget=None, mp_candidates=(4, 8), sensitivity=None, weight_bits=None, mp_search="paper"):
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

    for site, bits in sorted(per_site.items()):  # mixed precision: an explicit width per site (or per time group)
        if np.ndim(bits) == 1 and len(set(int(b) for b in bits)) == 1:
            bits = int(bits[0])
        if np.ndim(bits) == 0:
            x, w = pair(int(bits))
        else:
            widths = sorted(set(int(b) for b in bits))
            x = pair(widths[0])[0]  # the input side does not depend on the weight width
            n_steps = len(_timesteps(timesteps, steps))
            if len(bits) > n_steps:
                raise ValueError(f"vidit-q: {site} has widths for {len(bits)} time groups but the sampler has "
                                 f"{n_steps} steps")
            from jdq.quant.sensitivity import contiguous_groups

            w = Q.per_time_group([pair(b)[1] for b in widths], contiguous_groups(n_steps, len(bits)),
                                 [widths.index(int(b)) for b in bits])
            bits = "/".join(str(int(b)) for b in bits)
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


def _score_rows(units, names, metric, candidates):
    rows = []
    for n in names:
        have = {int(b): v.get(metric) for b, v in units[n]["weight"].items() if v.get(metric) is not None}
        if not have:
            raise ValueError(f"vidit-q: the sensitivity of {n} has no {metric} entry")
        row = []
        for b in candidates:
            near = min(have, key=lambda h: (abs(h - b), -h))  # an unmeasured width: the nearest measured one
            row.append(min(float(have[near]), 120.0))  # an exact (inf dB) result caps at float32's own noise
        rows.append(row)
    return rows


def mp_assignment(sensitivity: dict, budget: float, candidates=(4, 8), tolerance: float = 0.02, *,
                  search: str = "paper") -> dict:
    """``{site: bits}`` from a ``jdq sensitivity`` result (``{site: [bits per time group]}`` for a time-grouped one).

    ``search="paper"``: per metric (SSIM: content, SQNR: quality), the units' widths maximising
    their summed score, each metric's units with the budget (size-weighted mean of ``budget`` ±
    ``tolerance``) on their own; ``"noise"``: one program over every unit minimising the summed
    output noise power, the mean in ``[budget − 2·tolerance, budget]``. Units the plan keeps in
    floating point (the adaLN group) are left out. Unmeasured widths of a unit fall back to the
    nearest measured one below (or above).
    """
    if search not in ("paper", "noise"):
        raise ValueError(f"vidit-q: mp_search must be 'paper' or 'noise', got {search!r}")
    units = {n: u for n, u in sensitivity["units"].items() if u.get("weight") and u.get("group") != "adaln"}
    if not units:
        raise ValueError("vidit-q: the sensitivity has no quantized unit with weight measurements")
    timed = [n for n, u in units.items() if "time_group" in u]
    if timed and len(timed) != len(units):
        raise ValueError("vidit-q: the sensitivity mixes time-grouped and whole-trajectory units")
    size = {n: float(u["weight_size"]) * (len(u["steps"]) if timed else 1) for n, u in units.items()}
    chosen = {}
    if search == "paper":
        for metric in ("ssim", "sqnr"):
            names = [n for n, u in units.items() if u["metric"] == metric]
            if names:
                bits = Q.allocate_bits(_score_rows(units, names, metric, candidates), [size[n] for n in names],
                                       [list(candidates)] * len(names), budget, tolerance)
                chosen.update(zip(names, bits))
    else:
        names = list(units)
        noise = [[-(10.0 ** (-v / 10.0)) for v in row] for row in _score_rows(units, names, "sqnr", candidates)]
        bits = Q.allocate_bits(noise, [size[n] for n in names], [list(candidates)] * len(names), budget - tolerance,
                               tolerance)
        chosen.update(zip(names, bits))
    if not timed:
        return {site: int(b) for n, b in chosen.items() for site in units[n]["sites"]}
    n_groups = 1 + max(int(u["time_group"]) for u in units.values())
    out: dict[str, list] = {}
    for n, b in chosen.items():
        for site in units[n]["sites"]:
            out.setdefault(site, [None] * n_groups)[int(units[n]["time_group"])] = int(b)
    missing = sorted(s for s, v in out.items() if None in v)
    if missing:
        raise ValueError(f"vidit-q: the time-grouped sensitivity lacks some time groups of {missing[:3]}")
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
            opts["weight_bits"] = mp_assignment(json.load(f), float(opts["mp_budget"]), tuple(opts["mp_candidates"]),
                                                search=opts.get("mp_search") or "paper")
    return opts


def prepare(plan, stats, model, **opts):
    """Linked statistics (both operands' channel maxima) → state; the model's own parameters."""
    opts.pop("sampler", None), opts.pop("cond", None)
    return plan.init(Q.link_stats(stats) if stats else stats), model.params


DESCRIPTION = ("ViDiT-Q: asymmetric per-channel weights, per-token dynamic inputs, (timestep-aware) channel "
               "balancing, metric-decoupled mixed precision")


register(Recipe("vidit-q", DESCRIPTION, rules, calibrated=True, prepare=prepare, calibration=calibration, tune=tune,
                options=OPTIONS))
