"""Pallas TPU helpers shared by the ``<op>/tpu.py`` kernels."""

from __future__ import annotations

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu


def tiled_gemm_call(kernel, m: int, n: int, tm: int, tn: int, k_steps: int, in_specs, scratch_shapes, out_dtype,
                    interpret=False):
    """``pallas_call`` of a GEMM ``kernel`` over grid (M/tm, N/tn, k_steps), K innermost ("arbitrary").

    The output is (M, N) ``out_dtype``, written as (tm, tn) block (i, j); ``in_specs`` take grid
    indices ``(i, j, kk)``; ``scratch_shapes`` are the kernel's VMEM accumulators.
    """
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        grid=(m // tm, n // tn, k_steps),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((tm, tn), lambda i, j, kk: (i, j)),
        scratch_shapes=scratch_shapes,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
    )


__all__ = ["tiled_gemm_call"]
