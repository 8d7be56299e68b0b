"""The MixDiT activation split as one Mosaic GPU kernel: gather + MX9 / MX6 casts + E4M3 re-encoding + padding.

Computes :func:`jdq.kernels.mixdit.ref.quantize_activation` bit for bit (``hi="mx9"``, ``lo="mx6"``,
SMX blocks of 16 with micro-exponent pairs, the default rounding rules) in one pass over ``x``
(M, K) bf16 / float32: each CTA bulk-copies ``rows`` whole rows into shared memory, every thread
gathers whole 16-element blocks of the permuted channel order from shared memory, casts them in
registers and scatters the results into the padded operand tiles, which are bulk-stored. HBM
traffic is one read of ``x`` and one write of the operands (XLA needs 8 fusions and float32
intermediates, NOTES.md "MixDiT").

**Thread mapping.** Thread ``s`` of the CTA's warpgroup owns row ``r = s % rows`` and the blocks
``b = s // rows + k·(128 / rows)`` (``k`` = 0, 1, …) of each part (outlier part: ``K_hi`` padded
to 64 columns, rest: ``K_lo`` padded to 128), so a block's 16 elements, its pairs and its shared
exponent live in one thread's registers: the casts are elementwise over 16 register arrays, one
per element of a block, each a ``(128,)`` array with one value per thread (``WG_STRIDED`` layout,
one element per thread). The row amax that the E4M3 re-encoding needs is a per-thread max followed
by an exchange through shared memory (every thread of a row reads the other threads' partial maxima
from a doubled buffer at static offsets). Only the gather (a per-thread shared-memory load at a
channel index read from the permutation table) and the scatter are per-thread address arithmetic,
written in Mosaic GPU directly (``plgpu.inline_mgpu``); when interpreting, the same index
arithmetic runs in numpy / jnp, and the casts, the exchange and the copies are the same code.

**Gather table** (``(K_hi pad + K_lo pad,)`` int32, made by :func:`gather_table`): the input channel
of each output column, ``K`` for a padding column. Each row of ``x`` sits in shared memory with a
pitch of ``K + pad`` elements whose extra columns hold zeros, so a padding column reads a zero
(zeros never change a block's exponent, as in the reference). The pitch padding and a rotation of
the element order within a block (thread-dependent by an even amount, so pairs stay in their
registers) spread a warp's loads over the 32 shared-memory banks; both are chosen at trace time.

**Arithmetic** (:func:`smx_cast_blocks`): the one-pass SMX formulation of :mod:`jdq.formats.smx`
(flush below 2⁻¹²⁶, shared exponent from the block's max |x| bits, micro-exponent from the pair's
exponent, round half to even, saturate, NaN for a block with NaN / Inf), the re-encoding of
:func:`jdq.kernels.mixdit.ref.to_e4m3_rows` (the row exponent equals the exponent of the max |x| over
the outlier-free channels: an MX6 cast keeps each block's top binade) and the E4M3 bit pattern built
with integer operations (normal values are exact; below 2⁻⁶ the subnormal code rounds half to even,
as XLA's conversion does; ``SplitConfig.e4m3="bits"``, the default) or by the conversion instruction
(``"cvt"``, one instruction per value). Outputs are stored as uint16 / uint8 bit patterns and bit-cast to bf16 /
E4M3 outside the kernel (free).

Platform note: the reference runs in XLA, which flushes float32 subnormal results to zero; this
kernel's products are the same exact power-of-two scalings, so they agree unless an intermediate
falls below 2⁻¹²⁶ (blocks more than ~120 binades below 1), where the GPU's handling of subnormals decides.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jdq.kernels._mgpu import interpret_params, pl, plgpu, promise_in_bounds
from jdq.kernels.mixdit.ref import E4M3_TOP, HI_TILE, LO_TILE

BLOCK = 16  # SMX block (elements along K)
THREADS = 128  # one warpgroup
MX9, MX6 = 7, 4  # mantissa bits of the two formats


@dataclasses.dataclass(frozen=True)
class SplitConfig:
    """Per-thread register budget for the MX6 part (picks the rows per CTA), the largest row count, bank tricks."""

    elems_per_thread: int = 80
    max_rows: int = 32
    spread_banks: bool = True  # pitch padding + per-thread rotation within a block
    e4m3: str = "bits"  # "bits": integer ops (e4m3_bits; measured on an H200); "cvt": the conversion instruction
    loop: bool = False  # a loop over the blocks of a thread (two passes over the MX6 part) instead of unrolled code
    table_smem: bool = False  # copy the gather table to shared memory per CTA (else read through the L1 cache)

    def __post_init__(self):
        if self.e4m3 not in ("cvt", "bits"):
            raise ValueError(f"SplitConfig.e4m3 must be 'cvt' or 'bits', got {self.e4m3!r}")

    def rows(self, m: int, k_lo_pad: int) -> int:
        """Rows per CTA: the largest power of two ≤ ``max_rows`` dividing ``m`` within the register budget (0: none)."""
        nb = k_lo_pad // BLOCK
        best, r = 0, 1
        while r <= min(self.max_rows, THREADS):
            if m % r == 0 and (best == 0 or BLOCK * math.ceil(nb / (THREADS // r)) <= self.elems_per_thread):
                best = r
            r *= 2
        return best


def part_sizes(k: int, k_hi: int) -> tuple[int, int]:
    """(K_hi padded to the bf16 K tile, K_lo padded to the E4M3 K tile) of the kernel operands."""
    k_lo = k - k_hi
    return -(-k_hi // HI_TILE) * HI_TILE, -(-k_lo // LO_TILE) * LO_TILE


def supports(x_shape, x_dtype, k_hi: int, hi="mx9", lo="mx6", config: SplitConfig = SplitConfig()) -> str | None:
    """``None`` if the split kernel takes these operands, else the reason it does not."""
    from jdq import formats

    if len(x_shape) != 2:
        return f"x must be 2-D (M, K), got shape {tuple(x_shape)}"
    m, k = x_shape
    if jnp.dtype(x_dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)):
        return f"x must be bfloat16 or float32, got {jnp.dtype(x_dtype)}"
    want = {"mx9": (MX9, "hi"), "mx6": (MX6, "lo")}
    for fmt, name in ((hi, "mx9"), (lo, "mx6")):
        spec = formats.get(fmt)
        if spec != formats.get(name):
            return f"split kernel casts the default {name} only, got {spec}"
    if not 0 <= k_hi < k or k_hi % BLOCK:
        return f"k_hi={k_hi} must be a multiple of {BLOCK} in [0, K={k})"
    if (k * jnp.dtype(x_dtype).itemsize) % 16:
        return f"a row of x ({k} elements) is not a multiple of 16 bytes (bulk copy)"
    if config.rows(m, part_sizes(k, k_hi)[1]) == 0:
        return f"M={m} has no row count dividing it"
    return None


def gather_table(perm, k_hi: int):
    """The input channel of each kernel operand column: ``(K_hi pad + K_lo pad,)`` int32, ``K`` for padding."""
    k = perm.shape[0]
    khp, klp = part_sizes(k, k_hi)
    perm = perm.astype(jnp.int32)
    fill = lambda n: jnp.full((n,), k, jnp.int32)  # noqa: E731
    return jnp.concatenate([perm[:k_hi], fill(khp - k_hi), perm[k_hi:], fill(klp - (k - k_hi))])


@dataclasses.dataclass(frozen=True)
class _Part:
    """Static index arithmetic of one operand part (hi or lo) for a CTA of ``rows`` rows."""

    off: int  # first column of the part in the gather table
    cols: int  # padded width of the part
    rows: int
    rot_shift: int  # rotation ρ = (g >> rot_shift) & 3 (-1: none)
    real: int  # columns that are channels (the rest, up to ``cols``, is padding)
    opitch: int = 0  # row pitch of the part's shared-memory output tile (elements; 0: ``cols``)

    @property
    def pitch(self):
        return self.opitch or self.cols

    @property
    def nb(self):
        return self.cols // BLOCK

    @property
    def groups(self):
        return THREADS // self.rows

    @property
    def steps(self):
        return -(-self.nb // self.groups)

    def index(self, k, i, s, xp=np):
        """For register ``i`` of step ``k`` and threads ``s``: (row, column in the part clamped, block valid).

        ``xp``: numpy (static analysis) or jax.numpy (interpreted kernel: ``s`` an iota).
        """
        r, g = s % self.rows, s // self.rows
        rho = 0 * g if self.rot_shift < 0 else (g >> self.rot_shift) & 3
        b = g + k * self.groups
        e = (i + 2 * rho) & (BLOCK - 1)
        return r, xp.minimum(BLOCK * b + e, self.cols - 1), b < self.nb


def _worst_bank(words) -> int:
    """Most distinct 32-bit words any bank serves in one warp's access (1: conflict-free)."""
    worst = 1
    for w in range(THREADS // 32):
        banks = {}
        for word in set(words[32 * w:32 * w + 32].tolist()):
            banks[word % 32] = banks.get(word % 32, 0) + 1
        worst = max(worst, max(banks.values()))
    return worst


def _bank_conflicts(rows: int, k: int, pad: int, itemsize: int, rot_shift: int) -> int:
    """Worst shared-memory bank conflict of the gather (identity channel order), over one step's registers."""
    part = _Part(0, BLOCK * THREADS, rows, rot_shift, BLOCK * THREADS)
    return max(_worst_bank((r * (k + pad) + j) * itemsize // 4)
               for r, j, _ in (part.index(0, i, np.arange(THREADS)) for i in range(BLOCK)))


def _store_conflicts(part: "_Part", itemsize: int) -> int:
    """Worst shared-memory bank conflict of the scatter into the part's output tile, over one step's registers."""
    return max(_worst_bank((r * part.pitch + j) * itemsize // 4)
               for r, j, _ in (part.index(0, i, np.arange(THREADS)) for i in range(BLOCK)))


@functools.lru_cache(maxsize=None)
def _layout_choice(rows: int, k: int, itemsize: int, spread: bool) -> tuple[int, int]:
    """(pitch padding in elements, rotation shift) with the fewest gather bank conflicts."""
    unit = 16 // itemsize  # bulk copies need 16-byte aligned rows
    if not spread:
        return unit, -1
    cands = [(p * unit, rs) for p in (1, 2, 3, 4) for rs in (-1, 0, 1, 2, 3, 4)]
    return min(cands, key=lambda c: (_bank_conflicts(rows, k, c[0], itemsize, c[1]), c[0], c[1]))


@functools.lru_cache(maxsize=None)
def _out_pitch(part: "_Part", itemsize: int, spread: bool) -> int:
    """The output tile's row pitch (elements, 16-byte multiples) with the fewest scatter bank conflicts."""
    if not spread:
        return part.cols
    unit = 16 // itemsize
    return min((part.cols + p * unit for p in range(8)),
               key=lambda q: (_store_conflicts(dataclasses.replace(part, opitch=q), itemsize), q))


# ---------------------------------------------------------------------------------------------- arithmetic


def _pow2(n):
    return lax.bitcast_convert_type((n + 127) << 23, jnp.float32)


def _mul_pow2(x, n):
    half = n >> 1
    return x * _pow2(half) * _pow2(n - half)


def _abs_bits(v):
    return lax.bitcast_convert_type(v, jnp.int32) & 0x7FFFFFFF


def smx_cast_blocks(vals, m: int):
    """SMX-cast one block per thread: ``vals`` 16 float32 arrays (element ``i`` of each thread's block, pairs
    ``(i, i ^ 1)``) -> the 16 cast float32 arrays, the arithmetic of :func:`jdq.formats.smx.fake_quantize`."""
    qmax = float(2**m - 1)
    ab = [_abs_bits(v) for v in vals]
    amax = functools.reduce(jnp.maximum, ab)
    bad = amax >= 0x7F800000
    e_blk = (amax >> 23) - 127
    e_calc = jnp.maximum(e_blk, -126)
    out = [None] * BLOCK
    for i in range(0, BLOCK, 2):
        pair_exp = (jnp.maximum(ab[i], ab[i + 1]) >> 23) - 127
        step = e_calc - jnp.where(pair_exp < e_blk, 1, 0) - (m - 1)
        for j in (i, i + 1):
            v = jnp.where(ab[j] < 0x00800000, jnp.float32(0), vals[j])
            q = jnp.clip(lax.round(_mul_pow2(v, -step), lax.RoundingMethod.TO_NEAREST_EVEN), -qmax, qmax)
            out[j] = jnp.where(bad, jnp.float32(jnp.nan), _mul_pow2(q, step))
    return out


def bf16_bits(v):
    """bf16 bit patterns (int32, low 16 bits) of float32 ``v`` exactly representable in bf16."""
    return lax.shift_right_logical(lax.bitcast_convert_type(v, jnp.int32), 16)


def e4m3_bits(w):
    """E4M3 (fn) bit patterns (int32, low 8 bits) of float32 ``w`` with ``|w| < 256`` whose normal values carry
    at most 4 significant bits: exact above 2⁻⁶, round half to even below, 0x7F for NaN."""
    wb = lax.bitcast_convert_type(w, jnp.int32)
    sign = lax.shift_right_logical(wb, 24) & 0x80
    aw = wb & 0x7FFFFFFF
    normal = (aw >> 20) - ((127 - 7) << 3)
    sub = lax.round(lax.bitcast_convert_type(aw, jnp.float32) * jnp.float32(512.0),
                    lax.RoundingMethod.TO_NEAREST_EVEN).astype(jnp.int32)
    code = jnp.where(aw >= 0x3C800000, normal, sub)
    return sign | jnp.where(aw > 0x7F800000, 0x7F, code)


def e4m3_cvt_bits(w):
    """E4M3 bit patterns (int32) of float32 ``w`` by the conversion (round half to even, NaN -> 0x7F)."""
    return lax.bitcast_convert_type(w.astype(jnp.float8_e4m3fn), jnp.uint8).astype(jnp.int32)


# ---------------------------------------------------------------------------------------------- gather / scatter


def _wg_layout():
    return plgpu.Layout.WG_STRIDED((THREADS,), vec_size=1)


def _threads():
    return lax.broadcasted_iota(jnp.int32, (THREADS,), 0)


def _steps_iota(part: _Part, k=None):
    """(k, s, i) of every register, step (or the traced step ``k``) and thread as (16, steps, 128) arrays."""
    shape = (BLOCK, part.steps if k is None else 1, THREADS)
    kk = lax.broadcasted_iota(jnp.int32, shape, 1) if k is None else jnp.full(shape, k, jnp.int32)
    return kk, lax.broadcasted_iota(jnp.int32, shape, 2), lax.broadcasted_iota(jnp.int32, shape, 0)


def _gather_interpret(x_s, tbl_g, part: _Part, pitch: int, k=None):
    """[[16 (steps, 128) arrays]]: one "step" holding every step (the casts are elementwise); ``k``: that step."""
    xs = x_s[...].astype(jnp.float32)
    tbl = tbl_g[pl.ds(part.off, part.cols)]
    kk, s, i = _steps_iota(part, k)
    r, j, _ = part.index(kk, i, s, jnp)
    g = xs[r * pitch + tbl[j]]  # one gather for the 16 registers of every step
    return [[g[n] if k is None else g[n, 0] for n in range(BLOCK)]]


def _scatter_interpret(o_s, vals, part: _Part, dtype, k=None):
    o = o_s[...]
    k, s, i = _steps_iota(part, k)
    [vals] = vals
    r, j, valid = part.index(k, i, s, jnp)
    row = jnp.where(valid, r, part.rows)  # an invalid block goes to the trash row, as on the GPU
    vals = jnp.stack(vals).reshape(j.shape)
    if part.real % BLOCK:  # padding columns of the last block are zero even where the block is NaN
        vals = jnp.where(j < part.real, vals, 0)
    o_s[...] = o.at[row * part.pitch + j].set(vals.astype(dtype))


def _mlir():
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, memref, vector
    from jax.experimental.mosaic.gpu import fragmented_array as fa
    from jax.experimental.mosaic.gpu import utils as mu

    return ir, arith, memref, vector, fa, mu


def _thread_coords(part: _Part):
    """MLIR i32 values (tid, r, g, ρ) of the calling thread."""
    ir, arith, _, _, _, mu = _mlir()
    i32 = ir.IntegerType.get_signless(32)
    c = lambda v: arith.constant(i32, v)  # noqa: E731
    tid = mu.thread_idx()
    if tid.type != i32:
        tid = arith.index_cast(i32, tid)
    tid = arith.remui(tid, c(THREADS))
    r = arith.remui(tid, c(part.rows))
    g = arith.divui(tid, c(part.rows))
    rho = c(0) if part.rot_shift < 0 else arith.andi(arith.shrui(g, c(part.rot_shift)), c(3))
    return tid, r, g, rho


def _col(part: _Part, g, rho, k, i: int):
    """MLIR: (column in the part, clamped; block valid) for register ``i`` of step ``k`` (an int or an i32 value)."""
    ir, arith, *_ = _mlir()
    i32 = ir.IntegerType.get_signless(32)
    c = lambda v: arith.constant(i32, v)  # noqa: E731
    b = arith.addi(g, c(k * part.groups) if isinstance(k, int) else arith.muli(k, c(part.groups)))
    e = arith.andi(arith.addi(c(i), arith.shli(rho, c(1))), c(BLOCK - 1))
    j = arith.minui(arith.addi(arith.muli(b, c(BLOCK)), e), c(part.cols - 1))
    valid = arith.cmpi(arith.CmpIPredicate.ult, b, c(part.nb))
    return j, valid


def _scalar_i32(a):
    """The i32 MLIR value of a WG_SPLAT scalar passed to ``inline_mgpu``."""
    ir, arith, *_ = _mlir()
    v = a.registers.item()
    i32 = ir.IntegerType.get_signless(32)
    return v if v.type == i32 else arith.index_cast(i32, v)


def _gather_gpu(x_s, tbl_g, part: _Part, pitch: int, x_dtype, k=None):
    """[[16 arrays] per step]: every step unrolled, or (``k``: a traced step index) that one step."""
    n = (part.steps if k is None else 1) * BLOCK
    ret = [plgpu.ShapeDtypeStruct((THREADS,), jnp.float32, _wg_layout())] * n
    extra = () if k is None else (plgpu.Layout.WG_SPLAT(()),)

    @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), plgpu.RefType(), *extra), return_type=ret)
    def gather(ctx, x_ref, t_ref, *kk):
        ir, arith, memref, vector, fa, _ = _mlir()
        i32, f32, index = ir.IntegerType.get_signless(32), ir.F32Type.get(), ir.IndexType.get()
        c = lambda v: arith.constant(i32, v)  # noqa: E731
        _, r, g, rho = _thread_coords(part)
        base = arith.muli(r, c(pitch))
        layout = fa.WGStridedFragLayout((THREADS,), 1)
        out = []
        for k in (range(part.steps) if not kk else [_scalar_i32(kk[0])]):
            for i in range(BLOCK):
                j, _ = _col(part, g, rho, k, i)
                col = memref.load(t_ref, [arith.index_cast(index, arith.addi(j, c(part.off)))])
                v = memref.load(x_ref, [arith.index_cast(index, arith.addi(base, col))])
                if jnp.dtype(x_dtype) != jnp.float32:
                    v = arith.extf(f32, v)
                reg = vector.broadcast(ir.VectorType.get((1,), f32), v)
                out.append(fa.FragmentedArray(_registers=np.array([reg], dtype=object), _layout=layout,
                                              _is_signed=None))
        return out

    flat = gather(x_s, tbl_g) if k is None else gather(x_s, tbl_g, k)
    return [flat[n * BLOCK:(n + 1) * BLOCK] for n in range(len(flat) // BLOCK)]


def _scatter_gpu(o_s, vals, part: _Part, bits: int, k=None):
    """Store [[16 int32 arrays] per step] (every step, or the traced step ``k``) into the output tile."""
    vals = [v for step in vals for v in step]
    extra = () if k is None else (plgpu.Layout.WG_SPLAT(()),)

    @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), [_wg_layout()] * len(vals), *extra))
    def scatter(ctx, o_ref, regs, *kk):
        ir, arith, memref, vector, _, _ = _mlir()
        i32, index = ir.IntegerType.get_signless(32), ir.IndexType.get()
        ity = ir.IntegerType.get_signless(bits)
        c = lambda v: arith.constant(i32, v)  # noqa: E731
        _, r, g, rho = _thread_coords(part)
        n = 0
        for k in (range(part.steps) if not kk else [_scalar_i32(kk[0])]):
            _, valid = _col(part, g, rho, k, 0)
            row = arith.select(valid, r, c(part.rows))  # an invalid block goes to the trash row
            base = arith.muli(row, c(part.pitch))
            for i in range(BLOCK):
                j, _ = _col(part, g, rho, k, i)
                [reg] = regs[n].registers.flat
                v = vector.extract(reg, dynamic_position=[], static_position=ir.DenseI64ArrayAttr.get([0]))
                if part.real % BLOCK:  # padding columns of the last block are zero even where the block is NaN
                    v = arith.select(arith.cmpi(arith.CmpIPredicate.ult, j, c(part.real)), v, c(0))
                memref.store(arith.trunci(ity, v), o_ref, [arith.index_cast(index, arith.addi(base, j))])
                n += 1

    if k is None:
        scatter(o_s, list(vals))
    else:
        scatter(o_s, list(vals), k)


