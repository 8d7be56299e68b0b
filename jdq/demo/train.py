"""Train the embedded default model (a small class-conditional DiT on Animal-MNIST) and its classifier.

Usage (seeded and reproducible; ``--preset toy`` runs in a minute on a CPU)::

    python -m jdq.demo.train --out OUT_DIR [--preset default|toy] [--seed 0]

Writes ``OUT_DIR/dit/`` (a jdq model folder: ``config.json``, ``params.safetensors`` with the EMA
weights, ``sampling.json`` with the default sampler), ``OUT_DIR/classifier.safetensors``,
``OUT_DIR/metrics.json`` (training time, device, losses, classifier accuracy on held-out real
images and on the diffusion model's samples per sampler and guidance) and
``OUT_DIR/samples.png`` (10 samples of each class).

The DiT is trained as facebookresearch/DiT trains its models: ``t ~ U{0..999}`` on the linear
1000-step schedule, a learned sigma with the hybrid loss ``L_simple + L_vlb`` of Improved DDPM
(the variational term sees the mean with a stopped gradient), 10 % label dropout to the null
class for classifier-free guidance, adaLN-Zero initialisation, AdamW without weight decay, an EMA
of the weights. Pixels are in ``[-1, 1]`` (28×28×1); augmentation is a random horizontal flip.
The whole run is a few jitted ``lax.scan`` chunks over batches drawn on the device.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jdq.demo import classifier as clf
from jdq.demo import data
from jdq.io import atomic_write_text
from jdq.sampling import schedules

# ----------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Preset:
    """Model size and training length."""

    hidden: int = 160
    depth: int = 8
    heads: int = 4
    patch: int = 4
    steps: int = 20_000
    batch: int = 256
    lr: float = 3e-4
    warmup: int = 1_000
    ema: float = 0.9995
    label_dropout: float = 0.1
    clf_steps: int = 4_000
    clf_batch: int = 256
    clf_lr: float = 2e-3
    eval_per_class: int = 100
    eval_samplers: tuple = (("ddpm", 50), ("ddim", 50), ("ddpm", 100))
    eval_guidance: tuple = (1.0, 2.0, 4.0)
    chunk: int = 500


PRESETS = {
    "default": Preset(),
    # What this repository's CPU fallback used (2 shared cores, no GPU run available).
    "cpu": Preset(hidden=128, depth=4, heads=4, patch=4, steps=12_000, batch=32, lr=4e-4, warmup=500, ema=0.999,
                  clf_steps=1_500, clf_batch=128, eval_per_class=20, eval_samplers=(("ddpm", 50), ("ddim", 50)),
                  eval_guidance=(1.0, 2.0, 4.0), chunk=200),
    "toy": Preset(hidden=32, depth=1, heads=1, patch=7, steps=40, batch=32, warmup=5, clf_steps=40, clf_batch=64,
                  eval_per_class=2, eval_samplers=(("ddpm", 4), ("ddim", 4)), eval_guidance=(1.0, 2.0), chunk=20),
}

#: What ``jdq sample`` uses for the embedded model unless told otherwise (written to sampling.json).
DEFAULT_SAMPLING = {"sampler": "ddpm", "steps": 50, "guidance": 2.0, "clip_denoised": True, "pixel_space": True,
                    "class_names": list(data.CLASS_NAMES)}


# ----------------------------------------------------------------------------------------------
# Diffusion training loss (Improved DDPM's hybrid loss, as DiT trains)
# ----------------------------------------------------------------------------------------------


def diffusion_tables(num_timesteps: int = 1000) -> dict[str, jnp.ndarray]:
    """Per-timestep constants of the linear schedule (float32, indexed by t)."""
    betas = schedules.dit_betas(num_timesteps)
    ac = schedules.alphas_cumprod(betas)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    t = dict(
        sqrt_ac=np.sqrt(ac), sqrt_1m_ac=np.sqrt(1.0 - ac),
        sqrt_recip_ac=np.sqrt(1.0 / ac), sqrt_recipm1_ac=np.sqrt(1.0 / ac - 1.0),
        coef_x0=betas * np.sqrt(ac_prev) / (1.0 - ac), coef_xt=(1.0 - ac_prev) * np.sqrt(1.0 - betas) / (1.0 - ac),
        post_log_var=np.log(np.append(post_var[1], post_var[1:])), log_betas=np.log(betas),
    )
    return {k: jnp.asarray(v, jnp.float32) for k, v in t.items()}


def _bcast(v, x):
    return v.reshape((-1,) + (1,) * (x.ndim - 1))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def discretized_gaussian_nll(x, mean, log_scale):
    """−log P(x) of 8-bit pixels ``x`` in ``[-1, 1]`` under a Gaussian discretized to bins of 2/255 (nats)."""
    inv_std = jnp.exp(-log_scale)
    centered = x - mean
    cdf_plus = jax.scipy.stats.norm.cdf(inv_std * (centered + 1.0 / 255))
    cdf_min = jax.scipy.stats.norm.cdf(inv_std * (centered - 1.0 / 255))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_1m_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return -jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_1m_cdf_min, log_delta))


def hybrid_loss(out, x0, x_t, eps, t, tab):
    """``mse(ε̂, ε) + L_vlb`` per example (the variational term in bits/dim, the mean's gradient stopped)."""
    eps_hat, v = jnp.split(out.astype(jnp.float32), 2, axis=-1)
    mse = jnp.mean((eps_hat - eps) ** 2, axis=(1, 2, 3))
    g = lambda name: _bcast(tab[name][t], x0)  # noqa: E731
    x0_hat = g("sqrt_recip_ac") * x_t - g("sqrt_recipm1_ac") * jax.lax.stop_gradient(eps_hat)
    model_mean = g("coef_x0") * x0_hat + g("coef_xt") * x_t
    frac = (v + 1.0) / 2.0
    model_log_var = frac * g("log_betas") + (1.0 - frac) * g("post_log_var")
    true_mean = g("coef_x0") * x0 + g("coef_xt") * x_t
    kl = jnp.mean(normal_kl(true_mean, g("post_log_var"), model_mean, model_log_var), axis=(1, 2, 3)) / math.log(2.0)
    nll = jnp.mean(discretized_gaussian_nll(x0, model_mean, 0.5 * model_log_var), axis=(1, 2, 3)) / math.log(2.0)
    return mse + jnp.where(t == 0, nll, kl)


def adaln_zero(params):
    """Zero the adaLN modulations and the final linear (DiT's adaLN-Zero initialisation)."""
    def fix(path, leaf):
        name = ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        if "adaLN_modulation" in name or name.startswith("final_layer.linear"):
            return jnp.zeros_like(leaf)
        return leaf
    return jax.tree_util.tree_map_with_path(fix, params)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


def _flip(key, x):
    flip = jax.random.bernoulli(key, 0.5, (x.shape[0], 1, 1, 1))
    return jnp.where(flip, x[:, :, ::-1], x)


def train_dit(preset: Preset, images, labels, seed: int, log, stop_at: int | None = None, time_limit: float | None = None):
    """Train the DiT; returns ``(model with EMA params, losses per chunk, steps done)``.

    The learning-rate schedule always spans ``preset.steps``; ``stop_at`` (a step count) or
    ``time_limit`` (seconds, checked between chunks) end the run early, reproducibly for ``stop_at``.
    """
    from jdq.models import dit

    cfg = dit.Config(input_size=data.IMAGE_SIZE, patch_size=preset.patch, in_channels=1, hidden_size=preset.hidden,
                     depth=preset.depth, num_heads=preset.heads, num_classes=data.NUM_CLASSES, learn_sigma=True,
                     source="jdq.demo.train (Animal-MNIST)")
    model = dit.from_config(cfg, key=jax.random.key(seed))
    params = adaln_zero(model.params)
    sched = optax.warmup_cosine_decay_schedule(0.0, preset.lr, preset.warmup, preset.steps, preset.lr * 0.1)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, b1=0.9, b2=0.999, weight_decay=0.0))
    opt_state = opt.init(params)
    ema = params
    tab = diffusion_tables()
    x_all = jnp.asarray(data.to_model_range(images))
    y_all = jnp.asarray(labels, jnp.int32)
    null = data.NUM_CLASSES

    def loss_fn(p, x0, y, key):
        kt, ke, kd = jax.random.split(key, 3)
        t = jax.random.randint(kt, (x0.shape[0],), 0, 1000)
        eps = jax.random.normal(ke, x0.shape, jnp.float32)
        x_t = _bcast(tab["sqrt_ac"][t], x0) * x0 + _bcast(tab["sqrt_1m_ac"][t], x0) * eps
        y = jnp.where(jax.random.bernoulli(kd, preset.label_dropout, y.shape), null, y)
        out = model.apply(p, x_t, t.astype(jnp.float32), y)
        return jnp.mean(hybrid_loss(out, x0, x_t, eps, t, tab))

    def step(carry, key):
        p, o, e, i = carry
        ki, kf, kl = jax.random.split(key, 3)
        idx = jax.random.randint(ki, (preset.batch,), 0, x_all.shape[0])
        x0 = _flip(kf, x_all[idx])
        loss, grads = jax.value_and_grad(loss_fn)(p, x0, y_all[idx], kl)
        updates, o = opt.update(grads, o, p)
        p = optax.apply_updates(p, updates)
        decay = jnp.minimum(preset.ema, (1.0 + i) / (10.0 + i))
        e = jax.tree.map(lambda a, b: decay * a + (1.0 - decay) * b, e, p)
        return (p, o, e, i + 1), loss

    @jax.jit
    def run_chunk(carry, keys):
        return jax.lax.scan(step, carry, keys)

    carry = (params, opt_state, ema, jnp.zeros((), jnp.float32))
    key = jax.random.key(seed + 1)
    losses = []
    done = 0
    t0 = time.time()
    end = preset.steps if stop_at is None else min(stop_at, preset.steps)
    while done < end:
        if time_limit is not None and time.time() - t0 > time_limit:
            log(f"dit: time limit {time_limit:.0f}s reached after {done} steps (reproduce with --stop-at-step {done})")
            break
        n = min(preset.chunk, end - done)
        key, sub = jax.random.split(key)
        carry, chunk_losses = run_chunk(carry, jax.random.split(sub, n))
        chunk_losses = np.asarray(chunk_losses)
        done += n
        losses.append(float(chunk_losses.mean()))
        log(f"dit step {done}/{preset.steps}: loss {losses[-1]:.4f} ({time.time() - t0:.1f}s)")
    return model.replace(params=carry[2]), losses, done


