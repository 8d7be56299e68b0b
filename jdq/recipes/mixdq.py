"""MixDQ (arXiv 2405.17873; thu-nics/MixDQ): BOS-aware cross-attention, metric-decoupled mixed precision by integer programming.

``mixdq`` (options, the paper's defaults and their source):

* ``wbits`` / ``abits`` = 8 / 8 (the paper's plans: W8A8, W4A8 and mixed weights at 3.66 / 4.0
  average bits, ``final_config/``): weights symmetric min-max per output channel, activations one
  static min-max range per tensor (``sdxl_turbo.yaml``: ``running_stat``), every linear in the
  blocks (attention matmuls in floating point);
* ``bos`` = ``True``: BOS-aware cross-attention (:mod:`jdq.quant.bos`): the first text token's K
  and V are floating-point constants computed once from the unquantized model, the ``to_k`` /
  ``to_v`` inputs are calibrated on the other tokens. No-op on models without cross-attention;
* ``mp_budget`` (e.g. 3.66 or 4.0; ``None``: uniform ``wbits``) with ``sensitivity`` (a
  ``jdq sensitivity --recipe mixdq`` JSON): weight candidates {2, 4, 8} for content layers (FFN,
  cross-attention; scored by SSIM of images) and {4, 8} for quality layers (SQNR of the output),
  one exact integer program per group (:func:`jdq.quant.allocate_bits`, tolerance 0.02) with the
  budget split ``B̄_q = B̄(1 + r)/(k·r + 1)``, ``B̄_c = k·B̄_q`` (``r`` = content / quality
  parameters) over ``k ∈ linspace(0.46, 1.36, 10)`` and ``B̄ ∈ linspace(target − 0.3, target, 10)``,
  splits with ``B̄_q ∉ [4, 8]`` or ``B̄_c ∉ [2, 8]`` dropped; the distinct solutions (overall mean
  at most the target plus the tolerance) are ranked by the pixel MSE of their images against
  the FP images (``rank_samples`` samples at guidance ``rank_guidance``, activations in float),
  the best kept (``weight_bits``, filled in by ``tune``);
* ``act_budget`` (e.g. 7.77; ``None``: uniform ``abits``): activation candidates {4, 8}, one
  program per metric group at that budget (weighted by input width), after the ``act_protect``
  = 1 % most sensitive activation layers of each group (lowest 8-bit score) are kept in floating
  point (``act_sensitivie_a8_1%.pt``); ``act_bits`` holds the result (``0``: floating point). As
  in the paper the activation configurations are ranked by pixel MSE too, with the chosen weight
  assignment fixed: the budget-split grid of the weights, over the two groups' activations
  (both group budgets in [4, 8]), gives the candidates;
* ``ranking`` (filled in by ``tune``): the record of both rankings, every candidate with its pixel
  MSE, mean bits and layers per width, and the index chosen (the argmin), for the report;
* beyond the paper (off by default): ``mp_search = "noise"`` replaces the per-group programs
  over summed SSIM / summed SQNR-in-dB by one program over all layers that minimises the summed
  *output noise power* ``Σ 10^(−SQNR/10)`` (the noise of independent perturbations adds; a sum
  of decibels multiplies noise powers, so it pays for one layer's tiny noise with another's large
  one), candidates over ``B̄ ∈ linspace(target − 0.3, target, 10)`` (each mean at most its B̄);
  ``mp_candidates`` (e.g.
  ``(3, 4, 5, 6, 8)``) replaces the paper's widths for every layer; ``rank_uniform`` adds the
  uniform assignment at the target (when it is a candidate width) to the ranking, so the choice
  is never worse than uniform on the ranking samples;
* calibration: MixDQ calibrates 32 prompts of its one-step sampler; here every step of 32 samples.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np

from jdq import quant as Q
from jdq.quant.bos import bos_aware_rules, bos_stats, merge_bos_stats
from jdq.recipes.core import BLOCKS, Recipe, model_operands, register
CONTENT_W = (2, 4, 8)
QUALITY_W = (4, 8)
ACT_CANDIDATES = (4, 8)
K_GRID = tuple(np.linspace(0.46, 1.36, 10).tolist())
TOLERANCE = 0.02
#: Widths a ranking plan can select (weights; activations add floating point).
RANK_W = (2, 3, 4, 5, 6, 8)
SEARCHES = ("paper", "noise")
OPTIONS = dict(wbits=8, abits=8, bos=True, mp_budget=None, act_budget=None, act_protect=0.01, sensitivity=None,
               rank_samples=8, rank_guidance=1.0, weight_bits=None, act_bits=None, mp_search="paper",
               mp_candidates=None, rank_uniform=False, ranking=None)


def weight_cast(bits):
    """Symmetric min-max integer weights per output channel."""
    return Q.cast(f"int{bits}", granularity="row")


def act_cast(bits):
    """One static min-max range per tensor."""
    return Q.cast(f"int{bits}", granularity="tensor", static=True, symmetric=False)


def rules(wbits=8, abits=8, bos=True, mp_budget=None, act_budget=None, act_protect=0.01, sensitivity=None,
          rank_samples=8, rank_guidance=1.0, weight_bits=None, act_bits=None, mp_search="paper", mp_candidates=None,
          rank_uniform=False, ranking=None):
    """The rules of a MixDQ plan (see the module docstring for the options)."""
    out = []
    if bos:
        out += bos_aware_rules(act_cast(abits), None)
    for site, b in sorted((weight_bits or {}).items()):
        out.append(Q.rule(f"re:{re.escape(site)}", weight_cast(int(b)), roles=("weight",), name=f"{site} W{b}"))
    for site, b in sorted((act_bits or {}).items()):
        x = None if int(b) == 0 else act_cast(int(b))
        out.append(Q.rule(f"re:{re.escape(site)}", x, roles=("act", "post_gelu"), name=f"{site} A{b or 'FP'}"))
    out += [Q.rule(BLOCKS, weight_cast(wbits), roles=("weight",), name=f"int{wbits} weights per output channel"),
            Q.rule(BLOCKS, act_cast(abits), roles=("act", "post_gelu"), name=f"int{abits} inputs per tensor (static)")]
    return out


def calibration(**opts):
    """32 samples, every step, range statistics."""
    from jdq.quant.calibrate import CalibrationSettings

    return CalibrationSettings(samples=32, steps="all", stats=("range",))


def budget_splits(target: float, r: float, k_grid=K_GRID):
    """MixDQ's (B̄_content, B̄_quality) pairs over the k and B̄ grids, out-of-range splits dropped."""
    out = []
    for avg in np.linspace(target - 0.3, target, 10):
        for k in k_grid:
            bq = avg * (1 + r) / (k * r + 1)
            bc = k * bq
            if 4 <= bq <= 8 and 2 <= bc <= 8:
                out.append((float(bc), float(bq)))
    return out


