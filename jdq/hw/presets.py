"""Named hardware presets: a MixDiT-like accelerator and GPU rooflines from datasheets.

GPU figures are the vendors' *dense* (no 2:4 sparsity) tensor-core peaks; a datasheet that lists
"with sparsity" numbers is halved. One multiply-accumulate (MAC) = 2 FLOPs.

=========  ==============================  =========  ==========  =======  ===========  ======
preset     source                          FP16/BF16  INT8        FP8      bandwidth    power
=========  ==============================  =========  ==========  =======  ===========  ======
rtx3090    NVIDIA Ampere GA102 whitepaper   71 TF [1]  284 TOPS   —        936 GB/s     350 W
a100       NVIDIA A100 datasheet (SXM4      312 TF     624 TOPS   —        2,039 GB/s   400 W
           80 GB)
h100       NVIDIA H100 datasheet (SXM5)     989.4 TF   1,979 TOPS 1,979 TF 3,350 GB/s   700 W
h100_pcie  NVIDIA H100 datasheet (PCIe)     756 TF     1,513 TOPS 1,513 TF 2,000 GB/s   350 W
h200       NVIDIA H200 datasheet (SXM)      989.4 TF   1,979 TOPS 1,979 TF 4,800 GB/s   700 W
=========  ==============================  =========  ==========  =======  ===========  ======

[1] RTX 3090: 71 TFLOPS is FP16/BF16 with FP32 accumulate (what cuBLAS/PyTorch use for FP16
GEMMs); FP16 with FP16 accumulate is 142. INT4: 568 TOPS (3090), 1,248 (A100); Hopper has no
INT4 tensor path (INT4 runs as INT8). FP32 pairs use the non-tensor FP32 peak (35.6, 19.5,
66.9, 51.2, 66.9 TFLOPS). Formats a GPU does not support natively (MX, and FP8 before Hopper)
run at the rate of the path they are dequantized to (FP16/BF16) while being read from memory at
their own width (a weight-/activation-dequantizing kernel).

The MixDiT-like accelerator: the paper's configuration is not public (docs/methods.md §2: PE array,
multiplier design, conversion unit, clock, simulator are NOT FOUND). Every number of
:func:`mixdit_like` is an assumption, listed in :data:`MIXDIT_ASSUMPTIONS`.
"""

from __future__ import annotations

from typing import Callable

from jdq.hw.hardware import GPU, PE_FORMATS, Accelerator, accelerator, gpu

_T = 1e12
_FLOAT = ("fp32", "fp16", "bf16")
_QUANT_AS_FP16 = ("fp8", "int8", "int4", "mx9", "mx6", "mx4", "mxfp8", "mxfp6", "mxfp4", "mxint8")


def _gpu_table(fp16_tflops, fp32_tflops, int8_tops=None, int4_tops=None, fp8_tflops=None):
    """Dense MAC/s for every PE-format pair: native paths where the GPU has them, else the FP16 path."""
    fp16, fp32 = fp16_tflops * _T / 2, fp32_tflops * _T / 2
    table = {}
    for a in PE_FORMATS:
        for b in PE_FORMATS:
            table[(a, b)] = fp32 if "fp32" in (a, b) else fp16
    if int8_tops is not None:
        table[("int8", "int8")] = int8_tops * _T / 2
    if int4_tops is not None:
        table[("int4", "int4")] = int4_tops * _T / 2
    elif int8_tops is not None:
        table[("int4", "int4")] = int8_tops * _T / 2
    if int8_tops is not None:
        for pair in (("int8", "int4"), ("int4", "int8")):
            table[pair] = int8_tops * _T / 2
    if fp8_tflops is not None:
        table[("fp8", "fp8")] = fp8_tflops * _T / 2
    return table


def rtx3090() -> GPU:
    """NVIDIA GeForce RTX 3090 roofline (GA102 whitepaper: 71 dense FP16 TFLOPS with FP32 accumulate, 936 GB/s)."""
    return gpu(peak_macs_per_s=_gpu_table(71.0, 35.6, int8_tops=284.0, int4_tops=568.0),
               dram_bytes_per_s=936e9, power_w=350.0)


def a100() -> GPU:
    """NVIDIA A100 SXM4 80 GB roofline (datasheet: 312 dense BF16 TFLOPS, 624 INT8 TOPS, 2,039 GB/s)."""
    return gpu(peak_macs_per_s=_gpu_table(312.0, 19.5, int8_tops=624.0, int4_tops=1248.0),
               dram_bytes_per_s=2039e9, power_w=400.0)


def h100() -> GPU:
    """NVIDIA H100 SXM5 roofline (datasheet: 989.4 dense BF16 TFLOPS, 1,979 FP8/INT8, 3.35 TB/s)."""
    return gpu(peak_macs_per_s=_gpu_table(989.4, 66.9, int8_tops=1979.0, fp8_tflops=1979.0),
               dram_bytes_per_s=3350e9, power_w=700.0)


def h100_pcie() -> GPU:
    """NVIDIA H100 PCIe roofline (datasheet: 756 dense BF16 TFLOPS, 1,513 FP8/INT8, 2.0 TB/s)."""
    return gpu(peak_macs_per_s=_gpu_table(756.0, 51.2, int8_tops=1513.0, fp8_tflops=1513.0),
               dram_bytes_per_s=2000e9, power_w=350.0)


