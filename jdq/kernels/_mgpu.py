"""Shared pieces of the Mosaic GPU (``plgpu``) kernels: interpret-mode switches, swizzles, operand specs, epilogue.

Tested with jax 0.10.2 (CPU: GPU interpret mode and cross-lowering to Mosaic GPU) and run with
jax 0.11.2 on an H100/H200. Version-specific API choices live here and nowhere else.

**GPU interpret mode** (``interpret=True``; ``jax._src.pallas.mosaic_gpu.interpret``) runs the
same kernel body on the CPU, simulating shared memory, TMA copies, barriers, warpgroup threads and
``wgmma``. Two things it cannot run, and what the kernels do instead when interpreting:

* a ``wgmma`` whose B operand is a transposed shared-memory view (``plgpu.transpose_ref``: how
  8-bit B operands must be fed, K-major): the interpreter reads refs untransposed. Interpreted
  kernels receive B as ``(K, N)`` (transposed on the host) without swizzle transforms;
* ``plgpu.load(..., layout=...)`` of a scale vector from global memory: the interpreter reads it
  with plain ref indexing instead.

Everything else (tiling, the pipeline, the grid and warpgroup indexing, the epilogue arithmetic,
the output copies) is the code that runs on the GPU. Cross-lowering (``jax.jit(f).trace(...)
.lower(lowering_platforms=("cuda",))``) checks on a CPU that the real variant lowers to Mosaic GPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

try:  # pragma: no cover - import guard for jax builds without Mosaic GPU
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    HAVE_PLGPU = True
except Exception:  # noqa: BLE001
    pl = plgpu = None
    HAVE_PLGPU = False


def interpret_params(interpret):
    """``interpret=True`` -> the GPU interpreter's parameters; ``False``/``None`` -> ``None``."""
    if not interpret:
        return None
    if interpret is True:
        from jax._src.pallas.mosaic_gpu.interpret import params as _ip

        return _ip.InterpretGPUParams()
    return interpret


def smem_transforms(minor_elems: int, dtype, interpret=None):
    """(Tiling, Swizzle) transforms for an SMEM tile whose minor dim has ``minor_elems`` elements."""
    if interpret:
        return ()
    bits = jnp.dtype(dtype).itemsize * 8
    swizzle = plgpu.find_swizzle(minor_elems * bits)
    return (plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle))


def load_vec(ref, start, size, axis: int, interpret=None):
    """Load ``ref[start:start+size]`` as a vector broadcastable along ``axis`` of a WGMMA tile.

    ``axis=0``: indexed by the tile's rows (one value per row), ``axis=1``: by its columns.
    """
    sl = pl.ds(start, size)
    if interpret:
        return ref[sl]
    layout = plgpu.Layout.WGMMA.reduce(1 - axis)
    return plgpu.load(ref.at[sl], (), layout=layout, optimized=False)


def bcast_vec(ref, start, shape, axis: int, interpret=None):
    """:func:`load_vec` of ``shape[axis]`` values from ``start``, broadcast to the ``shape`` tile along ``axis``."""
    return lax.broadcast_in_dim(load_vec(ref, start, shape[axis], axis, interpret), shape, [axis])


def rhs_kmajor(ref, interpret=None):
    """A B-operand view for ``wgmma`` from a K-major (n, k) SMEM tile (interpret: already (k, n))."""
    if interpret:
        return ref
    return plgpu.transpose_ref(ref, (1, 0))


def kmajor_operand(w, interpret=None):
    """The (N, K) B operand as the kernel is given it: as is, or transposed to (K, N) when interpreting."""
    return w.T if interpret else w


def kmajor_spec(block_n: int, block_k: int, index_map, transforms=(), interpret=None, **kwargs):
    """``BlockSpec`` of a (block_n, block_k) tile of a K-major B operand; ``index_map`` returns (n, k) block indices.

    Interpreting, the operand is (K, N) (:func:`kmajor_operand`): the block and its indices are
    swapped and the swizzle ``transforms`` dropped.
    """
    if interpret:
        return plgpu.BlockSpec((block_k, block_n), lambda *idx: index_map(*idx)[::-1], **kwargs)
    return plgpu.BlockSpec((block_n, block_k), index_map, transforms=transforms, **kwargs)