def _zero_pad_gpu(x_s, rows: int, k: int, pitch: int):
    """Threads ``t < rows`` zero the pitch padding of row ``t`` (read by padding columns)."""
    @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),))
    def zero(ctx, x_ref):
        ir, arith, memref, _, _, mu = _mlir()
        from jax._src.lib.mlir.dialects import scf

        i32, index = ir.IntegerType.get_signless(32), ir.IndexType.get()
        c = lambda v: arith.constant(i32, v)  # noqa: E731
        tid = mu.thread_idx()
        if tid.type != i32:
            tid = arith.index_cast(i32, tid)
        eltype = ir.MemRefType(x_ref.type).element_type
        zero_v = arith.constant(eltype, 0.0)
        cond = arith.cmpi(arith.CmpIPredicate.ult, tid, c(rows))
        if_op = scf.IfOp(cond)
        with ir.InsertionPoint(if_op.then_block):
            for p in range(pitch - k):
                memref.store(zero_v, x_ref, [arith.index_cast(index, arith.addi(arith.muli(tid, c(pitch)), c(k + p)))])
            scf.yield_([])

    zero(x_s)


def _store_scales_gpu(s_g, scale, row0, rows: int):
    """Threads ``t < rows`` (which own row ``t``) write their row scale to ``s_g[row0 + t]``."""
    @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), _wg_layout(), plgpu.Layout.WG_SPLAT(())))
    def store(ctx, s_ref, sc, r0):
        ir, arith, memref, vector, _, mu = _mlir()
        from jax._src.lib.mlir.dialects import scf

        i32, index = ir.IntegerType.get_signless(32), ir.IndexType.get()
        c = lambda v: arith.constant(i32, v)  # noqa: E731
        tid = mu.thread_idx()
        if tid.type != i32:
            tid = arith.index_cast(i32, tid)
        [reg] = sc.registers.flat
        v = vector.extract(reg, dynamic_position=[], static_position=ir.DenseI64ArrayAttr.get([0]))
        start = r0.registers.item()
        if start.type != i32:
            start = arith.index_cast(i32, start)
        if_op = scf.IfOp(arith.cmpi(arith.CmpIPredicate.ult, tid, c(rows)))
        with ir.InsertionPoint(if_op.then_block):
            memref.store(v, s_ref, [arith.index_cast(index, arith.addi(start, tid))])
            scf.yield_([])

    store(s_g, scale, row0)


