"""Latency and energy of a :class:`~jdq.hw.Workload` on a :class:`~jdq.hw.Accelerator` or :class:`~jdq.hw.GPU`.

Everything is jnp arithmetic on arrays, so it jits and vmaps over hardware designs, plans
(stacked workloads) and layers (the entries of a workload) at once::

    evaluate = jax.jit(jax.vmap(jax.vmap(jdq.hw.latency, (None, 0)), (0, None)))
    seconds = evaluate(designs, workloads)          # [n_designs, n_plans]

The systolic-array model
------------------------
Compute cycles of one GEMM follow SCALE-Sim v3's conventions (its ``systolic_compute_{os,ws,is}``
demand matrices), which the tests check cycle for cycle:

* The GEMM ``(M × K) · (K × N)`` maps to a spatial ``S_r × S_c`` grid and a temporal extent ``T``:
  OS: ``S_r = M, S_c = N, T = K``; WS: ``S_r = K, S_c = N, T = M``; IS: ``S_r = K, S_c = M, T = N``.
* It runs in ``ceil(S_r / rows) · ceil(S_c / cols)`` folds, one after the other, with no overlap
  between folds. A fold takes ``T + rows + cols − 2`` cycles in OS (stream, skewed fill, drain),
  plus ``rows`` cycles to preload the stationary operand in WS and IS.
* SCALE-Sim prints the index of the last cycle (its "Total Cycles" = our count − 1) and stalls
  from its memory model apart; :func:`gemm_cycles` is the stall-free count.
* ``fold_overlap = 1`` (a design choice beyond SCALE-Sim) pipelines the folds instead
  (:func:`pipelined_cycles`): one fill and drain per GEMM, and each later fold's preload hides
  behind the previous fold's stream.
* Dataflow code 3 ("best") takes, per GEMM, the fastest of the three.

Precision-flexible PEs: a PE whose rate for an operand pair is ``r`` MACs per cycle consumes
``r`` elements of K per cycle (a dot-product PE), so the array sees ``K_eff = K · Σ_p f_p / r_p``
over the operand-format pairs ``p`` with K fractions ``f_p`` (the outlier and non-outlier parts
of each operand, assumed independent; outliers are processed in lockstep across the array, as
after channel grouping).

Memory: operands are read from DRAM at their storage bits. Reuse through the on-chip buffers
picks the better of two blockings: keep a block of A rows resident and stream B once per block,
or keep a block of B columns and stream A once per block. Outputs are written once. Attention
scores/probabilities never touch DRAM when ``fuse_attention`` is set. SRAM traffic follows the
dataflow (which operand is re-read per fold, and partial sums in WS/IS).

Time per GEMM: ``max(compute, DRAM, conversion)`` when conversion is pipelined
(``conv_overlap = 1``), else ``max(compute, DRAM) + conversion`` (double-buffered tiles hide
the shorter of compute and memory). Energy: MACs × pJ/MAC of the operand pair + SRAM and DRAM
bytes × pJ/byte + converted elements × pJ + static power × time.

The GPU roofline: ``max(MACs / (peak · efficiency), bytes / bandwidth) + kernel_overhead``,
with each operand read and the output written once (ideal caching); energy = power × time.

Not modelled (on either side): element-wise and normalization ops (softmax, LayerNorm, GELU,
adaLN modulation, residual adds), embedding lookups, the VAE and the text encoders.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jdq.hw.hardware import GPU, Accelerator, dataflow_index
from jdq.hw.workload import Workload

_PSUM_BYTES = 4.0  # FP32 partial sums in WS/IS


def _fold_mapping(m, n, k, rows, cols, dataflow):
    """SCALE-Sim's mapping of a GEMM to the array: (number of folds, temporal extent T, preload cycles)."""
    df = jnp.asarray(dataflow_index(dataflow), jnp.int32)
    m, n, k, rows, cols = (jnp.asarray(x, jnp.float32) for x in (m, n, k, rows, cols))
    is_os, is_ws = df == 0, df == 1
    s_r = jnp.where(is_os, m, k)
    s_c = jnp.where(is_os | is_ws, n, m)
    t = jnp.where(is_os, k, jnp.where(is_ws, m, n))
    preload = jnp.where(is_os, 0.0, rows)
    folds = jnp.ceil(s_r / rows) * jnp.ceil(s_c / cols)
    return folds, t, preload, rows, cols


def _sequential_cycles(m, n, k, rows, cols, dataflow):
    folds, t, preload, rows, cols = _fold_mapping(m, n, k, rows, cols, dataflow)
    return folds * (t + rows + cols - 2.0 + preload)


def _pipelined_cycles(m, n, k, rows, cols, dataflow):
    folds, t, preload, rows, cols = _fold_mapping(m, n, k, rows, cols, dataflow)
    # The first fold's preload is exposed; each later one hides behind the previous stream.
    first = t + rows + cols - 2.0 + preload
    return jnp.where(folds > 0, first + (folds - 1) * jnp.maximum(t, preload), 0.0)


