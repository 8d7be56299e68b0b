"""Weight storage of a model under a quantization plan, from abstract parameter shapes (no weights needed).

A linear weight (``<site>.kernel``, 2-D) whose ``<site>:weight`` operand the plan casts is stored
at its format's bits per element (:func:`jdq.formats.get`'s ``bits_per_element``; the MX formats'
shared scales are part of that number) plus, for integer casts, one float32 scale per scaled group: per
output channel (``"row"``: ``32 / in_features`` bits per element), per ``group_size`` input
channels (``"group"``) or one per tensor. Every other parameter (embeddings, norms, weights the
plan keeps in float) is stored in ``float_dtype``.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

SCALE_BITS = 32.0


def weight_bits_per_element(transform, in_features: int) -> float | None:
    """Storage bits per element of a weight cast by ``transform`` (``None``: not a cast jdq can size)."""
    from jdq.quant.reader import describe_transform

    op = describe_transform(transform, None, "weight")
    if op.fmt is None or (op.outliers is not None and not op.outliers.weight):
        return None  # nothing casts it, or an outlier split whose ratio lives in the state
    bits = op.bits
    if op.spec is not None and op.regions is None and op.fmt.startswith(("int", "uint")):
        if op.granularity == "row":
            bits += SCALE_BITS / in_features
        elif op.granularity == "group":
            bits += SCALE_BITS / int(op.spec.group_size or 64)
    return float(bits)


def weight_storage(params, plan, float_dtype=jnp.bfloat16) -> dict[str, Any]:
    """``{"bytes", "quantized_bytes", "float_bytes", "quantized_params", "params"}`` of ``params``
    (arrays or ``ShapeDtypeStruct``) stored as ``plan`` casts their weights."""
    from jdq.tree import flatten_params

    float_bits = 8 * jnp.dtype(float_dtype).itemsize
    q_bits = f_bits = 0.0
    q_count = total = 0
    for name, leaf in flatten_params(params).items():
        n = int(np.prod(leaf.shape, dtype=np.int64))
        total += n
        bits = None
        if name.endswith(".kernel") and len(leaf.shape) == 2 and plan is not None:
            t = plan.transform_for(f"{name[: -len('.kernel')]}:weight")
            if t is not None:
                bits = weight_bits_per_element(t, int(leaf.shape[0]))
        if bits is None:
            f_bits += n * float_bits
        else:
            q_bits += n * bits
            q_count += n
    return {"bytes": (q_bits + f_bits) / 8, "quantized_bytes": q_bits / 8, "float_bytes": f_bits / 8,
            "quantized_params": q_count, "params": total}
