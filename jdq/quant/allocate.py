"""Exact choice of one option per layer by integer linear programming (MixDQ's bit allocation, generalised).

Layer ``i`` has options ``j = 0 … J_i − 1`` (their number may differ per layer). Each option has a
score ``s_ij`` (e.g. a sensitivity: SQNR, SSIM, −MSE; higher is better) and any number of additive
costs ``c^r_ij`` (bits × size for an average bit width, latency or energy from the cost model, bytes
…). :func:`allocate` solves, exactly (``scipy.optimize.milp``, HiGHS branch and bound run to a zero
gap),

    maximise  Σ_ij s_ij x_ij            (or minimise Σ_ij c^o_ij x_ij for a cost named ``objective``)
    s.t.      Σ_j x_ij = 1               for every layer i            (one option per layer)
              lo_r ≤ Σ_ij c^r_ij x_ij ≤ hi_r   for every bounded quantity r   (``budget``)
              x_ij ∈ {0, 1}

where the summed score can be bounded too (``budget={"score": (s_min, None)}``), so "least latency at
a quality floor" is ``objective="latency"``. Costs must add over layers; a latency that does not
(overlapping layers) belongs in the evolutionary search (:mod:`jdq.quant.evolution`) instead.

:func:`allocate_bits` is MixDQ's program (``mixed_precision_scripts/optimize/integer_programming.py``
of thu-nics/MixDQ, solved there with OR-Tools SCIP): the size-weighted mean bit width within
``tolerance`` of ``avg_bits`` (``|Σ b_ij w_i x_ij − B̄ Σ w_i| ≤ 0.02 Σ w_i``, tolerance 0.02 as
there), maximising the summed score. MixDQ solves it per layer group (content / quality) with its
own budget; call it once per group.

Exactness: the objective is divided by its largest magnitude before solving, and HiGHS runs with
``mip_rel_gap = mip_abs_gap = 0``, so the returned choice is optimal up to HiGHS's feasibility
tolerances (1e-6 relative to that scale); the chosen options are then checked in float64 against
every bound, and a bound the solver met only within its tolerance is tightened and solved again.
Among equally good choices the solver's (deterministic) pick is returned.
"""

from __future__ import annotations

import math
import warnings
from typing import Mapping, NamedTuple, Sequence

import numpy as np

#: Default tolerance of the mean bit width (MixDQ's integer program: 0.02 · Σ w_i).
TOLERANCE = 0.02
#: Slack by which a bound is tightened when the solver met it only within its feasibility tolerance.
_TIGHTEN = 1e-6


class InfeasibleAllocation(ValueError):
    """No choice of one option per layer satisfies the bounds."""


class Allocation(NamedTuple):
    """Result of :func:`allocate`: the chosen option index per layer, the objective, and every summed quantity."""

    choice: tuple[int, ...]
    objective: float
    totals: dict[str, float]


def _ragged(values, name, lengths=None):
    rows = []
    for i, row in enumerate(values):
        row = np.asarray(row, np.float64).reshape(-1)
        if row.size == 0:
            raise ValueError(f"allocate: {name}[{i}] is empty; every layer needs at least one option")
        if lengths is not None and row.size != lengths[i]:
            raise ValueError(f"allocate: {name}[{i}] has {row.size} options, scores[{i}] has {lengths[i]}")
        if not np.all(np.isfinite(row)):
            raise ValueError(f"allocate: {name}[{i}] is not finite: {row.tolist()}")
        rows.append(row)
    if not rows:
        raise ValueError(f"allocate: {name} has no layers")
    if lengths is not None and len(rows) != len(lengths):
        raise ValueError(f"allocate: {name} has {len(rows)} layers, scores has {len(lengths)}")
    return rows


def _bounds(name, bound):
    if isinstance(bound, (int, float, np.integer, np.floating)):
        lo, hi = -math.inf, float(bound)
    else:
        try:
            lo, hi = bound
        except (TypeError, ValueError):
            raise ValueError(f"allocate: budget[{name!r}] must be an upper bound or a (lower, upper) pair, "
                             f"got {bound!r}") from None
        lo = -math.inf if lo is None else float(lo)
        hi = math.inf if hi is None else float(hi)
    if math.isnan(lo) or math.isnan(hi) or lo > hi:
        raise ValueError(f"allocate: budget[{name!r}] = ({lo}, {hi}) is empty")
    return lo, hi


