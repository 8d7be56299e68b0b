"""Fake-quant attention on already-cast q / k / v with the probabilities' cast inside: the reference.

A plan that quantizes attention (``<site>.qk`` roles ``q`` / ``k``, ``<site>.pv`` roles
``attn_prob`` / ``v``) makes ``jdq.models.layers.attention`` run it explicitly in XLA: the
(B, H, Lq, Lk) logits and probabilities are materialised, and the probabilities' cast is another
two passes over them. Of the four casts only the probabilities' sits between the two matmuls;
q, k and v can be cast before any attention kernel. :func:`reference` is that explicit path with
the q / k / v casts already applied — the same operations in the same order:

1. ``logits = bf16(q̂ · k̂ᵀ)`` (a matmul in the operands' dtype, float32 accumulation), then
   ``float32(logits) · scale``;
2. ``p = softmax(logits)`` in float32, rounded to the operands' dtype;
3. ``p̂ = cast(p)`` along the keys (the plan's ``attn_prob`` transform: :class:`ProbCast`);
4. ``out = p̂ · v̂`` in the operands' dtype.

A kernel computing this (:mod:`jdq.kernels.quant_attention.gpu`) needs each query row's softmax
maximum and sum before it can cast any probability (the cast's block scales see the normalized
values), so it makes two passes over the keys: statistics, then probabilities, cast and P·V. Its
row sum is accumulated in another order than XLA's, which can move a probability by one float32
ulp and so, rarely, across a bf16 or cast rounding boundary: the tests bound the difference.
XLA's own compilation of the explicit path is not rounding-exact either: by default a fusion may
keep a bf16 value in float32 (``xla_allow_excess_precision``), and on a CPU the logits' bf16
rounding is folded into the dot and the softmax divides by a reciprocal. For block casts with
power-of-two scales that rarely shows; a per-row FP8 scale moves with every such rounding.

:class:`ProbCast` names the probability casts a kernel does in registers: none, an OCP MX cast
(block scales along the keys), a shared-microexponent (MX9 / MX6 / MX4) cast or a scaled FP8 cast
with one scale per query row (``w8a8-fp8attn``), all dynamic (no calibrated state), so the cast is
a function of the probabilities alone.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

PROB_KINDS = ("none", "mx", "smx", "row", "split")


@dataclasses.dataclass(frozen=True)
class ProbCast:
    """The probabilities' cast along the keys: ``kind`` ``"none"`` | ``"mx"`` | ``"smx"`` | ``"row"`` | ``"split"`` and the format spec.

    ``"row"``: a scaled FP8 cast with a dynamic scale per query row (``amax / max``); a row's max
    probability is that of its max logit, ``1 / sum``, so the kernel knows it after its first pass.
    ``"split"``: MixDiT's block split (``split``: its :class:`~jdq.quant.outliers.OutlierMeta`,
    ``spec`` its ``hi`` format): per query row the top ``ratio`` of the key blocks by max
    probability in ``hi``, the rest in ``lo`` (two SMX formats that differ only in width, blocks
    of the selection's size); the ratio is the plan's state, an argument of the op.
    """

    kind: str = "none"
    spec: Any = None
    split: Any = None

    def __post_init__(self):
        if self.kind not in PROB_KINDS:
            raise ValueError(f"ProbCast kind must be one of {PROB_KINDS}, got {self.kind!r}")
        if (self.kind == "none") != (self.spec is None):
            raise ValueError(f"ProbCast({self.kind!r}) needs a format spec exactly when the kind is not 'none'")
        if (self.kind == "split") != (self.split is not None):
            raise ValueError("ProbCast: an OutlierMeta `split` is given exactly for kind 'split'")
        if self.kind == "split":
            from jdq.kernels.split_cast.ref import unsupported

            why = unsupported(self.split)
            if why:
                raise ValueError(f"ProbCast('split'): {why}")
            if self.spec != self.split.hi:
                raise ValueError("ProbCast('split'): spec must be the split's hi format")
        if self.kind == "row" and (self.spec.kind != "fp8" or self.spec.granularity != "row"):
            raise ValueError(f"ProbCast('row') takes an FP8 format with granularity 'row', got {self.spec}")
        if self.kind in ("smx", "split") and self.spec.sub_block_size != 2:
            raise ValueError(f"ProbCast: {self.spec.name} has sub-blocks of {self.spec.sub_block_size}; the kernel takes 2")

    @property
    def block(self) -> int:
        """Keys per scale block (1 when there is no cast or one scale per row)."""
        return 1 if self.kind in ("none", "row") else int(self.spec.block_size)

    @property
    def pairs(self) -> bool:
        """Whether the cast pairs neighbouring keys (a shared micro-exponent per pair)."""
        return self.kind in ("smx", "split")

    def apply(self, p, ratio=None):
        """``p`` fake-quantized along its last axis (the keys); ``ratio`` (float32) for a split."""
        if self.spec is None:
            return p
        if self.kind == "split":
            from jdq.quant.outliers import split_dynamic

            if ratio is None:
                raise ValueError("ProbCast('split').apply needs the split's ratio")
            return split_dynamic(self.split, p, {"ratio": jnp.asarray(ratio, jnp.float32)}, -1)
        from jdq import formats

        return formats.cast(p, self.spec, axis=-1)


def prob_cast_of(transform) -> ProbCast | str:
    """The :class:`ProbCast` of the probabilities' plan transform (``None``: no cast), or why no kernel can do it in registers."""
    from jdq.quant.casts import CastMeta

    if transform is None:
        return ProbCast()
    meta = transform.meta
    if isinstance(meta, CastMeta) and meta.scaling == "dynamic" and meta.spec.kind == "fp8":
        if meta.spec.granularity == "row":
            return ProbCast("row", meta.spec)
        return f"the probabilities' FP8 cast has granularity {meta.spec.granularity!r}; the kernel scales per row"
    from jdq.quant.outliers import OutlierMeta

    if isinstance(meta, OutlierMeta):
        from jdq.kernels.split_cast.ref import unsupported

        why = unsupported(meta)
        return why if why else ProbCast("split", meta.hi, meta)
    if not isinstance(meta, CastMeta) or meta.scaling != "block":
        return f"the probabilities' transform ({type(meta).__name__}) is not a single block-scaled or row-scaled FP8 cast"
    spec = meta.spec
    if spec.kind == "mx":
        return ProbCast("mx", spec)
    if spec.kind == "smx":
        if spec.sub_block_size != 2:
            return f"{spec.name}: sub-blocks of {spec.sub_block_size} (the kernel pairs keys)"
        return ProbCast("smx", spec)
    return f"the probabilities' cast is {spec.name} ({meta.scaling}); the kernel casts MX / MX9-MX6-MX4 blocks or FP8 rows"


def reference(qh, kt, vh, prob: ProbCast, scale: float, ratio=None):
    """Attention of cast operands ``qh`` (B, H, Lq, D), ``kt`` (B, H, D, Lk), ``vh`` (B, H, Lk, D): (B, H, Lq, D).

    The explicit path of ``jdq.models.layers.attention`` after the q / k / v casts (no mask or
    bias); ``ratio``: a split's state.
    """
    logits = jnp.matmul(qh, kt.astype(qh.dtype)).astype(jnp.float32) * scale
    probs = jax.nn.softmax(logits, axis=-1).astype(qh.dtype)
    return jnp.matmul(prob.apply(probs, ratio), vh.astype(qh.dtype))


def key_order(lk: int, block_kv: int, pairs: bool):
    """The key permutation the kernel reads k and v in (``None``: natural order).

    With ``pairs``, each chunk of ``block_kv`` keys is stored as its even keys then its odd keys, so
    the kernel's two half-chunk logit tiles hold the two members of every pair at the same place.
    """
    if not pairs:
        return None
    idx = jnp.arange(lk).reshape(lk // block_kv, block_kv // 2, 2)
    return jnp.swapaxes(idx, 1, 2).reshape(lk)


__all__ = ["PROB_KINDS", "ProbCast", "key_order", "prob_cast_of", "reference"]
