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
  point (``act_sensitivie_a8_1%.pt``); ``act_bits`` holds the result (``0``: floating point). The
  paper ranks activation configurations by pixel MSE too; here the program's optimum is taken;
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
OPTIONS = dict(wbits=8, abits=8, bos=True, mp_budget=None, act_budget=None, act_protect=0.01, sensitivity=None,
               rank_samples=8, rank_guidance=1.0, weight_bits=None, act_bits=None)


def weight_cast(bits):
    """Symmetric min-max integer weights per output channel."""
    return Q.cast(f"int{bits}", granularity="row")


def act_cast(bits):
    """One static min-max range per tensor."""
    return Q.cast(f"int{bits}", granularity="tensor", static=True, symmetric=False)


def rules(wbits=8, abits=8, bos=True, mp_budget=None, act_budget=None, act_protect=0.01, sensitivity=None,
          rank_samples=8, rank_guidance=1.0, weight_bits=None, act_bits=None):
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
        have = {int(b): v[metric] for b, v in units[n][side].items()}
        row = []
        for b in candidates:
            if b not in have:
                raise ValueError(f"mixdq: the sensitivity of {n} ({side}s) has no {b}-bit entry (has {sorted(have)}); "
                                 f"run jdq sensitivity with --{side.replace('act', 'act')}-bits including {b}")
            row.append(min(float(have[b]), 120.0))  # inf dB (exact) caps at float32's own noise floor
        rows.append(row)
    return rows


def weight_candidates(sensitivity: dict, target: float, tolerance: float = TOLERANCE) -> list[dict[str, int]]:
    """The distinct per-site weight assignments of MixDQ's budget-split grid (overall mean at most the target)."""
    units = sensitivity["units"]
    content = [n for n, u in units.items() if u["metric"] == "ssim"]
    quality = [n for n, u in units.items() if u["metric"] == "sqnr"]
    size = lambda names: float(sum(units[n]["weight_size"] for n in names))  # noqa: E731
    sc, sq = _scores(units, content, "weight", "ssim", CONTENT_W), _scores(units, quality, "weight", "sqnr", QUALITY_W)
    r = size(content) / size(quality) if quality and size(quality) else 0.0
    seen, out = set(), []
    for bc, bq in budget_splits(target, r):
        try:
            got_c = Q.allocate_bits(sc, [units[n]["weight_size"] for n in content], [CONTENT_W] * len(content),
                                    bc, tolerance) if content else ()
            got_q = Q.allocate_bits(sq, [units[n]["weight_size"] for n in quality], [QUALITY_W] * len(quality),
                                    bq, tolerance) if quality else ()
        except Q.InfeasibleAllocation:
            continue
        choice = {**dict(zip(content, got_c)), **dict(zip(quality, got_q))}
        total = sum(units[n]["weight_size"] for n in choice)
        mean = sum(b * units[n]["weight_size"] for n, b in choice.items()) / total
        key = tuple(sorted(choice.items()))
        if mean <= target + tolerance and key not in seen:  # the B̄ grid reaches 0.3 below the target
            seen.add(key)
            out.append({site: int(b) for n, b in choice.items() for site in units[n]["sites"]})
    if not out:
        raise ValueError(f"mixdq: no budget split has a feasible allocation at a mean of at most {target} weight bits")
    return out


def act_assignment(sensitivity: dict, budget: float | None, protect: float = 0.01,
                   tolerance: float = TOLERANCE) -> dict[str, int]:
    """``{site: bits}`` of the activations (``0``: floating point): the protected layers, then one program per group."""
    units = sensitivity["units"]
    out = {}
    for metric in ("ssim", "sqnr"):
        names = [n for n, u in units.items() if u["metric"] == metric and u.get("act")]
        if not names:
            continue
        a8 = [float(units[n]["act"]["8"][metric]) for n in names]
        n_protect = math.ceil(protect * len(names)) if protect > 0 else 0
        protected = {names[i] for i in np.argsort(a8, kind="stable")[:n_protect]}
        for n in protected:
            out.update({s: 0 for s in units[n]["sites"]})
        rest = [n for n in names if n not in protected]
        if budget is None or not rest:
            continue
        bits = Q.allocate_bits(_scores(units, rest, "act", metric, ACT_CANDIDATES),
                               [max(units[n]["act_size"], 1) for n in rest], [ACT_CANDIDATES] * len(rest), budget,
                               tolerance)
        out.update({s: int(b) for n, b in zip(rest, bits) for s in units[n]["sites"]})
    return out


def rank_by_pixel_mse(model, sampler, cond, candidates: list[dict[str, int]], *, samples=8, guidance=1.0, seed=0):
    """Index of the candidate weight assignment whose images are closest (pixel MSE) to the FP images, and all MSEs.

    One compiled sampler serves every candidate (:func:`jdq.quant.sensitivity.selectable`).
    """
    import jax
    import jax.numpy as jnp

    from jdq.quant.sensitivity import linear_sites, pick, selectable
    from jdq.sampling.generate import generate

    cond = jax.tree.map(lambda a: jnp.asarray(np.asarray(a)[:samples]), cond)
    operands = model_operands(model, cond)
    sites = linear_sites(operands)
    plan = Q.resolve([Q.rule("re:(" + "|".join(map(re.escape, sites)) + ")",
                             selectable([weight_cast(b) for b in CONTENT_W]), roles=("weight",)),
                      Q.keep_float("*")], operands)
    base = plan.init({})
    kw = dict(sampler=sampler, guidance=guidance, seed=seed, progress=False)
    fp = generate(model, cond, **kw)
    mses = []
    for cand in candidates:
        state = pick(plan, base, {s: CONTENT_W.index(b) for s, b in cand.items()})
        got = generate(model, cond, quant=plan.bind(state), **kw)
        mses.append(float(np.mean((got - fp) ** 2)))
    return int(np.argmin(mses)), mses


def tune(model, stats, sampler, cond, opts):
    """MixDQ's search: weight assignment (budget-split grid, pixel-MSE ranking), then the activation assignment."""
    opts = dict(opts)
    need_w = opts.get("mp_budget") is not None and opts.get("weight_bits") is None
    need_a = (opts.get("act_budget") is not None or opts.get("act_protect")) and opts.get("act_bits") is None
    if not (need_w or (need_a and opts.get("sensitivity"))):
        return opts
    if opts.get("sensitivity") is None:
        raise ValueError("mixdq: mp_budget / act_budget need sensitivity= (a `jdq sensitivity --recipe mixdq` JSON)")
    with open(opts["sensitivity"]) as f:
        sens = json.load(f)
    if need_w:
        cands = weight_candidates(sens, float(opts["mp_budget"]))
        if len(cands) > 1 and sampler is not None:
            best, _ = rank_by_pixel_mse(model, sampler, cond, cands, samples=int(opts["rank_samples"]),
                                        guidance=float(opts["rank_guidance"]))
        else:
            best = 0
        opts["weight_bits"] = cands[best]
    if need_a:
        opts["act_bits"] = act_assignment(sens, opts.get("act_budget"), float(opts.get("act_protect") or 0.0))
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
