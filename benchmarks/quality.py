"""What each quantization recipe does to the embedded Animal-MNIST DiT, measured with ``jdq eval`` (CPU).

::

    python benchmarks/quality.py                                  # FP + every recipe -> results/quality.md
    python benchmarks/quality.py --recipes mx6 mixdit mx9 mxfp4_e2m1
    python benchmarks/quality.py --sweep 1 1.5 2 3 4 --recipes    # FP Animal-FID against guidance only
    python benchmarks/quality.py --samples 200 --steps 5 --out /tmp/q.md --runs /tmp/qruns   # a quick look

Every row is one ``jdq eval`` run of the ``animal-mnist`` protocol (:mod:`jdq.metrics.protocols`:
1,000 samples, the classes in turn, DDIM, the protocol's guidance, seed 0), each in its own run
folder under ``--runs`` (resumable: an interrupted benchmark continues where it stopped, and a
finished row is read back, not recomputed). The quantized rows are paired with the FP run of the
same settings (``--fp-run``), so PSNR / SSIM / mean |Δ| compare images of the same noise. Columns:
Animal-FID (the classifier's penultimate features against the shipped statistics of the 10,000
real images), precision / recall (k = 3, against the shipped 1,000 real features), class agreement,
the paired difference of Animal-FID to the FP run's (same noise, so the sampling noise largely
cancels: the column that separates recipes), PSNR / SSIM / mean |Δ| vs FP, each with its 95 %
grouped-jackknife interval
(:mod:`jdq.metrics.intervals`), and the row's wall time.

``--floor`` adds the row "real images": 1,000 real images (100 per class, disjoint from the
shipped precision/recall subset) through the same metrics — the best any model can score at
this sample size. ``--sweep G …`` evaluates the FP model at each guidance (the protocol's
guidance is chosen where this FID is lowest; see the protocol's docstring).

The markdown file is written atomically; text below :data:`NOTES_MARKER` in an existing file
(the hand-written interpretation) is kept.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jdq.io import atomic_write_text  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS_MD = HERE / "results" / "quality.md"
RUNS = HERE / "results" / "quality_runs"
NOTES_MARKER = "<!-- notes: text below this line is written by hand and kept by benchmarks/quality.py -->"
FP = "fp"
COLUMNS = ("fid", "dfid", "precision", "recall", "agreement", "psnr", "ssim", "mad")


def parse_row(spec: str) -> tuple[str, dict]:
    """``"tq-dit:wbits=6,abits=6"`` -> ``("tq-dit", {"wbits": 6, "abits": 6})`` (values as JSON, else strings)."""
    name, _, rest = spec.partition(":")
    opts = {}
    for item in filter(None, rest.split(",")):
        k, _, v = item.partition("=")
        try:
            opts[k] = json.loads(v)
        except json.JSONDecodeError:
            opts[k] = v
    return name, opts


def row_slug(spec: str) -> str:
    """A folder-name form of a row spec."""
    return spec.replace(":", "-").replace(",", "-").replace("=", "")


def quantize_run(out: Path, name: str, options: dict, *, steps: int, guidance: float, progress: bool = True) -> dict:
    """``jdq quantize`` of the embedded model into ``out`` (skipped when it holds a finished folder); its report."""
    import subprocess

    if not (out / "quantized.json").is_file():  # its own process, so its peak memory is its own
        argv = ["quantize", "--recipe", name, "--out", str(out), "--sampler", "ddim", "--steps", str(steps),
                "--guidance", str(guidance)] + [a for k, v in options.items() for a in ("--option", f"{k}={json.dumps(v)}")]
        if not progress:
            argv.append("--no-progress")
        env = dict(os.environ, PYTHONPATH=str(HERE.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        code = subprocess.call([sys.executable, "-m", "jdq.cli"] + argv, env=env)
        if code != 0:
            raise SystemExit(f"jdq {' '.join(argv)} failed with status {code}")
    return json.loads((out / "report.json").read_text())


def eval_run(out: Path, *, quant: str | None = None, fp_run: Path | None = None, samples: int | None = None,
             steps: int | None = None, guidance: float | None = None, batch_size: int = 100,
             progress: bool = True, model: Path | None = None) -> dict:
    """``jdq eval`` of the embedded model (or a quantized folder ``model``) into ``out`` (skipped when finished)."""
    from jdq import cli

    res = out / "results.json"
    if not res.is_file():
        argv = ["eval"] + ([str(model)] if model is not None else []) + ["--out", str(out), "--batch-size", str(batch_size)]
        for flag, v in (("--quant", quant), ("--fp-run", fp_run), ("--samples", samples), ("--steps", steps),
                        ("--guidance", guidance)):
            if v is not None:
                argv += [flag, str(v)]
        if not progress:
            argv.append("--no-progress")
        t0 = time.perf_counter()
        code = cli.main(argv)
        if code != 0:
            raise SystemExit(f"jdq {' '.join(argv)} failed with status {code}")
        data = json.loads(res.read_text())
        data["benchmark_wall_s"] = time.perf_counter() - t0
        atomic_write_text(res, json.dumps(data, indent=2) + "\n")
    return json.loads(res.read_text())


def real_floor(samples: int, groups: int = 10) -> dict:
    """The metrics of ``samples`` real images (balanced, disjoint from the shipped PR subset) as a results dict."""
    import numpy as np

    from jdq.demo import animal_fid
    from jdq.demo import classifier as clf
    from jdq.demo.data import load_animal_mnist
    from jdq.metrics import evaluate

    images, labels = load_animal_mnist()
    ref = animal_fid.load_reference()
    with np.load(animal_fid.REFERENCE) as z:
        shipped = set(z["indices"].tolist())
    k = 10
    per = -(-samples // k)
    rng = np.random.default_rng(1)
    picks = [rng.choice([i for i in np.flatnonzero(labels == c) if i not in shipped], per, replace=False)
             for c in range(k)]
    order = np.stack(picks, axis=1).reshape(-1)[:samples]  # classes in turn, as the protocol's samples
    feats = animal_fid.extract(clf.load(animal_fid.CLASSIFIER), images[order][..., None])
    arrays = {"animal": feats["animal"], "predicted": feats["animal_logits"].argmax(-1), "labels": labels[order]}
    out = evaluate(["fid", "precision", "recall", "agreement"], ref, features="animal", arrays=arrays, groups=groups)
    return {"metrics": {m: v.to_dict() for m, v in out.items()}, "settings": {"samples": samples}}


def _cell(results: dict, metric: str) -> str:
    from jdq.cli.eval import format_metric
    from jdq.metrics.intervals import Interval

    d = results["metrics"].get(metric)
    return "—" if d is None else format_metric(metric, Interval.from_dict(d))


def table(rows: list[tuple[str, dict]]) -> str:
    """The markdown table of ``rows`` (``(label, results.json dict)``)."""
    head = ("| model | samples | Animal-FID ↓ | Animal-FID − FP's (paired) ↓ | precision ↑ | recall ↑ | "
            "class agreement ↑ | PSNR vs FP (dB) ↑ | SSIM vs FP ↑ | mean \\|Δ\\| vs FP ↓ | wall s |")
    lines = [head, "|---|---:|---|---|---|---|---|---|---|---|---:|"]
    for label, r in rows:
        wall = r.get("benchmark_wall_s", r.get("timing", {}).get("total_s"))
        lines.append(f"| {label} | {r['settings']['samples']} | " + " | ".join(_cell(r, m) for m in COLUMNS)
                     + f" | {'—' if wall is None else f'{wall:.0f}'} |")
    return "\n".join(lines)


def calibration_table(rows: list[tuple[str, dict]]) -> str:
    """Calibration cost of the rows quantized through ``jdq quantize`` ('' if none)."""
    lines = ["| recipe | calibration s | state building (search, GPTQ, folding) s | peak RSS MiB | quantized weights KiB |",
             "|---|---:|---:|---:|---:|"]
    for label, r in rows:
        q = r.get("quantize_report")
        if q:
            lines.append(f"| {label} | {q['calibration_s'] or 0:.0f} | {q['prepare_s'] or 0:.0f} | {q['peak_rss_mib']:.0f} | "
                         f"{q['quantized_weight_bytes'] / 1024:.0f} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def sweep_table(rows: list[tuple[float, dict]]) -> str:
    """FP metrics against guidance."""
    lines = ["| guidance | Animal-FID ↓ | precision ↑ | recall ↑ | class agreement ↑ |", "|---:|---|---|---|---|"]
    best = min(rows, key=lambda r: r[1]["metrics"]["fid"]["value"])[0]
    for g, r in rows:
        mark = " (lowest)" if g == best else ""
        lines.append(f"| {g:g}{mark} | " + " | ".join(_cell(r, m) for m in ("fid", "precision", "recall", "agreement"))
                     + " |")
    return "\n".join(lines)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def kept_notes(path) -> str:
    """The hand-written notes below :data:`NOTES_MARKER` in an existing results file ('' if none)."""
    try:
        text = Path(path).read_text()
    except OSError:
        return ""
    return text.split(NOTES_MARKER, 1)[1].lstrip("\n") if NOTES_MARKER in text else ""


def main(argv=None) -> int:
    """Run the rows (and the sweep), print the tables and write the results file."""
    from jdq import recipes
    from jdq.metrics import protocols

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipes", nargs="*", default=None, help="rows besides FP (default: every recipe; none: FP only)")
    p.add_argument("--samples", type=int, default=None, help="default: the protocol's (1,000)")
    p.add_argument("--steps", type=int, default=None, help="default: the protocol's")
    p.add_argument("--guidance", type=float, default=None, help="default: the protocol's")
    p.add_argument("--sweep", type=float, nargs="*", default=None, metavar="G", help="FP rows at these guidances")
    p.add_argument("--floor", action="store_true", help="add the real-images row (needs the animal-mnist package)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--runs", default=str(RUNS), help="folder of the jdq eval run folders (resumable)")
    p.add_argument("--out", default=str(RESULTS_MD))
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    names = list(recipes.names()) if args.recipes is None else list(args.recipes)
    unknown = [n for n in names if parse_row(n)[0] not in recipes.names()]
    if unknown:
        raise SystemExit(f"unknown recipe {unknown[0]!r}; known: {', '.join(recipes.names())}")
    proto = protocols.get("animal-mnist")
    steps = args.steps or proto.steps
    guidance = proto.guidance if args.guidance is None else args.guidance
    samples = args.samples or proto.samples
    runs = Path(args.runs)
    tag = f"n{samples}-ddim{steps}-g{guidance:g}"
    common = dict(samples=samples, steps=steps, guidance=guidance, batch_size=args.batch_size,
                  progress=not args.no_progress)
    load_before, t0 = os.getloadavg(), time.perf_counter()
    parts = []
    if args.sweep:
        sweep = [(g, eval_run(runs / f"fp-n{samples}-ddim{steps}-g{g:g}", **dict(common, guidance=g)))
                 for g in args.sweep]
        parts += [f"FP model against guidance ({samples} samples, DDIM {steps} steps, seed 0):", "", sweep_table(sweep), ""]
    rows = []
    if args.floor:
        rows.append(("real images (held out)", real_floor(samples)))
    if names or not args.sweep:
        fp_dir = runs / f"fp-{tag}"
        rows.append(("FP (float32)", eval_run(fp_dir, **common)))
        for name in names:
            recipe, options = parse_row(name)
            if options or recipes.get(recipe).calibrated:  # through `jdq quantize` and its folder
                qdir = runs / f"q-{row_slug(name)}-ddim{steps}-g{guidance:g}"
                report = quantize_run(qdir, recipe, options, steps=steps, guidance=guidance,
                                      progress=not args.no_progress)
                r = eval_run(runs / f"{row_slug(name)}-{tag}", model=qdir, fp_run=fp_dir, **common)
                r["quantize_report"] = {k: report.get(k) for k in ("calibration_s", "prepare_s", "total_s",
                                                                   "peak_rss_mib", "quantized_weight_bytes")}
                rows.append((f"`{name}`", r))
            else:
                rows.append((f"`{name}`", eval_run(runs / f"{name}-{tag}", quant=name, fp_run=fp_dir, **common)))
        parts += [f"Protocol `animal-mnist`: {samples} samples (classes in turn), DDIM {steps} steps, guidance "
                  f"{guidance:g}, seed 0; 95 % intervals: grouped jackknife over 10 contiguous groups.", "",
                  table(rows), ""]
        cal = calibration_table(rows)
        if cal:
            parts += ["Calibration (`jdq quantize`, CPU, the same shared machine; peak RSS of the whole process):", "",
                      cal, ""]
    argv_list = sys.argv[1:] if argv is None else list(argv)
    header = ["# Quantization recipes on the embedded Animal-MNIST DiT: `jdq eval` (CPU)", "",
              f"Generated by `python benchmarks/quality.py{' ' + shlex.join(argv_list) if argv_list else ''}` on "
              f"{datetime.date.today().isoformat()}: {_cpu_name()}, {os.cpu_count()} cores; load average "
              f"{load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after (other processes share the cores); "
              f"{time.perf_counter() - t0:.0f} s (rows read back from finished runs cost nothing).", ""]
    text = "\n".join(header + parts)
    print(text)
    atomic_write_text(args.out, text + "\n" + NOTES_MARKER + "\n\n" + kept_notes(args.out), parents=True)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