def _scores(units, names, side, metric, candidates):
    rows = []
    for n in names:
        have = {int(b): v.get(metric) for b, v in units[n].get(side, {}).items()}
        row = []
        for b in candidates:
            if have.get(b) is None:
                raise ValueError(f"mixdq: the sensitivity of {n} ({side}s) has no {b}-bit {metric} entry (has "
                                 f"{sorted(k for k, v in have.items() if v is not None)}); run jdq sensitivity with "
                                 f"--{side}-bits including {b}")
            row.append(min(float(have[b]), 120.0))  # inf dB (exact) caps at float32's own noise floor
        rows.append(row)
    return rows


def noise_scores(units, names, side, candidates):
    """``−10^(−SQNR/10)`` per unit and width: minus the output noise power each alone adds (relative to the signal)."""
    return [[-(10.0 ** (-v / 10.0)) for v in row] for row in _scores(units, names, side, "sqnr", candidates)]


def _mean(choice, size):
    return sum(b * size[n] for n, b in choice.items()) / sum(size[n] for n in choice)


def _expand(units, choice):
    return {site: int(b) for n, b in choice.items() for site in units[n]["sites"]}


def _split_solutions(units, names_c, names_q, side, scores_c, scores_q, cands_c, cands_q, target, splits, tolerance):
    """Per-group programs over the budget splits: the distinct unit choices whose overall mean is at most the target."""
    size = {n: float(max(units[n][f"{side}_size"], 1)) for n in names_c + names_q}
    seen, out = set(), []
    for bc, bq in splits:
        try:
            got_c = Q.allocate_bits(scores_c, [size[n] for n in names_c], [cands_c] * len(names_c), bc,
                                    tolerance) if names_c else ()
            got_q = Q.allocate_bits(scores_q, [size[n] for n in names_q], [cands_q] * len(names_q), bq,
                                    tolerance) if names_q else ()
        except Q.InfeasibleAllocation:
            continue
        choice = {**dict(zip(names_c, got_c)), **dict(zip(names_q, got_q))}
        key = tuple(sorted(choice.items()))
        if _mean(choice, size) <= target + tolerance and key not in seen:  # the B̄ grid reaches 0.3 below
            seen.add(key)
            out.append(choice)
    return out


