"""Text encoders: jdq against transformers (PyTorch) on the CPU, and T5-XXL weight memory per recipe.

CPU (this machine)::

    python benchmarks/text_encoders.py [--quick] [--no-write]

1. Throughput (prompts per second, median of ``--repeats`` timed calls after a warm-up) of the
   jitted jdq encoder and of transformers' eager model on the same random weights and tokens,
   float32 and bfloat16, in the same process: a T5 v1.1 Base-shaped encoder (12 layers, 768
   wide, 12 heads, gated GELU 2048) on PixArt-Σ's 300-token prompts and CLIP ViT-L/14's text
   tower (12 layers, 768 wide, quick-GELU) on 77 tokens. jdq's outputs are checked against
   transformers' before timing (float32: 1e-4 relative).
2. T5 v1.1 XXL's weight storage under each recipe (:func:`jdq.quant.memory.weight_storage`,
   from the abstract shapes; nothing is allocated).

Prints Markdown and writes ``benchmarks/results/text_encoders.md`` unless ``--no-write``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RECIPES = ("w8a8", "w4a8", "mxfp8_e4m3", "mxfp6_e2m3", "mxfp4_e2m1", "mx9", "mx6", "mx4", "mixdit")


def _time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _models(kind: str, quick: bool):
    import torch
    import transformers

    from checkpoints_convert.transformers_text import convert_transformers_arrays
    from jdq import models

    torch.manual_seed(0)
    if kind == "t5":
        cfg = transformers.T5Config(d_model=768, d_kv=64, d_ff=2048, num_layers=4 if quick else 12, num_heads=12,
                                    feed_forward_proj="gated-gelu", vocab_size=32128)
        ref = transformers.T5EncoderModel(cfg).eval()
        arch = "T5EncoderModel"
    else:
        cfg = transformers.CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=4 if quick else 12,
                                          num_attention_heads=12, projection_dim=768, eos_token_id=49407)
        ref = transformers.CLIPTextModelWithProjection(cfg).eval()
        arch = "CLIPTextModelWithProjection"
    _, params, jcfg = convert_transformers_arrays(ref.state_dict(), {**cfg.to_dict(), "architectures": [arch]})
    model = models.from_config(jcfg, abstract=True).replace(params=params)
    return ref, model


def throughput(quick: bool, repeats: int) -> list[str]:
    """The throughput table's rows."""
    import jax
    import jax.numpy as jnp
    import torch

    rows = []
    for kind, length, batch in [("t5", 300, 4), ("clip", 77, 8)]:
        ref, model = _models(kind, quick)
        rng = np.random.default_rng(0)
        ids = rng.integers(3, 30000, (batch, length))
        mask = np.ones_like(ids)
        mask[:, length // 2:] = 0
        if kind == "clip":
            ids[:, length // 2] = 49407
        t_ids, t_mask = torch.tensor(ids), torch.tensor(mask)
        for dtype in ("float32", "bfloat16"):
            jm = model if dtype == "float32" else model.with_dtype(dtype)
            tm = ref.to(torch.float32 if dtype == "float32" else torch.bfloat16)
            j_ids, j_mask = jnp.asarray(ids), jnp.asarray(mask)

            def run_jdq():
                return jax.block_until_ready(jm(j_ids, j_mask))

            def run_torch():
                with torch.no_grad():
                    return tm(input_ids=t_ids, attention_mask=t_mask)

            out_j, out_t = run_jdq(), run_torch()
            got = np.asarray(out_j if kind == "t5" else out_j["pooled"], np.float32)
            want = (out_t.last_hidden_state if kind == "t5" else out_t.text_embeds).float().numpy()
            err = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
            if dtype == "float32" and err > 1e-4:
                raise AssertionError(f"{kind}: jdq differs from transformers by {err:.2g}")
            tj, tt = _time(run_jdq, repeats), _time(run_torch, repeats)
            rows.append(f"| {kind.upper()} ({'T5 v1.1 Base shape' if kind == 't5' else 'CLIP-L text'}) | {dtype} | "
                        f"{batch}×{length} | {batch / tj:.1f} | {batch / tt:.1f} | {tt / tj:.2f} | {err:.1e} |")
    return rows


def memory_rows() -> list[str]:
    """T5-XXL weight storage per recipe."""
    import jax.numpy as jnp

    from jdq import recipes
    from jdq.models import t5
    from jdq.quant.memory import weight_storage
    from jdq.quant.transform import trace_operands

    model = t5.from_config(t5.T5_V1_1_XXL, abstract=True)
    ops = trace_operands(lambda p, ids, quant: model.apply(p, ids, quant=quant), model.params,
                         jnp.zeros((1, 8), jnp.int32))
    base = weight_storage(model.params, None)
    rows = [f"| bf16 (no recipe) | {base['bytes'] / 1e9:.2f} | 1.00 | 0 % |"]
    for name in RECIPES:
        ws = weight_storage(model.params, recipes.plan_for(name, ops))
        rows.append(f"| {name} | {ws['bytes'] / 1e9:.2f} | {ws['bytes'] / base['bytes']:.2f} | "
                    f"{100 * ws['quantized_params'] / ws['params']:.1f} % |")
    return rows


def main(argv=None) -> int:
    """Entry point."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="4 layers instead of 12")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    import os

    lines = [f"CPU: {os.cpu_count()} cores; {'4' if args.quick else '12'} layers; median of {args.repeats} calls", "",
             "| encoder | dtype | batch × tokens | jdq prompts/s | transformers prompts/s | jdq / transformers | "
             "max rel. diff |", "|---|---|---|---|---|---|---|"]
    lines += throughput(args.quick, args.repeats)
    lines += ["", "T5 v1.1 XXL encoder weights (4,762,310,656 params) per recipe; float parameters in bf16:", "",
              "| recipe | GB | / bf16 | params quantized |", "|---|---|---|---|"]
    lines += memory_rows()
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        from jdq.io import atomic_write_text

        atomic_write_text(ROOT / "benchmarks" / "results" / "text_encoders.md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
