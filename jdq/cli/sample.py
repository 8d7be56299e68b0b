"""``jdq sample``: sample a model (default: the embedded Animal-MNIST DiT) to a PNG grid and an .npz.

``jdq sample`` with no arguments samples the embedded default model (a small class-conditional
DiT trained on Animal-MNIST, shipped in ``jdq/assets``) on the CPU and writes ``samples.png``
(a grid) and ``samples.npz`` (the samples, their classes and the settings). Every option:
``jdq sample --help``.

Errors in the arguments (a missing folder, an unknown sampler, format or recipe, a recipe that
does not fit the model, a class out of range) print one line naming the problem and exit with
status 2 before anything is computed, and so does an output that cannot be written or an
option that does not apply to the model (``--eta`` with a sampler other than DDIM, ``--shift``
without a flow-matching sampler, ``--vae`` on a pixel-space model). The PNG and the .npz are
written as a pair (both to temporary files, then both renamed), so an interrupted run never
leaves a half-written file, nor a new .npz beside an old .png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from jdq.cli._common import COMMANDS, DEFAULT_CLASSIFIER, DEFAULT_MODEL, CliError, require_finite, require_writable
from jdq.cli._sampling import quantizer as _quantizer, validate_sampler as _validate_sampler  # noqa: F401

NAME = "sample"
HELP = COMMANDS[NAME][1]


def add_parser(sub):
    """Add ``jdq sample`` to an argparse sub-parser collection; return its parser."""
    p = sub.add_parser(NAME, help=HELP, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=None,
                   help="a jdq model folder (from `jdq convert`) or a quantized folder (from `jdq quantize`); "
                        "default: the embedded Animal-MNIST DiT")
    p.add_argument("--classes", type=int, nargs="+", default=None, metavar="C",
                   help="class labels to sample (DiT); default: every class of the embedded model, "
                        "or 8 random classes of another DiT")
    p.add_argument("--per-class", type=int, default=None, metavar="K",
                   help="samples per listed class, >= 1 (default 2 for the embedded model, else 1)")
    p.add_argument("--embeddings", default=None, metavar="FILE",
                   help="PixArt-Σ / SD3 text conditions: .npy (text_emb [N, L, D]) or .npz/.safetensors with "
                        "text_emb, and mask (PixArt-Σ) or pooled (SD3)")
    p.add_argument("--negative-embeddings", default=None, metavar="FILE",
                   help="unconditional embeddings for guidance (same keys; batch 1 or N)")
    p.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                   help="a prompt for a text-to-image pipeline folder (PixArt-Σ / SD3 from `jdq convert`); repeatable")
    p.add_argument("--negative-prompt", default=None, metavar="TEXT",
                   help="the negative prompt of a pipeline folder (default: empty, as diffusers)")
    p.add_argument("--quant-text-encoders", default=None, metavar="NAME",
                   help="a pipeline folder's text encoders quantized with this (uncalibrated) recipe, e.g. w8a8")
    p.add_argument("--sampler", default=None, help="ddpm, ddim, dpm++2m or euler (default: the model family's)")
    p.add_argument("--steps", type=int, default=None, help="number of sampling steps (default: the family's)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale, finite (1: none)")
    p.add_argument("--eta", type=float, default=None, help="DDIM eta >= 0 (default 0: deterministic); DDIM only")
    p.add_argument("--shift", type=float, default=None,
                   help="flow-matching time shift > 0 (SD3: 3.0); flow-matching (euler) sampler only")
    p.add_argument("--seed", type=int, default=0, help="random seed; sample j uses fold_in(key(seed), j)")
    p.add_argument("--batch-size", type=int, default=32, help="samples per compiled call")
    p.add_argument("--quant", default=None, metavar="NAME",
                   help="quantization recipe (e.g. w8a8, mxfp4_e2m1, mx6, mixdit); see the error for the list")
    p.add_argument("--calib-samples", type=int, default=8,
                   help="conditions used to calibrate a recipe that needs statistics (e.g. w8a8-static)")
    p.add_argument("--devices", type=int, default=None,
                   help="data-parallel over this many local devices (default: all)")
    p.add_argument("--vae", default=None, metavar="DIR",
                   help="a converted VAE folder to decode latents to images (latent models only)")
    p.add_argument("--out", default="samples", metavar="PREFIX",
                   help="write PREFIX.png (grid) and PREFIX.npz (samples); default 'samples'")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _load_arrays(path: str, what: str) -> dict:
    """``{name: array}`` from .npy (one array: ``text_emb``), .npz or .safetensors."""
    import numpy as np

    f = Path(path)
    if not f.is_file():
        raise CliError(f"{what} file {path} does not exist")
    try:
        if f.suffix == ".npy":
            return {"text_emb": np.load(f, allow_pickle=False)}
        if f.suffix == ".npz":
            with np.load(f, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        if f.suffix == ".safetensors":
            from safetensors.numpy import load_file
            return dict(load_file(str(f)))
    except Exception as e:  # noqa: BLE001 - any reader failure is a bad input file
        raise CliError(f"cannot read {what} file {path}: {e}") from None
    raise CliError(f"{what} file {path}: expected .npy, .npz or .safetensors")


def _text_condition(arrays: dict, family: str, path: str) -> dict:
    import numpy as np

    from jdq.models.spec import spec_of

    need, optional = spec_of(family).text_keys
    allowed = need + optional
    missing = [k for k in need if k not in arrays]
    if missing:
        raise CliError(f"{path}: a {family} model needs arrays {list(need)}; missing {missing} (found {sorted(arrays)})")
    cond = {k: np.asarray(arrays[k]) for k in allowed if k in arrays}
    if cond["text_emb"].ndim != 3:
        raise CliError(f"{path}: text_emb must be [N, L, D], got shape {cond['text_emb'].shape}")
    n = cond["text_emb"].shape[0]
    for k, v in cond.items():
        if v.shape[0] != n:
            raise CliError(f"{path}: {k} has batch {v.shape[0]} but text_emb has {n}")
    # a text mask keeps booleans; embeddings are float32
    return {k: v.astype(bool) if k == "mask" else v.astype(np.float32) for k, v in cond.items()}


def _resolve_model(arg):
    from jdq.models import load

    folder = DEFAULT_MODEL if arg is None else Path(arg)
    if not folder.exists():
        if arg is None:
            raise CliError(f"the embedded model is not installed in {folder}: train it with "
                           f"`python -m jdq.demo.train --out RUN` and install it with `python -m jdq.demo.install RUN`, "
                           f"or give a model folder")
        raise CliError(f"model folder {folder} does not exist")
    if not folder.is_dir():
        raise CliError(f"{folder} is not a folder (expected a jdq model folder from `jdq convert`)")
    try:
        model, _ = load(folder)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise CliError(f"cannot load model {folder}: {e}") from None
    defaults = {}
    if (folder / "sampling.json").is_file():
        defaults = read_sampling_defaults(folder / "sampling.json")
    return folder, model, defaults


#: The sampling.json keys jdq reads, with the types they must have (extra keys are kept, unread).
SAMPLING_KEYS = {"sampler": (str,), "steps": (int,), "guidance": (int, float), "clip_denoised": (bool,),
                 "pixel_space": (bool,), "class_names": (list,)}


def read_sampling_defaults(path: Path) -> dict:
    """A model folder's ``sampling.json``: a JSON object whose known keys have the right types (else CliError)."""
    import math

    try:
        defaults = json.loads(path.read_text())
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise CliError(f"{path}: not valid UTF-8 JSON ({e})") from None
    if not isinstance(defaults, dict):
        raise CliError(f"{path}: expected a JSON object of sampling defaults, found a JSON {type(defaults).__name__}")
    for key, types in SAMPLING_KEYS.items():
        v = defaults.get(key)
        if v is None:
            continue
        ok = isinstance(v, types) and not (isinstance(v, bool) and bool not in types)
        if ok and key == "guidance":
            ok = math.isfinite(v)
        if not ok:
            want = " or ".join(t.__name__ for t in types)
            raise CliError(f"{path}: {key} must be {'finite, ' if key == 'guidance' else ''}of type {want}, got {v!r}")
    return defaults


