"""Exact allocation by integer programming, against brute force on small random problems."""

import itertools

import numpy as np
import pytest

from jdq.quant import InfeasibleAllocation, allocate, allocate_bits

# HiGHS runs to a zero gap on an objective scaled to max |c| = 1; its feasibility / integrality
# tolerances (≤ 1e-6 on that scale) bound how far the returned optimum may be from the true one.
OPT_TOL = 1e-6


def brute_force(scores, costs, budget, objective="score"):
    """The best value of the objective over every choice satisfying the budget (None if none does)."""
    best = None
    for choice in itertools.product(*[range(len(s)) for s in scores]):
        totals = {"score": sum(s[j] for s, j in zip(scores, choice))}
        for name, c in costs.items():
            totals[name] = sum(row[j] for row, j in zip(c, choice))
        if all(lo <= totals[n] <= hi for n, (lo, hi) in budget.items()):
            v = totals[objective] if objective != "score" else -totals["score"]
            best = v if best is None or v < best else best
    return best


def random_problem(rng, ties=False):
    layers = int(rng.integers(1, 6))
    options = [int(rng.integers(1, 4)) for _ in range(layers)]
    if ties:  # few distinct values: many equally good choices
        scores = [rng.integers(0, 3, k).astype(float) for k in options]
    else:
        scores = [rng.normal(0, 1, k) for k in options]
    latency = [rng.uniform(0.5, 2.0, k) for k in options]
    return scores, latency


@pytest.mark.parametrize("ties", [False, True])
def test_allocate_equals_brute_force(ties):
    rng = np.random.default_rng(1 + ties)
    infeasible = 0
    for _ in range(150):
        scores, latency = random_problem(rng, ties)
        least, most = sum(r.min() for r in latency), sum(r.max() for r in latency)
        cap = float(rng.uniform(least - 0.2, most))
        want = brute_force(scores, {"lat": latency}, {"lat": (-np.inf, cap)})
        if want is None:
            infeasible += 1
            with pytest.raises(InfeasibleAllocation):
                allocate(scores, {"lat": latency}, {"lat": cap})
            continue
        res = allocate(scores, {"lat": latency}, {"lat": cap})
        assert res.totals["lat"] <= cap
        assert len(res.choice) == len(scores)
        got = sum(s[j] for s, j in zip(scores, res.choice))
        scale = max(np.max(np.abs(np.concatenate(scores))), 1e-300)
        assert abs(got - res.objective) <= 1e-9 * scale * len(scores)
        assert -want - got <= OPT_TOL * scale
    assert 5 < infeasible < 100  # both kinds of problem were drawn



@pytest.mark.parametrize("unit", [1e-6, 1e6])
def test_allocate_is_exact_whatever_the_cost_unit(unit):
    """Latencies in seconds (~1e-6) or cycles (~1e6): the same optimum as brute force."""
    rng = np.random.default_rng(7)
    for _ in range(60):
        scores, latency = random_problem(rng)
        latency = [r * unit for r in latency]
        least, most = sum(r.min() for r in latency), sum(r.max() for r in latency)
        cap = float(rng.uniform(least, most))
        want = brute_force(scores, {"lat": latency}, {"lat": (-np.inf, cap)})
        res = allocate(scores, {"lat": latency}, {"lat": cap})
        assert res.totals["lat"] <= cap
        got = sum(s[j] for s, j in zip(scores, res.choice))
        assert -want - got <= OPT_TOL * max(np.max(np.abs(np.concatenate(scores))), 1e-300)

def test_latency_as_objective_with_a_score_floor():
    rng = np.random.default_rng(5)
    for _ in range(100):
        scores, latency = random_problem(rng)
        floor = float(rng.uniform(sum(s.min() for s in scores), sum(s.max() for s in scores)))
        want = brute_force(scores, {"lat": latency}, {"score": (floor, np.inf)}, objective="lat")
        res = allocate(scores, {"lat": latency}, {"score": (floor, None)}, objective="lat")
        assert res.totals["score"] >= floor
        scale = max(r.max() for r in latency)
        assert res.objective - want <= OPT_TOL * scale


