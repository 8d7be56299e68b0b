"""Hardware descriptions as pytrees of numbers: systolic-array accelerators and GPU rooflines.

Every field is a number (or a small table of numbers), so a batch of designs is one pytree
with a leading axis (:func:`stack`) and one ``jax.vmap`` evaluates all of them. Nothing here is
static: the dataflow, too, is a number (:data:`DATAFLOWS`), and the cost model selects between
the dataflows arithmetically, so designs with different dataflows share one vmapped call.

Operand formats meet hardware through a small, fixed list of *PE format classes*
(:data:`PE_FORMATS`): a processing element's throughput and energy per multiply-accumulate are
tables indexed by the classes of its two operands (``pe_rate[a, b]``). :func:`pe_format` maps a
format name (as :mod:`jdq.formats` and the quantization transforms spell it) to its class.
"""

from __future__ import annotations

import re
from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

#: Dataflows of a 2-D systolic array, in the order of their numeric code (0, 1, 2):
#: output-, weight- and input-stationary, as SCALE-Sim names them; code 3, ``"best"``, is a
#: reconfigurable array that runs each GEMM in whichever of the three is fastest for it.
DATAFLOWS = ("os", "ws", "is", "best")

#: Operand format classes a PE distinguishes (rows/columns of ``pe_rate`` and ``mac_pj``).
#: ``mx9``/``mx6``/``mx4`` are the shared-microexponent formats (Rouhani et al. 2023),
#: ``mxfp*``/``mxint8`` the OCP MX v1.0 formats, ``int8``/``int4`` uniform integers of 5–8 and
#: at most 4 bits, ``fp8`` the E4M3/E5M2 float8 formats.
PE_FORMATS = ("fp32", "fp16", "bf16", "fp8", "int8", "int4", "mx9", "mx6", "mx4", "mxfp8", "mxfp6", "mxfp4", "mxint8")
NUM_PE_FORMATS = len(PE_FORMATS)


def dataflow_index(dataflow) -> int:
    """The numeric code (0 OS, 1 WS, 2 IS) of a dataflow given by name or number."""
    if isinstance(dataflow, str):
        name = dataflow.strip().lower()
        aliases = {"output_stationary": "os", "weight_stationary": "ws", "input_stationary": "is"}
        name = aliases.get(name, name)
        if name not in DATAFLOWS:
            raise ValueError(f"unknown dataflow {dataflow!r}; use one of {list(DATAFLOWS)} (or 0, 1, 2, 3)")
        return DATAFLOWS.index(name)
    if isinstance(dataflow, (int, np.integer)) and not 0 <= int(dataflow) < len(DATAFLOWS):
        raise ValueError(f"dataflow code {dataflow} out of range; use 0 (os), 1 (ws), 2 (is) or 3 (best)")
    return dataflow


_PE_ALIASES = {
    "float32": "fp32", "f32": "fp32", "fp32": "fp32", "tf32": "fp32",
    "float16": "fp16", "f16": "fp16", "half": "fp16", "fp16": "fp16",
    "bfloat16": "bf16", "bf16": "bf16",
    "smx9": "mx9", "mx9": "mx9", "smx6": "mx6", "mx6": "mx6", "smx4": "mx4", "mx4": "mx4",
    "mxint8": "mxint8",
}


