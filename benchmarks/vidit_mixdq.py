"""ViDiT-Q and MixDQ claims on the embedded Animal-MNIST DiT: mixed precision vs uniform W4, timestep-aware vs static balancing.

::

    python benchmarks/vidit_mixdq.py --samples 100 --out benchmarks/results/vidit_mixdq.json

Rows (each sampled from the same noise as the FP row, so ``Animal-FID − FP's`` is paired):

* ``W4A16 uniform`` against ``MixDQ MP 4.0 (A16)``: MixDQ's weight search at a 4.0-bit average
  (candidates {2, 4, 8} / {4, 8}, budget-split grid, pixel-MSE ranking) from a ``jdq sensitivity
  --recipe mixdq`` sweep (weights only; activations in float in both rows, so only the weight
  allocation differs);
* ``ViDiT-Q W4A8`` and ``W6A6`` with static and with timestep-aware balancing (same α: the
  paper's 0.11 at W4A8, 0.625 at W6A6), and without balancing.

Mixed precision at a 4-bit average, second round (``--mp-sensitivity``: a ``jdq sensitivity
--recipe mixdq`` sweep on the *evaluated* DDIM sampler, weights at 2/3/4/5/6/8 bits and
activations at 4/8; ``--viditq-sensitivity``: the ``vidit-q`` group sweep, weights 3/4/5/6/8):

* ``diagnosis``: on the ranking samples (20, seed 7), the measured output noise
  ``‖x − x_FP‖² / ‖x_FP‖²`` of uniform widths, of single-layer changes, of k FFN layers at 2 bits
  (compounding) and of every candidate of each search, beside the one-layer-at-a-time
  prediction (summed noise powers, summed SSIM, summed SQNR) and their rank correlations;
* ``MixDQ MP 4.0 (A16) …`` rows: the paper's search on the DDIM sweep, and the ``noise`` search
  (``mp_search="noise"``, uniform in the ranking) with candidates {2, 4, 8} and {3, 4, 5, 6, 8};
* activations: uniform W8A8 / W8A6 (static per tensor) against MixDQ's activation search at a
  6.0-bit average ({4, 8}, 1 % in float; paper and noise), weights at 8;
* ``ViDiT-Q W4A8-MP``: the vidit-q plan (timestep-aware balancing) with mixed weights at 4.0
  (candidates {3, 4, 5, 6, 8}; paper and noise) and the paper's {4, 8} at 4.5.

Third round (``--conditions``: ``benchmarks/vidit_mp_conditions.py``'s output): ``ViDiT-Q W4A8-MP
4.0 noise {3,4,5,6,8} asym-condition sweep`` / ``row-condition sweep``, the ``noise`` program on unit
measurements taken with the row's asymmetric weight cast alone / with the row's quantizer
(balancing, 8-bit per-token inputs) instead of the stored sweep's symmetric weights alone.

Protocol: the ``animal-mnist`` sampler (DDIM 15 steps, guidance 1.5, classes in turn, seed 0) at
a reduced sample count; calibration on ``--calib`` other samples along the same sampler.
Resumable: finished rows are kept in the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jdq import quant as Q  # noqa: E402
from jdq.io import atomic_write_text  # noqa: E402

#: The FP row's images, for the paired metrics of a resumed run (an ignored folder: not results).
FP_IMAGES = Path(__file__).resolve().parent / "results" / "quality_runs" / "vidit_mixdq_fp_images.npy"


def main(argv=None) -> int:
    """Run every row (skipping finished ones) and write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--calib", type=int, default=16)
    ap.add_argument("--out", default="benchmarks/results/vidit_mixdq.json")
    ap.add_argument("--sensitivity", default="benchmarks/results/vidit_mixdq_sensitivity")
    ap.add_argument("--sens-samples", type=int, default=20)
    ap.add_argument("--mp-sensitivity", default="benchmarks/results/vidit_mixdq_sensitivity_ddim")
    ap.add_argument("--viditq-sensitivity", default="benchmarks/results/vidit_mixdq_sensitivity_viditq")
    ap.add_argument("--rank-samples", type=int, default=20)
    ap.add_argument("--conditions", default="benchmarks/results/vidit_mp_conditions_n10.json",
                    help="benchmarks/vidit_mp_conditions.py's output: the W4A8-MP assignments of the third round")
    ap.add_argument("--rows", nargs="*", default=None)
    args = ap.parse_args(argv)

    import jdq
    from jdq import cli
    from jdq.demo import animal_fid
    from jdq.metrics import paired
    from jdq.metrics.evaluate import fid_delta_interval, fid_interval
    from jdq.metrics.protocols import ANIMAL_GUIDANCE, ANIMAL_STEPS
    from jdq.recipes import mixdq, vidit_q
    from jdq.sampling.generate import Denoiser, generate, guided_channels, null_condition, resolve_sampler, sample_shape
    from jdq.sampling.images import to_uint8
    from jdq.sampling.loop import collect_sampler_stats, sample_keys

    out = Path(args.out)
    tag = "" if args.samples == 100 else f"_n{args.samples}"  # image files of another sample count apart
    fp_images = FP_IMAGES.with_name(FP_IMAGES.stem + tag + ".npy")
    rows = json.loads(out.read_text())["rows"] if out.is_file() else {}
    model, _ = jdq.models.load(Path(jdq.__file__).parent / "assets" / "animal_dit")
    sampler = resolve_sampler(model, "ddim", ANIMAL_STEPS, clip_denoised=True)
    g = ANIMAL_GUIDANCE
    k = model.config.num_classes
    labels = np.tile(np.arange(k, dtype=np.int32), -(-args.samples // k))[: args.samples]
    calib = jnp.asarray(np.arange(args.calib, dtype=np.int32) % k)
    fn = Denoiser(model, "dit")
    x0 = jnp.zeros((1,) + sample_shape(model))
    operands = Q.trace_operands(fn, model.params, x0, jnp.zeros((1,)), jnp.asarray(labels[:1]))
    ref = animal_fid.load_reference()
    from jdq.demo import classifier

    clf = classifier.load(animal_fid.CLASSIFIER)
    stats_cache = {}

    def stats():
        if "s" not in stats_cache:
            _, st = collect_sampler_stats(fn, model.params, sampler, calib, sample_keys(12345, args.calib),
                                          sample_shape(model), uncond=null_condition(model, calib), guidance=g,
                                          guided_channels=guided_channels(model))
            stats_cache["s"] = st
        return stats_cache["s"]

    def features(images):
        return animal_fid.extract(clf, images)[animal_fid.FEATURES]

    def save():
        atomic_write_text(out, json.dumps({"samples": args.samples, "sampler": f"ddim {ANIMAL_STEPS}", "guidance": g,
                                           "calib": args.calib, "rows": rows}, indent=1) + "\n")

    def images_of(name):
        return FP_IMAGES.parent / ("vidit_mixdq_" + re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_") + tag + ".npy")

    paired_names = {n for pair in PAIRS for n in pair}

    def run(name, quant=None, info=None):
        if name in rows:
            print(f"{name}: read back", file=sys.stderr)
            if name in paired_names and not images_of(name).is_file():  # for the paired comparisons
                x = generate(model, labels, sampler=sampler, guidance=g, seed=0, batch_size=100, quant=quant,
                             progress=False)
                np.save(images_of(name), to_uint8(x))
            return
        t0 = time.time()
        x = generate(model, labels, sampler=sampler, guidance=g, seed=0, batch_size=100, quant=quant, progress=False)
        img = to_uint8(x)
        images_of(name).parent.mkdir(parents=True, exist_ok=True)
        np.save(images_of(name), img)
        f = features(img)
        row = {"fid": fid_interval(f, ref.stats_of(animal_fid.FEATURES)).to_dict(), "wall_s": time.time() - t0, "info": info or {}}
        if name != "FP":
            if not fp_images.is_file():  # a read-back FP row in a fresh checkout: the same images again
                fp_images.parent.mkdir(parents=True, exist_ok=True)
                np.save(fp_images, to_uint8(generate(model, labels, sampler=sampler, guidance=g, seed=0,
                                                     batch_size=100, progress=False)))
            fp = np.load(fp_images)
            row["dfid"] = fid_delta_interval(f, features(fp), ref.stats_of(animal_fid.FEATURES)).to_dict()
            row["psnr"] = paired.psnr(img, fp)
            row["ssim"] = paired.ssim(img, fp)
        else:
            fp_images.parent.mkdir(parents=True, exist_ok=True)
            np.save(fp_images, img)
        rows[name] = row
        save()
        print(f"{name}: FID {row['fid']} dFID {row.get('dfid')} ({row['wall_s']:.0f} s)", file=sys.stderr)

    def plan_of(rules, prep=None, opts=None):
        plan = Q.resolve(list(rules) + [Q.keep_float("*")], operands)
        st = stats() if prep is None else None
        state = prep(plan, stats(), model, **(opts or {}))[0] if prep else plan.init(Q.link_stats(st))
        return plan.bind(state)

    want = lambda n: args.rows is None or n in args.rows  # noqa: E731
    out.parent.mkdir(parents=True, exist_ok=True)
    run("FP")
    blocks = vidit_q.BLOCKS
    if want("W4A16 uniform"):
        run("W4A16 uniform", plan_of([Q.rule(blocks, mixdq.weight_cast(4), roles=("weight",))]))
    if want("MixDQ MP 4.0 (A16)") and "MixDQ MP 4.0 (A16)" not in rows:
        sens = Path(args.sensitivity) / "sensitivity.json"
        if not sens.is_file():
            code = cli.main(["sensitivity", "--recipe", "mixdq", "--out", args.sensitivity, "--samples",
                             str(args.sens_samples), "--steps", str(ANIMAL_STEPS), "--guidance", str(g),
                             "--weight-bits", "2", "4", "8", "--act-bits", "8", "--no-chart"])
            if code:
                return code
        data = json.loads(sens.read_text())
        cands = mixdq.weight_candidates(data, 4.0)
        best, mses = mixdq.rank_by_pixel_mse(model, sampler, jnp.asarray(labels[:20] if len(labels) >= 20 else labels),
                                             cands, samples=20, guidance=g, seed=7)
        wb = cands[best]
        sizes = {o.site: int(np.prod(o.shape)) for o in operands if o.role == "weight"}
        mean = sum(wb[s] * sizes[s] for s in wb) / sum(sizes[s] for s in wb)
        hist = {b: sum(1 for v in wb.values() if v == b) for b in (2, 4, 8)}
        rules = [Q.rule(f"re:{s.replace('.', '[.]')}", mixdq.weight_cast(b), roles=("weight",)) for s, b in wb.items()]
        run("MixDQ MP 4.0 (A16)", plan_of(rules), {"candidates": len(cands), "rank_mse": mses, "mean_bits": mean,
                                                    "layers_per_bits": hist, "weight_bits": wb})
    if "ranges" not in rows:  # why timestep-aware balancing does or does not differ: the per-range saliences
        from jdq.quant.balance import ChannelBalance

        table = np.asarray(vidit_q.range_groups(np.asarray(sampler.timesteps)).table)
        ema = ChannelBalance(salience="ema")
        ratios, drift = [], []
        for key, v in stats().items():
            site, _, role = key.rpartition(":")
            if role in Q.ACTIVATION_ROLES and site.startswith("blocks") and "adaLN" not in site:
                a = np.asarray(v["absmax_channel"])
                e0, e1 = (np.asarray(ema.act_salience(a[table == r], None)) for r in (0, 1))
                ratios.append(float(np.median(np.maximum(e0, e1) / np.maximum(np.minimum(e0, e1), 1e-6))))
                drift.append(float(np.median(a.max(0) / np.maximum(a.min(0), 1e-6))))
        rows["ranges"] = {"table": table.tolist(), "median_range_ratio": float(np.median(ratios)),
                          "max_range_ratio": float(np.max(ratios)), "median_step_drift": float(np.median(drift))}
        print(f"ranges: {rows['ranges']}", file=sys.stderr)
        save()
    for wb_, ab in ((4, 8), (6, 6)):
        for bal in ("none", "static", "timestep"):
            name = f"ViDiT-Q W{wb_}A{ab} {bal}"
            if want(name):
                r = vidit_q.rules(wbits=wb_, abits=ab, balance=bal, timesteps=tuple(np.asarray(sampler.timesteps)))
                run(name, plan_of(r, vidit_q.prepare), {"alpha": vidit_q.balance_of(wb_, ab, bal, None)[1]})

    # ---- second round: mixed precision at a 4-bit average, on the evaluated (DDIM) sampler ----
    def sweep(folder, recipe, wbits, abits, only=()):
        sens = Path(folder) / "sensitivity.json"
        if not sens.is_file():
            argv = ["sensitivity", "--recipe", recipe, "--out", folder, "--sampler", "ddim", "--samples", "10",
                    "--steps", str(ANIMAL_STEPS), "--guidance", str(g), "--weight-bits", *map(str, wbits),
                    "--act-bits", *map(str, abits), "--no-chart"] + (["--only", *only] if only else [])
            if cli.main(argv):
                raise SystemExit(f"jdq sensitivity failed for {folder}")
        return json.loads(sens.read_text())

    rank_labels = jnp.asarray(labels[: args.rank_samples])
    rank_kw = dict(samples=args.rank_samples, guidance=g, seed=7)
    wsizes = {o.site: int(np.prod(o.shape)) for o in operands if o.role == "weight"}

    def mean_bits(wb):
        return sum(wb[s] * wsizes[s] for s in wb) / sum(wsizes[s] for s in wb)

    def weight_rows(name, wb, extra=None):
        rules = [Q.rule(f"re:{re.escape(s)}", mixdq.weight_cast(b), roles=("weight",)) for s, b in wb.items()]
        run(name, plan_of(rules), dict(extra or {}, mean_bits=mean_bits(wb), weight_bits=wb,
                                       **mixdq.describe(wb)))

    rows_mp = ["MixDQ MP 4.0 (A16) paper", "MixDQ MP 4.0 (A16) noise {2,4,8}", "MixDQ MP 4.0 (A16) noise {3,4,5,6,8}"]

    def diagnose(sens, cands, ranked):
        """Measured joint damage (ranking samples) against the one-layer-at-a-time predictions."""
        from scipy.stats import spearmanr

        units = sens["units"]
        content = [n for n, u in units.items() if u["metric"] == "ssim"]
        quality = [n for n, u in units.items() if u["metric"] == "sqnr"]
        pred = lambda wb: sum(10 ** (-min(units[n]["weight"][str(b)]["sqnr"], 120) / 10)  # noqa: E731
                              for n, b in wb.items())
        ssim_sum = lambda wb: sum(units[n]["weight"][str(wb[n])]["ssim"] for n in content)  # noqa: E731
        sqnr_sum = lambda wb: sum(min(units[n]["weight"][str(wb[n])]["sqnr"], 120) for n in quality)  # noqa: E731
        sites = list(units)
        fc = sorted([n for n in content], key=lambda n: -units[n]["weight"]["2"]["sqnr"])  # most robust at 2 bits first
        tests = {f"uniform W{b}": {n: b for n in sites} for b in (3, 4, 5, 6, 8)}
        tests["W4 + blocks.3.mlp.fc1 at 2 (the round-1 choice's 2-bit layer)"] = dict(tests["uniform W4"],
                                                                                     **{"blocks.3.mlp.fc1": 2})
        tests["W4 + blocks.6.attn.proj at 8 (its 8-bit layer)"] = dict(tests["uniform W4"], **{"blocks.6.attn.proj": 8})
        for k in (1, 2, 4, 8):
            tests[f"W4 + {k} most robust FFN layers at 2"] = dict(tests["uniform W4"], **{n: 2 for n in fc[:k]})
        for k, cs in cands.items():
            for i, c in enumerate(cs):
                tests[f"{k} #{i}"] = c
        plan = mixdq.ranking_plan(operands)
        base = plan.init({})
        fp = np.asarray(generate(model, rank_labels, sampler=sampler, guidance=g, seed=7, progress=False), np.float64)
        out = {}
        for name, wb in tests.items():
            x = generate(model, rank_labels, sampler=sampler, guidance=g, seed=7, progress=False,
                         quant=plan.bind(mixdq.ranking_state(plan, base, wb)))
            err = np.asarray(x, np.float64) - fp
            out[name] = {"mean_bits": mean_bits(wb), **mixdq.describe(wb), "predicted_noise": pred(wb),
                         "content_ssim_sum": ssim_sum(wb), "quality_sqnr_sum": sqnr_sum(wb),
                         "measured_noise": float(np.sum(err**2) / np.sum(fp**2)), "pixel_mse": float(np.mean(err**2))}
            print(f"diagnosis {name}: {out[name]['mean_bits']:.3f} bits, predicted {out[name]['predicted_noise']:.4f}, "
                  f"measured {out[name]['measured_noise']:.4f}", file=sys.stderr)
        summary = {}
        paper = [v for k, v in out.items() if k.startswith("paper #")]
        allc = [v for k, v in out.items() if "#" in k]
        for label, group in (("paper candidates", paper), ("all candidates", allc)):
            m = [v["measured_noise"] for v in group]
            summary[label] = {
                "n": len(group),
                "spearman_predicted_noise": float(spearmanr([v["predicted_noise"] for v in group], m)[0]),
                "spearman_minus_content_ssim_sum": float(spearmanr([-v["content_ssim_sum"] for v in group], m)[0]),
                "spearman_minus_quality_sqnr_sum": float(spearmanr([-v["quality_sqnr_sum"] for v in group], m)[0]),
                "median_measured_over_predicted": float(np.median([v["measured_noise"] / v["predicted_noise"]
                                                                   for v in group]))}
        return {"tests": out, "summary": summary}

    need_mp = [n for n in rows_mp if want(n) and (n not in rows or (n in paired_names and not images_of(n).is_file()))]
    if need_mp or (want("diagnosis") and "diagnosis" not in rows):
        sens = sweep(args.mp_sensitivity, "mixdq", (2, 3, 4, 5, 6, 8), (4, 8))
        searches = {"paper": dict(search="paper"),
                    "noise {2,4,8}": dict(search="noise", candidates=(2, 4, 8), uniform=True),
                    "noise {3,4,5,6,8}": dict(search="noise", candidates=(3, 4, 5, 6, 8), uniform=True)}
        cands = {k: mixdq.weight_candidates(sens, 4.0, **kw) for k, kw in searches.items()}
        ranked = rows.get("mp_ranking", {})
        for k, cs in cands.items():  # only the searches a wanted row (or the diagnosis) needs
            if k not in ranked and (want(f"MixDQ MP 4.0 (A16) {k}") or (want("diagnosis") and "diagnosis" not in rows)):
                best, mses = mixdq.rank_by_pixel_mse(model, sampler, rank_labels, cs, **rank_kw)
                ranked[k] = {"chosen": best, "mse": mses, "candidates": cs}
                rows["mp_ranking"] = ranked
                save()
        if want("diagnosis") and "diagnosis" not in rows:
            rows["diagnosis"] = diagnose(sens, cands, ranked)
            save()
        for k in searches:
            name = f"MixDQ MP 4.0 (A16) {k}"
            if want(name):
                r = ranked[k]
                weight_rows(name, r["candidates"][r["chosen"]], {"search": k, "candidates": len(r["mse"]),
                                                                 "rank_mse": r["mse"]})
    if want("W5A16 uniform"):
        run("W5A16 uniform", plan_of([Q.rule(blocks, mixdq.weight_cast(5), roles=("weight",))]))
    # activations: MixDQ's {4, 8} search at a 6.0-bit average against uniform, weights at 8
    for ab in (8, 6):
        name = f"W8A{ab} uniform (static per tensor)"
        if want(name):
            run(name, plan_of(mixdq.rules(wbits=8, abits=ab, bos=False)))
    for k in ("paper", "noise"):
        name = f"MixDQ W8, activations MP 6.0 {k}"
        if want(name):
            if name in rows:
                info = rows[name]["info"]
                cs, mses, ab = [None] * info["candidates"], info["rank_mse"], info["act_bits"]
            else:
                sens = sweep(args.mp_sensitivity, "mixdq", (2, 3, 4, 5, 6, 8), (4, 8))
                cs = mixdq.act_candidates(sens, 6.0, 0.01, search=k)
                best, mses = (0, [None]) if len(cs) < 2 else mixdq.rank_by_pixel_mse(
                    model, sampler, rank_labels, cs, side="act", default_weight=8, default_act=8, stats=stats(),
                    **rank_kw)
                ab = cs[best]
            asz = {o.site: int(np.prod(o.shape[1:])) for o in operands if o.role in Q.ACTIVATION_ROLES}
            mean = sum(ab[s] * asz[s] for s in ab if ab[s]) / sum(asz[s] for s in ab if ab[s])
            run(name, plan_of(mixdq.rules(wbits=8, abits=8, bos=False, act_bits=ab)),
                {"candidates": len(cs), "rank_mse": mses, "mean_bits_quantized": mean, "act_bits": ab,
                 **mixdq.describe(ab)})
    # ViDiT-Q W4A8-MP: the W4A8 plan (timestep-aware balancing) with mixed weights
    for name, budget, widths, k in (("ViDiT-Q W4A8-MP 4.0 paper {3,4,5,6,8}", 4.0, (3, 4, 5, 6, 8), "paper"),
                                    ("ViDiT-Q W4A8-MP 4.0 noise {3,4,5,6,8}", 4.0, (3, 4, 5, 6, 8), "noise"),
                                    ("ViDiT-Q W4A8-MP 4.5 paper {4,8}", 4.5, (4, 8), "paper"),
                                    ("ViDiT-Q W4A8-MP 4.5 noise {4,8}", 4.5, (4, 8), "noise")):
        if want(name):
            vs = sweep(args.viditq_sensitivity, "vidit-q", (3, 4, 5, 6, 8), (8,), ("*/attention", "*/ffn"))
            wb = vidit_q.mp_assignment(vs, budget, widths, search=k)
            r = vidit_q.rules(wbits=4, abits=8, timesteps=tuple(np.asarray(sampler.timesteps)), weight_bits=wb)
            run(name, plan_of(r, vidit_q.prepare), {"mean_bits": mean_bits(wb), "weight_bits": wb,
                                                    **mixdq.describe(wb)})
    # third round: the same program on unit measurements taken under other conditions
    # (benchmarks/vidit_mp_conditions.py: "asym" = the row's asymmetric weight cast alone, "row" = the
    # row's balanced weights and 8-bit per-token inputs; the stored sweep used symmetric weights alone)
    for suffix, (src, cond) in CONDITION_ROWS.items():
        name = f"ViDiT-Q W4A8-MP 4.0 noise {{3,4,5,6,8}} {suffix}"
        src = src or args.conditions
        if want(name) and Path(src).is_file():
            wb = json.loads(Path(src).read_text())["assignments"][f"{cond} condition (noise)"]
            r = vidit_q.rules(wbits=4, abits=8, timesteps=tuple(np.asarray(sampler.timesteps)), weight_bits=wb)
            run(name, plan_of(r, vidit_q.prepare), {"mean_bits": mean_bits(wb), "weight_bits": wb,
                                                    "source": src, **mixdq.describe(wb)})
    # paired differences between quantized rows (same noise): FID(a) − FID(b) with its interval
    paired = rows.get("paired", {})
    for a, b in PAIRS:
        key = f"{a} − {b}"
        if key not in paired and images_of(a).is_file() and images_of(b).is_file() and a in rows and b in rows:
            paired[key] = fid_delta_interval(features(np.load(images_of(a))), features(np.load(images_of(b))),
                                             ref.stats_of(animal_fid.FEATURES)).to_dict()
            print(f"paired {key}: {paired[key]}", file=sys.stderr)
    if paired:
        rows["paired"] = paired
        save()
    return 0


#: Third-round W4A8-MP rows: name suffix → (the vidit_mp_conditions.py JSON, ``None``: ``--conditions``; condition).
CONDITION_ROWS = {
    "asym-condition sweep": (None, "asym"),
    "row-condition sweep": (None, "row"),
    "row-condition sweep (20 samples, seed 7)": ("benchmarks/results/vidit_mp_conditions_row_n20s7.json", "row"),
}

#: Paired comparisons ``(a, b)``: Animal-FID(a) − Animal-FID(b) on the same noise, with its interval.
PAIRS = (
    ("MixDQ MP 4.0 (A16) paper", "W4A16 uniform"),
    ("MixDQ MP 4.0 (A16) noise {3,4,5,6,8}", "W4A16 uniform"),
    ("ViDiT-Q W4A8-MP 4.0 paper {3,4,5,6,8}", "ViDiT-Q W4A8 timestep"),
    ("ViDiT-Q W4A8-MP 4.0 noise {3,4,5,6,8}", "ViDiT-Q W4A8 timestep"),
    ("ViDiT-Q W4A8-MP 4.0 noise {3,4,5,6,8} asym-condition sweep", "ViDiT-Q W4A8 timestep"),
    ("ViDiT-Q W4A8-MP 4.0 noise {3,4,5,6,8} row-condition sweep", "ViDiT-Q W4A8 timestep"),
    ("ViDiT-Q W4A8-MP 4.0 noise {3,4,5,6,8} row-condition sweep", "ViDiT-Q W4A8-MP 4.0 noise {3,4,5,6,8}"),
    ("ViDiT-Q W4A8-MP 4.0 noise {3,4,5,6,8} row-condition sweep (20 samples, seed 7)", "ViDiT-Q W4A8 timestep"),
    ("ViDiT-Q W4A8-MP 4.5 paper {4,8}", "ViDiT-Q W4A8 timestep"),
    ("ViDiT-Q W4A8-MP 4.5 noise {4,8}", "ViDiT-Q W4A8 timestep"),
    ("MixDQ W8, activations MP 6.0 paper", "W8A6 uniform (static per tensor)"),
    ("MixDQ W8, activations MP 6.0 noise", "W8A6 uniform (static per tensor)"),
)


if __name__ == "__main__":
    raise SystemExit(main())
