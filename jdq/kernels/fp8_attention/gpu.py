"""FP8 E4M3 flash attention for Hopper in Mosaic GPU: q·kᵀ and p·v as E4M3 WGMMAs, scales outside the MMAs.

Computes :func:`jdq.kernels.fp8_attention.ref.attention_from_codes` (same operations in the same
order). ``Config(kind="pipe")``: grid (B·H, Lq/block_q), one warpgroup per CTA:

* the CTA's (block_q, Dp) E4M3 query tile is brought to shared memory once by TMA;
* ``emit_pipeline`` over the key blocks (``stages`` buffers) brings the (block_kv, Dp) key tile
  and the (Dp, block_kv) tile of **vᵀ** — both K-major, as the 8-bit WGMMA requires of its B
  operand (q·kᵀ contracts over Dp, p·v over keys);
* per key block: S = q·kᵀ (E4M3 WGMMA, float32 accumulator), times the per-row (q scale × softmax
  scale × log2 e) and per-column (k scale, loaded one block ahead) vectors; the online softmax in
  float32 registers (running max / sum per row, base 2); ``P · 448`` cast to E4M3 and stored to a
  swizzled shared tile (the 8-bit register-A WGMMA wants the 8-bit fragment layout, not the
  accumulator's, and Mosaic GPU has no register relayout between them); P·V by an E4M3 WGMMA
  (B operand: the vᵀ tile) into a fresh float32 accumulator, added to the rescaled running one
  (``Config.acc_in_place``: into the rescaled running accumulator itself, one accumulator fewer
  in registers);
* epilogue: ``acc · (1/448) · v scale[col] / l[row]``, cast, stored through shared memory by TMA
  — the (B·H, Lq, Dp) tile, or with ``Config.direct_out`` only the D real columns, straight into
  a (B, Lq, H·D) output (no unpacking pass after the kernel).

``Config(kind="sw")``: as ``pipe``, software-pipelined by hand (the warpgroup issues its own TMA
loads): at step j the WGMMA of block j+1's logits is issued before block j's softmax, so the tensor
cores work while the softmax runs (``stages`` ≥ 2).

``Config(kind="ws")``: grid (B·H, Lq/(2·block_q)), three warpgroups per CTA — two compute
warpgroups (``block_q`` query rows each, the per-block arithmetic above in a ``fori_loop``) share
the key / vᵀ buffers that the third streams by TMA, refilling a slot once both have arrived on its
"consumed" barrier.

``Dp`` (the padded head dim) must be a multiple of 32; Lq a multiple of the CTA's rows and Lk of
``block_kv`` (64 or 128). :func:`jdq.kernels.fp8_attention.fp8_attention` pads Lq and falls back
to the XLA reference where Lk does not tile.

Interpret mode (``interpret=True``; see :mod:`jdq.kernels._mgpu`): the B operands are passed
(K, N) — k as kᵀ (BH, Dp, Lk), vᵀ as v (BH, Lk, Dp) — and the scale vectors are read by plain ref
indexing; ``acc_in_place`` runs as the fresh accumulator plus an add (the interpreter has no
``pl.run_state``: the same sum, one rounding apart); everything else is the code that runs on the GPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jdq.kernels._mgpu import (interpret_params, kmajor_spec, load_vec, pl, plgpu, rhs_kmajor, smem_transforms,
                               wgmma_partial, zeros_carry)
from jdq.kernels.fp8_attention.ref import D_MULTIPLE, LOG2E, P_SCALE, _check_codes


@dataclasses.dataclass(frozen=True)
class Config:
    """Schedule and block sizes of the FP8 attention kernel (see the module docstring).

    ``kind``: ``"pipe"`` (one warpgroup per CTA, ``block_q`` rows), ``"sw"`` (the same, software-pipelined:
    the next block's q·kᵀ overlaps this block's softmax) or ``"ws"`` (two compute warpgroups of
    ``block_q`` rows each and a TMA warpgroup per CTA). ``block_kv``: keys per step; ``stages``:
    key / value buffers in flight; ``acc_in_place``: P·V accumulates into the rescaled running
    accumulator (no fresh one + add); ``direct_out``: the epilogue stores only the D real columns of
    each head straight into a (B, Lq, H·D) output (no unpacking pass after the kernel).
    """

    block_q: int = 64
    block_kv: int = 64
    stages: int = 2
    acc_in_place: bool = False
    kind: str = "pipe"
    direct_out: bool = False

    @property
    def cta_rows(self) -> int:
        """Query rows per CTA."""
        return self.block_q * (2 if self.kind == "ws" else 1)

    def supports(self, lq: int, lk: int, dp: int) -> bool:
        """Whether (Lq, Lk, Dp) tile by this config (and the config is one the kernel takes)."""
        return (self.kind in ("pipe", "ws", "sw") and self.block_q in (64, 128) and self.block_kv in (64, 128)
                and self.stages >= (2 if self.kind == "sw" else 1) and lq % self.cta_rows == 0 and lk % self.block_kv == 0
                and dp % D_MULTIPLE == 0 and dp <= 256)


def _wgmma_into(acc, a_s, b_s, interpret):
    """``acc + a_s · b_sᵀ`` (B K-major) by one WGMMA accumulating into ``acc`` itself (``plgpu.ACC.init``)."""

    def scope(acc_ref):
        plgpu.wgmma(acc_ref, a_s, rhs_kmajor(b_s, interpret))
        plgpu.wgmma_wait(0)

    return pl.run_state(scope)(plgpu.ACC.init(acc))


def _init_carry(bq, dp, interpret, kv0):
    """(acc, running max, running sum, the first block's key scales) before the first key block, in the WGMMA layouts."""
    m0 = jnp.full((bq,), -jnp.inf, jnp.float32)
    l0 = jnp.zeros((bq,), jnp.float32)
    if not interpret:
        m0 = plgpu.layout_cast(m0, plgpu.Layout.WGMMA.reduce(1))
        l0 = plgpu.layout_cast(l0, plgpu.Layout.WGMMA.reduce(1))
    return zeros_carry((bq, dp), interpret), m0, l0, kv0


def _attend_block(carry, q_s, k_s, v_s, p_s, rs, ks_g, k_next, cfg, interpret, v_ready=None):
    """One key block of the online softmax (:func:`~jdq.kernels.fp8_attention.ref.attention_from_codes`'s step).

    ``rs``: the per-row scale vector (q scale · softmax scale · log2 e); the carry's last entry the
    block's key scales, loaded one step ahead: ``ks_g[k_next : k_next + block_kv]`` (the next block's)
    is issued here, before this block's MMAs, so its global-memory latency hides behind a whole step.
    ``v_ready``: called before the P·V WGMMA reads ``v_s`` (a barrier wait).
    """
    acc, m, l, kv = carry
    kv_next = load_vec(ks_g, k_next, p_s.shape[1], 1, interpret)
    s = wgmma_partial(q_s, k_s, p_s.shape, jnp.float32, interpret)
    return (*_softmax_pv(s, acc, m, l, kv, rs, p_s, v_s, cfg, interpret, v_ready), kv_next)


def _softmax_pv(s, acc, m, l, kv, rs, p_s, v_s, cfg, interpret, v_ready=None):
    """The block's logits ``s`` (q·kᵀ codes) -> scaled, online softmax, P to ``p_s``, ``acc`` rescaled plus P·V: (acc, m, l)."""
    s_shape, o_shape = s.shape, acc.shape
    s = s * lax.broadcast_in_dim(rs, s_shape, [0]) * lax.broadcast_in_dim(kv, s_shape, [1])
    m_new = jnp.maximum(m, s.max(axis=1))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s_shape, [0]))
    l = l * alpha + p.sum(axis=1)
    p_s[...] = (p * np.float32(P_SCALE)).astype(jnp.float8_e4m3fn)
    plgpu.commit_smem()
    acc = acc * lax.broadcast_in_dim(alpha, o_shape, [0])
    if v_ready is not None:
        v_ready()
    if cfg.acc_in_place and not interpret:  # the GPU interpreter has no run_state: the fresh-acc form
        acc = _wgmma_into(acc, p_s, v_s, interpret)
    else:
        acc = acc + wgmma_partial(p_s, v_s, o_shape, jnp.float32, interpret)
    return acc, m_new, l


