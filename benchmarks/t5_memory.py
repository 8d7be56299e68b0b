"""Peak memory of converting and loading a T5-XXL-shaped bf16 encoder (``jdq convert``, ``jdq.models.load``).

CPU (this machine)::

    python benchmarks/t5_memory.py --dir /tmp/t5xxl [--layers 24] [--keep]

1. Writes a synthetic transformers ``T5EncoderModel`` folder of T5 v1.1 XXL's shapes in bf16
   (``--layers`` of the 24 blocks; values are a repeated random tile: memory does not depend on
   them), sharded in ~2 GB files with a ``model.safetensors.index.json`` as the published ones.
2. In a fresh process each: converts it with :func:`checkpoints_convert.convert` (bf16 kept) and
   loads the result with :func:`jdq.models.load`; reports each process's peak resident set size
   (``ru_maxrss``), its peak before the step (after the imports) and the growth, beside the
   weights' size. Only the weights scale with ``--layers``, so a smaller run extrapolates
   linearly.

Prints a Markdown table (and writes ``benchmarks/results/t5_memory.md`` unless ``--no-write``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARD_BYTES = 2 * 1024**3


def t5_tensors(layers: int, d=4096, heads=64, d_kv=64, d_ff=10240, vocab=32128, buckets=32):
    """(name, shape) of a transformers T5EncoderModel state dict (v1.1: gated GELU, no biases)."""
    inner = heads * d_kv
    out = [("shared.weight", (vocab, d))]
    for i in range(layers):
        a = f"encoder.block.{i}.layer.0."
        out += [(a + f"SelfAttention.{n}.weight", (inner, d)) for n in "qkv"]
        out += [(a + "SelfAttention.o.weight", (d, inner)), (a + "layer_norm.weight", (d,))]
        if i == 0:
            out.append((a + "SelfAttention.relative_attention_bias.weight", (buckets, heads)))
        f = f"encoder.block.{i}.layer.1."
        out += [(f + "DenseReluDense.wi_0.weight", (d_ff, d)), (f + "DenseReluDense.wi_1.weight", (d_ff, d)),
                (f + "DenseReluDense.wo.weight", (d, d_ff)), (f + "layer_norm.weight", (d,))]
    return out + [("encoder.final_layer_norm.weight", (d,))]


def write_synthetic(folder: Path, layers: int) -> int:
    """The synthetic folder; returns the weights' bytes."""
    import ml_dtypes

    from jdq.models.streaming import write_safetensors

    folder.mkdir(parents=True, exist_ok=True)
    bf16 = np.dtype(ml_dtypes.bfloat16)
    tile = (np.random.default_rng(0).standard_normal(1 << 20) * 0.02).astype(bf16)
    tensors = t5_tensors(layers)
    shards, cur, size = [], [], 0
    for name, shape in tensors:
        n = int(np.prod(shape)) * 2
        if cur and size + n > SHARD_BYTES:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += n
    shards.append(cur)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(folder / fname, [(n, bf16, s) for n, s in shard],
                          lambda name, shapes=dict(shard): np.resize(tile, shapes[name]))
        for n, s in shard:
            weight_map[n] = fname
            total += int(np.prod(s)) * 2
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}))
    cfg = {"architectures": ["T5EncoderModel"], "model_type": "t5", "d_model": 4096, "d_kv": 64, "d_ff": 10240,
           "num_layers": layers, "num_heads": 64, "vocab_size": 32128, "feed_forward_proj": "gated-gelu",
           "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128, "layer_norm_epsilon": 1e-6,
           "dtype": "bfloat16"}
    (folder / "config.json").write_text(json.dumps(cfg))
    return total


_CHILD = """
import resource, sys, time, json
t0 = time.time()
import jax, jdq.models
import checkpoints_convert.transformers_text, jdq.models.streaming, jax.numpy as jnp
jnp.zeros(1).block_until_ready()
what, src, out = sys.argv[1:4]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
if what == "convert":
    from checkpoints_convert import convert
    convert(src, out)
elif what == "load":
    model, _ = jdq.models.load(out)
    jax.block_until_ready(model.params)
    assert str(jax.tree.leaves(model.params)[0].dtype) == "bfloat16"
print(json.dumps({"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "before": before,
                  "seconds": time.time() - t0}))
"""


def child(what: str, src: Path, out: Path) -> dict:
    """Peak RSS (bytes) and seconds of one step in a fresh Python process."""
    r = subprocess.run([sys.executable, "-c", _CHILD, what, str(src), str(out)], capture_output=True, text=True,
                       cwd=ROOT, env={**__import__("os").environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"})
    if r.returncode:
        raise RuntimeError(f"{what} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    """Entry point."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, required=True, help="scratch folder (needs 2x the weights on disk)")
    ap.add_argument("--layers", type=int, default=24, help="T5-XXL blocks to write (24: the full encoder)")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic and converted folders")
    ap.add_argument("--no-write", action="store_true", help="do not write benchmarks/results/t5_memory.md")
    args = ap.parse_args(argv)
    src, out = args.dir / "t5_src", args.dir / "t5_jdq"
    shutil.rmtree(src, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    try:
        weights = write_synthetic(src, args.layers)
        base = child("baseline", src, out)
        conv = child("convert", src, out)
        load = child("load", src, out)
    finally:
        if not args.keep:
            shutil.rmtree(src, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
    gb = lambda b: f"{b / 1e9:.2f} GB"  # noqa: E731
    lines = [f"T5 v1.1 XXL encoder shapes, {args.layers} of 24 blocks, bf16: weights {gb(weights)}", "",
             "| step | peak RSS | peak before the step (imports) | growth | growth / weights | seconds |",
             "|---|---|---|---|---|---|"]
    for name, r in [("imports only (baseline)", base), ("jdq convert (streamed)", conv), ("jdq.models.load", load)]:
        extra = r["peak_rss"] - r["before"]
        lines.append(f"| {name} | {gb(r['peak_rss'])} | {gb(r['before'])} | {gb(extra)} | {extra / weights:.3f} | "
                     f"{r['seconds']:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        from jdq.io import atomic_write_text

        atomic_write_text(ROOT / "benchmarks" / "results" / "t5_memory.md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