def _output_paths(prefix: str):
    base = Path(prefix)
    if base.suffix in (".png", ".npz"):
        base = base.with_suffix("")
    parent = base.parent
    if not parent.is_dir():
        raise CliError(f"output folder {parent} does not exist")
    png, npz = base.with_name(base.name + ".png"), base.with_name(base.name + ".npz")
    for p in (png, npz):
        if p.is_dir():
            raise CliError(f"output {p} is a folder")
        require_writable(p, "--out")
    return png, npz


def _conditions(model, args, defaults):
    """``(cond, uncond, labels or None)`` for the model's family."""
    import numpy as np

    from jdq.models.spec import spec_of

    family = model.family
    try:
        spec = spec_of(model)
    except ValueError as e:
        raise CliError(str(e)) from None
    if spec.class_conditional:
        if args.embeddings or args.negative_embeddings:
            raise CliError("--embeddings/--negative-embeddings condition PixArt-Σ and SD3; a DiT takes --classes")
        k = model.config.num_classes
        per = _per_class(args, defaults)
        if per < 1:
            raise CliError(f"--per-class must be >= 1, got {per}")
        if args.classes is not None:
            classes = args.classes
        elif defaults.get("class_names"):
            classes = list(range(k))
        else:
            classes = np.random.default_rng(args.seed).integers(0, k, 8).tolist()
        bad = [c for c in classes if not 0 <= c < k]
        if bad:
            raise CliError(f"class {bad[0]} is out of range: this model has classes 0..{k - 1}")
        # the grid has one column per listed class and one row per repetition
        labels = np.tile(np.asarray(classes, np.int32), per)
        return labels, None, labels
    else:
        if args.classes is not None:
            raise CliError(f"--classes conditions a DiT; a {family} model takes --embeddings")
        if args.embeddings is None:
            raise CliError(f"a {family} model needs --embeddings (jdq ships no text encoder; "
                           f"save the encoder's output as .npy/.npz/.safetensors)")
        cond = _text_condition(_load_arrays(args.embeddings, "--embeddings"), family, args.embeddings)
        per = _per_class(args, defaults)
        if per < 1:
            raise CliError(f"--per-class must be >= 1, got {per}")
        if per > 1:
            cond = {k: np.concatenate([v] * per) for k, v in cond.items()}
        uncond = None
        if args.negative_embeddings:
            uncond = _text_condition(_load_arrays(args.negative_embeddings, "--negative-embeddings"), family,
                                     args.negative_embeddings)
            n, nu = cond["text_emb"].shape[0], uncond["text_emb"].shape[0]
            if nu not in (1, n):
                raise CliError(f"--negative-embeddings has batch {nu}; expected 1 or {n}")
            for key in cond:
                if key not in uncond:
                    raise CliError(f"--negative-embeddings lacks {key!r} (the conditions have it)")
                if uncond[key].shape[1:] != cond[key].shape[1:]:
                    raise CliError(f"--negative-embeddings {key} has shape {uncond[key].shape[1:]} per sample, "
                                   f"the conditions {cond[key].shape[1:]}")
        return cond, uncond, None