def wgmma_partial(a_s, b_s, shape, acc_dtype, interpret=None):
    """``a_s · b_sᵀ`` (B K-major) by one WGMMA into a fresh scoped accumulator; its value once complete."""
    return wgmma_partials(a_s, [b_s], shape, acc_dtype, interpret)[0]


def wgmma_partials(a_s, b_refs, shape, acc_dtype, interpret=None):
    """``[a_s · bᵀ for b in b_refs]``: every WGMMA issued into its own fresh accumulator, then one wait for all."""

    def scope(*accs):
        for acc, b_s in zip(accs, b_refs):
            plgpu.wgmma(acc, a_s, rhs_kmajor(b_s, interpret))
        plgpu.wgmma_wait(0)
        return [acc[...] for acc in accs]

    return pl.run_scoped(scope, *[plgpu.ACC(shape, acc_dtype) for _ in b_refs])


def wgmma_register_a(acc, a, b_kmajor, a_scratch=None, interpret=None):
    """``acc += a · bᵀ``: ``a`` in registers (WGMMA's A operand), ``b_kmajor`` an (n, k) shared-memory tile.

    Interpreting, ``a`` goes through the shared-memory ``a_scratch`` (the GPU interpreter's
    ``wgmma`` reads no register operand) and ``b_kmajor`` is already (k, n) (:func:`rhs_kmajor`).
    """
    if interpret:
        a_scratch[...] = a
        a = a_scratch
    plgpu.wgmma(acc, a, rhs_kmajor(b_kmajor, interpret))


def zeros_carry(shape, interpret=None):
    """A float32 zero tile in the WGMMA register layout: the initial carry of a rescaling pipeline."""
    init = jnp.zeros(shape, jnp.float32)
    return init if interpret else plgpu.layout_cast(init, plgpu.Layout.WGMMA)


def store_tile(y, o_s, o_g, mi, ni):
    """Cast ``y`` to ``o_s``'s dtype, stage it in shared memory ``o_s``, TMA-store it as tile (mi, ni) of ``o_g``; wait."""
    tm, tn = o_s.shape
    o_s[...] = y.astype(o_s.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_s, o_g.at[pl.ds(mi * tm, tm), pl.ds(ni * tn, tn)])
    plgpu.wait_smem_to_gmem(0)


def store_rows(o_s, o_g, start):
    """TMA-store the written shared-memory tile ``o_s`` as rows ``[start, start + len(o_s))`` of ``o_g``; wait."""
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_s, o_g.at[pl.ds(start, o_s.shape[0])])
    plgpu.wait_smem_to_gmem(0)


def row_block_kernel(body, out_type, blocks: int, scratch, interpret=None, grid_name: str = "r"):
    """``plgpu.kernel`` over a 1-D grid of ``blocks`` row blocks named ``grid_name``, one warpgroup each (lane semantics)."""
    return plgpu.kernel(
        body,
        out_type=out_type,
        grid=(blocks,),
        grid_names=(grid_name,),
        scratch_types=list(scratch),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
        interpret=interpret_params(interpret),
    )


def tiled_kernel(body, m: int, n: int, tile_m: int, tile_n: int, out_dtype, scratch=(), interpret=None,
                 splits: int = 1, warpgroup_semantics: bool = False):
    """``plgpu.kernel`` for one warpgroup per (tile_m, tile_n) output tile: grid (M/tile_m, N/tile_n) named ("m", "n").

    The output is (M, N) ``out_dtype``; ``body`` receives the operands, the output, the ``scratch``
    buffers and last the swizzled (tile_m, tile_n) shared-memory tile that :func:`store_tile` stages.
    ``splits > 1`` (split-K) adds a leading grid axis "k" and a leading output axis of that size:
    one partial product per split, summed by the caller. ``warpgroup_semantics``: lower with
    Mosaic GPU's warpgroup semantics (register layouts inferred) instead of lane semantics.
    """
    o_tr = smem_transforms(tile_n, out_dtype, interpret)
    sem = plgpu.LoweringSemantics.Warpgroup if warpgroup_semantics else plgpu.LoweringSemantics.Lane
    grid, names, shape = (m // tile_m, n // tile_n), ("m", "n"), (m, n)
    if splits > 1:
        grid, names, shape = (splits, *grid), ("k", *names), (splits, *shape)
    return plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct(shape, out_dtype),
        grid=grid,
        grid_names=names,
        scratch_types=[*scratch, plgpu.SMEM((tile_m, tile_n), out_dtype, transforms=o_tr)],
        compiler_params=plgpu.CompilerParams(lowering_semantics=sem),
        interpret=interpret_params(interpret),
    )


