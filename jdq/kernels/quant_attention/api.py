"""``quant_attention``: fake-quant attention of cast operands, the probabilities' cast fused, on the implementation ``impl`` selects.

The fake-quant (unlowered) path of ``jdq.models.layers.attention`` calls it for a plan whose
probability cast :func:`~jdq.kernels.quant_attention.ref.prob_cast_of` accepts (no cast, an MX,
an MX9 / MX6 / MX4 or a per-row FP8 cast; every q / k / v transform is applied before, by the plan itself), on a
GPU, for bf16 operands without a mask or bias (``JDQ_QUANT_ATTENTION`` chooses: ``auto`` /
``xla`` / ``kernel``). Implementations ``{"gpu", "xla"}`` behind :func:`~jdq.kernels.op.dispatch`:
the Mosaic GPU kernel (:mod:`.gpu`) or the reference (:func:`~.ref.reference`, the explicit path).

Cost outside the kernel (XLA): the operands go to the kernel's layout — heads first, the head dim
zero-padded to a multiple of 16, k untransposed, for a pair cast the keys of each chunk even first
— in the fusions that cast them anyway; the output is sliced back to D and its heads moved after
the tokens (one more pass over the output).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jdq.kernels.op import dispatch, size_route
from jdq.kernels.quant_attention import ref


def _config(lk: int, prob: ref.ProbCast):
    from jdq.kernels import tuning
    from jdq.kernels.quant_attention.gpu import D_MULTIPLE, Config

    cfg = Config(**tuning.lookup("quant_attention_split" if prob.kind == "split" else "quant_attention", lk))
    if prob.pairs and cfg.block_kv % 32:
        cfg = dataclasses.replace(cfg, block_kv=32)
    if cfg.keep_logits:  # a row block's logits that do not fit shared memory are recomputed instead
        plain = dataclasses.replace(cfg, keep_logits=False)
        if cfg.supports(cfg.block_q, lk, D_MULTIPLE, prob) and not plain.supports(cfg.block_q, lk, D_MULTIPLE, prob):
            cfg = plain
    return cfg


def _padded(d: int) -> int:
    from jdq.kernels.quant_attention.gpu import D_MULTIPLE

    return -(-d // D_MULTIPLE) * D_MULTIPLE


def _layout(x, lk_axis_last: bool, dp: int, pair_chunk: int | None):
    """(B, H, L, D) — or (B, H, D, L) with ``lk_axis_last`` — to the kernel's (B·H, L, Dp).

    With ``pair_chunk``, the keys of each chunk of that many go even first
    (:func:`~jdq.kernels.quant_attention.ref.key_order`), as a reshape and transpose rather than a
    gather, so XLA fuses it with the operand's cast.
    """
    if lk_axis_last:
        x = jnp.swapaxes(x, -1, -2)
    b, h, n, d = x.shape
    x = x.reshape(b * h, n, d)
    if pair_chunk is not None:
        x = jnp.swapaxes(x.reshape(b * h, n // pair_chunk, pair_chunk // 2, 2, d), 2, 3).reshape(b * h, n, d)
    return jnp.pad(x, ((0, 0), (0, 0), (0, dp - d))) if dp != d else x


def _gpu(qh, kt, vh, ratio, prob, scale, *, impl, config=None):
    if impl not in ("gpu", "gpu_interpret"):
        return None
    from jdq.kernels.quant_attention.gpu import quant_attention_gpu

    if qh.dtype != jnp.bfloat16 or kt.dtype != jnp.bfloat16 or vh.dtype != jnp.bfloat16:
        return None
    b, h, lq, d = qh.shape
    lk = vh.shape[2]
    cfg = config
    dp = _padded(d)
    pad = (-lq) % cfg.block_q  # extra query rows are computed and dropped (rows are independent)
    if cfg.supports(lq + pad, lk, dp, prob):
        return None
    chunk = cfg.block_kv if prob.pairs else None
    q = _layout(qh, False, dp, None)
    if pad:
        q = jnp.pad(q, ((0, 0), (0, pad), (0, 0)))
    out = quant_attention_gpu(q, _layout(kt, True, dp, chunk), _layout(vh, False, dp, chunk), scale=scale, prob=prob,
                              config=cfg, interpret=impl == "gpu_interpret", ratio=ratio)
    return out[:, :lq, :d].reshape(b, h, lq, d)


def _xla(qh, kt, vh, ratio, prob, scale, *, impl, config=None):
    return ref.reference(qh, kt, vh, prob, scale, ratio)


#: The implementations of fake-quant attention (no TPU kernel: the XLA reference there).
IMPLEMENTATIONS = {"gpu": _gpu, "xla": _xla}


def _ctas(shape, config) -> int:
    """The kernel's CTAs for ``qh`` of ``shape`` (B, H, Lq, D): one per head and ``block_q`` query rows."""
    b, h, lq, _ = shape
    return b * h * -(-lq // config.block_q)


@functools.lru_cache(maxsize=None)
def _routed(prob, scale, impl, config):
    """The op for static arguments, routed by :func:`~jdq.kernels.op.size_route` on the CTAs it really runs.

    At DiT-XL/2 batch 1 with CFG (128 CTAs) MixDiT's step took 10.71 ms with the kernel against 9.18
    with the explicit XLA attention (H200); at batch 32 (4096 CTAs) the kernel was 7 ms per step faster
    than this op's XLA reference. Under ``vmap`` the batch counts in (the innermost vmapped axis).
    """

    def run(route, qh, kt, vh, ratio):
        return dispatch(IMPLEMENTATIONS, route, qh, kt, vh, ratio, prob, scale, config=config)

    @jax.custom_batching.custom_vmap
    def op(qh, kt, vh, ratio):
        return run(size_route(impl, _ctas(qh.shape, config)), qh, kt, vh, ratio)

    @op.def_vmap
    def rule(axis_size, in_batched, qh, kt, vh, ratio):
        per_call = _ctas(qh.shape[1:] if in_batched[0] else qh.shape, config)
        route = size_route(impl, axis_size * per_call)
        axes = [0 if b else None for b in in_batched]
        return jax.vmap(functools.partial(run, route), in_axes=axes)(qh, kt, vh, ratio), True

    return op


@functools.partial(jax.custom_jvp, nondiff_argnums=(4, 5, 6, 7))
def _quant_attention(qh, kt, vh, ratio, prob, scale, impl, config):
    return _routed(prob, scale, impl, config)(qh, kt, vh, ratio)


@_quant_attention.defjvp
def _quant_attention_jvp(prob, scale, impl, config, primals, tangents):
    # the reference's tangent (the probabilities' cast straight-through, as formats.cast); none for the ratio
    qh, kt, vh, ratio = primals
    _, dy = jax.jvp(lambda q, k, v: ref.reference(q, k, v, prob, scale, ratio), (qh, kt, vh), tangents[:3])
    return _quant_attention(*primals, prob, scale, impl, config), dy


def quant_attention(qh, kt, vh, ratio=None, *, prob: ref.ProbCast, scale: float, impl: str = "auto", config=None):
    """Attention of cast ``qh`` (B, H, Lq, D), ``kt`` (B, H, D, Lk), ``vh`` (B, H, Lk, D), ``prob`` cast inside: (B, H, Lq, D).

    :func:`~jdq.kernels.quant_attention.ref.reference` on the kernel where it tiles (bf16, Lk a
    multiple of ``block_kv``; Lq is padded) and, for ``impl="auto"``, where its CTAs fill the SMs
    (a vmapped batch counted in); the reference elsewhere; differentiable as the reference.
    ``ratio``: the state of a ``"split"`` probability cast (float32), else unused. ``config``: the
    kernel's blocks (default: the tuning table's row, read here, so a ``JDQ_TUNING`` override is
    part of the compiled function's key).
    """
    if (prob.kind == "split") != (ratio is not None):
        raise ValueError("quant_attention: a ratio is given exactly for a 'split' probability cast")
    if qh.ndim != 4 or kt.ndim != 4 or vh.ndim != 4:
        raise ValueError(f"quant_attention: qh {qh.shape}, kt {kt.shape}, vh {vh.shape} must be 4-d (B, H, ., .)")
    if kt.shape[2] != qh.shape[3] or vh.shape[2] != kt.shape[3] or qh.shape[:2] != kt.shape[:2] != vh.shape[:2]:
        raise ValueError(f"quant_attention: qh {qh.shape}, kt {kt.shape}, vh {vh.shape} do not fit together")
    return _jitted(qh, kt, vh, ratio, prob=prob, scale=float(scale), impl=impl, config=config or _config(vh.shape[2], prob))


@functools.partial(jax.jit, static_argnames=("prob", "scale", "impl", "config"))
def _jitted(qh, kt, vh, ratio, *, prob, scale, impl, config):
    ratio = jnp.float32(0) if ratio is None else jnp.asarray(ratio, jnp.float32)
    return _quant_attention(qh, kt, vh, ratio, prob, scale, impl, config)


__all__ = ["IMPLEMENTATIONS", "quant_attention"]