def _per_class(args, defaults) -> int:
    """``--per-class``, or its default (2 for the embedded model's named classes, else 1); 0 stays 0 (an error)."""
    if args.per_class is not None:
        return args.per_class
    return 2 if defaults.get("class_names") else 1


def _grid_images(model, samples, args, defaults):
    """uint8 images for the PNG (decoded with --vae for latent models)."""
    import numpy as np

    from jdq.sampling.images import to_uint8

    if defaults.get("pixel_space"):
        return to_uint8(samples)
    if args.vae is None:
        print("jdq sample: note: no --vae given; the PNG shows the first latent channels, min-max scaled",
              file=sys.stderr)
        lat = samples[..., :3] if samples.shape[-1] >= 3 else samples[..., :1]
        lo, hi = float(lat.min()), float(lat.max())
        return to_uint8(lat, lo, hi if hi > lo else lo + 1)
    from jdq.models import load
    import jax

    try:
        vae, _ = load(args.vae)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise CliError(f"cannot load --vae {args.vae}: {e}") from None
    # decode_latents is the VAEModel's (jitted) method, not the NNX module's: Model.apply cannot reach it
    images = [np.asarray(vae.decode_latents(jax.numpy.asarray(samples[i:i + 4]))) for i in range(0, len(samples), 4)]
    return to_uint8(np.concatenate(images))