def allocate(scores: Sequence[Sequence[float]], costs: Mapping[str, Sequence[Sequence[float]]] | None = None,
             budget: Mapping[str, object] | None = None, *, objective: str = "score",
             time_limit: float | None = None) -> Allocation:
    """One option per layer maximising the summed score (or minimising the cost ``objective``) within ``budget``.

    ``scores[i][j]`` and ``costs[name][i][j]`` are per layer and option (ragged); ``budget[name]``
    is an upper bound or a ``(lower, upper)`` pair (``None`` for no bound) on a summed cost or on
    ``"score"``. Raises :class:`InfeasibleAllocation` when no choice fits.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_array

    rows = {"score": _ragged(scores, "scores")}
    lengths = [r.size for r in rows["score"]]
    for name, value in (costs or {}).items():
        if name == "score":
            raise ValueError("allocate: 'score' is reserved for the scores; name the cost differently")
        rows[name] = _ragged(value, f"costs[{name!r}]", lengths)
    if objective not in rows:
        raise ValueError(f"allocate: objective {objective!r} is neither 'score' nor a cost ({sorted(rows)[1:]})")
    bounds = {}
    for name, bound in (budget or {}).items():
        if name not in rows:
            raise ValueError(f"allocate: budget names {name!r}, which is neither 'score' nor a cost ({sorted(rows)})")
        bounds[name] = _bounds(name, bound)

    flat = {name: np.concatenate(r) for name, r in rows.items()}
    n_layers, n_vars = len(lengths), sum(lengths)
    layer_of = np.repeat(np.arange(n_layers), lengths)
    one_each = csr_array((np.ones(n_vars), (layer_of, np.arange(n_vars))), shape=(n_layers, n_vars))

    c = -flat["score"] if objective == "score" else flat[objective].copy()
    top = np.max(np.abs(c))
    c = c / top if top > 0 else c
    # an infeasibility that a lone bound already proves gets a precise message
    for name, (lo, hi) in bounds.items():
        least = sum(float(r.min()) for r in rows[name])
        most = sum(float(r.max()) for r in rows[name])
        if least > hi or most < lo:
            raise InfeasibleAllocation(f"allocate: the summed {name} ranges over [{least:.6g}, {most:.6g}] for any "
                                       f"choice, outside the budget [{lo:.6g}, {hi:.6g}]")

    # each bound is solved in units of its largest cost, so that costs of any magnitude (latencies in
    # seconds are ~1e-6) sit well above HiGHS's absolute feasibility tolerance (1e-6)
    unit = {name: float(np.max(np.abs(flat[name]))) or 1.0 for name in bounds}
    tighten = {name: 0.0 for name in bounds}
    for _ in range(3):
        constraints = [LinearConstraint(one_each, 1.0, 1.0)]
        for name, (lo, hi) in bounds.items():
            scale = unit[name]
            constraints.append(LinearConstraint(flat[name][None, :] / scale, (lo + tighten[name]) / scale,
                                                (hi - tighten[name]) / scale))
        options = {"mip_rel_gap": 0.0, "mip_abs_gap": 0.0}
        if time_limit is not None:
            options["time_limit"] = float(time_limit)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Unrecognized options", category=RuntimeWarning)
            res = milp(c, integrality=np.ones(n_vars), bounds=Bounds(0, 1), constraints=constraints, options=options)
            if res.x is None and res.status not in (0, 2):  # HiGHS's presolve can fail ("Solve error") on an
                res = milp(c, integrality=np.ones(n_vars), bounds=Bounds(0, 1), constraints=constraints,
                           options=dict(options, presolve=False))  # infeasible program; without it, it proves it
        if res.status == 2:
            what = ", ".join(f"{n} in [{lo:.6g}, {hi:.6g}]" for n, (lo, hi) in bounds.items())
            raise InfeasibleAllocation(f"allocate: no choice of one option per layer has {what}; "
                                       "widen the budget or add options")
        if res.x is None:
            raise RuntimeError(f"allocate: the MILP solver stopped without a solution ({res.message})")
        if res.status != 0:
            raise RuntimeError(f"allocate: the MILP solver did not prove optimality ({res.message})")
        x = np.round(res.x).astype(bool)
        choice = tuple(int(np.flatnonzero(x[layer_of == i])[0]) for i in range(n_layers))
        totals = {name: float(sum(r[j] for r, j in zip(rows[name], choice))) for name in rows}
        violated = [name for name, (lo, hi) in bounds.items() if not lo <= totals[name] <= hi]
        if not violated:
            return Allocation(choice, totals[objective], totals)
        for name in violated:  # met only within the solver's tolerance: tighten and solve again
            tighten[name] = 10 * tighten[name] if tighten[name] else _TIGHTEN * unit[name]
    raise RuntimeError(f"allocate: the solver's choice violates the budget of {violated} even after tightening")


def allocate_bits(scores: Sequence[Sequence[float]], sizes: Sequence[float], candidates: Sequence[Sequence[int]],
                  avg_bits: float, tolerance: float = TOLERANCE, *, time_limit: float | None = None) -> tuple[int, ...]:
    """Bit widths from ``candidates[i]`` maximising Σ scores, size-weighted mean within ``tolerance`` of ``avg_bits``.

    MixDQ's integer program; raises :class:`InfeasibleAllocation` (naming the reachable range)
    when no choice has a mean within the tolerance.
    """
    cands = _ragged(candidates, "candidates")
    sizes = np.asarray(sizes, np.float64).reshape(-1)
    if sizes.size != len(cands):
        raise ValueError(f"allocate_bits: {sizes.size} sizes for {len(cands)} layers")
    if not np.all(np.isfinite(sizes)) or np.any(sizes < 0) or not sizes.sum() > 0:
        raise ValueError("allocate_bits: sizes must be finite, non-negative and not all zero")
    if not tolerance >= 0:
        raise ValueError(f"allocate_bits: tolerance must be >= 0, got {tolerance!r}")
    if len(scores) != len(cands):
        raise ValueError(f"allocate_bits: {len(scores)} score rows for {len(cands)} layers")
    total = float(sizes.sum())
    # the mean bit width itself is the bounded quantity: Σ b_ij w_i / Σ w_i
    mean_bits = [c * (w / total) for c, w in zip(cands, sizes)]
    lo, hi = avg_bits - tolerance, avg_bits + tolerance
    try:
        result = allocate(scores, {"mean_bits": mean_bits}, {"mean_bits": (lo, hi)}, time_limit=time_limit)
    except InfeasibleAllocation:
        least = sum(float(r.min()) for r in mean_bits)
        most = sum(float(r.max()) for r in mean_bits)
        raise InfeasibleAllocation(
            f"allocate_bits: no choice of bit widths has a size-weighted mean within {avg_bits:g} ± {tolerance:g} "
            f"(the mean ranges over [{least:.4g}, {most:.4g}]"
            + (")" if least > hi or most < lo else "; no combination lands inside the tolerance: widen it)")) from None
    return tuple(candidates[i][j] for i, j in enumerate(result.choice))
