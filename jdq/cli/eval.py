"""``jdq eval``: sample quality of a model (FP or ``--quant RECIPE``) with honest intervals, resumable.

``jdq eval`` with no arguments evaluates the embedded Animal-MNIST DiT with the ``animal-mnist``
protocol (1,000 samples on the CPU: Animal-FID, precision/recall, class agreement); ``jdq eval
--quant mx6 --out runs/mx6`` evaluates a recipe and adds PSNR / SSIM / mean |Δ| against the FP
model's images of the same noise (sampled into ``OUT/fp``, or taken from ``--fp-run DIR``).
``jdq eval converted/dit-xl-2-256 --protocol dit-imagenet256 --inception converted/inception
--vae converted/sd-vae-ft-ema --reference VIRTUAL_imagenet256_labeled.npz --out runs/dit`` runs
the DiT papers' protocol (a GPU job).

The run folder ``--out`` holds ``settings.json``, one atomic ``shard-NNNNN.npz`` per
``--shard-size`` samples (images, labels, features), and at the end ``results.json``,
``results.md`` (settings, seeds, device, versions, every metric with its 95 % interval and the
interval's method) and ``samples.png`` (a grid of the first samples). Run the same command again
after an interruption: finished shards are kept and the result equals an uninterrupted run's. A
folder holding a run with other settings is refused. Metrics are computed from the shards, so
``--metrics`` and ``--reference`` may change between runs of the same folder.

Several processes: ``--num-processes P --process-id I --coordinator HOST:PORT`` (or
``--distributed`` where ``jax.distributed.initialize()`` finds them itself, e.g. SLURM); each
process samples its shards into the shared ``--out``, process 0 gathers them and writes the results.

Inputs: a jdq model folder (``jdq convert``) — class-conditional DiTs — or a quantized folder from
``jdq quantize`` (evaluated with its stored state, paired with its model's FP run; no ``--quant``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from jdq.cli._common import COMMANDS, DEFAULT_CLASSIFIER, DEFAULT_MODEL, CliError, require_finite, require_writable

NAME = "eval"
HELP = COMMANDS[NAME][1]
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
GRID_PNG = "samples.png"
#: ``--quant`` value standing for a ``jdq quantize`` folder given as the model.
SAVED_PREFIX = "saved:"


def add_parser(sub):
    """Add ``jdq eval`` to an argparse sub-parser collection; return its parser."""
    from jdq.metrics.evaluate import METRICS
    from jdq.metrics.protocols import PROTOCOLS

    p = sub.add_parser(NAME, help=HELP, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=None,
                   help="a jdq model folder (a class-conditional DiT); default: the embedded Animal-MNIST DiT")
    p.add_argument("--quant", default=None, metavar="RECIPE", help="quantization recipe (e.g. mx6, mixdit, w8a8)")
    p.add_argument("--protocol", default=None, choices=sorted(PROTOCOLS),
                   help="animal-mnist (default for the embedded model) or dit-imagenet256 (default otherwise)")
    p.add_argument("--samples", type=int, default=None, metavar="N", help="number of samples (default: the protocol's)")
    p.add_argument("--metrics", nargs="+", default=None, metavar="M", choices=METRICS + ("clip",),
                   help=f"metrics to report (default: the protocol's, plus psnr ssim mad with --quant); "
                        f"any of {', '.join(METRICS)}; or clip (a text-to-image pipeline, with --prompts and --clip)")
    p.add_argument("--prompts", default=None, metavar="FILE", help="--metrics clip: one prompt per line")
    p.add_argument("--clip", default=None, metavar="DIR", help="--metrics clip: a converted transformers CLIPModel folder")
    p.add_argument("--reference", default=None, metavar="FILE",
                   help="reference batch .npz (ADM: arr_0 images and/or mu, sigma, mu_s, sigma_s); "
                        "default for animal-mnist: the shipped Animal-FID reference")
    p.add_argument("--out", default="eval", metavar="DIR", help="run folder (default ./eval)")
    p.add_argument("--fp-run", default=None, metavar="DIR",
                   help="FP run folder to pair a quantized run with (default OUT/fp, sampled if missing)")
    p.add_argument("--sampler", default=None, help="override the protocol's sampler (ddpm, ddim)")
    p.add_argument("--steps", type=int, default=None, help="override the protocol's number of steps")
    p.add_argument("--guidance", type=float, default=None, help="override the protocol's guidance scale")
    p.add_argument("--seed", type=int, default=None, help="override the protocol's seed (sample j: fold_in(key(seed), j))")
    p.add_argument("--batch-size", type=int, default=100, help="samples per compiled sampler call (default 100)")
    p.add_argument("--shard-size", type=int, default=None, help="samples per shard file (default 2 batches)")
    p.add_argument("--groups", type=int, default=10, help="jackknife groups for the intervals (default 10)")
    p.add_argument("--inception", default=None, metavar="DIR", help="converted FID Inception-v3 folder (jdq convert)")
    p.add_argument("--vae", default=None, metavar="DIR", help="converted VAE folder to decode latents")
    p.add_argument("--calib-samples", type=int, default=8, help="conditions to calibrate a recipe that needs it")
    p.add_argument("--devices", type=int, default=None, help="data-parallel over this many local devices (default all)")
    p.add_argument("--grid", type=int, default=100, help="samples in samples.png (default 100)")
    p.add_argument("--distributed", action="store_true", help="jax.distributed.initialize() with auto-detection")
    p.add_argument("--coordinator", default=None, metavar="HOST:PORT", help="jax.distributed coordinator address")
    p.add_argument("--num-processes", type=int, default=None, help="jax.distributed: number of processes")
    p.add_argument("--process-id", type=int, default=None, help="jax.distributed: this process's index")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


# ---------------------------------------------------------------------------- inputs


def _sha256(path: Path) -> str:
    from jdq.io import sha256_file

    return sha256_file(path)


def _load_folder(path, what: str):
    from jdq.models import load

    folder = Path(path)
    if not folder.is_dir():
        raise CliError(f"{what} folder {folder} does not exist" if not folder.exists() else
                       f"{what} {folder} is not a folder (expected a jdq model folder from `jdq convert`)")
    try:
        model, _ = load(folder)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise CliError(f"cannot load {what} {folder}: {e}") from None
    return model


def _load_subject(arg):
    """``(folder, model, sampling defaults, identity)`` of the model to evaluate.

    A quantized folder (``jdq quantize``) stands for the model it was quantized from; :func:`_plan`
    then evaluates its stored quantizer (``quant = "saved:<folder>"``).
    """
    from jdq.cli.sample import _resolve_model

    from jdq.recipes import saved

    if saved.is_quantized_folder(arg):
        try:
            arg = saved.read_manifest(arg)["model"]["path"]
        except saved.SavedError as e:
            raise CliError(str(e)) from None
    folder, model, defaults = _resolve_model(arg)
    from jdq.models.spec import find_spec

    spec = find_spec(model)
    if spec is None or not spec.class_conditional:
        raise CliError(f"jdq eval samples class-conditional DiTs; {folder} is a {model.family} model")
    identity = {"path": str(folder.resolve()), "params_sha256": _sha256(folder / "params.safetensors")}
    return folder, model, defaults, identity


def build_quantizer(model, recipe: str, sampler, labels, guidance: float, seed: int, calib_samples: int):
    """The :class:`jdq.recipes.Quantized` of ``recipe`` for ``model`` (calibrated if the recipe needs it)."""
    from jdq.cli.sample import _quantizer

    if recipe.startswith(SAVED_PREFIX):  # a jdq quantize folder: its stored state, no recalibration
        from jdq.recipes import saved

        try:
            return saved.load(recipe[len(SAVED_PREFIX):], model)[1]
        except saved.SavedError as e:
            raise CliError(str(e)) from None
    args = SimpleNamespace(quant=recipe, calib_samples=calib_samples, seed=seed)
    return _quantizer(model, args, sampler, labels, None, guidance, {})


# ---------------------------------------------------------------------------- the run


def _distributed(args) -> tuple[int, int]:
    """Start jax.distributed if asked; ``(process_index, process_count)``."""
    import jax

    explicit = (args.coordinator, args.num_processes, args.process_id)
    if args.distributed or any(v is not None for v in explicit):
        if not args.distributed and None in explicit:
            raise CliError("--coordinator, --num-processes and --process-id go together (or use --distributed)")
        try:
            if args.distributed and None in explicit:
                jax.distributed.initialize()
            else:
                jax.distributed.initialize(args.coordinator, num_processes=args.num_processes,
                                           process_id=args.process_id)
        except (RuntimeError, ValueError) as e:
            raise CliError(f"jax.distributed.initialize failed: {e}") from None
    return jax.process_index(), jax.process_count()


def _labels(num_classes: int, n: int):
    import numpy as np

    return np.tile(np.arange(num_classes, dtype=np.int32), -(-n // num_classes))[:n]


class _Plan(SimpleNamespace):
    """Everything one run needs (model, sampler, labels, extractor, settings)."""


def _plan(args):
    """Validate every argument and input and assemble the run (nothing is sampled yet)."""
    from jdq.metrics import protocols
    from jdq.sampling.generate import resolve_sampler

    for name in ("batch_size", "groups", "calib_samples"):
        if getattr(args, name) < 1:
            raise CliError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.quant is not None:
        from jdq import recipes
        if args.quant not in recipes.names():
            raise CliError(f"unknown quantization recipe {args.quant!r}; known: {', '.join(recipes.names())}")
    from jdq.recipes import saved

    if saved.is_quantized_folder(args.model):
        if args.quant is not None:
            raise CliError(f"{args.model} is a quantized folder (it carries its recipe); drop --quant")
        try:
            saved.load(args.model)  # the checks (model, recipe version, files) before anything is sampled
        except saved.SavedError as e:
            raise CliError(str(e)) from None
        args.quant = SAVED_PREFIX + str(Path(args.model).resolve())
    folder, model, defaults, identity = _load_subject(args.model)
    embedded = args.model is None or folder.resolve() == DEFAULT_MODEL.resolve()
    proto = protocols.get(args.protocol or ("animal-mnist" if embedded else "dit-imagenet256"))
    k = model.config.num_classes
    n = args.samples if args.samples is not None else proto.num_samples(k)
    if n < 2 * args.groups:
        raise CliError(f"--samples {n} is too few for {args.groups} jackknife groups (need >= {2 * args.groups})")
    steps = args.steps if args.steps is not None else proto.steps
    if steps < 1:
        raise CliError(f"--steps must be >= 1, got {steps}")
    try:
        sampler = resolve_sampler(model, args.sampler or proto.sampler, steps,
                                  clip_denoised=bool(defaults.get("clip_denoised", False)))
    except ValueError as e:
        raise CliError(str(e)) from None
    guidance = proto.guidance if args.guidance is None else require_finite(args.guidance, "--guidance")
    if guidance != 1.0 and not model.config.null_class:
        raise CliError(f"guidance {guidance:g} needs a DiT with a null class; pass --guidance 1")
    seed = proto.seed if args.seed is None else args.seed
    shard = args.shard_size if args.shard_size is not None else 2 * args.batch_size
    if shard < 1:
        raise CliError(f"--shard-size must be >= 1, got {shard}")

    pixel = bool(defaults.get("pixel_space"))
    if pixel and args.vae is not None:
        raise CliError(f"--vae decodes latents, but {folder} samples pixels (its sampling.json says pixel_space)")
    vae = None
    if not pixel:
        if args.vae is None:
            raise CliError(f"{folder} samples latents; give --vae DIR (a converted VAE) to decode them to images "
                           f"(or mark a pixel-space model with \"pixel_space\": true in its sampling.json)")
        vae = _load_folder(args.vae, "--vae")
    extractor = _extractor(proto.features, args)
    from jdq.metrics.evaluate import PAIRED

    metrics = list(args.metrics) if args.metrics else list(proto.metrics) + (
        (["dfid"] if "fid" in proto.metrics else []) + ["psnr", "ssim", "mad"] if args.quant else [])
    if args.quant is None and any(m in PAIRED for m in metrics):
        raise CliError(f"{', '.join(PAIRED)} compare a quantized model with the FP model: give --quant RECIPE")
    if "agreement" in metrics and proto.features != "animal":
        raise CliError("agreement needs a classifier of the model's classes (the embedded model's); "
                       "drop it from --metrics")
    settings = {
        "jdq_eval": 1, "protocol": proto.name, "model": identity, "quant": args.quant or "",
        "calib_samples": args.calib_samples if args.quant else 0, "sampler": sampler.kind, "steps": sampler.num_steps,
        "eta": 0.0, "clip_denoised": sampler.clip_denoised, "guidance": guidance, "seed": seed, "samples": n,
        "labels": f"classes 0..{k - 1} in turn (label of sample j: j mod {k})", "shard_size": shard,
        "batch_size": args.batch_size, "features": extractor.identity,
        "vae": {"path": str(Path(args.vae).resolve()), "params_sha256": _sha256(Path(args.vae) / "params.safetensors")}
        if vae is not None else None,
        "devices_per_process": args.devices,
    }
    return _Plan(folder=folder, model=model, defaults=defaults, protocol=proto, n=n, sampler=sampler,
                 guidance=guidance, seed=seed, shard=shard, vae=vae, extractor=extractor, metrics=metrics,
                 labels=_labels(k, n), settings=settings, pixel=pixel)


def _extractor(kind: str, args):
    """The feature extractor of a protocol: ``extract(uint8 images) -> {name: array}`` with its identity."""
    if kind == "animal":
        from jdq.demo import animal_fid
        from jdq.demo import classifier as clf

        if not DEFAULT_CLASSIFIER.is_file():
            raise CliError(f"the embedded classifier {DEFAULT_CLASSIFIER} is missing")
        params = clf.load(DEFAULT_CLASSIFIER)
        return SimpleNamespace(kind=kind, main="animal", extract=lambda images: animal_fid.extract(params, images),
                               identity={"kind": "animal-mnist classifier", "sha256": animal_fid.sha256(DEFAULT_CLASSIFIER)})
    if args.inception is None:
        raise CliError("this protocol's metrics use the FID Inception-v3: give --inception DIR (convert "
                       "weights-inception-2015-12-05-6726825d.pth with `jdq convert`)")
    model = _load_folder(args.inception, "--inception")
    from jdq.models import inception

    if not isinstance(model.config, inception.Config):
        raise CliError(f"--inception {args.inception} is a {model.family} model, not the FID Inception-v3")
    return SimpleNamespace(kind=kind, main="pool", extract=lambda images: _inception_features(model, images),
                           identity={"kind": "inception-v3 (TF 2015-12-05 graph)",
                                     "path": str(Path(args.inception).resolve()),
                                     "params_sha256": _sha256(Path(args.inception) / "params.safetensors")})


def _inception_features(model, images, batch: int = 50):
    import numpy as np

    out: dict[str, list] = {}
    for s in range(0, len(images), batch):
        for k, v in model(np.asarray(images[s:s + batch])).items():
            out.setdefault(k, []).append(np.asarray(v))
    return {k: np.concatenate(v) for k, v in out.items()}


def _make_shard(plan, quant, mesh, progress):
    """``make_shard(start, stop)`` for :func:`jdq.metrics.shards.run`."""
    import jax
    import numpy as np

    from jdq.sampling.generate import generate
    from jdq.sampling.images import to_uint8

    decode = None
    if plan.vae is not None:
        # decode_latents is the VAEModel's (jitted) method, not the NNX module's: Model.apply cannot reach it
        decode = lambda p, z: plan.vae.decode_latents(jax.numpy.asarray(z))  # noqa: E731

    def make(start, stop):
        labels = plan.labels[start:stop]
        x = generate(plan.model, labels, sampler=plan.sampler, guidance=plan.guidance, seed=plan.seed,
                     batch_size=min(plan.settings["batch_size"], stop - start),
                     quant=None if quant is None else quant.quantizer, params=None if quant is None else quant.params,
                     mesh=mesh, progress=progress, first_index=start)
        if decode is not None:
            x = np.concatenate([np.asarray(decode(plan.vae.params, x[i:i + 8])) for i in range(0, len(x), 8)])
        if not np.all(np.isfinite(x)):
            bad = int(np.sum(~np.all(np.isfinite(x.reshape(len(x), -1)), axis=1)))
            raise CliError(f"samples {start}..{stop - 1}: {bad} contain NaN or Inf (the model or recipe diverged); "
                           f"the shards written so far are kept")
        images = to_uint8(x)
        return {"labels": labels, "images": images, **plan.extractor.extract(images)}
    return make


def _sample_run(plan, folder, quant_name, args, pidx, pcount, progress):
    """Sample (or resume) the run of ``quant_name`` (``None``: FP) into ``folder``; returns seconds spent."""
    import jax

    from jdq import sharding
    from jdq.metrics import shards

    settings = dict(plan.settings, quant=quant_name or "", calib_samples=args.calib_samples if quant_name else 0)
    try:
        shards.prepare(folder, settings)
    except shards.RunFolderError as e:
        raise CliError(str(e)) from None
    done = set(shards.complete_shards(folder, plan.n, plan.shard))
    mine = [s for s in range(-(-plan.n // plan.shard)) if s % pcount == pidx]
    t0 = time.perf_counter()
    if any(s not in done for s in mine):
        ndev = len(jax.local_devices())
        if args.devices is not None and not 1 <= args.devices <= ndev:
            raise CliError(f"--devices {args.devices}: {ndev} local device(s) available")
        use = args.devices or ndev
        mesh = sharding.batch_mesh(num_devices=use) if use > 1 else None
        quant = None
        if quant_name:
            quant = build_quantizer(plan.model, quant_name, plan.sampler, plan.labels, plan.guidance, plan.seed,
                                    args.calib_samples)
        what = f"{quant_name or 'FP'}: {plan.n} samples, {plan.sampler.kind} {plan.sampler.num_steps} steps, " \
               f"guidance {plan.guidance:g} -> {folder}"
        print(f"jdq eval: {what} ({len(done)} shard(s) already done)", file=sys.stderr)
        shards.run(folder, plan.n, plan.shard, _make_shard(plan, quant, mesh, progress), process_index=pidx,
                   process_count=pcount, progress=progress, desc=f"{quant_name or 'FP'} shards")
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------- results


def _reference(plan, args):
    from jdq.metrics.reference import reference_from_batch

    if args.reference is None:
        if plan.protocol.features == "animal":
            from jdq.demo.animal_fid import load_reference

            try:
                return load_reference()
            except (FileNotFoundError, ValueError) as e:
                raise CliError(str(e)) from None
        if any(m in ("fid", "sfid", "precision", "recall", "kid") for m in plan.metrics):
            raise CliError(f"protocol {plan.protocol.name} compares with a reference batch: give --reference FILE "
                           f"(e.g. VIRTUAL_imagenet256_labeled.npz)")
        return None
    keys = ("animal",) if plan.protocol.features == "animal" else ("pool", "spatial")
    try:
        ref = reference_from_batch(args.reference, plan.extractor.extract, keys=keys, progress=not args.no_progress)
    except (FileNotFoundError, ValueError) as e:
        raise CliError(str(e)) from None
    wanted = {"fid": plan.extractor.main, "sfid": "spatial"}
    for m in plan.metrics:  # fail before sampling, not after
        if m in ("precision", "recall", "kid") and plan.extractor.main not in ref.features:
            raise CliError(f"{args.reference} has no images: precision, recall and KID need the reference images "
                           f"(arr_0) or their features; drop {m} from --metrics")
        if m in wanted and wanted[m] not in ref.stats and wanted[m] not in ref.features:
            raise CliError(f"{args.reference} has neither images nor statistics for {m}")
    return ref


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("jax", "jaxlib", "flax", "numpy", "scipy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _device(pcount: int) -> dict:
    import jax

    d = jax.local_devices()[0]
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"backend": jax.default_backend(), "device_kind": d.device_kind, "local_devices": len(jax.local_devices()),
            "processes": pcount, "cpu": cpu, "host": platform.node()}


METRIC_LABELS = {
    "fid": "FID", "sfid": "sFID", "is": "Inception Score", "precision": "precision", "recall": "recall",
    "kid": "KID", "agreement": "class agreement", "dfid": "FID − FP's FID (paired)", "psnr": "PSNR vs FP (dB)", "ssim": "SSIM vs FP",
    "mad": "mean |Δ| vs FP (8-bit levels)",
}
PERCENT = ("precision", "recall", "agreement")


def format_metric(name: str, iv) -> str:
    """A metric with its interval for a table cell."""
    if name in PERCENT:
        return iv.format(1, percent=True)
    return iv.format(4 if name in ("ssim", "kid") else 2)


def _markdown(results: dict) -> str:
    s = results["settings"]
    lines = [f"# jdq eval: {results['subject']}", "",
             f"Protocol `{s['protocol']}`; {s['samples']} samples, {s['sampler'].upper()} {s['steps']} steps, "
             f"guidance {s['guidance']:g}, seed {s['seed']} ({results['seeds']}); {s['labels']}.",
             f"Features: {results['features']}; reference: {results['reference']}.",
             f"Device: {results['device']['backend']} ({results['device']['device_kind']}, "
             f"{results['device']['local_devices']} local device(s), {results['device']['processes']} process(es)); "
             f"{', '.join(f'{k} {v}' for k, v in results['versions'].items())}; {results['date']}.", "",
             "| metric | value | 95 % interval | interval method |", "|---|---:|---|---|"]
    from jdq.metrics.intervals import Interval

    for name, d in results["metrics"].items():
        cell = format_metric(name, Interval.from_dict(d))
        value, _, interval = cell.partition(" ")
        lines.append(f"| {METRIC_LABELS.get(name, name)} | {value} | {interval or '—'} | {d['method']} |")
    lines += ["", f"Sampling {results['timing']['sampling_s']:.1f} s, metrics {results['timing']['metrics_s']:.1f} s, "
                  f"total {results['timing']['total_s']:.1f} s.", ""]
    return "\n".join(lines)


def _write_results(plan, args, out: Path, fp_dir, reference, t_start, sampling_s, pcount) -> dict:
    import numpy as np

    from jdq.io import atomic_write_text
    from jdq.metrics import shards
    from jdq.metrics.evaluate import PAIRED, evaluate
    from jdq.sampling.images import save_grid

    t0 = time.perf_counter()
    main = plan.extractor.main
    needs = {"labels"}
    for m in plan.metrics:
        needs |= {"fid": {main}, "precision": {main}, "recall": {main}, "kid": {main}, "sfid": {"spatial"},
                  "is": {"logits"}, "agreement": {"animal_logits"}, "dfid": {main}}.get(
            m, {"images"} if m in PAIRED else set())
    arrays = shards.load(out, plan.n, plan.shard, sorted(needs))
    if "animal_logits" in arrays:
        arrays["predicted"] = np.argmax(arrays.pop("animal_logits"), axis=-1)
    fp_arrays = None
    if any(m in PAIRED for m in plan.metrics):
        fp_keys = (["images"] if any(m in PAIRED and m != "dfid" for m in plan.metrics) else []) + (
            [main] if "dfid" in plan.metrics else [])
        fp_arrays = shards.load(fp_dir, plan.n, plan.shard, fp_keys)
    try:
        metrics = evaluate(plan.metrics, reference, features=main, arrays=arrays, fp_arrays=fp_arrays,
                           groups=args.groups, is_split_size=plan.protocol.is_split_size)
    except (ValueError, KeyError) as e:
        raise CliError(str(e).strip("'\"")) from None
    first = _first_images(out, plan, args.grid) if args.grid > 0 else None
    results = {
        "subject": f"{plan.folder.name}" + (f" with --quant {args.quant}" if args.quant else " (floating point)"),
        "settings": plan.settings | {"quant": args.quant or ""},
        "seeds": f"sample j uses the noise key fold_in(key({plan.seed}), j); labels j mod {plan.model.config.num_classes}",
        "features": plan.extractor.identity["kind"],
        "reference": reference.name if reference is not None else "none",
        "fp_run": str(Path(fp_dir).resolve()) if fp_arrays is not None else None,
        "metrics": {k: v.to_dict() for k, v in metrics.items()},
        "device": _device(pcount), "versions": _versions(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "timing": {"sampling_s": sampling_s, "metrics_s": time.perf_counter() - t0,
                   "total_s": time.perf_counter() - t_start},
    }
    atomic_write_text(out / RESULTS_JSON, json.dumps(results, indent=2) + "\n")
    atomic_write_text(out / RESULTS_MD, _markdown(results))
    if first is not None and len(first):
        k = plan.model.config.num_classes
        save_grid(out / GRID_PNG, first, ncol=k if k <= 32 else None, scale=4 if first.shape[1] <= 64 else 1)
    return results


def _first_images(out, plan, count):
    import numpy as np

    from jdq.metrics import shards

    take, parts = min(count, plan.n), []
    for s in range(-(-take // plan.shard)):
        with np.load(out / shards.shard_name(s), allow_pickle=False) as z:
            parts.append(z["images"])
    return np.concatenate(parts)[:take]


def run(args) -> int:
    """``jdq eval``: validate, sample (or resume) the shards, compute the metrics, write the results."""
    if args.metrics and "clip" in args.metrics:
        from jdq.cli.eval_clip import run_clip

        return run_clip(args)
    t_start = time.perf_counter()
    pidx, pcount = _distributed(args)  # before anything touches a jax backend
    out = Path(args.out)
    require_writable(out, "--out", folder=True)  # before loading anything, not after the sampling
    plan = _plan(args)
    progress = not args.no_progress and pidx == 0
    reference = _reference(plan, args) if pidx == 0 else None  # before sampling: a bad file fails fast
    sampling_s = 0.0
    fp_dir = None
    from jdq.metrics.evaluate import PAIRED

    if args.quant and any(m in PAIRED for m in plan.metrics):
        fp_dir = Path(args.fp_run) if args.fp_run else out / "fp"
        sampling_s += _sample_run(plan, fp_dir, None, args, pidx, pcount, progress)
    elif args.fp_run:
        raise CliError("--fp-run pairs a quantized run with its FP run: give --quant RECIPE")
    sampling_s += _sample_run(plan, out, args.quant, args, pidx, pcount, progress)
    from jdq.metrics import shards

    shards.barrier("jdq-eval-shards", pcount)
    if pidx != 0:
        return 0
    results = _write_results(plan, args, out, fp_dir, reference, t_start, sampling_s, pcount)
    from jdq.metrics.intervals import Interval

    summary = ", ".join(f"{METRIC_LABELS.get(k, k)} {format_metric(k, Interval.from_dict(v))}"
                        for k, v in results["metrics"].items())
    print(f"{summary}\nwrote {out / RESULTS_JSON}, {out / RESULTS_MD} in {results['timing']['total_s']:.1f}s")
    return 0