def _epilogue(acc, l, vs_g, v0, o_s, o_dst, interpret):
    """``acc · (1/448) · v scale[col] / l[row]``, cast, staged in ``o_s`` and TMA-stored to ``o_dst``; waits.

    ``o_s`` narrower than ``acc`` (``direct_out``): only its first ``o_s.shape[1]`` columns are stored.
    """
    bq, dp = acc.shape
    vv = load_vec(vs_g, v0, dp, 1, interpret)
    y = acc * np.float32(1.0 / P_SCALE) * lax.broadcast_in_dim(vv, (bq, dp), [1]) / lax.broadcast_in_dim(l, (bq, dp), [0])
    d = o_s.shape[1]
    if d != dp:
        y = y[:, :d]
    o_s[...] = y.astype(o_s.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_s, o_dst)
    plgpu.wait_smem_to_gmem(0)


def _output(bh, lq, dp, out_dtype, cfg, heads, d, interpret):
    """``(out type, staging tile width, its transforms, dst(o_g, h, row0, rows))`` of the output layout.

    (B·H, Lq, Dp), or with ``cfg.direct_out`` (B, Lq, H·D): head ``h % H`` of sample ``h // H`` at
    columns ``[(h % H)·D, (h % H + 1)·D)``, staged unswizzled (D = 72 bf16 rows are 144 bytes).
    """
    if not cfg.direct_out:
        return (jax.ShapeDtypeStruct((bh, lq, dp), out_dtype), dp, smem_transforms(dp, out_dtype, interpret),
                lambda o_g, h, row0, rows: o_g.at[h, pl.ds(row0, rows)])

    def dst(o_g, h, row0, rows):
        return o_g.at[lax.div(h, jnp.int32(heads)), pl.ds(row0, rows), pl.ds(lax.rem(h, jnp.int32(heads)) * d, d)]

    return jax.ShapeDtypeStruct((bh // heads, lq, heads * d), out_dtype), d, (), dst


def _pipe_kernel(qc, qs, k_op, v_op, ks, vs, scale, out_dtype, cfg, interpret, heads, d):
    """``kind="pipe"``: one warpgroup per CTA, ``emit_pipeline`` over the key blocks."""
    bh, lq, dp = qc.shape
    lk = ks.shape[1]
    bq, bkv = cfg.block_q, cfg.block_kv
    f8 = jnp.float8_e4m3fn
    d_tr = smem_transforms(dp, f8, interpret)  # q, k tiles: minor dim Dp
    kv_tr = smem_transforms(bkv, f8, interpret)  # vᵀ and P tiles: minor dim block_kv
    out_type, o_w, o_tr, o_dst = _output(bh, lq, dp, out_dtype, cfg, heads, d, interpret)
    row_mult = np.float32(scale * LOG2E)

    def body(q_g, k_g, v_g, qs_g, ks_g, vs_g, o_g, q_s, p_s, o_s, bar):
        h = lax.axis_index("bh")
        qi = lax.axis_index("q")
        plgpu.copy_gmem_to_smem(q_g.at[h, pl.ds(qi * bq, bq)], q_s, bar.at[0])
        rs = load_vec(qs_g, h * lq + qi * bq, bq, 0, interpret) * row_mult

        steps = lk // bkv

        def step(idx, k_s, v_s, carry):
            (j,) = idx
            # the q tile is waited for in the first step: its TMA overlaps the pipeline's first k / vᵀ loads
            pl.when(j == 0)(lambda: plgpu.barrier_wait(bar.at[0]))
            k_next = h * lk + jnp.minimum(j + 1, steps - 1) * bkv
            return _attend_block(carry, q_s, k_s, v_s, p_s, rs, ks_g, k_next, cfg, interpret)

        kv0 = load_vec(ks_g, h * lk, bkv, 1, interpret)
        acc, _, l, _ = plgpu.emit_pipeline(
            step,
            grid=(lk // bkv,),
            in_specs=[kmajor_spec(bkv, dp, lambda j: (j, 0), d_tr, interpret),
                      kmajor_spec(dp, bkv, lambda j: (0, j), kv_tr, interpret)],
            max_concurrent_steps=min(cfg.stages, lk // bkv),
            init_carry=_init_carry(bq, dp, interpret, kv0),
        )(k_g.at[h], v_g.at[h])
        _epilogue(acc, l, vs_g, h * dp, o_s, o_dst(o_g, h, qi * bq, bq), interpret)

    return plgpu.kernel(
        body,
        out_type=out_type,
        grid=(bh, lq // bq),
        grid_names=("bh", "q"),
        scratch_types=[
            plgpu.SMEM((bq, dp), f8, transforms=d_tr),
            plgpu.SMEM((bq, bkv), f8, transforms=kv_tr),
            plgpu.SMEM((bq, o_w), out_dtype, transforms=o_tr),
            plgpu.Barrier(num_arrivals=1, num_barriers=1),
        ],
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane, approx_math=True),
        interpret=interpret_params(interpret),
    )(qc, k_op, v_op, qs.reshape(-1), ks.reshape(-1), vs.reshape(-1))


def _ws_kernel(qc, qs, k_op, v_op, ks, vs, scale, out_dtype, cfg, interpret, heads, d):
    """``kind="ws"``: two compute warpgroups (``block_q`` rows each) share the key / value tiles a TMA warpgroup streams.

    Per CTA 2·block_q query rows; warpgroup 2 issues the TMA loads of the ``stages`` key and vᵀ
    buffers and refills a slot once both compute warpgroups have arrived on its "consumed"
    barrier (k after q·kᵀ, v after P·V). Same per-block arithmetic as ``pipe``.
    """
    bh, lq, dp = qc.shape
    lk = ks.shape[1]
    bq, bkv = cfg.block_q, cfg.block_kv
    steps = lk // bkv
    stages = min(cfg.stages, steps)
    f8 = jnp.float8_e4m3fn
    d_tr = smem_transforms(dp, f8, interpret)
    kv_tr = smem_transforms(bkv, f8, interpret)
    out_type, o_w, o_tr, o_dst = _output(bh, lq, dp, out_dtype, cfg, heads, d, interpret)
    row_mult = np.float32(scale * LOG2E)
    k_block = (dp, bkv) if interpret else (bkv, dp)  # interpret: B operands (K, N)
    v_block = (bkv, dp) if interpret else (dp, bkv)

    def k_src(k_g, h, j):
        return k_g.at[h, :, pl.ds(j * bkv, bkv)] if interpret else k_g.at[h, pl.ds(j * bkv, bkv)]

    def v_src(v_g, h, j):
        return v_g.at[h, pl.ds(j * bkv, bkv)] if interpret else v_g.at[h, :, pl.ds(j * bkv, bkv)]

    def kernel(q_g, k_g, v_g, qs_g, ks_g, vs_g, o_g):
        def scoped(q_s2, p_s2, o_s2, k_s, v_s, q_bar, k_bar, v_bar, k_free, v_free):
            h = lax.axis_index("bh")
            qi = lax.axis_index("q")
            wg = lax.axis_index("wg")

            @pl.when(wg < 2)
            def _compute():
                if not interpret:
                    plgpu.set_max_registers(232, action="increase")
                q_s, p_s, o_s = q_s2.at[wg], p_s2.at[wg], o_s2.at[wg]
                row0 = qi * (2 * bq) + wg * bq
                plgpu.copy_gmem_to_smem(q_g.at[h, pl.ds(row0, bq)], q_s, q_bar.at[wg])
                rs = load_vec(qs_g, h * lq + row0, bq, 0, interpret) * row_mult
                plgpu.barrier_wait(q_bar.at[wg])

                def step(j, carry):
                    slot = lax.rem(j, jnp.int32(stages))
                    plgpu.barrier_wait(k_bar.at[slot])
                    k_next = h * lk + jnp.minimum(j + 1, steps - 1) * bkv
                    out = _attend_block(carry, q_s, k_s.at[slot], v_s.at[slot], p_s, rs, ks_g, k_next, cfg,
                                        interpret, v_ready=lambda: (plgpu.barrier_arrive(k_free.at[slot]),
                                                                    plgpu.barrier_wait(v_bar.at[slot])))
                    plgpu.barrier_arrive(v_free.at[slot])
                    return out

                kv0 = load_vec(ks_g, h * lk, bkv, 1, interpret)
                acc, _, l, _ = lax.fori_loop(0, steps, step, _init_carry(bq, dp, interpret, kv0))
                _epilogue(acc, l, vs_g, h * dp, o_s, o_dst(o_g, h, row0, bq), interpret)

            @pl.when(wg == 2)
            def _memory():
                if not interpret:
                    plgpu.set_max_registers(40, action="decrease")
                for i in range(stages):
                    plgpu.copy_gmem_to_smem(k_src(k_g, h, i), k_s.at[i], k_bar.at[i])
                    plgpu.copy_gmem_to_smem(v_src(v_g, h, i), v_s.at[i], v_bar.at[i])

                @pl.loop(0, steps - stages)
                def _refill(j):
                    slot = lax.rem(j, jnp.int32(stages))
                    plgpu.barrier_wait(k_free.at[slot])
                    plgpu.copy_gmem_to_smem(k_src(k_g, h, j + stages), k_s.at[slot], k_bar.at[slot])
                    plgpu.barrier_wait(v_free.at[slot])
                    plgpu.copy_gmem_to_smem(v_src(v_g, h, j + stages), v_s.at[slot], v_bar.at[slot])

                # observe the consumption of the last `stages` blocks too (every phase of a barrier is waited on)
                @pl.loop(steps - stages, steps)
                def _drain(j):
                    slot = lax.rem(j, jnp.int32(stages))
                    plgpu.barrier_wait(k_free.at[slot])
                    plgpu.barrier_wait(v_free.at[slot])

        pl.run_scoped(
            scoped,
            plgpu.SMEM((2, bq, dp), f8, transforms=d_tr),
            plgpu.SMEM((2, bq, bkv), f8, transforms=kv_tr),
            plgpu.SMEM((2, bq, o_w), out_dtype, transforms=o_tr),
            plgpu.SMEM((stages, *k_block), f8, transforms=() if interpret else d_tr),
            plgpu.SMEM((stages, *v_block), f8, transforms=() if interpret else kv_tr),
            plgpu.Barrier(num_barriers=2),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_arrivals=2, num_barriers=stages),
            plgpu.Barrier(num_arrivals=2, num_barriers=stages),
            collective_axes="wg",
        )

    return plgpu.kernel(
        kernel,
        out_type=out_type,
        grid=(bh, lq // (2 * bq)),
        grid_names=("bh", "q"),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane, approx_math=True),
        interpret=interpret_params(interpret),
    )(qc, k_op, v_op, qs.reshape(-1), ks.reshape(-1), vs.reshape(-1))


def _sw_kernel(qc, qs, k_op, v_op, ks, vs, scale, out_dtype, cfg, interpret, heads, d):
    """``kind="sw"``: one warpgroup per CTA, software-pipelined: q·kᵀ of block j+1 runs while block j's softmax does.

    The warpgroup issues its own TMA loads (``stages`` ≥ 2 key / vᵀ buffers, refilled once a block's
    P·V is done) and, at step j, first issues the WGMMA of S_{j+1} = q·k_{j+1}ᵀ (asynchronous, into
    its own accumulator), then computes block j's softmax and P·V; S_{j+1} is read after both.
    Same per-block arithmetic as ``pipe``.
    """
    bh, lq, dp = qc.shape
    lk = ks.shape[1]
    bq, bkv = cfg.block_q, cfg.block_kv
    steps = lk // bkv
    stages = min(cfg.stages, steps)
    f8 = jnp.float8_e4m3fn
    d_tr = smem_transforms(dp, f8, interpret)
    kv_tr = smem_transforms(bkv, f8, interpret)
    out_type, o_w, o_tr, o_dst = _output(bh, lq, dp, out_dtype, cfg, heads, d, interpret)
    row_mult = np.float32(scale * LOG2E)
    k_block = (dp, bkv) if interpret else (bkv, dp)  # interpret: B operands (K, N)
    v_block = (bkv, dp) if interpret else (dp, bkv)
    s_shape = (bq, bkv)

    def k_src(k_g, h, j):
        return k_g.at[h, :, pl.ds(j * bkv, bkv)] if interpret else k_g.at[h, pl.ds(j * bkv, bkv)]

    def v_src(v_g, h, j):
        return v_g.at[h, pl.ds(j * bkv, bkv)] if interpret else v_g.at[h, :, pl.ds(j * bkv, bkv)]

    def body(q_g, k_g, v_g, qs_g, ks_g, vs_g, o_g, q_s, k_s, v_s, p_s, o_s, q_bar, k_bar, v_bar):
        h = lax.axis_index("bh")
        qi = lax.axis_index("q")
        plgpu.copy_gmem_to_smem(q_g.at[h, pl.ds(qi * bq, bq)], q_s, q_bar.at[0])
        for i in range(stages):
            plgpu.copy_gmem_to_smem(k_src(k_g, h, i), k_s.at[i], k_bar.at[i])
            plgpu.copy_gmem_to_smem(v_src(v_g, h, i), v_s.at[i], v_bar.at[i])
        rs = load_vec(qs_g, h * lq + qi * bq, bq, 0, interpret) * row_mult
        kv0 = load_vec(ks_g, h * lk, bkv, 1, interpret)
        plgpu.barrier_wait(q_bar.at[0])
        plgpu.barrier_wait(k_bar.at[0])
        s0 = wgmma_partial(q_s, k_s.at[0], s_shape, jnp.float32, interpret)

        def step(j, carry, issue_next: bool):
            s, acc, m, l, kv = carry
            slot = lax.rem(j, jnp.int32(stages))
            nslot = lax.rem(j + 1, jnp.int32(stages))
            kv_next = load_vec(ks_g, h * lk + jnp.minimum(j + 1, steps - 1) * bkv, bkv, 1, interpret)

            def scope(acc_s):
                if issue_next:  # S_{j+1} on the tensor cores while block j's softmax runs
                    plgpu.barrier_wait(k_bar.at[nslot])
                    plgpu.wgmma(acc_s, q_s, rhs_kmajor(k_s.at[nslot], interpret))
                out = _softmax_pv(s, acc, m, l, kv, rs, p_s, v_s.at[slot], cfg, interpret,
                                  v_ready=lambda: plgpu.barrier_wait(v_bar.at[slot]))
                return (acc_s[...] if issue_next else s, *out)

            s_next, acc, m, l = pl.run_scoped(scope, plgpu.ACC(s_shape, jnp.float32))

            @pl.when(j + stages < steps)
            def _refill():  # block j's k and vᵀ are consumed: bring block j + stages into their slot
                plgpu.copy_gmem_to_smem(k_src(k_g, h, j + stages), k_s.at[slot], k_bar.at[slot])
                plgpu.copy_gmem_to_smem(v_src(v_g, h, j + stages), v_s.at[slot], v_bar.at[slot])

            return s_next, acc, m, l, kv_next

        acc0, m0, l0, _ = _init_carry(bq, dp, interpret, kv0)
        carry = lax.fori_loop(0, steps - 1, lambda j, c: step(j, c, True), (s0, acc0, m0, l0, kv0))
        _, acc, _, l, _ = step(jnp.int32(steps - 1), carry, False)
        _epilogue(acc, l, vs_g, h * dp, o_s, o_dst(o_g, h, qi * bq, bq), interpret)

    return plgpu.kernel(
        body,
        out_type=out_type,
        grid=(bh, lq // bq),
        grid_names=("bh", "q"),
        scratch_types=[
            plgpu.SMEM((bq, dp), f8, transforms=d_tr),
            plgpu.SMEM((stages, *k_block), f8, transforms=() if interpret else d_tr),
            plgpu.SMEM((stages, *v_block), f8, transforms=() if interpret else kv_tr),
            plgpu.SMEM((bq, bkv), f8, transforms=kv_tr),
            plgpu.SMEM((bq, o_w), out_dtype, transforms=o_tr),
            plgpu.Barrier(num_arrivals=1, num_barriers=1),
            plgpu.Barrier(num_arrivals=1, num_barriers=stages),
            plgpu.Barrier(num_arrivals=1, num_barriers=stages),
        ],
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane, approx_math=True),
        interpret=interpret_params(interpret),
    )(qc, k_op, v_op, qs.reshape(-1), ks.reshape(-1), vs.reshape(-1))


# jitted: identical calls in a model lower once (see jdq.kernels.w8a8.gpu).
@functools.partial(jax.jit, static_argnames=("scale", "out_dtype", "config", "interpret", "heads", "d"))
def fp8_attention_gpu(qc, qs, kc, ks, vtc, vs, scale: float, out_dtype=jnp.bfloat16, config: Config = Config(),
                      interpret=False, heads: int | None = None, d: int | None = None):
    """FP8 flash attention of the operands of :func:`~jdq.kernels.fp8_attention.ref.quantize_operands`.

    Returns (B·H, Lq, Dp), or with ``config.direct_out`` (B, Lq, H·D) — which needs the ``heads``
    per sample and the real head dim ``d``.
    """
    bh, lq, lk, dp = _check_codes(qc, qs, kc, ks, vtc, vs)
    cfg = config
    if cfg.direct_out and (heads is None or d is None or bh % heads or not 0 < d <= dp or (d * jnp.dtype(out_dtype).itemsize) % 16):
        raise ValueError(f"fp8 attention kernel: direct_out needs heads dividing B·H={bh} and 0 < d <= Dp={dp} with "
                         f"d·itemsize a multiple of 16 bytes (TMA rows); got heads={heads}, d={d}")
    if not cfg.supports(lq, lk, dp):
        raise ValueError(f"fp8 attention kernel: Lq={lq}, Lk={lk}, Dp={dp} do not fit {cfg} (Lq % {cfg.cta_rows}, "
                         f"Lk % block_kv, Dp % {D_MULTIPLE}, block sizes 64 or 128, kind 'pipe' / 'sw' / 'ws', sw: stages >= 2)")
    if interpret:  # the interpreter reads B operands untransposed: give them (K, N)
        k_op, v_op = jnp.swapaxes(kc, 1, 2), jnp.swapaxes(vtc, 1, 2)
    else:
        k_op, v_op = kc, vtc
    run = {"ws": _ws_kernel, "sw": _sw_kernel}.get(cfg.kind, _pipe_kernel)
    return run(qc, qs, k_op, v_op, ks, vs, float(scale), jnp.dtype(out_dtype), cfg, interpret, heads, d)


__all__ = ["Config", "fp8_attention_gpu"]