def test_allocate_bits_equals_brute_force():
    rng = np.random.default_rng(0)
    infeasible = 0
    for _ in range(150):
        layers = int(rng.integers(1, 6))
        candidates = [sorted(rng.choice([2, 4, 8], int(rng.integers(1, 4)), replace=False).tolist())
                      for _ in range(layers)]
        scores = [rng.normal(0, 1, len(c)) for c in candidates]
        sizes = rng.uniform(1, 100, layers)
        avg = float(rng.uniform(2, 8))
        tol = float(rng.choice([0.02, 0.5]))
        mean_bits = [np.asarray(c) * w / sizes.sum() for c, w in zip(candidates, sizes)]
        want = brute_force(scores, {"bits": mean_bits}, {"bits": (avg - tol, avg + tol)})
        if want is None:
            infeasible += 1
            with pytest.raises(InfeasibleAllocation, match="size-weighted mean"):
                allocate_bits(scores, sizes, candidates, avg, tol)
            continue
        bits = allocate_bits(scores, sizes, candidates, avg, tol)
        assert all(b in c for b, c in zip(bits, candidates))
        mean = float(np.dot(bits, sizes) / sizes.sum())
        assert avg - tol <= mean <= avg + tol
        got = sum(s[c.index(b)] for s, c, b in zip(scores, candidates, bits))
        assert -want - got <= OPT_TOL * max(np.max(np.abs(np.concatenate(scores))), 1e-300)
    assert infeasible > 5


def test_allocate_bits_mixdq_shape():
    # MixDQ-like: 3.66 average bits over {2, 4, 8} with sizes spread over two orders of magnitude
    rng = np.random.default_rng(3)
    n = 60
    sizes = rng.integers(1, 100, n) * 1000
    candidates = [[2, 4, 8]] * n
    sens = rng.uniform(0.1, 1.0, n)
    scores = [[-s * 2.0**-b for b in c] for s, c in zip(sens, candidates)]  # error halves per extra bit
    bits = allocate_bits(scores, sizes, candidates, 3.66)
    mean = float(np.dot(bits, sizes) / sizes.sum())
    assert abs(mean - 3.66) <= 0.02
    # the most sensitive layers per parameter get the most bits
    order = np.argsort(-sens / sizes)
    assert np.mean([bits[i] for i in order[:10]]) > np.mean([bits[i] for i in order[-10:]])


def test_errors_name_the_problem():
    with pytest.raises(InfeasibleAllocation, match=r"ranges over \[2, 4\]"):
        allocate_bits([[0, 1]], [1], [[2, 4]], 6.0)
    with pytest.raises(InfeasibleAllocation, match="widen it"):
        allocate_bits([[0, 1], [0, 1]], [1, 1], [[2, 8], [2, 8]], 4.0)
    with pytest.raises(ValueError, match=r"costs\['lat'\]\[1\] has 1 options"):
        allocate([[1, 2], [1, 2]], {"lat": [[1, 2], [1]]})
    with pytest.raises(ValueError, match="scores\\[0\\] is empty"):
        allocate([[]])
    with pytest.raises(ValueError, match="objective"):
        allocate([[1]], objective="energy")
    with pytest.raises(ValueError, match="budget names"):
        allocate([[1]], budget={"lat": 1})
    with pytest.raises(ValueError, match="not finite"):
        allocate([[np.nan]])
    with pytest.raises(ValueError, match="4 sizes for 1 layers"):
        allocate_bits([[1]], [1, 2, 3, 4], [[4]], 4.0)


def test_infeasible_program_that_fails_highs_presolve():
    """A 2-layer program with no mean within the tolerance, on which HiGHS's presolve reports a solve error."""
    # reachable means: 2, 2.89, 3.11, 4, 4.67, 5.33, ...: none within 3.5376 ± 0.02
    with pytest.raises(InfeasibleAllocation, match="within"):
        allocate_bits([[0.1, 0.5, 0.9], [0.2, 0.6, 0.95]], [4000, 5000], [(2, 4, 8)] * 2, 3.53758865248227)
