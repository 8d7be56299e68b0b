"""Model speed: jdq's DiT forward (jitted) against PyTorch diffusers' DiTTransformer2DModel.

Run on a GPU: ``python benchmarks/models.py --device-run`` (DiT-XL/2-256, batch 32, bfloat16).
Without ``--device-run`` it runs a tiny version on whatever device is there (a CPU smoke test of
the script). Writes a markdown table to ``benchmarks/results/models.md`` (``--out``).

Both sides run the same weights: a random diffusers model (one timestep/class embedder shared by
every block, as in real checkpoints) is converted with ``checkpoints_convert`` into jdq, and the
outputs of the two are compared before timing. PyTorch runs eager and, on a GPU,
``torch.compile``; both in ``torch.inference_mode``, bf16 weights and activations. Each time is
the median over ``--repeats`` of the wall-clock mean of ``--iters`` back-to-back forwards
(device-synchronised before and after), after warm-up; jdq's is the jitted ``model.apply`` with
bf16 params (compile excluded). The ratio column is (time of the faster PyTorch variant) /
(time of the row): above 1 is faster than PyTorch's best.

diffusers is not in the GPU image. Carry it as a wheel (from the repository root, here)::

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl diffusers==0.42.1

(its other requirements -- requests, filelock, numpy, huggingface_hub, safetensors, regex, Pillow --
are in the GPU image), name ``.whl`` in ``carry`` and start the device command with ``python3 -m
pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/diffusers-*.whl && export
PYTHONPATH=/tmp/site:$PYTHONPATH;``. Without diffusers the
script still times jdq (random weights) and says clearly that the PyTorch baseline is absent.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jdq.io import atomic_write_text  # noqa: E402
from jdq.models import dit  # noqa: E402
from jdq.models.layers import FUSED_ATTENTION_ENV  # noqa: E402
from jdq.quant.transform import trace_operands  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "models.md")


def matmul_flops(model, batch: int) -> float:
    """FLOPs of one forward's matmuls (2·M·K·N per linear, both attention matmuls), from the traced sites."""
    cfg = model.config
    x = jax.ShapeDtypeStruct((batch, cfg.input_size, cfg.input_size, cfg.in_channels), jnp.float32)
    ops = trace_operands(model.apply, model.params, x, jax.ShapeDtypeStruct((batch,), jnp.float32),
                         jax.ShapeDtypeStruct((batch,), jnp.int32))
    by_site = {}
    for o in ops:
        by_site.setdefault(o.site, {})[o.role] = o.shape
    total = 0.0
    for roles in by_site.values():
        if "weight" in roles:
            act = roles.get("act", roles.get("post_gelu"))
            k, n = roles["weight"]
            total += 2.0 * np.prod(act[:-1]) * k * n
        elif "q" in roles:  # q (B, H, Lq, D) · kᵀ (B, H, D, Lk)
            b, h, lq, d = roles["q"]
            total += 2.0 * b * h * lq * d * roles["k"][-1]
        elif "attn_prob" in roles:  # p (B, H, Lq, Lk) · v (B, H, Lk, D)
            b, h, lq, lk = roles["attn_prob"]
            total += 2.0 * b * h * lq * lk * roles["v"][-1]
    return total


def time_calls(run, sync, iters: int, repeats: int, warmup: int) -> float:
    """Median over ``repeats`` of the mean milliseconds of ``iters`` back-to-back ``run()`` calls."""
    for _ in range(warmup):
        run()
    sync()
    means = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            out = run()
        sync(out)
        means.append((time.perf_counter() - t0) * 1e3 / iters)
    return statistics.median(means)


def load_diffusers():
    """``diffusers`` or ``None`` (with the reason printed)."""
    try:
        import diffusers  # noqa: F401

        return diffusers
    except Exception as e:  # noqa: BLE001
        print(f"*** diffusers is NOT available ({type(e).__name__}: {e}); the PyTorch baseline is skipped. "
              "Carry it as a wheel (see this script's docstring). ***")
        return None