def run(args) -> int:
    """``jdq sample``: validate everything, sample, write PREFIX.png and PREFIX.npz."""
    t0 = time.time()
    if args.batch_size < 1:
        raise CliError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.calib_samples < 1:
        raise CliError(f"--calib-samples must be >= 1, got {args.calib_samples}")
    png, npz = _output_paths(args.out)
    require_finite(args.guidance, "--guidance")
    if args.model is not None and (Path(args.model) / "pipeline.json").is_file():
        from jdq.cli.sample_text import run_pipeline

        return run_pipeline(args, png, npz)
    if args.prompt or args.negative_prompt or args.quant_text_encoders:
        raise CliError("--prompt/--negative-prompt/--quant-text-encoders need a text-to-image pipeline folder (a converted PixArt-Σ or "
                       "SD3 pipeline with pipeline.json)")
    if args.vae is not None and not Path(args.vae).is_dir():
        raise CliError(f"--vae folder {args.vae} does not exist")
    if args.quant is not None:
        from jdq import recipes
        if args.quant not in recipes.names():
            raise CliError(f"unknown quantization recipe {args.quant!r}; known: {', '.join(recipes.names())}")
    from jdq.recipes import saved

    quantized = None
    if saved.is_quantized_folder(args.model):
        if args.quant is not None:
            raise CliError(f"{args.model} is a quantized folder (it carries its recipe); drop --quant")
        try:
            manifest = saved.read_manifest(args.model)
            folder, model, defaults = _resolve_model(manifest["model"]["path"])
            _, quantized = saved.load(args.model, model)
        except saved.SavedError as e:
            raise CliError(str(e)) from None
        args.quant = f"{manifest['recipe']} (from {args.model})"
    else:
        folder, model, defaults = _resolve_model(args.model)
    if args.vae is not None and defaults.get("pixel_space"):
        raise CliError(f"--vae decodes latents, but {folder} samples pixels (its sampling.json says pixel_space)")
    sampler = _validate_sampler(model, args, defaults)
    cond, uncond, labels = _conditions(model, args, defaults)
    from jdq.models.spec import spec_of

    spec = spec_of(model)
    guidance = args.guidance if args.guidance is not None else defaults.get("guidance", spec.defaults.get("guidance", 1.0))
    guidance = float(guidance)
    if guidance != 1.0 and spec.null_condition is None and uncond is None:
        raise CliError(f"guidance {guidance:g} on a {model.family} model needs --negative-embeddings "
                       f"(or pass --guidance 1)")

    import jax
    import numpy as np

    from jdq import sharding
    from jdq.sampling.generate import generate

    ndev = len(jax.local_devices())
    if args.devices is not None and not 1 <= args.devices <= ndev:
        raise CliError(f"--devices {args.devices}: {ndev} local device(s) available")
    use = args.devices or ndev
    mesh = sharding.batch_mesh(num_devices=use) if use > 1 else None
    if args.quant is not None and quantized is None:
        quantized = _quantizer(model, args, sampler, cond, uncond, guidance, defaults)
    n = int(np.shape(jax.tree.leaves(cond)[0])[0])
    what = f"{n} samples of {folder.name} ({model.family}), {sampler.kind} {sampler.num_steps} steps, " \
           f"guidance {guidance:g}, {'quant ' + args.quant if args.quant else 'floating point'}"
    print(f"jdq sample: {what}", file=sys.stderr)
    samples = generate(model, cond, uncond=uncond, sampler=sampler, guidance=guidance, seed=args.seed,
                       batch_size=args.batch_size, quant=None if quantized is None else quantized.quantizer,
                       params=None if quantized is None else quantized.params, mesh=mesh,
                       progress=not args.no_progress)
    images = _grid_images(model, samples, args, defaults)

    from jdq.sampling.images import save_grid_and_npz

    per = _per_class(args, defaults)
    ncol = n // per if (labels is not None and per > 1 and n % per == 0) else None
    settings = dict(model=str(folder), family=model.family, sampler=sampler.kind, steps=sampler.num_steps,
                    guidance=guidance, seed=args.seed, quant=args.quant or "")
    arrays = {"samples": samples, "images": images, "settings": np.asarray(json.dumps(settings, allow_nan=False))}
    if labels is not None:
        arrays["labels"] = labels
    save_grid_and_npz(png, npz, images, arrays, ncol=ncol, scale=4 if images.shape[1] <= 64 else 1)
    line = f"wrote {png} and {npz} in {time.time() - t0:.1f}s"
    if args.model is None and labels is not None and DEFAULT_CLASSIFIER.is_file():
        from jdq.demo import classifier as clf

        agree = clf.accuracy(clf.load(DEFAULT_CLASSIFIER), samples, labels)
        line += f"; the classifier labels {agree:.0%} of the samples with their class"
    print(line)
    return 0