def _joint_solutions(units, names, side, candidates, target, tolerance):
    """``mp_search="noise"``: one program over every unit minimising the summed output noise, per B̄ of the grid.

    The mean is at most each B̄ (within ``[B̄ − 2·tolerance, B̄]``).
    """
    size = {n: float(max(units[n][f"{side}_size"], 1)) for n in names}
    scores = noise_scores(units, names, side, candidates)
    seen, out = set(), []
    for avg in np.linspace(target - 0.3, target, 10)[::-1]:
        try:
            # a budget is an upper bound here: the mean lies in [B̄ − 2·tolerance, B̄]
            bits = Q.allocate_bits(scores, [size[n] for n in names], [candidates] * len(names), float(avg) - tolerance,
                                   tolerance)
        except Q.InfeasibleAllocation:
            continue
        choice = dict(zip(names, bits))
        key = tuple(sorted(choice.items()))
        if key not in seen:
            seen.add(key)
            out.append(choice)
    return out


def weight_candidates(sensitivity: dict, target: float, tolerance: float = TOLERANCE, *, search: str = "paper",
                      candidates=None, uniform: bool = False) -> list[dict[str, int]]:
    """The distinct per-site weight assignments to rank (overall mean at most the target).

    ``search="paper"``: MixDQ's budget-split grid, one program per metric group (content widths
    {2, 4, 8} and quality {4, 8}, or ``candidates`` for both); ``"noise"``: one program over all
    layers minimising the summed output noise power, per B̄ of the grid. ``uniform``: the uniform
    assignment at ``target`` (when it is a candidate width) comes first.
    """
    if search not in SEARCHES:
        raise ValueError(f"mixdq: mp_search must be one of {SEARCHES}, got {search!r}")
    units = {n: u for n, u in sensitivity["units"].items() if u.get("weight")}
    content = [n for n, u in units.items() if u["metric"] == "ssim"]
    quality = [n for n, u in units.items() if u["metric"] == "sqnr"]
    cc = tuple(candidates) if candidates is not None else CONTENT_W
    cq = tuple(candidates) if candidates is not None else QUALITY_W
    if search == "paper":
        size = lambda names: float(sum(units[n]["weight_size"] for n in names))  # noqa: E731
        r = size(content) / size(quality) if quality and size(quality) else 0.0
        sols = _split_solutions(units, content, quality, "weight", _scores(units, content, "weight", "ssim", cc),
                                _scores(units, quality, "weight", "sqnr", cq), cc, cq, target, budget_splits(target, r),
                                tolerance)
    else:
        cands = tuple(sorted(set(cc) | set(cq)))
        sols = _joint_solutions(units, content + quality, "weight", cands, target, tolerance)
    out = [_expand(units, c) for c in sols]
    if uniform and float(target).is_integer() and int(target) in set(cc) | set(cq):
        flat = {site: int(target) for u in units.values() for site in u["sites"]}
        out = [flat] + [c for c in out if c != flat]
    if not out:
        raise ValueError(f"mixdq: no budget split has a feasible allocation at a mean of at most {target} weight bits")
    return out