def rows_of(v, shape):
    """A (rows,) vector of a tile's row reductions broadcast back to the ``shape`` tile along its columns."""
    return lax.broadcast_in_dim(v, shape, [0])


def group_row_max(a, group_w: int, interpret=None):
    """Each element's max over its group of ``group_w`` consecutive columns of a WGMMA-layout tile ``a`` (a ≥ 0).

    One group: a row reduction; more: a masked row reduction per group (registers cannot be
    regrouped), selected back by the column's group. ``group_w`` is a power of two.
    """
    groups = a.shape[1] // group_w
    if groups == 1:
        return rows_of(a.max(axis=1), a.shape)
    if interpret:
        col = lax.broadcasted_iota(jnp.int32, a.shape, 1)
    else:
        col = plgpu.broadcasted_iota(jnp.int32, a.shape, 1, layout=plgpu.Layout.WGMMA)
    g = col >> (group_w.bit_length() - 1)
    zero = jnp.zeros_like(a)
    out = None
    for i in range(groups):
        mask = g == i
        row = rows_of(jnp.where(mask, a, zero).max(axis=1), a.shape)
        out = row if out is None else jnp.where(mask, row, out)
    return out


def promise_in_bounds() -> dict:
    """``copy_gmem_to_smem`` kwargs that let a contiguous row-block copy use one bulk copy.

    With the default out-of-bounds mode (zero fill) every GMEM->SMEM copy is a tiled TMA copy,
    limited to 256 elements per dimension; a slice of whole rows promised in bounds is sent as a
    single ``cp.async.bulk`` of any length.
    """
    mode = getattr(plgpu, "OOBFillMode", None)
    return {} if mode is None else {"oob_mode": mode.PROMISE_IN_BOUNDS}


def row_layout():
    """A register layout for (4·r, 128·c) tiles: warps own rows, each lane 4 consecutive elements.

    Row reductions (``axis=1``) then stay inside a warp. ``Layout.TILED`` of the Mosaic GPU
    ``TiledLayout`` tiling ``(4, 128)(4,)``: warp dim = row in the 4-row tile, lane dim = 32
    groups of 4 columns, vector dim = the 4 columns.
    """
    from jax.experimental.mosaic.gpu import fragmented_array as fa

    return plgpu.Layout.TILED(fa.Tiling(((4, 128), (4,))), warp_dims=(-3,), lane_dims=(-2,), vector_dim=-1)


def num_sms(default: int = 132) -> int:
    """Streaming multiprocessors of the default GPU (``default`` when none is attached)."""
    try:
        dev = jax.devices("gpu")[0]
        return int(getattr(dev, "core_count", default) or default)
    except Exception:  # noqa: BLE001
        return default


def device_kind() -> str:
    """``device_kind`` of the first accelerator (``'cpu'`` when there is none)."""
    try:
        return jax.devices()[0].device_kind
    except Exception:  # noqa: BLE001  # pragma: no cover
        return "cpu"


__all__ = ["HAVE_PLGPU", "bcast_vec", "device_kind", "group_row_max", "interpret_params", "kmajor_operand", "kmajor_spec", "load_vec",
           "num_sms", "promise_in_bounds", "rhs_kmajor", "row_layout", "rows_of", "smem_transforms", "store_tile", "tiled_kernel",
           "wgmma_partial", "wgmma_partials", "wgmma_register_a", "zeros_carry"]
