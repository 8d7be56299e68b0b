"""W8A8 GEMM for Hopper in Mosaic GPU (``plgpu``): int8 or FP8 E4M3 WGMMA, fused dequantization epilogue.

Computes :func:`jdq.kernels.w8a8.ref.w8a8_matmul`: ``xq`` (M, K) int8 row-major, ``wq`` (N, K)
int8 K-major (Hopper's 8-bit WGMMA reads its B operand only K-major, so the weight is stored
transposed by :func:`jdq.kernels.lower`), per-row ``xs`` (M,) and per-channel ``ws`` (N,) float32
scales, bias ``b`` (N,) float32. The epilogue converts the int32 tile to float32, multiplies by
the row and column scales, adds the bias, casts to the output dtype, and stores through shared
memory with TMA.

FP8: the same kernels with ``float8_e4m3fn`` operands on both sides run the E4M3 WGMMA with a
float32 accumulator (no conversion in the epilogue); everything else is identical.

Two variants (``Config.kind``):

* ``"pipe"``: one warpgroup per CTA, a grid of (M/tile_m, N/tile_n) CTAs, ``emit_pipeline`` over
  K with ``stages`` shared-memory buffers (TMA loads overlap the WGMMAs). Small enough that two
  CTAs fit one SM at 2 stages, which overlaps one CTA's epilogue with another's main loop.
* ``"ws"``: warp-specialised and persistent (the structure of JAX's ``hopper_matmul_mgpu``): one
  CTA per SM loops over output tiles; a memory warpgroup issues TMA loads, two compute warpgroups
  each own a (tile_m, tile_n) accumulator (the CTA tile is doubled along ``wg_dim``).

Fused epilogue extras (``ws`` only), for the DiT block around the linear:

* ``residual`` (M, N) and ``gate`` (G, N): the output is ``residual + gate[r // (M/G)] · y`` (the
  adaLN-Zero gated residual, one gate row per sample of M/G tokens), with ``y`` rounded to the
  output dtype first (the unfused path materializes it) and the sum rounded once. The residual
  tile is brought into the output staging buffer by TMA — issued before the tile's main loop when it
  fits the buffer's slots, so the load overlaps the MMAs — and added there. A warpgroup tile must
  lie in one sample: M/G a multiple of ``tile_m``.
* ``split`` = S > 1: the output is a tuple of S arrays (M, N/S), the column parts — ``qkv`` written
  as q, k and v, each its own buffer, so attention needs no slice copies (an XLA slice of one
  output would be a copy). N/S must be a multiple of the CTA tile's N.

Shapes must be multiples of the CTA tile (M: tile_m or 2·tile_m, N: tile_n or 2·tile_n, K: tile_k);
:func:`jdq.kernels.w8a8.w8a8_matmul` pads M and falls back to XLA otherwise.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from jdq.kernels._mgpu import (interpret_params, kmajor_operand, kmajor_spec, load_vec, pl, plgpu, rhs_kmajor,
                               smem_transforms, store_tile, tiled_kernel)


@dataclasses.dataclass(frozen=True)
class Config:
    """Block sizes and schedule of the W8A8 GPU kernel (see the module docstring)."""

    kind: str = "pipe"
    tile_m: int = 128
    tile_n: int = 128
    tile_k: int = 128
    stages: int = 3
    wg_dim: str = "m"  # ws only: the CTA tile is 2 warpgroup tiles along this dim
    epi_m: int = 64  # ws only: epilogue sub-tile
    epi_n: int = 64
    num_sms: int = 132
    grid_minor: str = "n"  # ws only: tile order, n-minor walks along a row of tiles
    wgmma_wait: int = 0  # 1 keeps one WGMMA in flight (pipe only; needs delay_release)

    def cta_tile(self):
        """(cta_m, cta_n): the output tile one CTA owns per step."""
        if self.kind == "ws":
            return (self.tile_m * (2 if self.wg_dim == "m" else 1), self.tile_n * (2 if self.wg_dim == "n" else 1))
        return self.tile_m, self.tile_n

    def supports(self, m: int, n: int, k: int) -> bool:
        """Whether (m, n, k) are multiples of this config's tiles."""
        cm, cn = self.cta_tile()
        return m % cm == 0 and n % cn == 0 and k % self.tile_k == 0


