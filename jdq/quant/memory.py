"""Weight storage of a model under a quantization plan, from abstract parameter shapes (no weights needed).

A linear weight (``<site>.kernel``, 2-D) whose ``<site>:weight`` operand the plan casts is stored
at its format's bits per element (:func:`jdq.hw.workload.format_bits`; the MX formats' shared
scales are part of that number) plus, for integer casts, one float32 scale per scaled group: per
output channel (``"row"``: ``32 / in_features`` bits per element), per ``group_size`` input
channels (``"group"``) or one per tensor. Every other parameter (embeddings, norms, weights the
plan keeps in float) is stored in ``float_dtype``.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

SCALE_BITS = 32.0


def _cast_meta(transform):
    """The meta of the last casting stage of a transform (chains and wrappers walked), or ``None``."""
    from jdq.hw.workload import _stages

    found = None
    for stage_meta, _ in _stages(getattr(transform, "meta", None), None):
        if hasattr(stage_meta, "fmt") and hasattr(stage_meta, "granularity"):
            found = stage_meta
    return found


def weight_bits_per_element(transform, in_features: int) -> float | None:
    """Storage bits per element of a weight cast by ``transform`` (``None``: not a cast jdq can size)."""
    from jdq.hw.workload import format_bits, format_of_transform

    try:
        fmt = format_of_transform(transform, key="weight")
    except ValueError:
        return None
    bits = format_bits(fmt.name)
    if fmt.hi_name is not None:  # an outlier split: that fraction at the high format
        bits = (1 - fmt.hi_frac) * bits + fmt.hi_frac * format_bits(fmt.hi_name)
    meta = _cast_meta(transform)
    if meta is not None and str(getattr(meta, "fmt", "")).startswith(("int", "uint")):
        options = dict(getattr(meta, "options", ()) or ())
        if meta.granularity == "row":
            bits += SCALE_BITS / in_features
        elif meta.granularity == "group":
            bits += SCALE_BITS / int(options.get("group_size", 64))
    return float(bits)


def weight_storage(params, plan, float_dtype=jnp.bfloat16) -> dict[str, Any]:
    """``{"bytes", "quantized_bytes", "float_bytes", "quantized_params", "params"}`` of ``params``
    (arrays or ``ShapeDtypeStruct``) stored as ``plan`` casts their weights."""
    from jdq.models.base import flatten_params

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
