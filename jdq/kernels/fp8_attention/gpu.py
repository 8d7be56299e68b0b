"""FP8 E4M3 flash attention for Hopper in Mosaic GPU: q·kᵀ and p·v as E4M3 WGMMAs, scales outside the MMAs.

Computes :func:`jdq.kernels.fp8_attention.ref.attention_from_codes` (same operations in the same
order). Grid (B·H, Lq/block_q), one warpgroup per CTA:

* the CTA's (block_q, Dp) E4M3 query tile is brought to shared memory once by TMA;
* ``emit_pipeline`` over the key blocks (``stages`` buffers) brings the (block_kv, Dp) key tile
  and the (Dp, block_kv) tile of **vᵀ** — both K-major, as the 8-bit WGMMA requires of its B
  operand (q·kᵀ contracts over Dp, p·v over keys);
* per key block: S = q·kᵀ (E4M3 WGMMA, float32 accumulator), times the per-row (q scale × softmax
  scale × log2 e) and per-column (k scale) vectors; the online softmax in float32 registers
  (running max / sum per row, base 2); ``P · 448`` cast to E4M3 and stored to a swizzled shared
  tile (the 8-bit register-A WGMMA wants the 8-bit fragment layout, not the accumulator's, and
  Mosaic GPU has no register relayout between them); P·vᵀᵀ by an E4M3 WGMMA into a fresh
  float32 accumulator, added to the rescaled running one;
* epilogue: ``acc · (1/448) · v scale[col] / l[row]``, cast, stored through shared memory by TMA.

``Dp`` (the padded head dim) must be a multiple of 32; Lq a multiple of ``block_q`` (64 or 128)
and Lk of ``block_kv`` (64 or 128). :func:`jdq.kernels.fp8_attention.fp8_attention` pads and
falls back to the XLA reference where these do not hold.

Interpret mode (``interpret=True``; see :mod:`jdq.kernels._mgpu`): the B operands are passed
(K, N) — k as kᵀ (BH, Dp, Lk), vᵀ as v (BH, Lk, Dp) — and the scale vectors are read by plain ref
indexing; everything else is the code that runs on the GPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jdq.kernels._mgpu import (interpret_params, kmajor_spec, load_vec, pl, plgpu, smem_transforms, wgmma_partial,
                               zeros_carry)
from jdq.kernels.fp8_attention.ref import D_MULTIPLE, LOG2E, P_SCALE, _check_codes


@dataclasses.dataclass(frozen=True)
class Config:
    """Block sizes of the FP8 attention kernel: query rows per CTA, keys per step, pipeline buffers."""

    block_q: int = 64
    block_kv: int = 64
    stages: int = 2

    def supports(self, lq: int, lk: int, dp: int) -> bool:
        """Whether (Lq, Lk, Dp) tile by this config (and the config is one the kernel takes)."""
        return (self.block_q in (64, 128) and self.block_kv in (64, 128) and self.stages >= 1
                and lq % self.block_q == 0 and lk % self.block_kv == 0 and dp % D_MULTIPLE == 0 and dp <= 256)


def _row_vec(ref, start, size, interpret):
    """``ref[start:start+size]`` as a per-row vector of a WGMMA tile (the accumulator's row layout)."""
    return load_vec(ref, start, size, 0, interpret)


# jitted: identical calls in a model lower once (see jdq.kernels.w8a8.gpu).
@functools.partial(jax.jit, static_argnames=("scale", "out_dtype", "config", "interpret"))
def fp8_attention_gpu(qc, qs, kc, ks, vtc, vs, scale: float, out_dtype=jnp.bfloat16, config: Config = Config(),
                      interpret=False):
    """FP8 flash attention of the operands of :func:`~jdq.kernels.fp8_attention.ref.quantize_operands`: (BH, Lq, Dp)."""
    bh, lq, lk, dp = _check_codes(qc, qs, kc, ks, vtc, vs)
    cfg = config
    if not cfg.supports(lq, lk, dp):
        raise ValueError(f"fp8 attention kernel: Lq={lq}, Lk={lk}, Dp={dp} do not fit {cfg} "
                         f"(Lq % block_q, Lk % block_kv, Dp % {D_MULTIPLE}, block sizes 64 or 128)")
    bq, bkv = cfg.block_q, cfg.block_kv
    out_dtype = jnp.dtype(out_dtype)
    f8 = jnp.float8_e4m3fn
    d_tr = smem_transforms(dp, f8, interpret)  # q, k tiles: minor dim Dp
    kv_tr = smem_transforms(bkv, f8, interpret)  # vᵀ and P tiles: minor dim block_kv
    o_tr = smem_transforms(dp, out_dtype, interpret)
    row_mult = np.float32(scale * LOG2E)
    inv_p = np.float32(1.0 / P_SCALE)
    steps = lk // bkv
    s_shape, o_shape = (bq, bkv), (bq, dp)

    def body(q_g, k_g, v_g, qs_g, ks_g, vs_g, o_g, q_s, p_s, o_s, bar):
        h = lax.axis_index("bh")
        qi = lax.axis_index("q")
        plgpu.copy_gmem_to_smem(q_g.at[h, pl.ds(qi * bq, bq)], q_s, bar.at[0])
        rs = _row_vec(qs_g, h * lq + qi * bq, bq, interpret) * row_mult

        def step(idx, k_s, v_s, carry):
            (j,) = idx
            acc, m, l = carry
            s = wgmma_partial(q_s, k_s, s_shape, jnp.float32, interpret)
            kv = load_vec(ks_g, h * lk + j * bkv, bkv, 1, interpret)
            s = s * lax.broadcast_in_dim(rs, s_shape, [0]) * lax.broadcast_in_dim(kv, s_shape, [1])
            m_new = jnp.maximum(m, s.max(axis=1))
            alpha = jnp.exp2(m - m_new)
            p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s_shape, [0]))
            l = l * alpha + p.sum(axis=1)
            p_s[...] = (p * np.float32(P_SCALE)).astype(f8)
            plgpu.commit_smem()
            pv = wgmma_partial(p_s, v_s, o_shape, jnp.float32, interpret)
            acc = acc * lax.broadcast_in_dim(alpha, o_shape, [0]) + pv
            return acc, m_new, l

        m0 = jnp.full((bq,), -jnp.inf, jnp.float32)
        l0 = jnp.zeros((bq,), jnp.float32)
        if not interpret:
            m0 = plgpu.layout_cast(m0, plgpu.Layout.WGMMA.reduce(1))
            l0 = plgpu.layout_cast(l0, plgpu.Layout.WGMMA.reduce(1))
        plgpu.barrier_wait(bar.at[0])
        acc, _, l = plgpu.emit_pipeline(
            step,
            grid=(steps,),
            in_specs=[kmajor_spec(bkv, dp, lambda j: (j, 0), d_tr, interpret),
                      kmajor_spec(dp, bkv, lambda j: (0, j), kv_tr, interpret)],
            max_concurrent_steps=min(cfg.stages, steps),
            init_carry=(zeros_carry(o_shape, interpret), m0, l0),
        )(k_g.at[h], v_g.at[h])
        vv = load_vec(vs_g, h * dp, dp, 1, interpret)
        y = acc * inv_p * lax.broadcast_in_dim(vv, o_shape, [1]) / lax.broadcast_in_dim(l, o_shape, [0])
        o_s[...] = y.astype(out_dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_s, o_g.at[h, pl.ds(qi * bq, bq)])
        plgpu.wait_smem_to_gmem(0)

    if interpret:  # the interpreter reads B operands untransposed: give them (K, N)
        k_op, v_op = jnp.swapaxes(kc, 1, 2), jnp.swapaxes(vtc, 1, 2)
    else:
        k_op, v_op = kc, vtc
    return plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((bh, lq, dp), out_dtype),
        grid=(bh, lq // bq),
        grid_names=("bh", "q"),
        scratch_types=[
            plgpu.SMEM((bq, dp), f8, transforms=d_tr),
            plgpu.SMEM((bq, bkv), f8, transforms=kv_tr),
            plgpu.SMEM((bq, dp), out_dtype, transforms=o_tr),
            plgpu.Barrier(num_arrivals=1, num_barriers=1),
        ],
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane, approx_math=True),
        interpret=interpret_params(interpret),
    )(qc, k_op, v_op, qs.reshape(-1), ks.reshape(-1), vs.reshape(-1))


__all__ = ["Config", "fp8_attention_gpu"]
