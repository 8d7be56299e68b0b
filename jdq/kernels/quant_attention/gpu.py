"""Fake-quant attention for Hopper in Mosaic GPU: bf16 WGMMAs on cast q / k / v, the probabilities cast in registers.

Computes :func:`jdq.kernels.quant_attention.ref.reference` for operands in the kernel's layout:
``q`` (B·H, Lq, Dp), ``k`` and ``v`` (B·H, Lk, Dp), bf16, heads first, the head dim zero-padded to
``Dp`` (a multiple of 16, the bf16 WGMMA's K step); for a pair cast (:attr:`ProbCast.pairs`) the
keys of every ``block_kv`` chunk of k and v stored even keys first, then odd keys
(:func:`~jdq.kernels.quant_attention.ref.key_order`). Grid (B·H, Lq / block_q), one warpgroup per CTA:

* the CTA's (block_q, Dp) query tile is brought to shared memory once by TMA;
* **pass 1** (``emit_pipeline`` over the key chunks, k only): S = q·kᵀ (one WGMMA, float32
  accumulator), rounded to bf16 and scaled as the reference's logits; running row max and row sum
  of ``exp(logits − max)`` (float32, rescaled when the max grows);
* **pass 2** (k and v): S again; ``p = exp(logits − max) / sum`` rounded to bf16; the cast along the
  keys in registers — for an MX / SMX cast every scale block of a chunk is a group of columns of
  the S tile, its max |p| a masked row reduction; for a per-row FP8 cast the row's max probability
  is known from pass 1 (``bf16(1 / sum)``, its max logit's); the element arithmetic is
  :mod:`jdq.formats`' own (``mx`` / ``smx`` / ``fp8.fake_quantize_given_amax``), so a
  probability's cast is bit for bit the reference's; a pair cast computes S as two half-chunk tiles (even keys, odd
  keys), so each element's pair partner sits at the same place of the other tile; the cast
  probabilities go through a swizzled shared tile (one per half) into ``P·V`` WGMMAs (B operand:
  the (keys, Dp) v tile as stored) accumulating into float32;
* epilogue: the accumulator to bf16 (NaN rows where the row's logits had a NaN or an infinity, as
  the reference's softmax gives), staged in shared memory, TMA-stored to the (B·H, Lq, Dp) output.

Lq must be a multiple of ``block_q``, Lk of ``block_kv``, and ``block_kv`` a multiple of the cast's
block (of 32 for a pair cast, whose half-chunks feed a K = 16 WGMMA at least).

Interpret mode (``interpret=True``; see :mod:`jdq.kernels._mgpu`): k is passed as kᵀ (B·H, Dp, Lk),
the accumulation of P·V runs as a fresh accumulator plus an add (the interpreter has no
``pl.run_state``); everything else is the code that runs on the GPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from jdq.kernels._mgpu import (group_row_max, interpret_params, kmajor_spec, pl, plgpu, rows_of, smem_transforms,
                               wgmma_partial, zeros_carry)
from jdq.kernels.quant_attention.ref import ProbCast

D_MULTIPLE = 16  # bf16 WGMMA K step


@dataclasses.dataclass(frozen=True)
class Config:
    """Block sizes of the fake-quant attention kernel: ``block_q`` query rows per CTA, ``block_kv`` keys per step, ``stages``."""

    block_q: int = 64
    block_kv: int = 64
    stages: int = 2

    def supports(self, lq: int, lk: int, dp: int, prob: ProbCast) -> str | None:
        """``None`` when (Lq, Lk, Dp) and the cast tile by this config, else why not."""
        if self.block_q != 64:
            return f"block_q={self.block_q}: the kernel runs one 64-row warpgroup tile"
        if lq % self.block_q or lk % self.block_kv:
            return f"Lq={lq} / Lk={lk} are not multiples of block_q={self.block_q} / block_kv={self.block_kv}"
        if dp % D_MULTIPLE or dp > 256:
            return f"head dim {dp} is not a multiple of {D_MULTIPLE} up to 256"
        if self.block_kv % max(prob.block, 1) or self.block_kv > 128:
            return f"block_kv={self.block_kv} is not a multiple of the cast's block {prob.block} (at most 128)"
        if prob.pairs and self.block_kv % 32:
            return f"block_kv={self.block_kv}: a pair cast needs a multiple of 32"
        return None


def _row_vec(x, interpret):
    """A (rows,) float32 vector in the layout of a WGMMA tile's row reductions."""
    return x if interpret else plgpu.layout_cast(x, plgpu.Layout.WGMMA.reduce(1))


