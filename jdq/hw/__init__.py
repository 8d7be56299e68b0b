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
    wl = jdq.hw.model_workload("dit-xl-2", jdq.hw.workload.mixdit())   # one denoising step, MixDiT's stores
    seconds = jdq.hw.latency(jdq.hw.presets.get("mixdit_like"), wl)
    # A plan (a recipe's) resolved for any jdq model (with measured outlier fractions per operand key):
    ops = jdq.quant.trace_operands(model.apply, model.params, *inputs)
    wl = jdq.hw.from_operands(ops, jdq.hw.workload.from_plan(plan, outlier_fractions))
    # Designs x plans x layers in one call:
    table = jax.jit(jax.vmap(jax.vmap(jdq.hw.latency, (None, 0)), (0, None)))(
        jdq.hw.stack(designs), jdq.hw.workload.stack(workloads))
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
from jdq.hw.workload import (
    Gemm,
    OperandFormat,
    Workload,
    format_bits,
    from_operands,
    model_operands,
    model_workload,
    pack,
)

__all__ = [
    "Accelerator", "Cost", "DATAFLOWS", "GPU", "Gemm", "OperandFormat", "PE_FORMATS", "Workload",
    "accelerator", "accelerator_cost", "dataflow_index", "energy", "evaluate", "format_bits",
    "from_operands", "gemm_cycles", "gpu", "gpu_cost", "latency", "model_operands", "model_workload",
    "pack", "pair_table", "pe_format",
    "presets", "replace", "stack", "workload",
]
