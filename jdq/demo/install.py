"""Install a training run (:mod:`jdq.demo.train`'s output folder) as the embedded default model.

Usage::

    python -m jdq.demo.install RUN_DIR [--sampler ddpm --steps 50 --guidance 2]

Copies ``RUN_DIR/dit`` to ``jdq/assets/animal_dit`` (with ``sampling.json``: the sampler, steps
and guidance ``jdq sample`` uses by default; without flags, the setting with the best classifier
agreement among those of at most ``--max-steps`` steps in ``metrics.json``), the classifier to
``jdq/assets/animal_classifier.safetensors``, a summary of ``metrics.json`` to
``jdq/assets/animal_training.json`` and the sample grid to ``docs/samples.png``. Every file is
written atomically; the assets must stay within 30 MB.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from jdq.demo import data
from jdq.io import atomic_write, atomic_write_text

PACKAGE = Path(__file__).resolve().parents[1]
REPO = PACKAGE.parent
MAX_ASSET_BYTES = 30 * 1000 * 1000


def choose_sampling(metrics: dict, max_steps: int = 100) -> dict:
    """The evaluated (sampler, steps, guidance) with the best classifier agreement, at most ``max_steps`` steps."""
    rows = [r for r in metrics.get("sample_accuracy", []) if r["steps"] <= max_steps]
    if not rows:
        raise ValueError(f"metrics.json has no evaluated sampler with at most {max_steps} steps")
    best = max(rows, key=lambda r: (round(r["accuracy"], 3), -r["steps"], -r["guidance"]))
    return {"sampler": best["sampler"], "steps": best["steps"], "guidance": best["guidance"]}


def install(run_dir, assets=None, docs=None, sampling: dict | None = None, max_steps: int = 100) -> dict:
    """Install ``run_dir`` into ``assets`` (default ``jdq/assets``) and ``docs``; returns the sampling defaults."""
    from jdq.demo import classifier as clf
    from jdq.models import load
    from jdq.models.base import write_folder_atomically

    run = Path(run_dir)
    assets = PACKAGE / "assets" if assets is None else Path(assets)
    docs = REPO / "docs" if docs is None else Path(docs)
    needed = ["dit/config.json", "dit/params.safetensors", "classifier.safetensors", "metrics.json", "samples.png"]
    missing = [n for n in needed if not (run / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{run} is not a complete training run: missing {missing}")
    load(run / "dit")  # checks names and shapes
    clf.load(run / "classifier.safetensors")
    metrics = json.loads((run / "metrics.json").read_text())
    chosen = dict(choose_sampling(metrics, max_steps) if sampling is None else sampling)
    defaults = {**chosen, "clip_denoised": True, "pixel_space": True, "class_names": list(data.CLASS_NAMES)}
    size = (run / "dit/params.safetensors").stat().st_size + (run / "classifier.safetensors").stat().st_size
    if size > MAX_ASSET_BYTES:
        raise ValueError(f"the weights take {size / 1e6:.1f} MB; the embedded model must stay within 30 MB")
    assets.mkdir(parents=True, exist_ok=True)
    docs.mkdir(parents=True, exist_ok=True)

    def write_model(tmp: Path):
        shutil.copyfile(run / "dit/config.json", tmp / "config.json")
        shutil.copyfile(run / "dit/params.safetensors", tmp / "params.safetensors")
        (tmp / "sampling.json").write_text(json.dumps(defaults, indent=2) + "\n")

    write_folder_atomically(assets / "animal_dit", write_model, overwrite=True)
    atomic_write(assets / "animal_classifier.safetensors", lambda tmp: shutil.copyfile(run / "classifier.safetensors", tmp))
    summary = {k: metrics.get(k) for k in ("device", "jax", "seed", "preset", "config", "dit_params", "dit_steps_done",
                                          "dit_train_seconds", "classifier_train_seconds", "classifier_test_accuracy",
                                          "classifier_test_images", "sample_accuracy")}
    summary["default_sampling"] = chosen
    atomic_write_text(assets / "animal_training.json", json.dumps(summary, indent=2) + "\n")
    atomic_write(docs / "samples.png", lambda tmp: shutil.copyfile(run / "samples.png", tmp))
    return chosen


def main(argv=None) -> int:
    """Command line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--sampler", default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--guidance", type=float, default=None)
    ap.add_argument("--max-steps", type=int, default=100, help="most steps a default may take (CPU time)")
    args = ap.parse_args(argv)
    given = [args.sampler, args.steps, args.guidance]
    if any(v is not None for v in given) and not all(v is not None for v in given):
        print("jdq.demo.install: give all of --sampler, --steps and --guidance, or none", file=sys.stderr)
        return 2
    sampling = None if args.sampler is None else {"sampler": args.sampler, "steps": args.steps, "guidance": args.guidance}
    try:
        chosen = install(args.run_dir, sampling=sampling, max_steps=args.max_steps)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"jdq.demo.install: error: {e}", file=sys.stderr)
        return 2
    print(f"installed {args.run_dir} as the embedded model; jdq sample defaults: {chosen}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
