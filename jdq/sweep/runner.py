"""A whole sweep on disk: samples per chunk (resumable), metrics vs FP, cost-model latency, JSON / markdown / PNG.

Folder layout (``out``): ``settings.json`` (what the run is; a folder holding another run is
refused), ``fp.npz`` (the floating-point samples every point is compared with, same noise),
``points/g<group>-c<start>.npz`` (one vmapped chunk: ``samples``, ``index`` = global point
indices), then ``sweep.json``, ``sweep.md`` and ``pareto.png``. Every file is written atomically,
so an interrupted run keeps its finished chunks and a rerun with the same settings samples only
the rest.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jdq import sharding
from jdq.io import atomic_write_text
from jdq.metrics import shards
from jdq.metrics.fid import RankDeficientWarning
from jdq.sampling.images import save_npz, to_uint8
from jdq.sweep import bits, core, latency, pareto

#: Quality metrics a sweep can report: name -> (higher is better, description).
METRICS = {
    "animal-fid": (False, "Animal-FID of the point's samples vs the real Animal-MNIST statistics (jackknife interval)"),
    "dfid": (False, "Animal-FID(point) − Animal-FID(FP), paired over the same noise (paired jackknife interval)"),
    "psnr": (True, "PSNR (dB) of the point's images vs the FP images (same noise)"),
    "ssim": (True, "SSIM of the point's images vs the FP images"),
}


def _load_npz(path: Path, keys: Sequence[str]):
    try:
        with np.load(path, allow_pickle=False) as z:
            if all(k in z.files for k in keys):
                return {k: z[k] for k in keys}
    except (OSError, ValueError, EOFError):
        pass
    return None


def calibration_stats(spec: core.SamplerSpec, num: int, seed: int) -> Callable[[str], dict]:
    """``stats_for(recipe)``: per-step operand statistics of the FP sampler on the first ``num`` conditions."""
    from jdq.sampling.loop import collect_sampler_stats, sample_keys

    cache = {}

    def stats_for(name):
        if "stats" not in cache:
            n = max(1, min(num, int(np.shape(jax.tree.leaves(spec.cond)[0])[0])))
            cond = jax.tree.map(lambda a: a[:n], spec.cond)
            _, cache["stats"] = collect_sampler_stats(spec.fn, spec.params, spec.sampler, cond, sample_keys(seed + 1, n),
                                                      spec.shape, uncond=spec.uncond, guidance=spec.guidance,
                                                      guided_channels=spec.guided_channels)
        return cache["stats"]
    return stats_for


def point_metrics(names: Sequence[str], images: np.ndarray, fp_images: np.ndarray, feats=None, fp_feats=None,
                  reference=None) -> dict:
    """The requested quality metrics of one point (uint8 images vs FP images), intervals as dicts."""
    import importlib

    from jdq.metrics import psnr, ssim

    E = importlib.import_module("jdq.metrics.evaluate")  # the package attribute is the function evaluate()

    out = {}
    for name in names:
        if name == "psnr":
            out[name] = {"value": float(psnr(images, fp_images))}
        elif name == "ssim":
            out[name] = {"value": float(ssim(images, fp_images))}
        elif name == "animal-fid":
            out[name] = E.fid_interval(feats, reference, groups=min(10, len(feats))).to_dict()
        elif name == "dfid":
            out[name] = E.fid_delta_interval(feats, fp_feats, reference, groups=min(10, len(feats))).to_dict()
        else:
            raise KeyError(f"unknown metric {name!r}; known: {list(METRICS)}")
    return out


def run_sweep(out, model, *, recipe: str | None, vary: Mapping[str, list], metrics: Sequence[str],
              hardware: Sequence[str], samples: int, steps: int, seed: int = 0, guidance: float | None = None,
              defaults: Mapping | None = None, max_chunk: int | None = None, cost_model: str | None = None,
              calib_samples: int = 8, log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
              model_name: str = "", bits_family: str = "int", bits_default: int | None = None) -> dict:
    """Run (or resume) the sweep into folder ``out``; return the ``sweep.json`` payload (also written).

    ``bits_family`` / ``bits_default``: the formats of bit-width settings (:mod:`jdq.sweep.bits`).
    """
    from jdq import hw
    from jdq.hw import workload
    from jdq.models.spec import named_configs

    out = Path(out)
    defaults = dict(defaults or {})
    points = core.grid(vary)
    if not points:
        raise core.SweepError("the grid is empty")
    for m in metrics:
        if m not in METRICS:
            raise core.SweepError(f"unknown metric {m!r}; known: {', '.join(METRICS)}")
    if samples < 2 and any(m in ("animal-fid", "dfid") for m in metrics):
        raise core.SweepError("Animal-FID and its interval need at least 2 samples per point")
    presets = [latency.preset(h) for h in hardware]  # KeyError names the known presets
    if cost_model is not None and cost_model not in named_configs():
        raise core.SweepError(f"unknown cost model {cost_model!r}; known: {', '.join(named_configs())}")
    k = model.config.num_classes
    spec = core.class_spec(model, np.arange(samples) % k, steps=steps, guidance=guidance, seed=seed, defaults=defaults)
    ops = core.spec_operands(spec)
    groups = core.build_groups(points, ops, recipe=recipe, stats_for=calibration_stats(spec, calib_samples, seed),
                               num_steps=steps, bits_family=bits_family, bits_default=bits_default)
    structure = core.structure_report(groups)
    settings = dict(model=model_name, recipe=recipe, vary={k_: [repr(v) for v in vs] for k_, vs in vary.items()},
                    samples=samples, steps=steps, seed=seed, guidance=spec.guidance, sampler=spec.sampler.kind,
                    calib_samples=calib_samples)
    if groups[0].space is not None:
        settings.update(bits_family=groups[0].space.bits_family, bits_default=groups[0].space.default)
    shards.prepare(out, settings)
    (out / "points").mkdir(exist_ok=True)

    fp = _load_npz(out / "fp.npz", ["samples"])
    if fp is None:
        log(f"sampling FP: {samples} samples, {steps} steps")
        save_npz(out / "fp.npz", samples=np.asarray(spec.run(None)))
        fp = _load_npz(out / "fp.npz", ["samples"])
    fp_samples = fp["samples"]

    devices = jax.local_device_count()
    mesh = sharding.batch_mesh() if devices > 1 else None
    found: dict[int, np.ndarray] = {}
    memory = []
    for gi, g in enumerate(groups):
        state0 = jax.tree.map(lambda a: a[0], g.states)
        est = core.sweep_bytes(spec, g.plan, state0)
        per_point = int(est.per_point * core.MEMORY_SAFETY)
        shared = int(est.shared * core.MEMORY_SAFETY)
        cap = max_chunk if max_chunk is not None else (core.CPU_MAX_CHUNK if jax.default_backend() == "cpu" else None)
        chunk = core.chunk_size(len(g), per_point, max_chunk=cap, devices=devices, shared=shared)
        record = {"group": gi, "estimated_bytes_per_point": per_point, "estimated_shared_bytes": shared,
                  "chunk": chunk, "out_of_memory": []}
        memory.append(record)

        def on_oom(start, size, new, error, gi=gi, record=record):
            record["out_of_memory"].append({"start": start, "points_per_call": size, "retried_with": new})
            record["points_per_call"] = new
            log(f"group {gi}: out of memory at {size} points per call (point {start}): retrying with {new}")

        def path_of(start, gi=gi):
            return out / "points" / f"g{gi:02d}-c{start:04d}.npz"

        def skip(start, g=g, chunk=chunk, path_of=path_of):
            want = np.asarray(g.indices[start:start + chunk])
            have = _load_npz(path_of(start), ["samples", "index"])
            return have is not None and np.array_equal(have["index"], want)

        def save(start, x, g=g, path_of=path_of):
            idx = np.asarray(g.indices[start:start + x.shape[0]])
            save_npz(path_of(start), samples=x, index=idx)
            log(f"group {gi} ({g.recipe}): points {start}..{start + x.shape[0] - 1} of {len(g)} written")

        todo = [s for s in range(0, len(g), chunk) if not skip(s)]
        log(f"group {gi} ({g.recipe}, varies {list(g.varies) or 'nothing'}): {len(g)} points, chunk {chunk}, "
            f"{len(todo)} chunk(s) to sample")
        core.run_group(spec, g, chunk=chunk, mesh=mesh, on_chunk=save, skip=skip, on_oom=on_oom)
        for start in range(0, len(g), chunk):
            have = _load_npz(path_of(start), ["samples", "index"])
            for j, i in enumerate(have["index"]):
                found[int(i)] = have["samples"][j]

    # quality
    fp_img = to_uint8(fp_samples)
    needs_fid = any(m in ("animal-fid", "dfid") for m in metrics)
    reference = feats_of = fp_feats = None
    if needs_fid:
        if fp_img.shape[1:] != (28, 28, 1):
            raise core.SweepError(f"Animal-FID needs 28×28×1 images (the embedded model's); this model makes "
                                  f"{fp_img.shape[1:]}: use --metrics psnr,ssim")
        from jdq.demo import animal_fid, classifier

        clf = classifier.load(animal_fid.CLASSIFIER)
        reference = animal_fid.load_reference().stats_of(animal_fid.FEATURES)
        feats_of = lambda img: animal_fid.extract(clf, img)[animal_fid.FEATURES]  # noqa: E731
        fp_feats = feats_of(fp_img)
        if samples <= fp_feats.shape[1]:
            log(f"note: {samples} samples for {fp_feats.shape[1]} Animal-FID features: the covariance is rank-deficient, "
                "so FID values are dominated by the missing directions (compare points, not papers)")

    # cost: the plan of each point on the cost shapes (the sweep's model with CFG, or a named model)
    if cost_model is None:
        x2 = jnp.zeros((2,) + tuple(spec.shape), jnp.float32)
        c2 = jax.tree.map(lambda a: jnp.concatenate([a[:1], a[:1]]), spec.cond)
        cost_ops = core.Q.trace_operands(spec.fn, spec.params, x2, jnp.zeros((2,), jnp.float32), c2)
    else:
        cost_ops = workload.model_operands(cost_model, batch=2)
    rows = []
    fp_cost = {}
    for name, hw_ in zip(hardware, presets):
        wl = hw.from_operands(cost_ops, workload.uniform("bf16"))
        fp_cost[name] = {"seconds": float(hw.evaluate(hw_, wl).total().seconds) * steps}
    cost_plans = {}
    for gi, g in enumerate(groups):
        for j, i in enumerate(g.indices):
            state = jax.tree.map(lambda a: a[j], g.states)
            if g.space is not None:  # bit widths: priced per time group on the cost shapes, by site
                cost = {}
                for name, hw_ in zip(hardware, presets):
                    c = bits.point_cost(hw_, cost_ops, g.space, points[i], steps)
                    cost[name] = {"seconds": c["seconds"], "energy_j": c["energy_j"],
                                  "speedup_vs_bf16": fp_cost[name]["seconds"] / c["seconds"]}
                rows.append(_row(i, points, gi, g, found, metrics, fp_img, feats_of, fp_feats, reference, needs_fid, cost))
                continue
            if cost_model is not None:  # the same recipe and settings resolved on the cost model's operands
                if g.recipe not in cost_plans:
                    from jdq import recipes
                    p = recipes.plan_for(g.recipe, cost_ops)
                    cost_plans[g.recipe] = (p, p.init(None) if not recipes.get(g.recipe).calibrated else None)
                cplan, cstate = cost_plans[g.recipe]
                if cstate is None:
                    raise core.SweepError(f"--cost-model {cost_model}: calibrated recipe {g.recipe!r} cannot be "
                                          "priced on shapes without the model")
                for key, value in points[i].items():
                    if not core.SETTINGS[key].structural:
                        cstate = core.SETTINGS[key].apply(cplan, cstate, value) or cstate
            else:
                cplan, cstate = g.plan, state
            cost = {}
            for name, hw_ in zip(hardware, presets):
                c = latency.plan_cost(hw_, cost_ops, cplan, cstate)
                cost[name] = {"seconds": c["seconds"] * steps, "energy_j": c["energy_j"] * steps,
                              "speedup_vs_bf16": fp_cost[name]["seconds"] / (c["seconds"] * steps)}
            rows.append(_row(i, points, gi, g, found, metrics, fp_img, feats_of, fp_feats, reference, needs_fid, cost))
    rows.sort(key=lambda r: r["index"])
    payload = {"settings": settings, "structure": structure, "memory": memory, "metrics": list(metrics),
               "hardware": list(hardware), "cost_model": cost_model or "the swept model (batch 2: CFG)",
               "fp_cost": fp_cost, "points": rows}
    if metrics and hardware:
        quality = metrics[0]
        hi = METRICS[quality][0]
        xs = [r["cost"][hardware[0]]["seconds"] * 1e3 for r in rows]
        ys = [_num(r["metrics"][quality]["value"]) for r in rows]
        payload["pareto"] = {"x": f"latency on {hardware[0]} (ms per image)", "y": quality,
                             "front": [rows[i]["index"] for i in pareto.pareto_front(xs, ys, hi)]}
        err = None
        if "low" in rows[0]["metrics"][quality]:
            err = ([_num(r["metrics"][quality]["low"]) for r in rows], [_num(r["metrics"][quality]["high"]) for r in rows])
        pareto.plot_pareto(out / "pareto.png", xs, ys, [r["label"] for r in rows],
                           xlabel=payload["pareto"]["x"], ylabel=quality, higher_is_better=hi, errors=err,
                           title=f"{model_name or 'model'}: {recipe or ''} sweep, {samples} samples, {steps} steps")
    atomic_write_text(out / "sweep.json", json.dumps(payload, indent=2, default=_json_default) + "\n")
    atomic_write_text(out / "sweep.md", markdown_table(payload))
    return payload


def _row(i, points, gi, g, found, metrics, fp_img, feats_of, fp_feats, reference, needs_fid, cost) -> dict:
    img = to_uint8(found[i])
    feats = feats_of(img) if needs_fid else None
    with warnings.catch_warnings():  # said once below, not per point and jackknife group
        warnings.simplefilter("ignore", RankDeficientWarning)
        quality = point_metrics(metrics, img, fp_img, feats, fp_feats, reference)
    point = {k: list(v) if isinstance(v, tuple) else v for k, v in points[i].items()}
    return {"index": i, "label": core.point_label(points[i]), "point": point, "group": gi,
            "recipe": g.recipe, "metrics": quality, "cost": cost}


def _num(v):
    return float(v)  # Interval.to_dict writes inf / nan as strings, which float() reads back


def _json_default(v):
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")


def markdown_table(payload: Mapping) -> str:
    """The sweep as a markdown table: one row per point, metrics with intervals, latency/energy per preset."""
    metrics, hardware = payload["metrics"], payload["hardware"]
    front = set(payload.get("pareto", {}).get("front", []))
    head = ["point", "group"] + metrics + [f"{h} ms/img" for h in hardware] + [f"{h} mJ/img" for h in hardware] + ["front"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in payload["points"]:
        cells = [r["label"], str(r["group"])]
        for m in metrics:
            v = r["metrics"][m]
            if "low" in v:
                cells.append(f"{_num(v['value']):.3f} [{_num(v['low']):.3f}, {_num(v['high']):.3f}]")
            else:
                cells.append(f"{_num(v['value']):.4f}")
        cells += [f"{r['cost'][h]['seconds'] * 1e3:.4g}" for h in hardware]
        cells += [f"{r['cost'][h]['energy_j'] * 1e3:.4g}" for h in hardware]
        cells.append("★" if r["index"] in front else "")
        lines.append("| " + " | ".join(cells) + " |")
    s = payload["structure"]
    lines.append("")
    lines.append(f"{s['compilations']} compilation(s); vmapped within one: {s['vmapped'] or 'none'}; "
                 f"structural (compiled separately): {s['structural'] or 'none'}. Cost shapes: {payload['cost_model']}.")
    return "\n".join(lines) + "\n"