def _with_best(schedule, m, n, k, rows, cols, dataflow):
    df = jnp.asarray(dataflow_index(dataflow), jnp.int32)
    fixed = schedule(m, n, k, rows, cols, df)
    best = jnp.minimum(jnp.minimum(schedule(m, n, k, rows, cols, 0), schedule(m, n, k, rows, cols, 1)),
                       schedule(m, n, k, rows, cols, 2))
    return jnp.where(df == 3, best, fixed)


def gemm_cycles(m, n, k, rows, cols, dataflow):
    """Stall-free compute cycles of one ``(m × k)·(k × n)`` GEMM on a ``rows × cols`` systolic
    array with ``dataflow`` ``"os"``/``"ws"``/``"is"`` (or 0/1/2; ``"best"``/3: the fewest of
    the three), fill and drain included.

    Matches SCALE-Sim v3's cycle count (its reported "Total Cycles" is this minus one, plus
    stalls). Arguments may be arrays (broadcast together) and traced; the result is float32,
    exact below 2**24 cycles.
    """
    return _with_best(_sequential_cycles, m, n, k, rows, cols, dataflow)


def pipelined_cycles(m, n, k, rows, cols, dataflow):
    """Compute cycles when consecutive folds overlap: each fold occupies the array for its
    stream (at least the preload of the next stationary tile), plus one fill and drain per GEMM."""
    return _with_best(_pipelined_cycles, m, n, k, rows, cols, dataflow)


class Cost(NamedTuple):
    """Cost of each workload entry (all ``count`` GEMMs of it), seconds, bytes and joules.

    ``seconds``: latency; ``compute_s``/``memory_s``/``conv_s``: its components (compute
    includes fill and drain); ``dram_bytes``: DRAM traffic; ``macs``: multiply-accumulates;
    ``energy_j`` = ``mac_j + sram_j + dram_j + conv_j + static_j``.
    """

    seconds: jax.Array
    compute_s: jax.Array
    memory_s: jax.Array
    conv_s: jax.Array
    dram_bytes: jax.Array
    macs: jax.Array
    energy_j: jax.Array
    mac_j: jax.Array
    sram_j: jax.Array
    dram_j: jax.Array
    conv_j: jax.Array
    static_j: jax.Array

    def total(self) -> "Cost":
        """Sum over the entries (the last axis)."""
        return Cost(*(jnp.sum(x, axis=-1) for x in self))

    @property
    def memory_bound(self) -> jax.Array:
        """Per entry: whether DRAM time exceeds compute time."""
        return self.memory_s > self.compute_s


def _pairs(wl: Workload):
    """The four operand-format pairs of each entry: (K fraction, a class, b class)."""
    ra, rb = wl.a_hi_frac, wl.b_hi_frac
    return (
        ((1 - ra) * (1 - rb), wl.a_fmt, wl.b_fmt),
        (ra * (1 - rb), wl.a_hi_fmt, wl.b_fmt),
        ((1 - ra) * rb, wl.a_fmt, wl.b_hi_fmt),
        (ra * rb, wl.a_hi_fmt, wl.b_hi_fmt),
    )


def _time_per_mac(table, wl: Workload):
    """``Σ_p f_p / table[p]``: time units per MAC given a per-pair rate table (inf if unsupported)."""
    total = 0.0
    for frac, ia, ib in _pairs(wl):
        rate = table[ia, ib]
        total = total + jnp.where(frac > 0, frac / jnp.where(rate > 0, rate, 0.0), 0.0)
    return total


def _mean_per_mac(table, wl: Workload):
    """``Σ_p f_p · table[p]``: e.g. the mean energy per MAC."""
    return sum(frac * table[ia, ib] for frac, ia, ib in _pairs(wl))


def _operand_bytes(wl: Workload):
    a = ((1 - wl.a_hi_frac) * wl.a_bits + wl.a_hi_frac * wl.a_hi_bits) / 8.0
    b = ((1 - wl.b_hi_frac) * wl.b_bits + wl.b_hi_frac * wl.b_hi_bits) / 8.0
    return a, b