def pe_format(name: str) -> str:
    """The PE format class (an entry of :data:`PE_FORMATS`) of a format name.

    Accepts jdq format names and common spellings: ``"mx6"``, ``"mxfp8_e4m3"``, ``"mxfp4"``,
    ``"int8"``, ``"int4_sym"``, ``"fp8_e4m3"``, ``"bfloat16"``, ``"float16"``. Integers of
    5–8 bits map to ``int8`` and those of 2–4 bits to ``int4`` (the PE runs them on that path).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"format name must be a non-empty string, got {name!r}")
    key = name.strip().lower().replace("-", "_")
    if key in _PE_ALIASES:
        return _PE_ALIASES[key]
    for prefix in ("mxfp8", "mxfp6", "mxfp4"):
        if key.startswith(prefix):
            return prefix
    if key.startswith("mxint8"):
        return "mxint8"
    if re.match(r"^(s?mx)(9|6|4)(\b|_)", key):
        return "mx" + re.match(r"^s?mx(9|6|4)", key).group(1)
    if key.startswith(("fp8", "float8", "e4m3", "e5m2")):
        return "fp8"
    m = re.match(r"^u?int(\d+)", key)
    if m:
        bits = int(m.group(1))
        if 5 <= bits <= 8:
            return "int8"
        if 1 <= bits <= 4:
            return "int4"
        if bits in (16, 32):
            raise ValueError(f"format {name!r}: {bits}-bit integer operands have no PE class; use fp16/fp32")
    raise ValueError(f"format {name!r} has no PE format class; known classes: {list(PE_FORMATS)}")


def pe_index(name: str) -> int:
    """Index of :func:`pe_format` ``(name)`` in :data:`PE_FORMATS`."""
    return PE_FORMATS.index(pe_format(name))


def pair_table(entries: Mapping[tuple[str, str], float], default: float = 0.0, symmetric: bool = True) -> jax.Array:
    """A ``[F, F]`` table over :data:`PE_FORMATS` from ``{(a, b): value}`` (format names or classes).

    With ``symmetric=True`` an entry for ``(a, b)`` also fills ``(b, a)`` unless that is given.
    Pairs not listed get ``default`` (``0`` in a throughput table means "not supported").
    """
    table = np.full((NUM_PE_FORMATS, NUM_PE_FORMATS), float(default), np.float32)
    given = set()
    for (a, b), value in entries.items():
        i, j = pe_index(a), pe_index(b)
        table[i, j] = value
        given.add((i, j))
    if symmetric:
        for (i, j) in list(given):
            if (j, i) not in given:
                table[j, i] = table[i, j]
    return jnp.asarray(table)


class Accelerator(NamedTuple):
    """A 2-D systolic-array accelerator with precision-flexible PEs (all fields are numbers).

    * ``rows``, ``cols``: PE array size; ``dataflow``: 0 OS, 1 WS, 2 IS, 3 best of the three per
      GEMM (:data:`DATAFLOWS`).
    * ``fold_overlap`` (0 or 1): 0 runs the folds (tiles) of a GEMM one after the other, each with its own
      fill and drain (SCALE-Sim's schedule, :func:`jdq.hw.gemm_cycles`); 1 pipelines them (the
      next tile's operands enter while the last one drains; one fill and drain per GEMM).
    * ``clock_hz``: clock frequency.
    * ``pe_rate[a, b]``: multiply-accumulates one PE performs per cycle on operands of PE format
      classes ``a`` and ``b`` (``0``: unsupported; the cost model then returns ``inf``). A rate
      ``r > 1`` means the PE consumes ``r`` elements of the reduction (K) axis per cycle.
    * ``mac_pj[a, b]``: energy of one such multiply-accumulate, picojoules.
    * ``buf_a_bytes``, ``buf_b_bytes``, ``buf_out_bytes``: on-chip buffers for the left operand
      (activations), the right operand (weights, K/V) and the outputs.
    * ``dram_bytes_per_s``: DRAM bandwidth; ``dram_pj_per_byte``, ``sram_pj_per_byte``: access energy.
    * ``conv_elems_per_cycle``, ``conv_pj_per_elem``: MX precision-conversion units (BF16/FP32 to
      an MX format, incl. outlier selection) throughput and energy per converted element.
    * ``conv_overlap`` (0 or 1): 1 if conversion runs in parallel with the array (pipelined), 0 if serial.
    * ``fuse_attention``: 1 if attention scores/probabilities stay on chip (never go to DRAM).
    * ``static_w``: static (leakage + clock) power, watts, charged for the whole run time.
    """

    rows: jax.Array
    cols: jax.Array
    dataflow: jax.Array
    fold_overlap: jax.Array
    clock_hz: jax.Array
    pe_rate: jax.Array
    mac_pj: jax.Array
    buf_a_bytes: jax.Array
    buf_b_bytes: jax.Array
    buf_out_bytes: jax.Array
    dram_bytes_per_s: jax.Array
    dram_pj_per_byte: jax.Array
    sram_pj_per_byte: jax.Array
    conv_elems_per_cycle: jax.Array
    conv_pj_per_elem: jax.Array
    conv_overlap: jax.Array
    fuse_attention: jax.Array
    static_w: jax.Array


class GPU(NamedTuple):
    """A GPU as a roofline (all fields are numbers).

    * ``peak_macs_per_s[a, b]``: dense tensor-core multiply-accumulates per second for operand
      classes ``a`` and ``b`` (datasheet TFLOPS / 2). Formats without native support carry the
      rate of the path they run on (e.g. MX6 dequantized to FP16 runs at the FP16 rate).
    * ``dram_bytes_per_s``: memory bandwidth.
    * ``efficiency``: fraction of the peak compute rate a GEMM reaches (1 = ideal roofline).
    * ``kernel_overhead_s``: fixed time per GEMM kernel (launch, tail); 0 = ideal roofline.
    * ``fuse_attention``: 1 if attention scores stay on chip (flash attention).
    * ``power_w``: board power charged for the run time (energy = power × time).
    """

    peak_macs_per_s: jax.Array
    dram_bytes_per_s: jax.Array
    efficiency: jax.Array
    kernel_overhead_s: jax.Array
    fuse_attention: jax.Array
    power_w: jax.Array


Hardware = Accelerator | GPU


def accelerator(*, rows, cols, dataflow="os", fold_overlap=0, clock_hz, pe_rate, mac_pj, buf_a_bytes, buf_b_bytes,
                buf_out_bytes, dram_bytes_per_s, dram_pj_per_byte, sram_pj_per_byte,
                conv_elems_per_cycle, conv_pj_per_elem, conv_overlap=1, fuse_attention=1,
                static_w=0.0) -> Accelerator:
    """Build an :class:`Accelerator`; tables may be ``{(fmt_a, fmt_b): value}`` dicts (see :func:`pair_table`)."""
    if isinstance(pe_rate, Mapping):
        pe_rate = pair_table(pe_rate)
    if isinstance(mac_pj, Mapping):
        mac_pj = pair_table(mac_pj)
    fields = dict(rows=rows, cols=cols, dataflow=dataflow_index(dataflow), fold_overlap=fold_overlap,
                  clock_hz=clock_hz,
                  pe_rate=pe_rate, mac_pj=mac_pj, buf_a_bytes=buf_a_bytes, buf_b_bytes=buf_b_bytes,
                  buf_out_bytes=buf_out_bytes, dram_bytes_per_s=dram_bytes_per_s,
                  dram_pj_per_byte=dram_pj_per_byte, sram_pj_per_byte=sram_pj_per_byte,
                  conv_elems_per_cycle=conv_elems_per_cycle, conv_pj_per_elem=conv_pj_per_elem,
                  conv_overlap=conv_overlap, fuse_attention=fuse_attention, static_w=static_w)
    for name in ("rows", "cols", "clock_hz", "dram_bytes_per_s", "conv_elems_per_cycle"):
        value = fields[name]
        if isinstance(value, (int, float)) and not value > 0:
            raise ValueError(f"accelerator: {name} must be > 0, got {value}")
    out = {k: jnp.asarray(v, jnp.int32 if k == "dataflow" else jnp.float32) for k, v in fields.items()}
    for name in ("pe_rate", "mac_pj"):
        if out[name].shape[-2:] != (NUM_PE_FORMATS, NUM_PE_FORMATS):
            raise ValueError(f"accelerator: {name} must be [{NUM_PE_FORMATS}, {NUM_PE_FORMATS}] "
                             f"(one row/column per PE format), got shape {out[name].shape}")
    return Accelerator(**out)


def gpu(*, peak_macs_per_s, dram_bytes_per_s, efficiency=1.0, kernel_overhead_s=0.0, fuse_attention=1,
        power_w=0.0) -> GPU:
    """Build a :class:`GPU`; ``peak_macs_per_s`` may be a ``{(fmt_a, fmt_b): value}`` dict."""
    if isinstance(peak_macs_per_s, Mapping):
        peak_macs_per_s = pair_table(peak_macs_per_s)
    if isinstance(dram_bytes_per_s, (int, float)) and not dram_bytes_per_s > 0:
        raise ValueError(f"gpu: dram_bytes_per_s must be > 0, got {dram_bytes_per_s}")
    fields = dict(peak_macs_per_s=peak_macs_per_s, dram_bytes_per_s=dram_bytes_per_s, efficiency=efficiency,
                  kernel_overhead_s=kernel_overhead_s, fuse_attention=fuse_attention, power_w=power_w)
    out = {k: jnp.asarray(v, jnp.float32) for k, v in fields.items()}
    if out["peak_macs_per_s"].shape[-2:] != (NUM_PE_FORMATS, NUM_PE_FORMATS):
        raise ValueError(f"gpu: peak_macs_per_s must be [{NUM_PE_FORMATS}, {NUM_PE_FORMATS}], "
                         f"got shape {out['peak_macs_per_s'].shape}")
    return GPU(**out)


def stack(designs):
    """Stack designs of one kind (all :class:`Accelerator` or all :class:`GPU`) along a new leading axis."""
    designs = list(designs)
    if not designs:
        raise ValueError("stack(): no designs given")
    kinds = {type(d).__name__ for d in designs}
    if len(kinds) != 1:
        raise TypeError(f"stack(): designs must be of one kind, got {sorted(kinds)}")
    return jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *designs)


def replace(design, **changes):
    """A copy of ``design`` with some fields changed (numbers are converted to arrays)."""
    if "dataflow" in changes:
        changes["dataflow"] = jnp.asarray(dataflow_index(changes["dataflow"]), jnp.int32)
    bad = [k for k in changes if k not in design._fields]
    if bad:
        raise ValueError(f"{type(design).__name__} has no field(s) {bad}; fields: {list(design._fields)}")
    return design._replace(**{k: jnp.asarray(v, getattr(design, k).dtype) for k, v in changes.items()})