def _logits(q_s, k_ref, width, scale, interpret):
    """``float32(bf16(q · kᵀ)) · scale`` for a (width, Dp) key tile (interpret: (Dp, width))."""
    s = wgmma_partial(q_s, k_ref, (q_s.shape[0], width), jnp.float32, interpret)
    return s.astype(jnp.bfloat16).astype(jnp.float32) * jnp.float32(scale)


def _key_half(k_s, i, w, interpret):
    """Keys ``[i·w, (i+1)·w)`` of the chunk's key tile."""
    return k_s.at[:, pl.ds(i * w, w)] if interpret else k_s.at[pl.ds(i * w, w)]


def _block_amax(p, group_w: int, interpret):
    """Each element's scale-block max |p| as int32 bits; a block is ``group_w`` consecutive columns (p ≥ 0)."""
    return lax.bitcast_convert_type(group_row_max(p, group_w, interpret), jnp.int32)


def cast_probs(halves, prob: ProbCast, interpret=None, row_amax=None):
    """The probability tiles ``halves`` (float32, bf16-valued, ≥ 0) cast by ``prob`` along the columns.

    One tile: consecutive columns of ``prob.block`` share a scale, or (``"row"``) each row shares
    one from its max ``row_amax`` (rows,). Two tiles (a pair cast): the even and odd keys of a
    chunk, so a scale block is ``block / 2`` consecutive columns of each and an element's pair
    partner is the other tile's element at the same place.
    """
    from jdq.formats import fp8, mx, smx

    if prob.kind == "none":
        return halves
    if prob.kind == "row":
        (p,) = halves
        return (fp8.fake_quantize_given_amax(p, rows_of(row_amax, p.shape), prob.spec),)
    if prob.kind == "mx":
        (p,) = halves
        return (mx.fake_quantize_given_amax(p, _block_amax(p, prob.block, interpret), prob.spec),)
    even, odd = halves
    amax = _block_amax(jnp.maximum(even, odd), prob.block // 2, interpret)
    return (smx.fake_quantize_given_amax(even, odd, amax, prob.spec),
            smx.fake_quantize_given_amax(odd, even, amax, prob.spec))


def _pv_into(acc, p_refs, v_refs, interpret):
    """``acc + Σ p_ref · v_ref`` by WGMMAs (B: the (keys, Dp) v tile as stored)."""
    if interpret:  # the GPU interpreter has no run_state: a fresh accumulator, then the add
        def fresh(acc_ref):
            for p_r, v_r in zip(p_refs, v_refs):
                plgpu.wgmma(acc_ref, p_r, v_r)
            plgpu.wgmma_wait(0)
            return acc_ref[...]

        return acc + pl.run_scoped(fresh, plgpu.ACC(acc.shape, jnp.float32))

    def scope(acc_ref):
        for p_r, v_r in zip(p_refs, v_refs):
            plgpu.wgmma(acc_ref, p_r, v_r)
        plgpu.wgmma_wait(0)

    return pl.run_state(scope)(plgpu.ACC.init(acc))


def _kernel(q, k_op, v, scale, prob, cfg, interpret):
    bh, lq, dp = q.shape
    lk = v.shape[1]
    bq, bkv = cfg.block_q, cfg.block_kv
    halves = 2 if prob.pairs else 1
    w = bkv // halves
    bf16 = jnp.bfloat16
    d_tr = smem_transforms(dp, bf16, interpret)
    p_tr = d_tr  # P·V wants P's swizzle equal to v's (chosen by Dp); w is a multiple of 16, so it tiles
    steps = lk // bkv
    k_spec = functools.partial(kmajor_spec, bkv, dp, lambda j: (j, 0), d_tr, interpret)
    v_spec = plgpu.BlockSpec((bkv, dp), lambda j: (j, 0), transforms=d_tr)

    def body(q_g, k_g, v_g, o_g, q_s, p_s, o_s, bar):
        h = lax.axis_index("bh")
        qi = lax.axis_index("q")
        plgpu.copy_gmem_to_smem(q_g.at[h, pl.ds(qi * bq, bq)], q_s, bar.at[0])

        def stats(idx, k_s, carry):
            (j,) = idx
            pl.when(j == 0)(lambda: plgpu.barrier_wait(bar.at[0]))
            m, l = carry
            x = _logits(q_s, k_s, bkv, scale, interpret)
            m_new = jnp.maximum(m, x.max(axis=1))
            l = l * jnp.exp(m - m_new) + jnp.exp(x - rows_of(m_new, x.shape)).sum(axis=1)
            return m_new, l

        m0 = _row_vec(jnp.full((bq,), -jnp.inf, jnp.float32), interpret)
        l0 = _row_vec(jnp.zeros((bq,), jnp.float32), interpret)
        m, l = plgpu.emit_pipeline(stats, grid=(steps,), in_specs=[k_spec()], max_concurrent_steps=min(cfg.stages, steps),
                                   init_carry=(m0, l0))(k_g.at[h])

        # a row's largest probability is its max logit's, exp(0) / sum = 1 / sum, rounded to bf16 like every p
        row_amax = (1.0 / l).astype(bf16).astype(jnp.float32) if prob.kind == "row" else None

        def attend(idx, k_s, v_s, acc):
            ps = []
            for i in range(halves):
                x = _logits(q_s, _key_half(k_s, i, w, interpret) if halves > 1 else k_s, w, scale, interpret)
                p = jnp.exp(x - rows_of(m, x.shape)) / rows_of(l, x.shape)
                ps.append(p.astype(bf16).astype(jnp.float32))
            for i, p in enumerate(cast_probs(tuple(ps), prob, interpret, row_amax)):
                p_s.at[i][...] = p.astype(bf16)
            plgpu.commit_smem()
            return _pv_into(acc, [p_s.at[i] for i in range(halves)],
                            [v_s.at[pl.ds(i * w, w)] for i in range(halves)], interpret)

        acc = plgpu.emit_pipeline(attend, grid=(steps,), in_specs=[k_spec(), v_spec],
                                  max_concurrent_steps=min(cfg.stages, steps),
                                  init_carry=zeros_carry((bq, dp), interpret))(k_g.at[h], v_g.at[h])
        bad = rows_of(l, acc.shape)
        acc = jnp.where(bad != bad, jnp.nan, acc)  # NaN sum: a NaN or an infinite logit in the row
        o_s[...] = acc.astype(o_s.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_s, o_g.at[h, pl.ds(qi * bq, bq)])
        plgpu.wait_smem_to_gmem(0)

    return plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((bh, lq, dp), bf16),
        grid=(bh, lq // bq),
        grid_names=("bh", "q"),
        scratch_types=[
            plgpu.SMEM((bq, dp), bf16, transforms=d_tr),
            plgpu.SMEM((halves, bq, w), bf16, transforms=p_tr),
            plgpu.SMEM((bq, dp), bf16, transforms=d_tr),
            plgpu.Barrier(num_arrivals=1, num_barriers=1),
        ],
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
        interpret=interpret_params(interpret),
    )(q, k_op, v)


@functools.partial(jax.jit, static_argnames=("scale", "prob", "config", "interpret"))
def quant_attention_gpu(q, k, v, *, scale: float, prob: ProbCast, config: Config = Config(), interpret: bool = False):
    """The kernel on ``q`` (B·H, Lq, Dp), ``k`` / ``v`` (B·H, Lk, Dp) bf16 in the kernel's key order: (B·H, Lq, Dp) bf16."""
    for name, a in (("q", q), ("k", k), ("v", v)):
        if a.ndim != 3 or a.dtype != jnp.bfloat16:
            raise ValueError(f"quant_attention_gpu: {name} must be (B·H, L, Dp) bfloat16, got {a.shape} {a.dtype}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"quant_attention_gpu: q {q.shape}, k {k.shape}, v {v.shape} do not fit together")
    why = config.supports(q.shape[1], k.shape[1], q.shape[2], prob)
    if why:
        raise ValueError(f"quant_attention_gpu: {why}")
    k_op = jnp.swapaxes(k, 1, 2) if interpret else k  # interpret: kᵀ (the B operand as (K, N))
    return _kernel(q, k_op, v, scale, prob, config, interpret)


__all__ = ["Config", "D_MULTIPLE", "cast_probs", "quant_attention_gpu"]