def train_classifier(preset: Preset, images, labels, seed: int, log):
    """Train the CNN with flips and ±2-pixel shifts; returns params."""
    x_all = jnp.asarray(data.to_model_range(images))
    y_all = jnp.asarray(labels, jnp.int32)
    params = clf.init(jax.random.key(seed + 2))
    sched = optax.cosine_decay_schedule(preset.clf_lr, preset.clf_steps)
    opt = optax.adamw(sched, weight_decay=1e-4)
    opt_state = opt.init(params)

    def augment(key, x):
        kf, ks = jax.random.split(key)
        x = _flip(kf, x)
        pad = jnp.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)), constant_values=-1.0)
        shifts = jax.random.randint(ks, (x.shape[0], 2), 0, 5)
        crop = lambda img, s: jax.lax.dynamic_slice(img, (s[0], s[1], 0), x.shape[1:])  # noqa: E731
        return jax.vmap(crop)(pad, shifts)

    def loss_fn(p, x, y):
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(clf.logits(p, x), y))

    def step(carry, key):
        p, o = carry
        ki, ka = jax.random.split(key)
        idx = jax.random.randint(ki, (preset.clf_batch,), 0, x_all.shape[0])
        loss, grads = jax.value_and_grad(loss_fn)(p, augment(ka, x_all[idx]), y_all[idx])
        updates, o = opt.update(grads, o, p)
        return (optax.apply_updates(p, updates), o), loss

    run = jax.jit(lambda c, k: jax.lax.scan(step, c, k))
    (params, _), losses = run((params, opt_state), jax.random.split(jax.random.key(seed + 3), preset.clf_steps))
    log(f"classifier: final loss {float(np.asarray(losses)[-100:].mean()):.4f}")
    return params


