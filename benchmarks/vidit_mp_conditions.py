"""Why ViDiT-Q W4A8-MP at 4.0 bits loses to uniform W4A8: the sweep's conditions against the row's.

::

    python benchmarks/vidit_mp_conditions.py --out benchmarks/results/vidit_mp_conditions.json

The ``vidit-q`` sensitivity sweep (``benchmarks/results/vidit_mixdq_sensitivity_viditq``) quantizes
one unit's weights at a time (symmetric per output channel, no balancing, activations in float).
The W4A8-MP rows of ``benchmarks/vidit_mixdq.py`` run with timestep-aware balancing (α 0.11, two
ranges) and 8-bit per-token inputs. This script measures every unit (one block's attention or FFN)
at every width of the MP candidates under both conditions, on the same samples:

* ``weights``: the unit's weights alone at ``b`` bits, the rest in float, with the sweep's own
  quantizer (symmetric per output channel: ``jdq.quant.sensitivity.SweepSpec``);
* ``asym`` (optional): the row's weight cast alone (asymmetric per output channel), no balancing,
  inputs in float;
* ``row``: the unit under the row's quantizer (balanced weights at ``b`` bits and balanced 8-bit
  per-token inputs), the rest in float.

For each it records the output noise ``‖x − x_FP‖² / ‖x_FP‖²`` (SQNR in dB) and the classifier
feature noise ``Σ‖f − f_FP‖² / Σ‖f_FP − f̄_FP‖²`` (the Animal-FID features). Then the ``noise`` program
(:func:`jdq.recipes.vidit_q.mp_assignment`) is run on each condition's SQNRs at a 4.0 average over
{3, 4, 5, 6, 8}, and the whole row plans (uniform W4A8, the stored sweep's assignment, the
row-condition assignment) are measured the same way. Resumable: finished measurements are kept.
Samples: ``--samples`` (default 20, seed 7, classes in turn: the ranking samples of
``vidit_mixdq.py``); calibration as there (16 samples, seed 12345).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jdq import quant as Q  # noqa: E402
from jdq.io import atomic_write_text  # noqa: E402

WIDTHS = (3, 4, 5, 6, 8)


def relative_noise(x, ref) -> float:
    """``‖x − ref‖² / ‖ref‖²``."""
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.sum((x - ref) ** 2) / np.sum(ref**2))


def feature_noise(f, f_ref) -> float:
    """``Σ‖f − f_ref‖² / Σ‖f_ref − mean(f_ref)‖²``: the feature error against the features' own spread."""
    f, f_ref = np.asarray(f, np.float64), np.asarray(f_ref, np.float64)
    return float(np.sum((f - f_ref) ** 2) / np.sum((f_ref - f_ref.mean(0)) ** 2))