def diffusers_dit(diffusers, cfg: dit.Config, seed: int = 0):
    """A diffusers DiT of ``cfg``'s shape with random weights and one embedder shared by all blocks."""
    import torch

    torch.manual_seed(seed)
    m = diffusers.DiTTransformer2DModel(
        num_attention_heads=cfg.num_heads, attention_head_dim=cfg.hidden_size // cfg.num_heads,
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, num_layers=cfg.depth,
        sample_size=cfg.input_size, patch_size=cfg.patch_size, num_embeds_ada_norm=cfg.num_classes,
        norm_num_groups=1)
    with torch.no_grad():
        for p in m.parameters():  # adaLN-Zero style zeros would make the benchmark trivial to check
            p.copy_(torch.randn_like(p) * (0.02 if p.ndim < 2 else p.shape[-1] ** -0.5))
        for blk in m.transformer_blocks[1:]:
            blk.norm1.emb.load_state_dict(m.transformer_blocks[0].norm1.emb.state_dict())
    return m.eval()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device-run", action="store_true", help="the real benchmark: DiT-XL/2-256, batch 32, bf16")
    ap.add_argument("--variant", default=None, help="DiT variant (default XL/2 with --device-run)")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-torch-compile", action="store_true")
    ap.add_argument("--out", default=RESULTS, help="markdown results file")
    args = ap.parse_args(argv)

    if args.device_run:
        cfg = dit.Config.variant(args.variant or "XL/2", args.resolution, dtype="bfloat16")
        batch, iters = args.batch or 32, args.iters or 20
    else:  # smoke size
        cfg = dit.Config(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=4, num_classes=10,
                         dtype="bfloat16")
        batch, iters = args.batch or 2, args.iters or 3
    backend = jax.default_backend()
    device = jax.devices()[0].device_kind
    print(f"jax {jax.__version__} on {backend} ({device}); DiT hidden={cfg.hidden_size} depth={cfg.depth} "
          f"patch={cfg.patch_size} input={cfg.input_size} batch={batch} bf16")

    diffusers = load_diffusers()
    rows, notes = [], []
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, cfg.input_size, cfg.input_size, cfg.in_channels)).astype(np.float32)
    t = rng.integers(0, 1000, batch).astype(np.float32)
    y = rng.integers(0, cfg.num_classes + 1, batch).astype(np.int64)  # includes the null class

    torch_model = None
    if diffusers is not None:
        import torch

        from checkpoints_convert.dit import convert_diffusers_dit
        from jdq.models.base import Model

        torch_model = diffusers_dit(diffusers, cfg)
        t0 = time.perf_counter()
        sd = {k: v.detach().float().numpy() for k, v in torch_model.state_dict().items()}
        params, conv_cfg = convert_diffusers_dit(sd, dict(torch_model.config))
        del sd
        model = dit.from_config(conv_cfg, abstract=True)
        model = Model(conv_cfg, model.graphdef, jax.tree.map(jnp.asarray, params)).with_dtype(jnp.bfloat16)
        print(f"converted the diffusers weights in {time.perf_counter() - t0:.1f} s")
    else:
        t0 = time.perf_counter()
        model = dit.from_config(cfg, key=0).with_dtype(jnp.bfloat16)
        print(f"random jdq params in {time.perf_counter() - t0:.1f} s")

    flops = matmul_flops(model, batch)
    xj, tj, yj = jax.device_put(jnp.asarray(x, jnp.bfloat16)), jax.device_put(jnp.asarray(t)), \
        jax.device_put(jnp.asarray(y, jnp.int32))
    params = jax.device_put(model.params)
    out_j = None
    # jdq's default fused attention (cuDNN flash attention on a GPU in bf16), and XLA's for comparison.
    modes = [("auto", "jdq (jax.jit)"), ("xla", "jdq (jax.jit), XLA attention")] if backend == "gpu" \
        else [("auto", "jdq (jax.jit)")]
    for mode, label in modes:
        os.environ[FUSED_ATTENTION_ENV] = mode  # read when the forward is traced
        fwd = jax.jit(model.apply)
        try:
            t0 = time.perf_counter()
            out = jax.block_until_ready(fwd(params, xj, tj, yj))
            print(f"{label}: compile + first run {time.perf_counter() - t0:.1f} s")
            ms = time_calls(lambda: fwd(params, xj, tj, yj), lambda o=None: jax.block_until_ready(o),
                            iters, args.repeats, warmup=2)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            notes.append(f"{label} failed: {type(e).__name__}: {str(e)[:300]}")
            continue
        out_j = out if out_j is None else out_j
        rows.append((label, ms))
    os.environ.pop(FUSED_ATTENTION_ENV, None)
    if out_j is None:
        raise SystemExit("every jdq variant failed; see the notes above")

    if torch_model is not None:
        import torch

        dev = "cuda" if torch.cuda.is_available() else "cpu"
        tm = torch_model.to(dev, torch.bfloat16)
        xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().to(dev, torch.bfloat16)
        tt, yt = torch.from_numpy(t).to(dev), torch.from_numpy(y).to(dev)
        sync = (lambda o=None: torch.cuda.synchronize()) if dev == "cuda" else (lambda o=None: None)

        with torch.inference_mode():
            out_t = tm(xt, timestep=tt, class_labels=yt).sample
            ref = out_t.float().permute(0, 2, 3, 1).cpu().numpy()
            err = float(np.max(np.abs(np.asarray(out_j, np.float32) - ref)) / np.max(np.abs(ref)))
            notes.append(f"jdq vs diffusers output, same weights, both bf16: max|Δ|/max|ref| = {err:.2e}")
            print(notes[-1])
            eager_ms = time_calls(lambda: tm(xt, timestep=tt, class_labels=yt).sample, sync, iters, args.repeats, 2)
            rows.append(("PyTorch diffusers eager", eager_ms))
            if dev == "cuda" and not args.no_torch_compile:
                try:
                    tc = torch.compile(tm)
                    t0 = time.perf_counter()
                    tc(xt, timestep=tt, class_labels=yt)
                    sync()
                    print(f"torch.compile + first run {time.perf_counter() - t0:.1f} s")
                    comp_ms = time_calls(lambda: tc(xt, timestep=tt, class_labels=yt).sample, sync, iters,
                                         args.repeats, 3)
                    rows.append(("PyTorch diffusers torch.compile", comp_ms))
                except Exception as e:  # noqa: BLE001
                    traceback.print_exc()
                    notes.append(f"torch.compile failed: {type(e).__name__}: {str(e)[:200]}")
            elif dev != "cuda":
                notes.append("torch.compile skipped (no GPU)")

    torch_times = [ms for name, ms in rows if name.startswith("PyTorch")]
    best_torch = min(torch_times) if torch_times else None
    lines = [
        "# Model speed: DiT forward, jdq vs PyTorch diffusers",
        "",
        f"`python benchmarks/models.py{' --device-run' if args.device_run else ''}` — "
        f"{device} ({backend}), jax {jax.__version__}"
        + (f", torch {__import__('torch').__version__}, diffusers {diffusers.__version__}" if diffusers else "")
        + f", python {platform.python_version()}.",
        "",
        f"DiT hidden {cfg.hidden_size}, depth {cfg.depth}, patch {cfg.patch_size}, latent {cfg.input_size}², "
        f"batch {batch}, bfloat16 weights and activations; matmul work {flops / 1e12:.3f} TFLOP per forward. "
        f"Median of {args.repeats} × mean of {iters} forwards.",
        "",
        "| implementation | ms / forward | matmul TFLOP/s | speed vs best PyTorch |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, ms in rows:
        ratio = f"{best_torch / ms:.2f}×" if best_torch else "n/a (no PyTorch baseline)"
        lines.append(f"| {name} | {ms:.3f} | {flops / ms / 1e9:.1f} | {ratio} |")
    lines += [""] + [f"- {n}" for n in notes]
    if diffusers is None:
        lines.append("- diffusers was NOT available: no PyTorch baseline in this run.")
    if not args.device_run:
        lines.append("- smoke size (no --device-run): not a performance result.")
    text = "\n".join(lines) + "\n"
    print(text)
    atomic_write_text(args.out, text, parents=True)
    out_dir = os.environ.get("OUT")
    if out_dir:
        atomic_write_text(os.path.join(out_dir, "models.md"), text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
