"""Shared helpers for the Mosaic GPU (``plgpu``) kernels: interpret-mode switches, swizzles.

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

import functools

import jax
import jax.numpy as jnp

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


def rhs_kmajor(ref, interpret=None):
    """A B-operand view for ``wgmma`` from a K-major (n, k) SMEM tile (interpret: already (k, n))."""
    if interpret:
        return ref
    return plgpu.transpose_ref(ref, (1, 0))


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


__all__ = ["HAVE_PLGPU", "interpret_params", "smem_transforms", "load_vec", "rhs_kmajor", "promise_in_bounds", "row_layout",
           "num_sms", "device_kind"]
del functools