def as_sensitivity(units: dict, measured: dict, condition: str) -> dict:
    """A ``jdq sensitivity``-shaped dict whose weight SQNRs are one condition's measurements."""
    out = {}
    for n, u in units.items():
        m = measured.get(condition, {}).get(n, {})
        out[n] = dict(u, weight={str(b): {"sqnr": m[str(b)]["sqnr"]} for b in WIDTHS if str(b) in m})
    return {"units": out}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--calib", type=int, default=16)
    ap.add_argument("--sensitivity", default="benchmarks/results/vidit_mixdq_sensitivity_viditq/sensitivity.json")
    ap.add_argument("--rows-json", default="benchmarks/results/vidit_mixdq.json",
                    help="where the stored W4A8-MP rows' assignments are read")
    ap.add_argument("--out", default="benchmarks/results/vidit_mp_conditions.json")
    ap.add_argument("--conditions", nargs="*", default=["weights", "row"])
    ap.add_argument("--assignments", default=None, metavar="JSON",
                    help="also measure the row plans of another run's assignments (an out-of-sample check; with "
                         "--conditions and nothing after it, only the plans are measured)")
    ap.add_argument("--budget-s", type=float, default=540.0, help="stop starting new measurements after this")
    args = ap.parse_args(argv)

    import jdq
    from jdq.demo import animal_fid, classifier
    from jdq.metrics.protocols import ANIMAL_GUIDANCE, ANIMAL_STEPS
    from jdq.recipes import vidit_q
    from jdq.sampling.generate import Denoiser, generate, guided_channels, null_condition, resolve_sampler, sample_shape
    from jdq.sampling.images import to_uint8
    from jdq.sampling.loop import collect_sampler_stats, sample_keys

    t_start = time.time()
    out = Path(args.out)
    res = json.loads(out.read_text()) if out.is_file() else {}
    res.setdefault("settings", {"samples": args.samples, "seed": args.seed, "calib": args.calib,
                                "sampler": f"ddim {ANIMAL_STEPS}", "guidance": ANIMAL_GUIDANCE, "widths": list(WIDTHS)})
    measured = res.setdefault("units", {})
    plans_done = res.setdefault("plans", {})

    def save():
        atomic_write_text(out, json.dumps(res, indent=1) + "\n")

    model, _ = jdq.models.load(Path(jdq.__file__).parent / "assets" / "animal_dit")
    sampler = resolve_sampler(model, "ddim", ANIMAL_STEPS, clip_denoised=True)
    ts = tuple(np.asarray(sampler.timesteps))
    g = ANIMAL_GUIDANCE
    k = model.config.num_classes
    labels = jnp.asarray(np.arange(args.samples, dtype=np.int32) % k)
    calib = jnp.asarray(np.arange(args.calib, dtype=np.int32) % k)
    fn = Denoiser(model, "dit")
    x0 = jnp.zeros((1,) + sample_shape(model))
    operands = Q.trace_operands(fn, model.params, x0, jnp.zeros((1,)), labels[:1])
    clf = classifier.load(animal_fid.CLASSIFIER)
    units = {n: u for n, u in json.loads(Path(args.sensitivity).read_text())["units"].items()
             if u.get("weight") and u.get("group") != "adaln"}
    _, stats = collect_sampler_stats(fn, model.params, sampler, calib, sample_keys(12345, args.calib),
                                     sample_shape(model), uncond=null_condition(model, calib), guidance=g,
                                     guided_channels=guided_channels(model))

    def sample(quant=None):
        return np.asarray(generate(model, labels, sampler=sampler, guidance=g, seed=args.seed, batch_size=100,
                                   quant=quant, progress=False), np.float64)

    def feats(x):
        return animal_fid.extract(clf, to_uint8(x))[animal_fid.FEATURES]

    x_fp = sample()
    f_fp = feats(x_fp)

    def measure(quant):
        t0 = time.time()
        x = sample(quant)
        n = relative_noise(x, x_fp)
        return {"noise": n, "sqnr": float(-10 * np.log10(max(n, 1e-12))), "feature_noise": feature_noise(feats(x), f_fp),
                "wall_s": time.time() - t0}

    def bind(rules):
        plan = Q.resolve(list(rules) + [Q.keep_float("*")], operands)
        return plan.bind(vidit_q.prepare(plan, stats, model)[0])

    from jdq.quant import sensitivity as S
    from jdq.quant.balance_timestep import range_groups, timestep_balance_pair

    def switch_plan(condition, b):
        """Every block linear under ``condition`` at ``b`` bits, switchable (all off): one compile per width."""
        if condition == "weights":  # the sweep's own quantizer (jdq.quant.sensitivity.SweepSpec): symmetric
            w, x = Q.cast(f"int{b}", granularity="row"), None
        elif condition == "asym":  # the row's weight cast alone: asymmetric, no balancing, inputs in float
            w, x = vidit_q.weight_cast(b), None
        else:  # the row's quantizer: timestep-aware balancing (alpha 0.11, two ranges), 8-bit per-token inputs
            x, w = timestep_balance_pair(vidit_q.act_cast(8), vidit_q.weight_cast(b),
                                         range_groups(ts, vidit_q.DEFAULT_RANGES), 0.11)
        rules = [Q.keep_float(vidit_q.FLOAT_IN_BLOCKS), Q.rule(vidit_q.BLOCKS, S.switchable(w), roles=("weight",))]
        if x is not None:
            rules.append(Q.rule(vidit_q.BLOCKS, S.switchable(x), roles=("act", "post_gelu")))
        plan = Q.resolve(rules + [Q.keep_float("*")], operands)
        return plan, plan.init(Q.link_stats(stats))

    def over_budget():
        return time.time() - t_start > args.budget_s

    # 1. one unit at a time, under each condition
    for condition in args.conditions:
        for b in WIDTHS:
            todo = [n for n in units if str(b) not in measured.get(condition, {}).get(n, {})]
            if not todo:
                continue
            plan, base = switch_plan(condition, b)
            for n in todo:
                if over_budget():
                    save()
                    print("budget reached; run again to continue", file=sys.stderr)
                    return 0
                done = measured.setdefault(condition, {}).setdefault(n, {})
                done[str(b)] = measure(plan.bind(S.switch_on(plan, base, units[n]["sites"])))
                save()
                print(f"{condition} {n} W{b}: SQNR {done[str(b)]['sqnr']:.2f} dB, feature noise "
                      f"{done[str(b)]['feature_noise']:.4f} ({done[str(b)]['wall_s']:.1f} s)", file=sys.stderr)

    # 2. the noise program on each condition's measurements, and the whole row plans
    complete = [c for c in ("weights", "asym", "row") if all(str(b) in measured.get(c, {}).get(n, {})
                                                     for n in units for b in WIDTHS)]
    assignments = res.setdefault("assignments", {})
    stored = json.loads(Path(args.rows_json).read_text())["rows"]
    assignments["stored sweep (noise)"] = stored["ViDiT-Q W4A8-MP 4.0 noise {3,4,5,6,8}"]["info"]["weight_bits"]
    assignments["stored sweep (paper)"] = stored["ViDiT-Q W4A8-MP 4.0 paper {3,4,5,6,8}"]["info"]["weight_bits"]
    if args.assignments:  # another run's assignments, measured here on other samples
        assignments.update(json.loads(Path(args.assignments).read_text())["assignments"])
    for c in complete:
        assignments[f"{c} condition (noise)"] = vidit_q.mp_assignment(as_sensitivity(units, measured, c), 4.0, WIDTHS,
                                                                      search="noise")
    plans = {"uniform W4A8 timestep": None, **assignments}
    for name, wb in plans.items():
        if name in plans_done:
            continue
        if over_budget():
            save()
            print("budget reached; run again to continue", file=sys.stderr)
            return 0
        r = vidit_q.rules(wbits=4, abits=8, balance="timestep", timesteps=ts, weight_bits=wb)
        plans_done[name] = dict(measure(bind(r)), layers_per_bits=(
            {str(b): sum(1 for v in wb.values() if v == b) for b in WIDTHS} if wb else {"4": 32}))
        save()
        print(f"plan {name}: {plans_done[name]}", file=sys.stderr)

    # 3. summaries: rank agreement of the two conditions per width, the sweep's noise against the row's
    from scipy.stats import spearmanr

    summary = {}
    if {"weights", "row"} <= set(complete):
        stored_sens = {n: {str(b): 10 ** (-min(u["weight"][str(b)]["sqnr"], 120) / 10) for b in WIDTHS}
                       for n, u in units.items()}
        summary["spearman_stored_sweep_vs_weights_condition"] = float(spearmanr(
            [stored_sens[n][str(b)] for n in units for b in WIDTHS],
            [measured["weights"][n][str(b)]["noise"] for n in units for b in WIDTHS])[0])
        for b in WIDTHS:
            per = {c: np.asarray([measured[c][n][str(b)]["sqnr"] for n in units]) for c in complete}
            entry = {f"spearman_weights_vs_{c}_sqnr": float(spearmanr(per["weights"], per[c])[0])
                     for c in complete if c != "weights"}
            entry.update({f"median_{c}_minus_weights_sqnr_db": float(np.median(per[c] - per["weights"]))
                          for c in complete if c != "weights"})
            entry["spearman_row_noise_vs_row_feature_noise"] = float(spearmanr(
                [measured["row"][n][str(b)]["noise"] for n in units],
                [measured["row"][n][str(b)]["feature_noise"] for n in units])[0])
            summary[f"W{b}"] = entry
    res["summary"] = summary
    save()
    print(json.dumps(summary, indent=1), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
