"""Record, and compare, what every built-in recipe does to the embedded model (a refactoring check).

::

    python benchmarks/behaviour_check.py --out before.npz          # record
    python benchmarks/behaviour_check.py --out after.npz           # ... change the code, record again
    python benchmarks/behaviour_check.py --compare before.npz after.npz

For every registered recipe (:func:`jdq.recipes.names`) and for floating point, it samples the
embedded Animal-MNIST DiT with ``jdq sample`` (fixed seed, a few classes, a few DDPM steps) and
keeps the samples; for each recipe whose sites lower to kernels it also keeps one lowered
forward pass (reference kernels, ``impl="xla"``) and the fake-quant forward on the same inputs.
``--compare`` reports, per entry, whether two recordings are bit-identical (and the largest
difference when not). Float arithmetic differs between CPUs, so compare recordings made on the
same machine; this is a script, not a test, for that reason.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402


def _sample(recipe: str | None, steps: int, classes: list[int], seed: int) -> np.ndarray:
    """The samples ``jdq sample`` writes for ``recipe`` (``None``: floating point)."""
    from jdq import cli

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "s"
        argv = ["sample", "--steps", str(steps), "--classes", *map(str, classes), "--per-class", "1",
                "--seed", str(seed), "--calib-samples", "2", "--out", str(out), "--no-progress"]
        if recipe is not None:
            argv += ["--quant", recipe]
        code = cli.main(argv)
        if code != 0:
            raise SystemExit(f"jdq {' '.join(argv)} failed with status {code}")
        with np.load(out.with_suffix(".npz")) as z:
            return np.asarray(z["samples"])


def _lower_fn():
    """``lower(plan, params, impl=)`` wherever this version of jdq keeps it."""
    try:
        from jdq.kernels import lower
    except ImportError:
        from jdq.quant import lower
    return lower


def _lowered_forward(recipe: str, seed: int) -> dict[str, np.ndarray]:
    """One lowered forward pass and the fake-quant one on the same inputs (empty when nothing lowers)."""
    import jax
    import jax.numpy as jnp

    from jdq import quant as Q
    from jdq import recipes
    from jdq.models import load
    from jdq.cli._common import DEFAULT_MODEL

    model, cfg = load(DEFAULT_MODEL)
    key = jax.random.key(seed)
    x = jax.random.normal(key, (2, cfg.input_size, cfg.input_size, cfg.in_channels), jnp.float32)
    t = jnp.array([10.0, 600.0])
    y = jnp.array([1, 4], jnp.int32)
    fn = lambda p, *a, quant=None: model.apply(p, *a, quant=quant)  # noqa: E731
    operands = Q.trace_operands(fn, model.params, x, t, y)
    plan = recipes.plan_for(recipe, operands)
    if recipes.get(recipe).calibrated:
        stats = Q.collect_stats(fn, model.params, x, t, y)[1]
        state = plan.init(Q.stack_stats([stats]))
    else:
        state = plan.init()
    low = _lower_fn()(plan, model.params, state, impl="xla")
    if not low.weights:
        return {}
    return {"lowered": np.asarray(jax.jit(fn)(model.params, x, t, y, quant=low)),
            "fake": np.asarray(jax.jit(fn)(model.params, x, t, y, quant=plan.bind(state))),
            "lowered_sites": np.asarray(sorted(low.weights))}


def record(out: Path, steps: int, classes: list[int], seed: int, only: list[str] | None) -> None:
    """Write every recipe's samples (and lowered/fake forwards) to ``out``."""
    from jdq import recipes

    names = only or list(recipes.names())
    arrays = {"fp/samples": _sample(None, steps, classes, seed)}
    for name in names:
        print(f"  {name}", file=sys.stderr, flush=True)
        arrays[f"{name}/samples"] = _sample(name, steps, classes, seed)
        for k, v in _lowered_forward(name, seed).items():
            arrays[f"{name}/{k}"] = v
    tmp = out.with_name(out.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, out)
    print(f"wrote {out}: {len(arrays)} arrays")


def compare(a: Path, b: Path) -> int:
    """Print bit-identity per entry of two recordings; exit status 1 when any differs or is missing."""
    with np.load(a) as za, np.load(b) as zb:
        keys = sorted(set(za.files) | set(zb.files))
        bad = 0
        for k in keys:
            if k not in za.files or k not in zb.files:
                print(f"{k:40s} only in {a if k in za.files else b}")
                bad += 1
                continue
            x, y = za[k], zb[k]
            if x.shape != y.shape or x.dtype != y.dtype:
                print(f"{k:40s} shape/dtype differ: {x.shape} {x.dtype} vs {y.shape} {y.dtype}")
                bad += 1
            elif x.dtype.kind in "US":
                same = bool(np.array_equal(x, y))
                print(f"{k:40s} {'identical' if same else 'DIFFERENT'}")
                bad += not same
            else:
                same = x.tobytes() == y.tobytes()
                diff = "" if same else f" max |Δ| {float(np.max(np.abs(x.astype(np.float64) - y))):.3g}"
                print(f"{k:40s} {'bit-identical' if same else 'DIFFERENT' + diff}")
                bad += not same
        if "fake" in " ".join(keys):
            for k in keys:
                if k.endswith("/lowered") and k in zb.files:
                    f = zb[k[: -len("lowered")] + "fake"]
                    print(f"{k:40s} lowered vs fake-quant (in {b.name}): max |Δ| "
                          f"{float(np.max(np.abs(zb[k].astype(np.float64) - f))):.3g}")
    print(f"{len(keys) - bad} of {len(keys)} entries identical")
    return 1 if bad else 0


def main(argv=None) -> int:
    """Command line: ``--out FILE`` records, ``--compare A B`` compares."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="record to this .npz")
    p.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"), help="compare two recordings")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--classes", type=int, nargs="+", default=[0, 7])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--recipes", nargs="+", default=None, help="only these recipes (default: all)")
    args = p.parse_args(argv)
    if args.compare:
        return compare(*args.compare)
    if args.out is None:
        p.error("give --out FILE or --compare A B")
    record(args.out, args.steps, args.classes, args.seed, args.recipes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
