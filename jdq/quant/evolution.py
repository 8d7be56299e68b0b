"""Evolutionary search over per-layer choices (Q-DiT's automatic granularity allocation), seeded and resumable.

A *genome* is one choice per gene (e.g. a weight/activation group size per linear layer:
``choices[i]`` lists the values gene ``i`` may take; the lists may differ). :func:`evolution_search`
minimises (or maximises) ``fitness(genome)`` over genomes that satisfy ``constraint(genome)``,
exactly as Juanerx/Q-DiT's ``scripts/evolution.py`` (an Once-for-All-style searcher) does:

1. **Initial population**: the ``initial`` genomes (Q-DiT: the uniform ``[128] * 112``), then random
   genomes (each gene uniform over its choices) until ``population`` are collected.
2. **Each generation**: the ``top_k`` best genomes seen so far (previous top-k ∪ the current
   population; elitist) are the parents. ``mutations`` children: a random parent with each gene
   redrawn uniformly with probability ``mutation_prob`` (the redrawn value may equal the old one);
   ``crossovers`` children: two random parents (possibly the same), each gene from either with
   probability ½; then random genomes fill the population to ``population``. Mutation and crossover
   stop after ``10 ×`` their count of tries, as in Q-DiT.
3. A candidate is *legal* if it satisfies the constraint and was never proposed before (Q-DiT's
   ``vis_dict``: every genome is evaluated at most once, duplicates and illegal candidates are
   dropped without evaluation and do not count).

Where this differs from the released code, and why:

* the last generation's children are ranked too (Q-DiT evaluates them but returns before merging
  them into its top-k, wasting a generation of FID runs);
* ``initial`` genomes must satisfy the constraint (Q-DiT adds its preset unchecked) and are
  de-duplicated;
* the random fill gives up after ``100 × population`` tries (Q-DiT loops forever when the
  constraint leaves fewer legal genomes than the population size);
* one ``numpy`` generator (``seed``) drives every draw, so the same seed gives the same history;
* all candidates of a generation are generated before any is evaluated (legality does not depend
  on fitness), so a ``batched`` fitness can score them in one call (e.g. plans vmapped through one
  jitted sampler); the history is the same either way.

**Resume.** With ``state_path`` the search state (population, top-k, proposed genomes, RNG state,
history) is written atomically as JSON after every generation, and the fitness of every evaluated
genome after every evaluation (batch). Calling again with the same arguments continues from the
last finished generation, replays the interrupted one from the saved RNG state without
re-evaluating what was already scored, and returns exactly what an uninterrupted run returns.
Asking for more ``generations`` than a finished state holds continues it. Genomes are stored as
indices into ``choices``; a state written for other choices or settings is refused.

Defaults (Juanerx/Q-DiT ``scripts/evolution.sh``): population 50, top-k 10, 25 mutations with
per-gene probability 0.1, crossover probability 0.5 per gene, 10 generations (``--max_epochs 10``;
the argparse default is 20), seed 1234. Crossovers default to 25, the count Q-DiT's method is
described with (50 children per generation); the released ``evolution.sh`` passes
``--crossover_num 15``, leaving 10 random genomes per generation: pass ``crossovers=15`` for that.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

#: Version of the JSON state written by :func:`evolution_search`.
STATE_VERSION = 1
#: Q-DiT's candidate group sizes (``search_space`` of ``scripts/evolution.py``).
QDIT_GROUP_SIZES = (32, 64, 128, 192, 288)


class EvolutionResult(NamedTuple):
    """Result of :func:`evolution_search`.

    ``best`` / ``best_fitness``: the best genome (values) and its fitness; ``top``: the final top-k
    as ``(genome, fitness)`` best first; ``history``: one dict per generation (``generation``;
    ``top``, its parents as ``[(genome, fitness), …]``, best first; ``evaluated``: the evaluations
    before it); ``evaluations``: every evaluated genome and its fitness, in evaluation order.
    """

    best: tuple
    best_fitness: float
    top: list
    history: list
    evaluations: list


def mean_at_least(threshold: float) -> Callable[[Sequence[float]], bool]:
    """Constraint ``mean(genome) >= threshold`` (Q-DiT: mean group size ≥ 128, its 'efficiency predictor')."""
    return lambda genome: float(np.mean(genome)) >= threshold


def evolution_search(choices: Sequence[Sequence[Any]], fitness: Callable, *, constraint: Callable | None = None,
                     initial: Sequence[Sequence[Any]] = (), generations: int = 10, population: int = 50,
                     top_k: int = 10, mutations: int = 25, mutation_prob: float = 0.1, crossovers: int = 25,
                     crossover_prob: float = 0.5, seed: int = 1234, minimize: bool = True, batched: bool = False,
                     state_path: str | Path | None = None, progress: bool = True) -> EvolutionResult:
    """Q-DiT's evolutionary search of one choice per gene: minimise (or maximise) ``fitness`` under ``constraint``.

    ``fitness(genome) -> float`` gets a tuple of values (``batched=True``: a list of genomes, returns
    a list of floats); ``constraint(genome) -> bool``. NaN fitness ranks last; ``progress`` shows a
    bar per generation. See the module docstring for the algorithm, the resume rules and the defaults.
    """
    choices = _check_choices(choices)
    for name, v, lo in (("generations", generations, 0), ("population", population, 1), ("top_k", top_k, 1),
                        ("mutations", mutations, 0), ("crossovers", crossovers, 0)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < lo:
            raise ValueError(f"evolution_search: {name} must be an int >= {lo}, got {v!r}")
    for name, p in (("mutation_prob", mutation_prob), ("crossover_prob", crossover_prob)):
        if not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"evolution_search: {name} must lie in [0, 1], got {p!r}")
    sizes = np.asarray([len(c) for c in choices])
    settings = dict(choices=[list(c) for c in choices], population=int(population), top_k=int(top_k),
                    mutations=int(mutations), mutation_prob=float(mutation_prob), crossovers=int(crossovers),
                    crossover_prob=float(crossover_prob), seed=int(seed), minimize=bool(minimize),
                    initial=[list(_encode(choices, g, "initial")) for g in initial])
    search = _Search(choices, sizes, fitness, constraint, settings, batched,
                     None if state_path is None else Path(state_path))
    search.run(int(generations), progress)
    return search.result()


def _check_choices(choices):
    if isinstance(choices, (str, bytes)) or not len(choices):
        raise ValueError("evolution_search: choices must be a non-empty sequence of per-gene choice lists")
    out = []
    for i, c in enumerate(choices):
        c = tuple(c)
        if not c:
            raise ValueError(f"evolution_search: gene {i} has no choices")
        if len(set(map(repr, c))) != len(c):
            raise ValueError(f"evolution_search: gene {i} lists a choice twice: {list(c)}")
        try:
            json.dumps(list(c))
        except TypeError:
            raise TypeError(f"evolution_search: the choices of gene {i} must be JSON values (numbers, strings), "
                            f"got {list(c)!r}") from None
        out.append(c)
    return tuple(out)


def _encode(choices, genome, what):
    genome = tuple(genome)
    if len(genome) != len(choices):
        raise ValueError(f"evolution_search: {what} genome has {len(genome)} genes, expected {len(choices)}")
    idx = []
    for i, (v, c) in enumerate(zip(genome, choices)):
        if v not in c:
            raise ValueError(f"evolution_search: {what} genome gene {i} = {v!r} is not one of its choices {list(c)}")
        idx.append(c.index(v))
    return tuple(idx)


def _rank_key(minimize):
    def key(f):
        f = float(f)
        if math.isnan(f):
            return math.inf
        return f if minimize else -f
    return key


class _Search:
    """The search's mutable state; genomes are tuples of choice indices internally."""

    def __init__(self, choices, sizes, fitness, constraint, settings, batched, path):
        self.choices, self.sizes, self.fitness_fn, self.constraint = choices, sizes, fitness, constraint
        self.settings, self.batched, self.path = settings, batched, path
        self.key = _rank_key(settings["minimize"])
        self.cache: dict[tuple, float] = {}   # every fitness ever computed (survives interruptions)
        self.order: list[tuple] = []          # evaluation order of the cache
        self.generation = 0                   # generations finished
        self.boundary = None                  # the state at the last finished generation
        if path is not None and path.exists():
            self._load()
        if self.boundary is None:
            self.boundary = dict(phase="initial", rng=np.random.default_rng(settings["seed"]).bit_generator.state,
                                 seen=[], candidates=[], top=[], history=[])

    # ----------------------------------------------------------------------------- persistence

    def _load(self):
        try:
            state = json.loads(self.path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"evolution_search: cannot read the state file {self.path}: {e}") from None
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(f"evolution_search: {self.path} is not an evolution state of version {STATE_VERSION}")
        if state.get("settings") != self.settings:
            diff = sorted(k for k in set(self.settings) | set(state.get("settings", {}))
                          if state.get("settings", {}).get(k) != self.settings.get(k))
            raise ValueError(f"evolution_search: {self.path} was written with other settings ({', '.join(diff)}); "
                             "use the same arguments or another state_path")
        for g, f in state["evaluations"]:
            self.cache[tuple(g)] = float(f)
            self.order.append(tuple(g))
        self.boundary = state["boundary"]
        self.generation = int(state["generation"])

    def _save(self):
        if self.path is None:
            return
        from jdq.io import atomic_write_text

        state = dict(version=STATE_VERSION, settings=self.settings, generation=self.generation,
                     boundary=self.boundary, evaluations=[[list(g), self.cache[g]] for g in self.order])
        atomic_write_text(self.path, json.dumps(state))

    # ----------------------------------------------------------------------------- evaluation

    def _values(self, genome):
        return tuple(c[i] for c, i in zip(self.choices, genome))

    def _evaluate(self, genomes):
        todo = [g for g in dict.fromkeys(genomes) if g not in self.cache]
        if not todo:
            return
        if self.batched:
            scores = list(self.fitness_fn([self._values(g) for g in todo]))
            if len(scores) != len(todo):
                raise ValueError(f"evolution_search: batched fitness returned {len(scores)} values "
                                 f"for {len(todo)} genomes")
            for g, f in zip(todo, scores):
                self.cache[g] = float(f)
                self.order.append(g)
            self._save()
        else:
            for g in todo:
                self.cache[g] = float(self.fitness_fn(self._values(g)))
                self.order.append(g)
                self._save()

    def _legal(self, genome, seen):
        if genome in seen:
            return False
        if self.constraint is not None and not self.constraint(self._values(genome)):
            return False
        seen.add(genome)
        return True

    # ----------------------------------------------------------------------------- proposal

    def _random(self, rng):
        return tuple(int(v) for v in rng.integers(0, self.sizes))

    def _fill(self, rng, seen, candidates):
        target = self.settings["population"]
        tries = 100 * target
        while len(candidates) < target and tries > 0:
            tries -= 1
            g = self._random(rng)
            if self._legal(g, seen):
                candidates.append(g)

    def _children(self, rng, seen, top):
        s = self.settings
        out = []
        for count, make in ((s["mutations"], self._mutate), (s["crossovers"], self._cross)):
            made, tries = 0, 10 * count
            while made < count and tries > 0:
                tries -= 1
                g = make(rng, top)
                if self._legal(g, seen):
                    out.append(g)
                    made += 1
        return out

    def _mutate(self, rng, top):
        parent = np.asarray(top[int(rng.integers(len(top)))])
        redraw = rng.random(len(parent)) < self.settings["mutation_prob"]
        fresh = rng.integers(0, self.sizes)
        return tuple(int(v) for v in np.where(redraw, fresh, parent))

    def _cross(self, rng, top):
        a = np.asarray(top[int(rng.integers(len(top)))])
        b = np.asarray(top[int(rng.integers(len(top)))])
        take_a = rng.random(len(a)) < self.settings["crossover_prob"]
        return tuple(int(v) for v in np.where(take_a, a, b))

    def _select(self, top, candidates):
        pool = list(dict.fromkeys(list(top) + list(candidates)))
        pool.sort(key=lambda g: self.key(self.cache[g]))  # stable: earlier genomes win ties
        return pool[: self.settings["top_k"]]

    # ----------------------------------------------------------------------------- driver

    def _step(self):
        """Propose and evaluate one batch of candidates from the boundary state; return the next boundary."""
        b = self.boundary
        rng = np.random.default_rng()
        rng.bit_generator.state = b["rng"]
        seen = {tuple(g) for g in b["seen"]}
        top = [tuple(g) for g in b["top"]]
        candidates = []
        if b["phase"] == "initial":
            for g in self.settings["initial"]:
                g = tuple(g)
                if self.constraint is not None and not self.constraint(self._values(g)):
                    raise ValueError(f"evolution_search: initial genome {list(self._values(g))} "
                                     "violates the constraint")
                if g not in seen:
                    seen.add(g)
                    candidates.append(g)
        else:
            top = self._select(top, [tuple(g) for g in b["candidates"]])
            candidates = self._children(rng, seen, top)
        self._fill(rng, seen, candidates)
        if not candidates and b["phase"] == "initial":
            raise ValueError("evolution_search: no genome satisfies the constraint (none found in "
                             f"{100 * self.settings['population']} random tries)")
        history = list(b["history"])
        if b["phase"] != "initial":  # every genome proposed before is evaluated: len(b["seen"]) evaluations
            history.append(self._record(len(history), top, len(b["seen"])))
        self._evaluate(candidates)
        return dict(phase="generation", rng=rng.bit_generator.state, seen=sorted(list(g) for g in seen),
                    candidates=[list(g) for g in candidates], top=[list(g) for g in top], history=history)

    def _record(self, generation, top, evaluated):
        return dict(generation=generation, top=[[list(self._values(g)), self.cache[g]] for g in top],
                    evaluated=evaluated)

    def run(self, generations, progress):
        # boundary phases: "initial" (nothing proposed), then after each step "generation" holding the
        # candidates of the last step; ``self.generation`` counts the steps taken after the initial one
        total = generations + 1
        done = 0 if self.boundary["phase"] == "initial" else self.generation + 1
        if done > total:
            raise ValueError(f"evolution_search: the state {self.path} holds {self.generation} generations, "
                             f"more generations than the {generations} asked for")
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, initial=min(done, total), desc="evolution")
        while done < total:
            self.boundary = self._step()
            done += 1
            self.generation = done - 1
            self._save()
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()

    def result(self):
        b = self.boundary
        top = self._select([tuple(g) for g in b["top"]], [tuple(g) for g in b["candidates"]])
        best = top[0]
        return EvolutionResult(
            best=self._values(best), best_fitness=self.cache[best],
            top=[(self._values(g), self.cache[g]) for g in top],
            history=[dict(h, top=[(tuple(v), f) for v, f in h["top"]]) for h in b["history"]],
            evaluations=[(self._values(g), self.cache[g]) for g in self.order])
