"""Q-DiT's evolutionary search: constraint, de-duplication, elitism, seeding, and exact resumption."""

import json

import numpy as np
import pytest

from jdq.quant import evolution_search, mean_at_least
from jdq.quant.evolution import QDIT_GROUP_SIZES

GENES = 12
CHOICES = [QDIT_GROUP_SIZES] * GENES
# a fitness with a known optimum: gene i prefers TARGET[i]; larger groups cost a little everywhere
TARGET = np.random.default_rng(7).choice(QDIT_GROUP_SIZES, GENES)


def fitness(genome):
    g = np.asarray(genome, float)
    return float(np.sum(np.abs(np.log2(g / TARGET))) + 1e-3 * np.sum(g) / 288)


class Counting:
    """A fitness that counts its calls and can fail at a chosen call (an interruption)."""

    def __init__(self, fail_at=None):
        self.calls, self.fail_at = 0, fail_at

    def __call__(self, genome):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise KeyboardInterrupt("simulated interruption")
        return fitness(genome)


KW = dict(constraint=mean_at_least(128), initial=[[128] * GENES], generations=4, population=20, top_k=5,
          mutations=8, crossovers=8, seed=3)


def test_search_respects_the_constraint_and_never_repeats_a_genome():
    res = evolution_search(CHOICES, fitness, **KW)
    genomes = [g for g, _ in res.evaluations]
    assert len(set(genomes)) == len(genomes)
    assert all(np.mean(g) >= 128 for g in genomes)
    assert genomes[0] == (128,) * GENES  # the preset is evaluated first
    assert res.best_fitness == min(f for _, f in res.evaluations)  # elitist: the best ever is kept
    assert res.best_fitness < fitness([128] * GENES)
    tops = [h["top"][0][1] for h in res.history] + [res.best_fitness]
    assert all(a >= b for a, b in zip(tops, tops[1:]))  # the best never gets worse
    assert len(res.history) == KW["generations"]
    # every generation evaluates at most a population of new genomes
    counts = [0] + [h["evaluated"] for h in res.history] + [len(genomes)]
    assert all(0 < b - a <= KW["population"] for a, b in zip(counts, counts[1:]))


def test_same_seed_same_history_other_seed_other_history():
    a = evolution_search(CHOICES, fitness, **KW)
    b = evolution_search(CHOICES, fitness, **KW)
    assert a == b
    c = evolution_search(CHOICES, fitness, **dict(KW, seed=4))
    assert c.evaluations != a.evaluations


def test_maximize_and_batched_fitness_give_the_same_search():
    neg = evolution_search(CHOICES, lambda g: -fitness(g), minimize=False, **KW)
    pos = evolution_search(CHOICES, fitness, **KW)
    assert neg.best == pos.best and [g for g, _ in neg.evaluations] == [g for g, _ in pos.evaluations]
    batches = []

    def batch_fitness(genomes):
        batches.append(len(genomes))
        return [fitness(g) for g in genomes]

    bat = evolution_search(CHOICES, batch_fitness, batched=True, **KW)
    assert bat == pos
    assert len(batches) == KW["generations"] + 1  # one call per generation (and the initial population)


def test_resume_after_finished_generations_and_mid_generation(tmp_path):
    full = evolution_search(CHOICES, fitness, **KW)

    # stop after 2 generations, then ask for 4: continues from the saved state
    path = tmp_path / "evo.json"
    evolution_search(CHOICES, fitness, **dict(KW, generations=2), state_path=path)
    state = json.loads(path.read_text())
    assert state["generation"] == 2
    count = Counting()
    resumed = evolution_search(CHOICES, count, **KW, state_path=path)
    assert resumed == full
    assert count.calls == len(full.evaluations) - len(state["evaluations"])  # nothing evaluated twice

    # interrupted in the middle of a generation: the evaluations done so far are kept, the rest replayed
    path2 = tmp_path / "evo2.json"
    stop = len(full.evaluations) // 2
    with pytest.raises(KeyboardInterrupt):
        evolution_search(CHOICES, Counting(fail_at=stop), **KW, state_path=path2)
    kept = len(json.loads(path2.read_text())["evaluations"])
    assert kept == stop - 1
    count = Counting()
    assert evolution_search(CHOICES, count, **KW, state_path=path2) == full
    assert count.calls == len(full.evaluations) - kept

    # a finished state asked again returns the same result without evaluating anything
    count = Counting()
    assert evolution_search(CHOICES, count, **KW, state_path=path2) == full and count.calls == 0


def test_state_written_for_other_settings_is_refused(tmp_path):
    path = tmp_path / "evo.json"
    evolution_search(CHOICES, fitness, **dict(KW, generations=1), state_path=path)
    with pytest.raises(ValueError, match="other settings.*seed"):
        evolution_search(CHOICES, fitness, **dict(KW, seed=9), state_path=path)
    with pytest.raises(ValueError, match="more generations"):
        evolution_search(CHOICES, fitness, **dict(KW, generations=0), state_path=path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read the state file"):
        evolution_search(CHOICES, fitness, **KW, state_path=path)


def test_per_gene_choices_and_bad_input():
    choices = [(32, 64), (1, 2, 3), ("a", "b")]
    res = evolution_search(choices, lambda g: g[0] + g[1] + (g[2] == "b"), population=6, top_k=2, mutations=2,
                           crossovers=2, generations=3, seed=0)
    assert res.best == (32, 1, "a") and res.best_fitness == 33
    assert len(res.evaluations) <= 2 * 3 * 2  # the whole space: 12 genomes, none twice
    with pytest.raises(ValueError, match="violates the constraint"):
        evolution_search(CHOICES, fitness, constraint=mean_at_least(200), initial=[[128] * GENES])
    with pytest.raises(ValueError, match="no genome satisfies"):
        evolution_search(CHOICES, fitness, constraint=lambda g: False, population=5)
    with pytest.raises(ValueError, match="not one of its choices"):
        evolution_search(CHOICES, fitness, initial=[[100] * GENES])
    with pytest.raises(ValueError, match="has no choices"):
        evolution_search([(1, 2), ()], fitness)
