"""Allocation against the cost model's latency: exact ILP and evolutionary search vs brute force on a small problem."""

import itertools

import numpy as np
import pytest

from jdq import quant as Q
from jdq.hw import OperandFormat, workload
from jdq.models import dit
from jdq.sweep import latency as L


def small_problem():
    """Per-site latency of a 2-block DiT's linear layers on the MixDiT-like accelerator, options mx9 / mx6 / mx4."""
    cfg = dit.Config(input_size=16, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=2, num_classes=3)
    ops = workload.model_operands("dit-xl-2", batch=2, config=cfg)
    table = L.site_costs(L.preset("mixdit_like"), ops, [OperandFormat(f) for f in ("mx9", "mx6", "mx4")])
    sites = [s for s in table if s.startswith("blocks.") and s.endswith(("qkv", "proj", "fc1", "fc2"))]
    costs = np.stack([table[s] for s in sites])
    rng = np.random.default_rng(0)
    # scores: higher precision is better, with a site-dependent sensitivity
    sens = rng.uniform(0.5, 2.0, len(sites))
    scores = -sens[:, None] * np.array([1.0, 4.0, 16.0])[None, :]
    return sites, scores, costs


def brute_force(scores, costs, budget):
    best = None
    for choice in itertools.product(range(scores.shape[1]), repeat=scores.shape[0]):
        c = sum(costs[i, j] for i, j in enumerate(choice))
        s = sum(scores[i, j] for i, j in enumerate(choice))
        if c <= budget and (best is None or s > best[0]):
            best = (s, choice)
    return best


def test_site_costs_are_those_of_the_cost_model():
    sites, scores, costs = small_problem()
    # more precise formats never make a layer faster on this accelerator; mx4 is strictly cheaper than mx9 somewhere
    assert np.all(costs[:, 0] >= costs[:, 1]) and np.all(costs[:, 1] >= costs[:, 2]) and np.any(costs[:, 0] > costs[:, 2])


@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.9])
def test_latency_budget_allocation_matches_brute_force(fraction):
    sites, scores, costs = small_problem()
    lo, hi = costs.min(1).sum(), costs.max(1).sum()
    budget = lo + fraction * (hi - lo)
    best_score, _ = brute_force(scores, costs, budget)
    got = L.allocate_latency(scores, costs, budget)
    # the ILP is exact up to HiGHS's 1e-6 relative feasibility tolerance on the scaled problem
    assert got.totals["latency"] <= budget * (1 + 1e-9)
    assert got.objective == pytest.approx(best_score, rel=1e-9, abs=1e-9)
    # the dual: least latency at the brute-force optimum's score is within the budget
    dual = L.allocate_latency(scores, costs, None, objective="latency", score_floor=best_score - 1e-9)
    assert dual.totals["latency"] <= budget * (1 + 1e-9)


def test_evolution_search_with_latency_constraint_matches_brute_force():
    sites, scores, costs = small_problem()
    n = len(sites)
    budget = costs.min(1).sum() + 0.5 * (costs.max(1).sum() - costs.min(1).sum())
    best_score, best_choice = brute_force(scores, costs, budget)
    choices = [("mx9", "mx6", "mx4")] * n
    index = {"mx9": 0, "mx6": 1, "mx4": 2}
    fit = lambda g: -sum(scores[i, index[v]] for i, v in enumerate(g))  # noqa: E731 (minimised)
    # 3^8 = 6561 genomes; a population of 400 over 15 generations finds the optimum of this separable problem
    res = Q.evolution_search(choices, fit, constraint=L.cost_constraint(costs, budget, choices), population=400,
                             top_k=20, mutations=200, crossovers=150, generations=15, seed=0, progress=False)
    assert L.cost_constraint(costs, budget, choices)(res.best)
    assert -res.best_fitness == pytest.approx(best_score, rel=1e-12)