def evaluate_samples(model, clf_params, sampler_name, steps, guidance, per_class, seed, clip=True, quant=None):
    """Sample ``per_class`` images of each class; returns ``(fraction labelled as conditioned, samples, labels)``."""
    from jdq.sampling.generate import generate_classes

    labels = np.repeat(np.arange(data.NUM_CLASSES), per_class).astype(np.int32)
    # one batch size for every call, so the grid reuses the evaluation's compiled sampler
    samples = generate_classes(model, labels, sampler=sampler_name, steps=steps, guidance=guidance, seed=seed,
                               batch_size=1000, clip_denoised=clip, quant=quant, progress=False)
    return clf.accuracy(clf_params, samples, labels), samples, labels


def main(argv=None):
    """Command line entry point (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output folder (created; must not exist unless --overwrite)")
    ap.add_argument("--preset", default="default", choices=sorted(PRESETS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None, help="override the preset's DiT training steps")
    ap.add_argument("--stop-at-step", type=int, default=None, help="end DiT training after this many steps")
    ap.add_argument("--time-limit-s", type=float, default=None, help="end DiT training after this many seconds")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    preset = PRESETS[args.preset]
    if args.steps is not None:
        preset = dataclasses.replace(preset, steps=args.steps)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        sys.exit(f"jdq.demo.train: {out} exists and is not empty (pass --overwrite)")
    out.mkdir(parents=True, exist_ok=True)
    log_lines = []

    def log(msg):
        print(msg, flush=True)
        log_lines.append(msg)

    device = jax.devices()[0]
    log(f"jax {jax.__version__} on {device.platform}: {getattr(device, 'device_kind', device)}; preset {args.preset} "
        f"{dataclasses.asdict(preset)}")
    images, labels = data.load_animal_mnist()
    train_idx, test_idx = data.split(labels, seed=args.seed)

    t0 = time.time()
    model, losses, steps_done = train_dit(preset, images, labels, args.seed, log, args.stop_at_step, args.time_limit_s)
    dit_seconds = time.time() - t0
    t1 = time.time()
    clf_params = train_classifier(preset, images[train_idx], labels[train_idx], args.seed, log)
    clf_seconds = time.time() - t1
    test_acc = clf.accuracy(clf_params, data.to_model_range(images[test_idx]), labels[test_idx])
    log(f"classifier accuracy on {len(test_idx)} held-out real images: {test_acc:.4f}")

    from jdq.models.base import save
    save(model, out / "dit", overwrite=True)
    atomic_write_text(out / "dit" / "sampling.json", json.dumps(DEFAULT_SAMPLING, indent=2) + "\n")
    clf.save(clf_params, out / "classifier.safetensors")

    evals = []
    for name, steps in preset.eval_samplers:
        for g in preset.eval_guidance:
            t2 = time.time()
            acc, _, _ = evaluate_samples(model, clf_params, name, steps, g, preset.eval_per_class, seed=1234)
            evals.append({"sampler": name, "steps": steps, "guidance": g, "accuracy": acc,
                          "samples": preset.eval_per_class * data.NUM_CLASSES, "seconds": time.time() - t2})
            log(f"samples {name}-{steps} guidance {g}: classifier agrees on {acc:.4f} ({time.time() - t2:.1f}s)")
    d = DEFAULT_SAMPLING
    _, grid_samples, _ = evaluate_samples(model, clf_params, d["sampler"], d["steps"], d["guidance"], 10, seed=0)
    from jdq.sampling.images import save_grid
    save_grid(out / "samples.png", data.to_uint8(grid_samples), ncol=10, scale=2)

    metrics = {
        "device": f"{device.platform}: {getattr(device, 'device_kind', str(device))}",
        "jax": jax.__version__, "python": platform.python_version(), "seed": args.seed, "preset": args.preset,
        "config": dataclasses.asdict(preset), "dit_params": model.num_params, "dit_steps_done": steps_done, "dit_train_seconds": dit_seconds,
        "classifier_train_seconds": clf_seconds, "dit_loss_per_chunk": losses,
        "classifier_test_accuracy": test_acc, "classifier_test_images": int(len(test_idx)), "sample_accuracy": evals,
    }
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2, default=str) + "\n")
    atomic_write_text(out / "train.log", "\n".join(log_lines) + "\n")
    log(f"done: DiT {dit_seconds:.0f}s, classifier {clf_seconds:.0f}s, written to {out}")


if __name__ == "__main__":
    main()