# ---------------------------------------------------------------------------------------------- kernel


# jitted: identical calls in a model lower once (see jdq.kernels.w8a8.gpu).
@functools.partial(jax.jit, static_argnames=("k_hi", "config", "interpret"))
def split_activation_gpu(x, tbl, k_hi: int, config: SplitConfig = SplitConfig(), interpret=False):
    """``x`` (M, K) and a :func:`gather_table` -> (x_hi (M, K_hi pad) bf16, x_lo (M, K_lo pad) E4M3, s_x (M,) f32)
    in one pass, equal to :func:`jdq.kernels.mixdit.ref.quantize_activation` (see the module docstring)."""
    why = supports(x.shape, x.dtype, k_hi, config=config)
    if why:
        raise ValueError(f"mixdit split kernel: {why}")
    m, k = x.shape
    khp, klp = part_sizes(k, k_hi)
    if tbl.shape != (khp + klp,) or tbl.dtype != jnp.int32:
        raise ValueError(f"mixdit split kernel: gather table must be int32 ({khp + klp},), got {tbl.dtype} {tbl.shape}")
    rows = config.rows(m, klp)
    isz = jnp.dtype(x.dtype).itemsize
    pad, rot = _layout_choice(rows, k, isz, config.spread_banks)
    pitch = k + pad
    hi = _Part(0, khp, rows, rot, k_hi) if k_hi else None
    lo = _Part(khp, klp, rows, rot, k - k_hi)
    if hi is not None:
        hi = dataclasses.replace(hi, opitch=_out_pitch(hi, 2, config.spread_banks))
    lo = dataclasses.replace(lo, opitch=_out_pitch(lo, 1, config.spread_banks))
    groups = THREADS // rows

    def body(x_g, t_g, oh_g, ol_g, s_g, x_s, oh_s, ol_s, p_s, bars, *t_s):
        i = lax.axis_index("m")
        row0 = i * rows
        if t_s:  # the gather table into shared memory, with the rows' copies
            plgpu.copy_gmem_to_smem(t_g, t_s[0], t_s[1].at[0], **promise_in_bounds())
        if interpret:  # the pitch padding of every row is zero (padding columns read it)
            for r in range(rows):
                x_s[pl.ds(r * pitch + k, pad)] = jnp.zeros((pad,), x.dtype)
        else:
            _zero_pad_gpu(x_s, rows, k, pitch)
        for r in range(rows):
            plgpu.copy_gmem_to_smem(x_g.at[pl.ds((row0 + r) * k, k)], x_s.at[pl.ds(r * pitch, k)], bars.at[r],
                                    **promise_in_bounds())
        for r in range(rows):
            plgpu.barrier_wait(bars.at[r])
        if t_s:
            plgpu.barrier_wait(t_s[1].at[0])
            t_g = t_s[0]
        plgpu.commit_smem()  # every thread's pad zeros visible

        def gather(part, k=None):
            if interpret:
                return _gather_interpret(x_s, t_g, part, pitch, k)
            return _gather_gpu(x_s, t_g, part, pitch, x.dtype, k)

        def scatter(o, v, part, dt, bits, k=None):
            if interpret:
                _scatter_interpret(o, v, part, dt, k)
            else:
                _scatter_gpu(o, v, part, bits, k)

        def abs_max(vals):
            out = functools.reduce(jnp.maximum, [_abs_bits(v) for step in vals for v in step])
            return jnp.max(out, axis=0) if out.ndim == 2 else out  # interpreted, unrolled: (steps, 128)

        def zeros_i32():
            z = jnp.zeros((THREADS,), jnp.int32)
            return z if interpret else plgpu.layout_cast(z, _wg_layout())

        encode = e4m3_bits if config.e4m3 == "bits" else e4m3_cvt_bits
        cast_hi = lambda vals: [[bf16_bits(v) for v in smx_cast_blocks(step, MX9)] for step in vals]  # noqa: E731
        cast_lo = lambda vals, inv: [[encode(v * inv) for v in smx_cast_blocks(step, MX6)] for step in vals]  # noqa: E731

        if not config.loop:
            if hi is not None:
                scatter(oh_s, cast_hi(gather(hi)), hi, jnp.uint16, 16)
            vals = gather(lo)
            part_max = abs_max(vals)
        else:  # one block per thread per iteration; the MX6 part is gathered twice (row max, then codes)
            if hi is not None:
                def hi_step(kk, carry):
                    scatter(oh_s, cast_hi(gather(hi, kk)), hi, jnp.uint16, 16, kk)
                    return carry
                lax.fori_loop(0, hi.steps, hi_step, 0)
            part_max = lax.fori_loop(0, lo.steps, lambda kk, acc: jnp.maximum(acc, abs_max(gather(lo, kk))),
                                     zeros_i32())
        p_s[pl.ds(0, THREADS)] = part_max
        p_s[pl.ds(THREADS, THREADS)] = part_max
        plgpu.commit_smem()
        load = (lambda off: p_s[pl.ds(off, THREADS)]) if interpret else (
            lambda off: plgpu.load(p_s.at[pl.ds(off, THREADS)], (), layout=_wg_layout()))
        row_max = functools.reduce(jnp.maximum, [load(gg * rows) for gg in range(groups)])
        e_row = jnp.maximum(((row_max >> 23) & 0xFF) - 127, -126 + E4M3_TOP)
        inv = _pow2(E4M3_TOP - e_row)
        if not config.loop:
            scatter(ol_s, cast_lo(vals, inv), lo, jnp.uint8, 8)
        else:
            def lo_step(kk, carry):
                scatter(ol_s, cast_lo(gather(lo, kk), inv), lo, jnp.uint8, 8, kk)
                return carry
            lax.fori_loop(0, lo.steps, lo_step, 0)
        scale = _pow2(e_row - E4M3_TOP)
        if interpret:
            s_g[pl.ds(row0, rows)] = scale[:rows]
        else:
            _store_scales_gpu(s_g, scale, row0, rows)

        plgpu.commit_smem()
        for part, o_s, o_g in ((hi, oh_s, oh_g), (lo, ol_s, ol_g)):
            if part is None:
                continue
            if part.pitch == part.cols:  # contiguous rows: one bulk copy
                plgpu.copy_smem_to_gmem(o_s.at[pl.ds(0, rows * part.cols)],
                                        o_g.at[pl.ds(row0 * part.cols, rows * part.cols)])
            else:
                for r in range(rows):
                    plgpu.copy_smem_to_gmem(o_s.at[pl.ds(r * part.pitch, part.cols)],
                                            o_g.at[pl.ds((row0 + r) * part.cols, part.cols)])
        plgpu.wait_smem_to_gmem(0)

    khp_alloc = hi.pitch if hi is not None else 8  # no outlier part: a dummy buffer, never written
    oh, ol, s = plgpu.kernel(
        body,
        out_type=(jax.ShapeDtypeStruct((m * khp if khp else 8,), jnp.uint16), jax.ShapeDtypeStruct((m * klp,), jnp.uint8),
                  jax.ShapeDtypeStruct((m,), jnp.float32)),
        grid=(m // rows,),
        grid_names=("m",),
        scratch_types=[
            plgpu.SMEM((rows * pitch,), x.dtype),
            plgpu.SMEM(((rows + 1) * khp_alloc,), jnp.uint16),
            plgpu.SMEM(((rows + 1) * lo.pitch,), jnp.uint8),
            plgpu.SMEM((2 * THREADS,), jnp.int32),
            plgpu.Barrier(num_arrivals=1, num_barriers=rows),
            *([plgpu.SMEM((khp + klp,), jnp.int32), plgpu.Barrier(num_arrivals=1, num_barriers=1)]
              if config.table_smem else []),
        ],
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
        interpret=interpret_params(interpret),
    )(x.reshape(-1), tbl)
    x_hi = lax.bitcast_convert_type(oh.reshape(m, khp), jnp.bfloat16) if khp else jnp.zeros((m, 0), jnp.bfloat16)
    x_lo = lax.bitcast_convert_type(ol.reshape(m, klp), jnp.float8_e4m3fn)
    return x_hi, x_lo, s


__all__ = ["SplitConfig", "bf16_bits", "e4m3_bits", "e4m3_cvt_bits", "gather_table", "part_sizes", "smx_cast_blocks",
           "split_activation_gpu", "supports"]