def h200() -> GPU:
    """NVIDIA H200 SXM roofline (datasheet: 989.4 dense BF16 TFLOPS, 1,979 FP8/INT8, 4.8 TB/s)."""
    return gpu(peak_macs_per_s=_gpu_table(989.4, 66.9, int8_tops=1979.0, fp8_tflops=1979.0),
               dram_bytes_per_s=4800e9, power_w=700.0)


#: Every assumption behind :func:`mixdit_like` (the paper's accelerator is not public).
MIXDIT_ASSUMPTIONS = (
    "PE array 128 x 128, output-stationary, 1 GHz (not given in the paper's abstract or summaries); "
    "consecutive tiles are pipelined (fold_overlap = 1: one fill and drain per GEMM; SCALE-Sim's "
    "schedule, fold_overlap = 0, is reported as a variant).",
    "Precision-flexible PE built from four 4-bit x 4-bit magnitude multipliers: one MX6 x MX6 MAC "
    "(4-bit magnitudes) per multiplier, MX9 (7-bit magnitudes) split into two 4-bit slices, so per "
    "PE per cycle: MX6xMX6 4, MX9xMX6 2, MX9xMX9 1, INT8xINT8 1, MX4 pairs as MX6; MXFP/MXINT8 run "
    "on the MX9 path (1), FP16/BF16/FP8 on a slow float path (1/4).",
    "Weights are MX6 in the MixDiT plan (the paper's weight format is NOT FOUND).",
    "Outliers (MX9) are processed in lockstep across the array (channel-grouped), so a fraction r "
    "of K costs the MX9 rate; no extra fill/drain between the MX6 and MX9 parts.",
    "MX precision-conversion units sized to the array's peak operand intake, 512 elements/cycle "
    "(128 rows x 4 MX6 elements), pipelined with the array (conv_overlap = 1); every run-time "
    "quantized operand element (activations, Q, K, V, attention probabilities) is converted once.",
    "On-chip buffers: 2 MiB left operand, 2 MiB right operand, 1 MiB outputs (5 MiB total, "
    "close to the RTX 3090's 6 MiB L2).",
    "DRAM bandwidth 936 GB/s, the RTX 3090's GDDR6X (iso-bandwidth comparison).",
    "Quantized activations are converted on the producer's output path (after its element-wise "
    "ops), so a GEMM reads them at MX bits; every GEMM output is also written at 16 bits (the "
    "BF16 residual stream); the extra MX copy's write is not counted. Attention scores and "
    "probabilities stay on chip (fused attention), as on the GPUs (flash attention).",
    "Energy (45 nm-class relative values after Horowitz, ISSCC 2014): MAC MX6xMX6 0.08 pJ, "
    "MX9xMX6 0.15 pJ, MX9xMX9 / INT8 0.3 pJ, FP16 1.5 pJ; SRAM 2.5 pJ/byte; DRAM 58 pJ/byte "
    "(GDDR6X, 7.25 pJ/bit); conversion 1 pJ/element; static power 2 W.",
)


def mixdit_like() -> Accelerator:
    """A MixDiT-like MX accelerator; every number is an assumption (see :data:`MIXDIT_ASSUMPTIONS`)."""
    rate = {}
    energy = {}
    slow, slow_pj = 0.25, 1.5
    for a in PE_FORMATS:
        for b in PE_FORMATS:
            rate[(a, b)] = slow
            energy[(a, b)] = slow_pj
    mx9_path = ("mx9", "int8", "mxfp8", "mxfp6", "mxfp4", "mxint8")
    mx6_path = ("mx6", "mx4", "int4")
    for a in mx9_path + mx6_path:
        for b in mx9_path + mx6_path:
            hi = (a in mx9_path) + (b in mx9_path)
            rate[(a, b)] = (4.0, 2.0, 1.0)[hi]
            energy[(a, b)] = (0.08, 0.15, 0.3)[hi]
    return accelerator(
        rows=128, cols=128, dataflow="os", fold_overlap=1, clock_hz=1e9, pe_rate=rate, mac_pj=energy,
        buf_a_bytes=2 * 2**20, buf_b_bytes=2 * 2**20, buf_out_bytes=2**20,
        dram_bytes_per_s=936e9, dram_pj_per_byte=58.0, sram_pj_per_byte=2.5,
        conv_elems_per_cycle=512, conv_pj_per_elem=1.0, conv_overlap=1, fuse_attention=1, static_w=2.0)


PRESETS: dict[str, Callable[[], Accelerator | GPU]] = {
    "mixdit_like": mixdit_like,
    "rtx3090": rtx3090,
    "a100": a100,
    "h100": h100,
    "h100_pcie": h100_pcie,
    "h200": h200,
}


def get(name: str) -> Accelerator | GPU:
    """The preset called ``name`` (one of :data:`PRESETS`)."""
    key = name.strip().lower().replace("-", "_")
    if key not in PRESETS:
        raise KeyError(f"unknown hardware preset {name!r}; known presets: {sorted(PRESETS)}")
    return PRESETS[key]()


def for_device_kind(device_kind: str) -> str:
    """The GPU preset name for a ``jax.devices()[0].device_kind`` string (e.g. ``"NVIDIA H100 80GB HBM3"``)."""
    kind = device_kind.lower()
    if "h200" in kind:
        return "h200"
    if "h100" in kind:
        return "h100_pcie" if "pcie" in kind else "h100"
    if "a100" in kind:
        return "a100"
    if "3090" in kind:
        return "rtx3090"
    raise KeyError(f"no GPU preset for device kind {device_kind!r}; known presets: {sorted(PRESETS)}")