def _protected(units, protect):
    """Names of the ``protect`` fraction most sensitive activation units of each metric group (lowest 8-bit score)."""
    out = set()
    for metric in ("ssim", "sqnr"):
        names = [n for n, u in units.items() if u["metric"] == metric and u.get("act")]
        if not names or protect <= 0:
            continue
        a8 = [float(units[n]["act"]["8"][metric]) for n in names]
        out |= {names[i] for i in np.argsort(a8, kind="stable")[:math.ceil(protect * len(names))]}
    return out


def act_assignment(sensitivity: dict, budget: float | None, protect: float = 0.01,
                   tolerance: float = TOLERANCE) -> dict[str, int]:
    """``{site: bits}`` of the activations (``0``: floating point): the protected layers, then one program per group."""
    units = sensitivity["units"]
    out = {}
    protected = _protected(units, protect)
    for n in protected:
        out.update({s: 0 for s in units[n]["sites"]})
    for metric in ("ssim", "sqnr"):
        rest = [n for n, u in units.items() if u["metric"] == metric and u.get("act") and n not in protected]
        if budget is None or not rest:
            continue
        bits = Q.allocate_bits(_scores(units, rest, "act", metric, ACT_CANDIDATES),
                               [max(units[n]["act_size"], 1) for n in rest], [ACT_CANDIDATES] * len(rest), budget,
                               tolerance)
        out.update({s: int(b) for n, b in zip(rest, bits) for s in units[n]["sites"]})
    return out


def act_candidates(sensitivity: dict, budget: float, protect: float = 0.01, tolerance: float = TOLERANCE, *,
                   search: str = "paper", uniform: bool = False) -> list[dict[str, int]]:
    """The distinct activation assignments to rank: protected units in float, the rest from the budget-split grid.

    The paper's per-group program at the budget (:func:`act_assignment`) comes first; then the
    grid's other splits (both group budgets in [4, 8]); ``search="noise"``: one program over all
    units minimising the summed output noise, per B̄ of the grid. ``uniform``: all remaining
    activations at the budget first (when it is a candidate width).
    """
    if search not in SEARCHES:
        raise ValueError(f"mixdq: mp_search must be one of {SEARCHES}, got {search!r}")
    units = {n: u for n, u in sensitivity["units"].items() if u.get("act")}
    protected = _protected(units, protect)
    content = [n for n, u in units.items() if u["metric"] == "ssim" and n not in protected]
    quality = [n for n, u in units.items() if u["metric"] == "sqnr" and n not in protected]
    fp = {s: 0 for n in protected for s in units[n]["sites"]}
    out = []
    if search == "paper":
        try:
            out.append(act_assignment(sensitivity, budget, protect, tolerance))
        except Q.InfeasibleAllocation:
            pass
        size = lambda names: float(sum(max(units[n]["act_size"], 1) for n in names))  # noqa: E731
        r = size(content) / size(quality) if quality else 0.0
        splits = [(bc, bq) for bc, bq in budget_splits(budget, r) if 4 <= bc <= 8]
        sols = _split_solutions(units, content, quality, "act", _scores(units, content, "act", "ssim", ACT_CANDIDATES),
                                _scores(units, quality, "act", "sqnr", ACT_CANDIDATES), ACT_CANDIDATES, ACT_CANDIDATES,
                                budget, splits, tolerance)
    else:
        sols = _joint_solutions(units, content + quality, "act", ACT_CANDIDATES, budget, tolerance)
    for c in sols:
        cand = {**fp, **_expand(units, c)}
        if cand not in out:
            out.append(cand)
    if uniform and float(budget).is_integer() and int(budget) in ACT_CANDIDATES:
        flat = {**fp, **{s: int(budget) for n in content + quality for s in units[n]["sites"]}}
        out = [flat] + [c for c in out if c != flat]
    if not out:
        raise ValueError(f"mixdq: no activation assignment has a mean of at most {budget} bits")
    return out


