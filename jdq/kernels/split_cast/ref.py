"""Reference of the fused split cast: ``outliers.split_dynamic(meta, activate(x), {"ratio": ratio})``, the model's own ops.

MixDiT casts each linear input by a block :func:`jdq.quant.outlier_split`: per row (token), the
``k = round(ratio · K / 16)`` blocks of 16 with the largest max ``|x|`` (ties to the earlier block,
NaN last) in MX9, the rest in MX6. Unfused, XLA computes it as a block-max fusion, a top-k selection
(a sort, or :mod:`jdq.kernels.row_select`) and a cast fusion, with the MLP's GELU before it in
another. The kernel takes splits whose two formats are SMX formats that differ only in the
mantissa width and whose selection blocks are the formats' blocks (:func:`unsupported`): a block
is then wholly one format, and the cast is one pass with a width per block.
"""

from __future__ import annotations

import jax.numpy as jnp


def unsupported(meta) -> str | None:
    """Why a kernel cannot run the outlier split ``meta`` with one width per block of a row, or ``None``."""
    from jdq.formats import smx

    if meta.granularity != "block" or meta.scope != "row":
        return f"a {meta.granularity} / {meta.scope} selection (the kernel selects blocks per row)"
    if getattr(meta.hi, "kind", None) != "smx" or getattr(meta.lo, "kind", None) != "smx":
        return "hi and lo must be MX9 / MX6 / MX4 (SMX) formats"
    if not smx.differ_only_in_width(meta.hi, meta.lo) or meta.hi.sub_block_size != 2:
        return f"{meta.hi.name} / {meta.lo.name} differ in more than the mantissa width, or do not pair elements"
    if meta.block_size != meta.hi.block_size:
        return f"selection blocks of {meta.block_size} are not the formats' blocks of {meta.hi.block_size}"
    return None


def check(x, meta, activation):
    """Raise a ValueError naming the problem unless the op takes ``x`` (bf16, last axis a multiple of the block), ``meta`` and ``activation``."""
    from jdq.kernels.act_cast.ref import check_rows

    check_rows("split_cast", x, activation, unsupported(meta), meta.block_size, f"the block {meta.block_size}")


def reference(x, ratio, meta, activation: str | None = None):
    """``split_dynamic(meta, activate(x, activation), {"ratio": ratio}, -1)`` for bf16 ``x``: the unfused model's split."""
    from jdq.kernels.activations import activate
    from jdq.quant.outliers import split_dynamic

    check(x, meta, activation)
    return split_dynamic(meta, activate(x, activation), {"ratio": jnp.asarray(ratio, jnp.float32)}, -1)


__all__ = ["check", "reference", "unsupported"]
