"""Animal-FID of ``jdq eval`` run folders, and paired differences between runs of the same noise.

::

    python benchmarks/paired_fid.py fp=runs/fp w8a8=runs/w8a8 w8a8-fp8attn=runs/w8a8-fp8attn \\
        --pair w8a8-fp8attn w8a8 --pair w8a8 fp --pair w8a8-fp8attn fp --out benchmarks/results/fp8attn_fid.json

``jdq eval`` pairs each quantized run with its FP run only; this script compares any two runs
sampled from the same noise (same model, sampler, steps, guidance, seed, labels: their
``settings.json`` may differ only in ``quant`` and ``calib_samples``), from the Animal-MNIST
features stored in their shards. Per run: Animal-FID with its grouped-jackknife interval
(:func:`jdq.metrics.evaluate.fid_interval`); per ``--pair A B``: ``FID(A) − FID(B)`` with the
paired grouped-jackknife interval (:func:`jdq.metrics.evaluate.fid_delta_interval`, the path of
``benchmarks/vidit_mixdq.py``'s paired rows: the same groups are left out of both runs, so the
shared sampling noise cancels). ``--samples N`` uses the first N samples of every run (the runs'
first N samples are the same noise whatever their sample counts). Runs need not be finished: the
whole shards at the front are used.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from jdq.io import atomic_write_text  # noqa: E402

#: settings.json keys that may differ between paired runs (everything else fixes the noise and labels).
MAY_DIFFER = ("quant", "calib_samples", "samples")
FEATURES = "animal"


def read_run(folder, samples: int | None = None) -> dict:
    """``{"settings", "features", "labels", "index"}`` of the whole shards at the front of a run folder.

    ``samples``: the first that many (an error if fewer are on disk)."""
    from jdq.metrics import shards

    folder = Path(folder)
    settings = json.loads((folder / shards.SETTINGS_FILE).read_text())
    n, size = int(settings["samples"]), int(settings["shard_size"])
    done = set(shards.complete_shards(folder, n, size))
    front = 0
    while front in done:
        front += 1
    have = min(n, front * size)
    want = have if samples is None else samples
    if want > have or want < 1:
        raise SystemExit(f"{folder}: {have} samples in whole shards at the front, {want} wanted")
    arrays = shards.load(folder, min(n, -(-want // size) * size), size, keys=(FEATURES, "labels", "index"))
    return {"settings": settings, "features": arrays[FEATURES][:want], "labels": arrays["labels"][:want],
            "index": arrays["index"][:want]}


def check_paired(name_a: str, a: dict, name_b: str, b: dict) -> None:
    """Refuse two runs that are not of the same noise and labels."""
    sa = {k: v for k, v in a["settings"].items() if k not in MAY_DIFFER}
    sb = {k: v for k, v in b["settings"].items() if k not in MAY_DIFFER}
    if sa != sb:
        diff = sorted(k for k in set(sa) | set(sb) if sa.get(k) != sb.get(k))
        raise SystemExit(f"{name_a} and {name_b} are not paired: their settings differ in {', '.join(diff)}")
    if not (np.array_equal(a["index"], b["index"]) and np.array_equal(a["labels"], b["labels"])):
        raise SystemExit(f"{name_a} and {name_b} are not paired: their sample indices or labels differ")


def main(argv=None) -> int:
    """Read the runs, compute the FIDs and the paired differences, write the JSON, print a table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", metavar="NAME=DIR", help="jdq eval run folders (animal-mnist features)")
    ap.add_argument("--pair", nargs=2, action="append", default=[], metavar=("A", "B"),
                    help="report FID(A) − FID(B), paired (repeatable)")
    ap.add_argument("--samples", type=int, default=None, help="the first N samples of every run (default: all "
                                                                "that every run has)")
    ap.add_argument("--groups", type=int, default=10, help="jackknife groups (default 10)")
    ap.add_argument("--out", default=None, help="JSON file to write")
    args = ap.parse_args(argv)

    from jdq.demo import animal_fid
    from jdq.metrics.evaluate import fid_delta_interval, fid_interval

    folders = {}
    for spec in args.runs:
        name, eq, folder = spec.partition("=")
        if not eq or not name or not folder:
            raise SystemExit(f"run {spec!r}: give NAME=DIR")
        folders[name] = folder
    for a, b in args.pair:
        for n in (a, b):
            if n not in folders:
                raise SystemExit(f"--pair {a} {b}: no run named {n!r} (runs: {', '.join(folders)})")
    runs = {k: read_run(v) for k, v in folders.items()}
    n = args.samples if args.samples is not None else min(len(r["features"]) for r in runs.values())
    runs = {k: read_run(v, n) for k, v in folders.items()}
    first = next(iter(runs))
    for k in runs:
        check_paired(first, runs[first], k, runs[k])
    ref = animal_fid.load_reference().stats_of(FEATURES)
    out = {"samples": n, "groups": args.groups,
           "settings": {k: v for k, v in runs[first]["settings"].items() if k not in MAY_DIFFER},
           "runs": {}, "pairs": {}}
    for k, r in runs.items():
        out["runs"][k] = {"folder": str(Path(folders[k]).resolve()), "quant": r["settings"].get("quant", ""),
                          "fid": fid_interval(r["features"], ref, args.groups).to_dict()}
    for a, b in args.pair:
        iv = fid_delta_interval(runs[a]["features"], runs[b]["features"], ref, args.groups)
        out["pairs"][f"{a} − {b}"] = iv.to_dict()
    if args.out:
        atomic_write_text(args.out, json.dumps(out, indent=1) + "\n")
    from jdq.metrics.intervals import Interval

    print(f"{n} samples, {args.groups} jackknife groups")
    print("| run | Animal-FID ↓ |\n|---|---|")
    for k, r in out["runs"].items():
        print(f"| {k} | {Interval.from_dict(r['fid']).format()} |")
    if out["pairs"]:
        print("\n| paired difference | Animal-FID ↓ |\n|---|---|")
        for k, v in out["pairs"].items():
            print(f"| {k} | {Interval.from_dict(v).format()} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