def ranking_plan(operands, weight_widths=RANK_W, act_widths=None):
    """A plan whose block linears' weights (and, with ``act_widths``, inputs) pick their width from the state.

    Option 0 of every stage is floating point, option ``i + 1`` is ``weight_widths[i]`` (or
    ``act_widths[i]``): one compiled sampler serves every candidate assignment.
    """
    from jdq.quant.select import selectable
    from jdq.quant.sensitivity import linear_sites

    pattern = "re:(" + "|".join(map(re.escape, linear_sites(operands))) + ")"
    out = [Q.rule(pattern, selectable(None, *[weight_cast(b) for b in weight_widths]), roles=("weight",))]
    if act_widths:
        out.append(Q.rule(pattern, selectable(None, *[act_cast(b) for b in act_widths]), roles=Q.ACTIVATION_ROLES))
    return Q.resolve(out + [Q.keep_float("*")], operands)


def ranking_state(plan, base, weight_bits=None, act_bits=None, default_weight=None, default_act=None,
                  weight_widths=RANK_W, act_widths=ACT_CANDIDATES):
    """``base`` with every site's option set to its width in ``weight_bits`` / ``act_bits`` (``0`` or absent: float)."""
    from jdq.quant.select import set_index

    def index(bits, widths, what):
        if not bits:
            return 0
        if int(bits) not in widths:
            raise ValueError(f"mixdq ranking: {what} width {bits} is not one of {tuple(widths)}")
        return 1 + tuple(widths).index(int(bits))

    state = dict(base)
    for key in plan.quantized_keys:
        op = plan.operand(key)
        if op.role == "weight":
            i = index((weight_bits or {}).get(op.site, default_weight), weight_widths, "weight")
        else:
            i = index((act_bits or {}).get(op.site, default_act), act_widths, "activation")
        state = set_index(state, [key], i)
    return state


def rank_by_pixel_mse(model, sampler, cond, candidates: list[dict[str, int]], *, side="weight", weight_bits=None,
                      default_weight=None, default_act=None, stats=None, samples=8, guidance=1.0, seed=0,
                      uncond=None):
    """Index of the candidate whose images are closest (pixel MSE) to the FP images, and every candidate's MSE.

    ``side="weight"``: ``candidates`` are weight assignments (activations in float);
    ``"act"``: activation assignments (``0``: float) with the weights at ``weight_bits`` (sites
    not listed: ``default_weight``), static per-tensor ranges from ``stats``. One compiled sampler
    serves every candidate (:func:`ranking_plan`). Ties go to the earlier candidate.
    """
    import jax
    import jax.numpy as jnp

    from jdq.sampling.generate import generate

    if side not in ("weight", "act"):
        raise ValueError(f"rank_by_pixel_mse: side must be 'weight' or 'act', got {side!r}")
    if not candidates:
        raise ValueError("rank_by_pixel_mse: no candidates to rank")
    if side == "act" and stats is None:
        raise ValueError("rank_by_pixel_mse: ranking activations needs the calibration statistics (stats=)")
    cond = jax.tree.map(lambda a: jnp.asarray(np.asarray(a)[:samples]), cond)
    operands = model_operands(model, cond)
    plan = ranking_plan(operands, RANK_W, ACT_CANDIDATES if side == "act" else None)
    base = plan.init(stats if side == "act" else {})
    kw = dict(sampler=sampler, guidance=guidance, seed=seed, progress=False, uncond=uncond)
    fp = generate(model, cond, **kw)
    mses = []
    for cand in candidates:
        if side == "weight":
            state = ranking_state(plan, base, cand, None, default_weight)
        else:
            state = ranking_state(plan, base, weight_bits, cand, default_weight, default_act)
        got = generate(model, cond, quant=plan.bind(state), **kw)
        mses.append(float(np.mean((np.asarray(got, np.float64) - fp) ** 2)))
    return int(np.argmin(mses)), mses


def describe(assignment: dict[str, int], sizes: dict[str, float] | None = None) -> dict:
    """Layers per width (``"0"``: float) and, with ``sizes``, the size-weighted mean width of an assignment."""
    out = {"layers_per_bits": {str(b): sum(1 for v in assignment.values() if v == b)
                               for b in sorted(set(assignment.values()))}}
    if sizes:
        known = [s for s in assignment if s in sizes]
        out["mean_bits"] = sum(assignment[s] * sizes[s] for s in known) / max(sum(sizes[s] for s in known), 1)
    return out