def _check(xq, xs, wq, ws, b, cfg):
    m, k = xq.shape
    n, k2 = wq.shape
    if xq.dtype != wq.dtype or xq.dtype not in (jnp.int8, jnp.float8_e4m3fn):
        raise TypeError(f"w8a8 GPU kernel needs int8 or float8_e4m3fn operands (both alike), got xq {xq.dtype}, wq {wq.dtype}")
    if k != k2:
        raise ValueError(f"w8a8: xq {xq.shape} and wq {wq.shape} (N, K) disagree on K")
    if xs.shape != (m,) or ws.shape != (n,) or b.shape != (n,):
        raise ValueError(f"w8a8: scales/bias shapes xs {xs.shape}, ws {ws.shape}, b {b.shape}; want ({m},), ({n},), ({n},)")
    if not cfg.supports(m, n, k):
        raise ValueError(f"w8a8: shape M={m} N={n} K={k} is not a multiple of the tiles of {cfg}")
    return m, n, k


#: Activations the epilogue can apply (names of ``jdq.kernels.activations.ACTIVATIONS`` whose ops lower
#: to Mosaic GPU); computed in float32 before the output cast.
FUSED_ACTIVATIONS = ("gelu_tanh", "silu")


def _activation_fn(activation):
    if activation is None:
        return None
    if activation not in FUSED_ACTIVATIONS:
        raise ValueError(f"w8a8 GPU kernel: activation {activation!r} cannot be fused; fusable: {FUSED_ACTIVATIONS}")
    from jdq.kernels.activations import ACTIVATIONS

    return ACTIVATIONS[activation]


def _acc_dtype(xq):
    return jnp.int32 if xq.dtype == jnp.int8 else jnp.float32


