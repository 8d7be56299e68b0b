"""One kernel case run a few times, nothing else: the target of a hardware profiler (``ncu``) and of the compiler's resource report.

::

    python3 benchmarks/kernel_profile.py --case attention:kernel:mixdit [--repeat 3]
    MOSAIC_GPU_DUMP_PTXAS=1 python3 benchmarks/kernel_profile.py --case attention:kernel_nocast
    ncu --clock-control none --launch-skip 2 --launch-count 1 -k regex:mosaic --section Occupancy \\
        python3 benchmarks/kernel_profile.py --case split:fc2 in:gelu + split one kernel

Cases (``--case``, one per process so a profiler's launch counts are simple):

* ``attention:<variant>``: a variant of ``benchmarks/quant_attention.py`` (``kernel:<fmt>[@<config>]``,
  ``kernel_nocast``, ``fused:<fmt>``, ``cudnn_bf16``, ...) at DiT-XL/2 b64 (``--shape``);
* ``split:<operand>:<variant>``: a variant of ``benchmarks/mixdit_fakequant.py`` (``split kernel``,
  ``split one kernel``, ``gelu + split one kernel``, ...) on one DiT-XL/2 operand (``linear in (qkv, proj,
  fc1)``, ``fc2 in``, ...) at ``--batch`` evaluations.

The case's jitted function runs once to compile, then ``--repeat`` times, each call waited for; the
script prints what ran and the outputs' checksum (so a run that did nothing is visible). The printed
launch order per call is the function's own; with ``--launch-skip`` a profiler skips the compile-time
call. No timing: times come from the benchmarks that own the cases.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import mixdit_fakequant as mf  # noqa: E402  (benchmarks/: the cases' owners)
import quant_attention as qa  # noqa: E402


def attention_case(name, shape, impl):
    """``(fn, args)`` of ``benchmarks/quant_attention.py``'s variant ``name`` on one random (q, k, v) of ``shape``."""
    example = qa.qkv(jax.random.key(0), shape)
    g, args = qa.run_variant(name, example, impl)
    return g, args


def split_case(operand, name, batch, tiny):
    """``(fn, args)`` of ``benchmarks/mixdit_fakequant.py``'s variant ``name`` on its operand ``operand``."""
    ops = mf.operands(batch, tokens=16, dim=64, heads=4) if tiny else mf.operands(batch)
    if operand not in ops:
        raise SystemExit(f"--case split: unknown operand {operand!r}; one of {sorted(ops)}")
    shape, axis, ratio, _ = ops[operand]
    vs = mf.variants(axis, ratio)
    if name not in vs:
        raise SystemExit(f"--case split: unknown variant {name!r}; one of {sorted(vs)}")
    x = (jax.random.normal(jax.random.key(0), shape, jnp.float32) * 2.0).astype(jnp.bfloat16)
    return jax.jit(vs[name]), (x,)


def build(case, shape, batch, tiny):
    """The case's ``(fn, args)`` (see the module docstring)."""
    kind, _, rest = case.partition(":")
    impl = "gpu_interpret" if tiny else "gpu"
    if kind == "attention" and rest:
        return attention_case(rest, shape, impl)
    if kind == "split" and ":" in rest:
        operand, _, name = rest.partition(":")
        return split_case(operand, name, batch, tiny)
    raise SystemExit(f"--case {case!r}: expected attention:<variant> or split:<operand>:<variant>")


def checksum(out):
    """The float64 sum of every leaf of ``out`` (booleans counted)."""
    return float(sum(np.asarray(x, np.float64).sum() for x in jax.tree.leaves(out)))


def main(argv=None):
    """Build the case, run it once to compile and ``--repeat`` times more, print what ran."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--case", required=True, help="attention:<variant> or split:<operand>:<variant>")
    p.add_argument("--repeat", type=int, default=3, help="calls after the compiling one")
    p.add_argument("--shape", default="dit.b64", help="attention shape (benchmarks/quant_attention.py SHAPES)")
    p.add_argument("--batch", type=int, default=64, help="split: model evaluations (64: batch 32 with CFG)")
    p.add_argument("--tiny", action="store_true", help="small shapes, kernels interpreted (CPU smoke test)")
    args = p.parse_args(argv)
    if args.repeat < 0:
        raise SystemExit("--repeat must be >= 0")
    shapes = qa.TINY if args.tiny else qa.SHAPES
    shape = shapes["tiny"] if args.tiny else shapes.get(args.shape)
    if shape is None:
        raise SystemExit(f"--shape {args.shape!r}: one of {sorted(shapes)}")
    fn, fargs = build(args.case, shape, args.batch, args.tiny)
    out = jax.block_until_ready(fn(*fargs))
    for _ in range(args.repeat):
        out = jax.block_until_ready(fn(*fargs))
    print(f"case {args.case!r} on {jax.devices()[0].device_kind}: {1 + args.repeat} calls, "
          f"inputs {[tuple(a.shape) for a in fargs]}, checksum {checksum(out):.6g}")
    return checksum(out)


if __name__ == "__main__":
    main()