@jax.jit
def accelerator_cost(hw: Accelerator, wl: Workload) -> Cost:
    """Per-entry :class:`Cost` of ``wl`` on a systolic-array accelerator (see the module doc)."""
    m, n, k, count = wl.m, wl.n, wl.k, wl.count
    k_eff = jnp.ceil(k * _time_per_mac(hw.pe_rate, wl))

    def cycles_for(df):
        return jnp.where(hw.fold_overlap > 0.5, _pipelined_cycles(m, n, k_eff, hw.rows, hw.cols, df),
                         _sequential_cycles(m, n, k_eff, hw.rows, hw.cols, df))

    per_df = jnp.stack([cycles_for(df) for df in range(3)])  # [3, G]
    # Code 3 ("best"): a reconfigurable array picks the fastest dataflow for each GEMM.
    df = jnp.where(hw.dataflow == 3, jnp.argmin(per_df, axis=0), hw.dataflow)
    cycles = jnp.where(df == 0, per_df[0], jnp.where(df == 1, per_df[1], per_df[2]))
    compute_s = count * cycles / hw.clock_hz

    a_el, b_el = _operand_bytes(wl)
    fuse = hw.fuse_attention
    a_bytes = m * k * a_el * (1 - wl.a_fused * fuse)
    b_bytes = k * n * b_el
    o_bytes = m * n * wl.out_bits / 8.0 * (1 - wl.out_fused * fuse)
    tm = jnp.clip(jnp.floor(hw.buf_a_bytes / jnp.maximum(k * a_el, 1e-9)), 1.0, jnp.maximum(m, 1.0))
    tn = jnp.clip(jnp.floor(hw.buf_b_bytes / jnp.maximum(k * b_el, 1e-9)), 1.0, jnp.maximum(n, 1.0))
    dram = jnp.minimum(a_bytes + b_bytes * jnp.ceil(m / tm), b_bytes + a_bytes * jnp.ceil(n / tn)) + o_bytes
    dram_bytes = count * dram
    memory_s = dram_bytes / hw.dram_bytes_per_s

    conv_elems = count * (wl.a_conv * m * k + wl.b_conv * k * n)
    conv_s = conv_elems / (hw.conv_elems_per_cycle * hw.clock_hz)
    busy = jnp.maximum(compute_s, memory_s)
    seconds = jnp.where(hw.conv_overlap > 0.5, jnp.maximum(busy, conv_s), busy + conv_s)

    # SRAM traffic by dataflow (elements re-read per fold; partial sums when K is spatial).
    k_folds = jnp.ceil(k_eff / hw.rows)
    psum = m * n * (2 * k_folds - 1) * _PSUM_BYTES
    sram_os = m * k * a_el * jnp.ceil(n / hw.cols) + k * n * b_el * jnp.ceil(m / hw.rows) + m * n * wl.out_bits / 8
    sram_ws = m * k * a_el * jnp.ceil(n / hw.cols) + k * n * b_el + psum
    sram_is = m * k * a_el + k * n * b_el * jnp.ceil(m / hw.cols) + psum
    sram_bytes = count * jnp.where(df == 0, sram_os, jnp.where(df == 1, sram_ws, sram_is))

    macs = count * m * n * k
    mac_j = macs * _mean_per_mac(hw.mac_pj, wl) * 1e-12
    sram_j = sram_bytes * hw.sram_pj_per_byte * 1e-12
    dram_j = dram_bytes * hw.dram_pj_per_byte * 1e-12
    conv_j = conv_elems * hw.conv_pj_per_elem * 1e-12
    static_j = seconds * hw.static_w
    energy = mac_j + sram_j + dram_j + conv_j + static_j
    return Cost(seconds, compute_s, memory_s, conv_s, dram_bytes, macs, energy, mac_j, sram_j, dram_j, conv_j, static_j)


@jax.jit
def gpu_cost(hw: GPU, wl: Workload) -> Cost:
    """Per-entry :class:`Cost` of ``wl`` on a GPU roofline (see the module doc)."""
    m, n, k, count = wl.m, wl.n, wl.k, wl.count
    macs = count * m * n * k
    compute_s = macs * _time_per_mac(hw.peak_macs_per_s, wl) / hw.efficiency
    a_el, b_el = _operand_bytes(wl)
    fuse = hw.fuse_attention
    dram_bytes = count * (m * k * a_el * (1 - wl.a_fused * fuse) + k * n * b_el
                          + m * n * wl.out_bits / 8.0 * (1 - wl.out_fused * fuse))
    memory_s = dram_bytes / hw.dram_bytes_per_s
    nonempty = (macs > 0).astype(jnp.float32)
    seconds = jnp.maximum(compute_s, memory_s) + hw.kernel_overhead_s * nonempty
    zero = jnp.zeros_like(seconds)
    energy = seconds * hw.power_w
    return Cost(seconds, compute_s, memory_s, zero, dram_bytes, macs, energy, zero, zero, zero, zero, energy)


def evaluate(hw, wl: Workload) -> Cost:
    """Per-entry :class:`Cost` of workload ``wl`` on hardware ``hw`` (an Accelerator or a GPU)."""
    if isinstance(hw, Accelerator):
        return accelerator_cost(hw, wl)
    if isinstance(hw, GPU):
        return gpu_cost(hw, wl)
    raise TypeError(f"evaluate(): hardware must be a jdq.hw.Accelerator or jdq.hw.GPU, got {type(hw).__name__}")


def latency(hw, wl: Workload) -> jax.Array:
    """Total seconds of all entries of ``wl`` on ``hw`` (one model call)."""
    return jnp.sum(evaluate(hw, wl).seconds, axis=-1)


def energy(hw, wl: Workload) -> jax.Array:
    """Total joules of all entries of ``wl`` on ``hw`` (one model call)."""
    return jnp.sum(evaluate(hw, wl).energy_j, axis=-1)
