"""jdq.hw: a jitted, vectorized accelerator and GPU cost model for quantized diffusion transformers.

* Hardware as pytrees of numbers: :class:`Accelerator` (systolic array, precision-flexible PEs,
  MX conversion units, buffers, DRAM, energy) and :class:`GPU` (roofline); named
  :mod:`~jdq.hw.presets` (a MixDiT-like accelerator; RTX 3090, A100, H100, H200).
* Workloads as structs of arrays: :class:`Workload`, built from the operands a model exposes
  (:func:`jdq.quant.trace_operands`) and a plan's operand formats (:mod:`~jdq.hw.workload`).
* The model: :func:`gemm_cycles` (SCALE-Sim-exact systolic cycles), :func:`evaluate`,
  :func:`latency`, :func:`energy` — jnp functions that ``jax.jit`` and ``jax.vmap`` over designs ×
  plans × layers.

Example::

    import jax, jdq
    wl = jdq.hw.model_workload("dit-xl-2", jdq.hw.workload.mixdit())
    hw = jdq.hw.presets.get("mixdit_like")
    seconds = jdq.hw.latency(hw, wl)      # one denoising step
"""

from jdq.hw import presets, workload
from jdq.hw.cost import Cost, accelerator_cost, energy, evaluate, gemm_cycles, gpu_cost, latency
from jdq.hw.hardware import (
    DATAFLOWS,
    GPU,
    PE_FORMATS,
    Accelerator,
    accelerator,
    dataflow_index,
    gpu,
    pair_table,
    pe_format,
    replace,
    stack,
)
from jdq.hw.workload import Gemm, OperandFormat, Workload, format_bits, from_operands, pack

__all__ = [
    "Accelerator", "Cost", "DATAFLOWS", "GPU", "Gemm", "OperandFormat", "PE_FORMATS", "Workload",
    "accelerator", "accelerator_cost", "dataflow_index", "energy", "evaluate", "format_bits",
    "from_operands", "gemm_cycles", "gpu", "gpu_cost", "latency", "pack", "pair_table", "pe_format",
    "presets", "replace", "stack", "workload",
]
