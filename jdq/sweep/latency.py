"""Plans priced by the accelerator cost model (:mod:`jdq.hw`): per point, and per layer for allocation.

The cost model counts the denoiser's GEMMs and attention matmuls (:mod:`jdq.hw.cost`); each
workload entry is one matmul site, and a step's latency and energy are the sums over entries,
so per-site costs are additive and :func:`jdq.quant.allocate` can bound or minimise them exactly.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import numpy as np

from jdq import hw
from jdq import quant as Q


def preset(name: str):
    """A hardware preset by name (``jdq.hw.presets``); unknown names raise ``KeyError`` listing the known ones."""
    key = name.strip().lower().replace("-", "_")
    if key not in hw.presets.PRESETS:
        raise KeyError(f"unknown hardware preset {name!r}; known: {sorted(hw.presets.PRESETS)}")
    return hw.presets.get(key)


_evaluate = jax.jit(hw.evaluate)


def plan_cost(hardware, operands: Sequence[Q.Operand], plan: Q.Plan, state: Mapping) -> dict:
    """``{"seconds", "energy_j"}`` of one model call with ``plan`` (outlier fractions from ``state``) on ``hardware``."""
    wl = hw.from_operands(operands, hw.workload.from_plan(plan, state))
    total = _evaluate(hardware, wl).total()
    return {"seconds": float(total.seconds), "energy_j": float(total.energy_j)}


def site_costs(hardware, operands: Sequence[Q.Operand], formats: Sequence[hw.OperandFormat | None],
               metric: str = "seconds") -> dict[str, np.ndarray]:
    """Per matmul site, the cost (``"seconds"`` or ``"energy_j"``) of one call with all its operands in each format.

    Returns ``{site: [len(formats)]}``; a ``None`` format keeps the site in BF16. The operands of
    one site (weight and activation, or the two attention operands) take the same format.
    """
    if metric not in ("seconds", "energy_j"):
        raise ValueError(f"site_costs: metric must be 'seconds' or 'energy_j', got {metric!r}")
    per_format = []
    for fmt in formats:
        f = fmt or hw.workload.FLOAT16
        wl = hw.from_operands(operands, lambda op, f=f: f)
        per_format.append(np.asarray(getattr(_evaluate(hardware, wl), metric), np.float64))
    sites = list(wl.names)
    table = np.stack(per_format, axis=1)  # [entries, formats]
    return {name: table[i] for i, name in enumerate(sites)}


def allocate_latency(scores, costs, budget: float, *, objective: str = "score", score_floor: float | None = None,
                     cost_name: str = "latency"):
    """One option per layer maximising the summed score with the summed cost (latency or energy) ``<= budget``.

    ``costs[i][j]``: the cost-model cost of layer ``i`` in option ``j`` (:func:`site_costs`); with
    ``objective="latency"`` the summed cost is minimised instead, at a summed score ``>= score_floor``
    (then ``budget`` may be ``None``). Exact (:func:`jdq.quant.allocate`); returns its :class:`~jdq.quant.Allocation`.
    """
    rows = [np.asarray(r, np.float64) for r in costs]
    # jdq.quant.allocate's tolerances are absolute for quantities below 1, and a latency in seconds is
    # ~1e-6: solve in units of the largest entry, so every bound keeps its full relative precision
    unit = max(float(np.max(np.abs(r))) for r in rows) or 1.0
    bounds = {}
    if budget is not None:
        bounds[cost_name] = float(budget) / unit
    if score_floor is not None:
        bounds["score"] = (float(score_floor), None)
    res = Q.allocate(scores, {cost_name: [r / unit for r in rows]}, bounds,
                     objective="score" if objective == "score" else cost_name)
    totals = dict(res.totals)
    totals[cost_name] = float(sum(r[j] for r, j in zip(rows, res.choice)))
    return Q.Allocation(res.choice, totals[cost_name] if objective != "score" else res.objective, totals)


def cost_constraint(costs, budget: float, choices=None):
    """``constraint(genome) -> bool`` for :func:`jdq.quant.evolution_search`: the summed cost-model cost within ``budget``.

    ``costs[i][j]`` is gene ``i``'s cost at its ``j``-th choice; ``choices`` (the search's choice
    lists) map a genome's values back to indices (default: the genome holds indices).
    """
    rows = [np.asarray(r, np.float64) for r in costs]
    lookup = None if choices is None else [{v: j for j, v in enumerate(c)} for c in choices]

    def constraint(genome):
        idx = genome if lookup is None else [lookup[i][v] for i, v in enumerate(genome)]
        return float(sum(r[j] for r, j in zip(rows, idx))) <= budget

    return constraint