def _pipe_kernel(xq, xs, wq, ws, b, out_dtype, cfg, interpret, act=None):
    m, n, k = _check(xq, xs, wq, ws, b, cfg)
    tm, tn, tk = cfg.tile_m, cfg.tile_n, cfg.tile_k
    x_tr = smem_transforms(tk, xq.dtype, interpret)
    delay = 1 if cfg.wgmma_wait else 0

    def body(x_g, w_g, xs_g, ws_g, b_g, o_g, o_s):
        mi = lax.axis_index("m")
        ni = lax.axis_index("n")

        def scope(acc_ref):
            def step(_, x_s, w_s):
                plgpu.wgmma(acc_ref, x_s, rhs_kmajor(w_s, interpret))
                plgpu.wgmma_wait(cfg.wgmma_wait)

            plgpu.emit_pipeline(
                step,
                grid=(k // tk,),
                in_specs=[plgpu.BlockSpec((tm, tk), lambda kk: (mi, kk), transforms=x_tr, delay_release=delay),
                          kmajor_spec(tn, tk, lambda kk: (ni, kk), x_tr, interpret, delay_release=delay)],
                max_concurrent_steps=cfg.stages,
            )(x_g, w_g)
            return acc_ref[...]

        acc = pl.run_scoped(scope, plgpu.ACC((tm, tn), _acc_dtype(xq)))
        y = _epilogue(acc, xs_g, ws_g, b_g, mi * tm, ni * tn, tm, tn, interpret, act)
        store_tile(y, o_s, o_g, mi, ni)

    return tiled_kernel(body, m, n, tm, tn, out_dtype, interpret=interpret)(xq, kmajor_operand(wq, interpret), xs, ws, b)


def _epilogue(acc, xs_g, ws_g, b_g, row0, col0, tm, tn, interpret, act=None):
    xv = load_vec(xs_g, row0, tm, 0, interpret)
    wv = load_vec(ws_g, col0, tn, 1, interpret)
    bv = load_vec(b_g, col0, tn, 1, interpret)
    y = acc.astype(jnp.float32) * lax.broadcast_in_dim(xv, (tm, tn), [0])
    y = y * lax.broadcast_in_dim(wv, (tm, tn), [1]) + lax.broadcast_in_dim(bv, (tm, tn), [1])
    return y if act is None else act(y)


def _check_extras(m, n, cfg, residual, gate, split):
    """Validate the fused epilogue extras; returns the rows per gate group (None without a gate)."""
    if (residual is None) != (gate is None):
        raise ValueError("w8a8: residual and gate go together (out = residual + gate * y)")
    if split > 1 and residual is not None:
        raise ValueError("w8a8: split outputs and a fused residual are not supported together")
    if (split > 1 or residual is not None) and cfg.kind != "ws":
        raise ValueError(f"w8a8: fused residual / split outputs need Config(kind='ws'), got {cfg.kind!r}")
    cm, cn = cfg.cta_tile()
    if split > 1 and (n % split or (n // split) % cn):
        raise ValueError(f"w8a8: split={split} needs N/split a multiple of the CTA tile N {cn}; N={n}")
    if residual is None:
        return None
    g = gate.shape[0]
    if residual.shape != (m, n) or gate.shape != (g, n) or m % g or (m // g) % cfg.tile_m:
        raise ValueError(f"w8a8: residual {residual.shape} must be ({m}, {n}) and gate {gate.shape} (G, {n}) with "
                         f"M/G a multiple of tile_m {cfg.tile_m}")
    return m // g


def _ws_kernel(xq, xs, wq, ws, b, out_dtype, cfg, interpret, act=None, residual=None, gate=None, split=1):
    m, n, k = _check(xq, xs, wq, ws, b, cfg)
    group_rows = _check_extras(m, n, cfg, residual, gate, split)
    n_part = n // split
    tm, tn, tk = cfg.tile_m, cfg.tile_n, cfg.tile_k
    cta_m, cta_n = cfg.cta_tile()
    epi_m, epi_n = min(cfg.epi_m, tm), min(cfg.epi_n, tn)
    m_iters, n_iters, k_iters = m // cta_m, n // cta_n, k // tk
    x_tr = smem_transforms(tk, xq.dtype, interpret)
    o_tr = smem_transforms(epi_n, out_dtype, interpret)
    n_slots = min(2, (tm * tn) // (epi_m * epi_n))
    # a residual tile that fits the staging slots is loaded before the main loop (overlapped with it)
    prefetch = group_rows is not None and (tm * tn) // (epi_m * epi_n) <= n_slots
    acc_dtype = _acc_dtype(xq)

    def get_pipeline(body, ctx):
        return plgpu.emit_pipeline_warp_specialized(
            body,
            grid=(k_iters,),
            memory_registers=40,
            in_specs=[plgpu.BlockSpec((cta_m, tk), lambda kk: (0, kk), transforms=x_tr),
                      kmajor_spec(cta_n, tk, lambda kk: (0, kk), x_tr, interpret)],
            wg_axis="wg",
            num_compute_wgs=2,
            max_concurrent_steps=cfg.stages,
            compute_context=ctx,
        )

    def kernel(x_g, w_g, xs_g, ws_g, b_g, *rest):
        r_g, gate_g, o_gs = (*rest[:2], rest[2:]) if group_rows else (None, None, rest)
        ignore = lambda *_, **__: None  # noqa: E731

        @functools.partial(
            pl.run_scoped,
            allocs=get_pipeline(ignore, ignore).get_allocations(x_g, w_g),
            o_s=plgpu.SMEM((2, n_slots, epi_m, epi_n), out_dtype, transforms=o_tr),
            r_bar=None if group_rows is None else plgpu.Barrier(num_barriers=2 * n_slots),
            collective_axes="wg",
        )
        def _scope(allocs, o_s, r_bar):
            wg = lax.axis_index("wg")

            @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
            def _tiles(info):
                (lin,) = info.index
                if cfg.grid_minor == "n":
                    mi, ni = lin // n_iters, lin % n_iters
                else:
                    mi, ni = lin % m_iters, lin // m_iters
                cm, cn = pl.ds(mi * cta_m, cta_m), pl.ds(ni * cta_n, cta_n)
                if cfg.wg_dim == "m":
                    wm, wn = pl.ds(wg * tm, tm), slice(None)
                    row0, col0 = mi * cta_m + wg * tm, ni * cta_n
                else:
                    wm, wn = slice(None), pl.ds(wg * tn, tn)
                    row0, col0 = mi * cta_m, ni * cta_n + wg * tn

                part = (ni * cta_n) // n_part  # output p holds columns [p·N/S, (p+1)·N/S)
                o_cols = pl.ds(ni * cta_n - part * n_part, cta_n)

                def store(src, wm, wn, es_m, es_n):
                    for p, o_g in enumerate(o_gs):
                        dst = o_g.at[cm, o_cols].at[wm, wn].at[es_m, es_n]
                        if split == 1:
                            plgpu.copy_smem_to_gmem(src, dst)
                        else:
                            pl.when(part == p)(lambda dst=dst: plgpu.copy_smem_to_gmem(src, dst))

                sub_tiles = [(slice(ei * epi_m, (ei + 1) * epi_m), slice(ej * epi_n, (ej + 1) * epi_n))
                             for ei in range(tm // epi_m) for ej in range(tn // epi_n)]

                def load_residual(j):
                    es_m, es_n = sub_tiles[j]
                    bar = r_bar.at[wg * n_slots + j % n_slots]
                    plgpu.copy_gmem_to_smem(r_g.at[cm, cn].at[wm, wn].at[es_m, es_n], o_s.at[wg, j % n_slots], bar)
                    return bar

                def ctx(eval_pipeline):
                    bars = {}
                    if prefetch:  # the residual tile lands in the staging buffer while the main loop runs
                        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                        bars = {j: load_residual(j) for j in range(len(sub_tiles))}

                    @functools.partial(pl.run_scoped, acc=plgpu.ACC((tm, tn), acc_dtype))
                    def _(acc):
                        eval_pipeline(acc)
                        y = _epilogue(acc[...], xs_g, ws_g, b_g, row0, col0, tm, tn, interpret, act).astype(out_dtype)
                        if group_rows:  # gate * y in float32 (y already rounded: the unfused path stores it)
                            gv = load_vec(gate_g, (row0 // group_rows) * n + col0, tn, 1, interpret)
                            y = y.astype(jnp.float32) * lax.broadcast_in_dim(gv, (tm, tn), [1])
                        if not prefetch:
                            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                        for j, (es_m, es_n) in enumerate(sub_tiles):
                            slot = j % n_slots
                            if not prefetch:
                                plgpu.wait_smem_to_gmem(n_slots - 1, wait_read_only=True)
                            if group_rows:
                                plgpu.barrier_wait(bars[j] if prefetch else load_residual(j))
                                o_s[wg, slot] = (o_s[wg, slot].astype(jnp.float32) + y[es_m, es_n]).astype(out_dtype)
                            else:
                                o_s[wg, slot] = y[es_m, es_n]
                            plgpu.commit_smem()
                            store(o_s.at[wg, slot], wm, wn, es_m, es_n)

                def mma(_, x_s, w_s, acc):
                    w_view = w_s.at[:, wn] if interpret else w_s.at[wn]
                    plgpu.wgmma(acc, x_s.at[wm], rhs_kmajor(w_view, interpret))
                    plgpu.wgmma_wait(0)
                    return acc

                w_src = w_g.at[:, cn] if interpret else w_g.at[cn, :]
                get_pipeline(mma, ctx)(x_g.at[cm, :], w_src, allocations=allocs)

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    extras = () if group_rows is None else (residual.astype(out_dtype), gate.astype(jnp.float32).reshape(-1))
    return plgpu.kernel(
        kernel,
        out_type=tuple(jax.ShapeDtypeStruct((m, n_part), out_dtype) for _ in range(split)) if split > 1
        else jax.ShapeDtypeStruct((m, n), out_dtype),
        grid=(cfg.num_sms,),
        grid_names=("sm",),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=interpret_params(interpret),
    )(xq, kmajor_operand(wq, interpret), xs, ws, b, *extras)


# jitted so that a model calling the kernel at many sites of one shape lowers it once (JAX
# dedupes identical jitted calls in a module); otherwise every site lowers its own copy (DiT-XL/2: 112).
@functools.partial(jax.jit, static_argnames=("out_dtype", "config", "interpret", "activation", "split"))
def w8a8_matmul_gpu(xq, xs, wq, ws, b=None, out_dtype=jnp.bfloat16, config: Config = Config(), interpret=False,
                    activation: str | None = None, residual=None, gate=None, split: int = 1):
    """W8A8 GEMM ``act((M, K) × (N, K) -> (M, N))`` (int8 or E4M3 codes) with the fused dequant (+ activation) epilogue.

    ``residual`` / ``gate`` / ``split``: the fused extras of the module docstring (``ws`` only); with
    ``split`` = S > 1 the result is a tuple of S arrays (M, N/S).
    """
    if b is None:
        b = jnp.zeros((wq.shape[0],), jnp.float32)
    xs, ws, b = (jnp.asarray(v, jnp.float32) for v in (xs, ws, b))
    if config.kind == "ws":
        return _ws_kernel(xq, xs, wq, ws, b, jnp.dtype(out_dtype), config, interpret, _activation_fn(activation),
                          residual, gate, split)
    if config.kind != "pipe":
        raise ValueError(f"w8a8 GPU config.kind must be 'pipe' or 'ws', got {config.kind!r}")
    _check_extras(xq.shape[0], wq.shape[0], config, residual, gate, split)
    return _pipe_kernel(xq, xs, wq, ws, b, jnp.dtype(out_dtype), config, interpret, _activation_fn(activation))


__all__ = ["Config", "FUSED_ACTIVATIONS", "w8a8_matmul_gpu"]
