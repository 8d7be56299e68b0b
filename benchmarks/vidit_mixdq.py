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

Protocol: the ``animal-mnist`` sampler (DDIM 15 steps, guidance 1.5, classes in turn, seed 0) at
a reduced sample count; calibration on ``--calib`` other samples along the same sampler.
Resumable: finished rows are kept in the JSON.
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

    def run(name, quant=None, info=None):
        if name in rows:
            print(f"{name}: read back", file=sys.stderr)
            return
        t0 = time.time()
        x = generate(model, labels, sampler=sampler, guidance=g, seed=0, batch_size=100, quant=quant, progress=False)
        img = to_uint8(x)
        f = features(img)
        row = {"fid": fid_interval(f, ref.stats_of(animal_fid.FEATURES)).to_dict(), "wall_s": time.time() - t0, "info": info or {}}
        if name != "FP":
            fp = np.load(FP_IMAGES)
            row["dfid"] = fid_delta_interval(f, features(fp), ref.stats_of(animal_fid.FEATURES)).to_dict()
            row["psnr"] = paired.psnr(img, fp)
            row["ssim"] = paired.ssim(img, fp)
        else:
            FP_IMAGES.parent.mkdir(parents=True, exist_ok=True)
            np.save(FP_IMAGES, img)
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