def _site_sizes(sens, side):
    out = {}
    for u in sens["units"].values():
        for s in u["sites"]:
            out[s] = float(max(u.get(f"{side}_size", 0), 1)) / len(u["sites"])
    return out


def tune(model, stats, sampler, cond, opts):
    """MixDQ's search: weight assignment (budget-split grid, pixel-MSE ranking), then the activation assignment.

    The rankings (every candidate's pixel MSE, mean bits and layers per width, the chosen index)
    are recorded in ``opts["ranking"]``.
    """
    opts = dict(opts)
    need_w = opts.get("mp_budget") is not None and opts.get("weight_bits") is None
    need_a = (opts.get("act_budget") is not None or opts.get("act_protect")) and opts.get("act_bits") is None
    if not (need_w or (need_a and opts.get("sensitivity"))):
        return opts
    if opts.get("sensitivity") is None:
        raise ValueError("mixdq: mp_budget / act_budget need sensitivity= (a `jdq sensitivity --recipe mixdq` JSON)")
    with open(opts["sensitivity"]) as f:
        sens = json.load(f)
    search = opts.get("mp_search") or "paper"
    ranking = dict(opts.get("ranking") or {})
    kw = dict(samples=int(opts["rank_samples"]), guidance=float(opts["rank_guidance"]))
    if need_w:
        cands = weight_candidates(sens, float(opts["mp_budget"]), search=search,
                                  candidates=opts.get("mp_candidates"), uniform=bool(opts.get("rank_uniform")))
        mses = None
        best = 0
        if len(cands) > 1 and sampler is not None:
            best, mses = rank_by_pixel_mse(model, sampler, cond, cands, **kw)
        opts["weight_bits"] = cands[best]
        sizes = _site_sizes(sens, "weight")
        ranking["weight"] = {"chosen": best, "candidates": [dict(describe(c, sizes), mse=None if mses is None else mses[i])
                                                            for i, c in enumerate(cands)]}
    if need_a:
        if opts.get("act_budget") is None:
            opts["act_bits"] = act_assignment(sens, None, float(opts.get("act_protect") or 0.0))
        else:
            cands = act_candidates(sens, float(opts["act_budget"]), float(opts.get("act_protect") or 0.0),
                                   search=search, uniform=bool(opts.get("rank_uniform")))
            mses = None
            best = 0
            if len(cands) > 1 and sampler is not None and stats:
                best, mses = rank_by_pixel_mse(model, sampler, cond, cands, side="act", weight_bits=opts.get("weight_bits"),
                                               default_weight=int(opts["wbits"]), default_act=int(opts["abits"]),
                                               stats=stats, **kw)
            opts["act_bits"] = cands[best]
            sizes = _site_sizes(sens, "act")
            ranking["act"] = {"chosen": best, "candidates": [dict(describe(c, sizes), mse=None if mses is None else mses[i])
                                                             for i, c in enumerate(cands)]}
    if ranking:
        opts["ranking"] = ranking
    return opts


def prepare(plan, stats, model, *, sampler=None, cond=None, **opts):
    """State from the calibration statistics, plus the BOS K/V constants where the model has cross-attention."""
    stats = dict(stats or {})
    if opts.get("bos", True) and any(plan.operand(k).site.endswith((".to_k", ".to_v")) and ".attn2" in k
                                     for k in plan.quantized_keys):
        import jax.numpy as jnp

        import jax

        from jdq.sampling.generate import Denoiser, sample_shape

        one = jax.tree.map(lambda a: jnp.asarray(np.asarray(a)), cond)
        n = int(np.shape(jax.tree.leaves(one)[0])[0])
        x = jnp.zeros((n,) + sample_shape(model), jnp.float32)
        stats = merge_bos_stats(stats, bos_stats(Denoiser(model, model.family), model.params, x,
                                                 jnp.zeros((n,), jnp.float32), one))
    return plan.init(stats), model.params


DESCRIPTION = ("MixDQ: per-channel weights, static per-tensor inputs, BOS-aware cross-attention, metric-decoupled "
               "mixed precision by integer programming")


register(Recipe("mixdq", DESCRIPTION, rules, calibrated=True, prepare=prepare, calibration=calibration, tune=tune,
                options=OPTIONS))
