"""Run SCALE-Sim v3 (PyPI ``scalesim``) on one GEMM: the reference for :func:`jdq.hw.gemm_cycles`.

SCALE-Sim is optional: :func:`available` says whether it can be imported (and why not). It is
driven layer by layer (``single_layer_sim``) from a GEMM topology file (``name, M, N, K,``) and a
config file written to a temporary directory, with no reports or traces written.

NumPy ≥ 2.4: scalesim 3.0.0 ends each layer's memory simulation with
``int(max(list_of_one_element_arrays))``, which NumPy 2.4 rejects ("only 0-dimensional arrays
can be converted to Python scalars"). We do not patch the installed package: each layer gets
its own instance of a subclass of SCALE-Sim's scratchpad whose ``service_memory_requests``
calls the original and, on exactly that error, finishes the two statements it did not reach
(the total cycle count as the maximum serviced OFMAP cycle, and the traces-valid flag) from the
trace matrix the original had already built. With NumPy < 2.4 the original completes and the
subclass does nothing.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import NamedTuple

_CONFIG = """[general]
run_name = jdq

[architecture_presets]
ArrayHeight: {rows}
ArrayWidth: {cols}
IfmapSramSzkB: {sram_kb}
FilterSramSzkB: {sram_kb}
OfmapSramSzkB: {sram_kb}
IfmapOffset: 0
FilterOffset: 10000000
OfmapOffset: 20000000
Dataflow: {dataflow}
Bandwidth: {bandwidth}
ReadRequestBuffer: 32
WriteRequestBuffer: 32

[layout]
IfmapCustomLayout: False
IfmapSRAMBankBandwidth: 10
IfmapSRAMBankNum: 10
IfmapSRAMBankPort: 2
FilterCustomLayout: False
FilterSRAMBankBandwidth: 10
FilterSRAMBankNum: 10
FilterSRAMBankPort: 2

[sparsity]
SparsitySupport: false
SparseRep: ellpack_block
OptimizedMapping: false
BlockSize: 8
RandomNumberGeneratorSeed: 40

[run_presets]
InterfaceBandwidth: {mode}
UseRamulatorTrace: False
"""


class SimResult(NamedTuple):
    """SCALE-Sim's numbers for one GEMM: ``total_cycles`` as it reports them (index of the last
    cycle, stalls included), ``stall_cycles``, ``compute_cycles`` = total − stalls + 1 (a count,
    comparable to :func:`jdq.hw.gemm_cycles`), and the wall time of the simulation."""

    total_cycles: int
    stall_cycles: int
    compute_cycles: int
    seconds: float


def available() -> tuple[bool, str]:
    """``(True, version)`` if SCALE-Sim can be imported, else ``(False, reason)``."""
    try:
        import scalesim  # noqa: F401
        from scalesim.single_layer_sim import single_layer_sim  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return False, f"scalesim is not importable ({type(e).__name__}: {e}); pip install scalesim==3.0.0"
    try:
        from importlib.metadata import version

        return True, version("scalesim")
    except Exception:  # pragma: no cover
        return True, "unknown version"


def _scratchpad_class():
    import numpy as np
    from scalesim.memory.double_buffered_scratchpad_mem import double_buffered_scratchpad

    class Scratchpad(double_buffered_scratchpad):
        """SCALE-Sim's scratchpad, finishing the last statements its NumPy-2.4 failure skips."""

        def service_memory_requests(self, ifmap_demand_mat, filter_demand_mat, ofmap_demand_mat):
            try:
                super().service_memory_requests(ifmap_demand_mat, filter_demand_mat, ofmap_demand_mat)
            except TypeError as e:
                trace = getattr(self, "ofmap_trace_matrix", None)
                if ("0-dimensional" not in str(e) or trace is None
                        or trace.shape[0] != ofmap_demand_mat.shape[0]):
                    raise
                self.total_cycles = int(np.max(trace[:, 0]))
                self.traces_valid = True

    return Scratchpad


def simulate_gemm(m: int, n: int, k: int, rows: int, cols: int, dataflow: str,
                  sram_kb: int = 4096, bandwidth: int | None = None) -> SimResult:
    """Simulate ``(m × k)·(k × n)`` on a ``rows × cols`` array with SCALE-Sim.

    ``bandwidth=None`` uses SCALE-Sim's bandwidth-estimation mode (no stalls); an integer runs
    its user-bandwidth mode with that many words per cycle (stalls appear when it is too low;
    this mode needs NumPy < 2.4, its read buffers convert one-element arrays with ``int()`` too).
    """
    ok, why = available()
    if not ok:
        raise RuntimeError(why)
    if dataflow not in ("os", "ws", "is"):
        raise ValueError(f"dataflow must be 'os', 'ws' or 'is', got {dataflow!r}")
    for name, v in (("m", m), ("n", n), ("k", k), ("rows", rows), ("cols", cols)):
        if int(v) < 1:
            raise ValueError(f"simulate_gemm: {name} must be >= 1, got {v}")
    from scalesim.layout_utils import layouts
    from scalesim.scale_config import scale_config
    from scalesim.single_layer_sim import single_layer_sim
    from scalesim.topology_utils import topologies

    with tempfile.TemporaryDirectory(prefix="jdq-scalesim-") as tmp:
        cfg_path, topo_path, layout_path = (os.path.join(tmp, f) for f in ("jdq.cfg", "gemm.csv", "layout.csv"))
        with open(cfg_path, "w") as f:
            f.write(_CONFIG.format(rows=rows, cols=cols, sram_kb=sram_kb, dataflow=dataflow,
                                   bandwidth=bandwidth or 10, mode="USER" if bandwidth else "CALC"))
        with open(topo_path, "w") as f:
            f.write(f"Layer, M, N, K,\ngemm, {int(m)}, {int(n)}, {int(k)},\n")
        with open(layout_path, "w") as f:
            f.write("Layer,\n")
        config = scale_config()
        config.read_conf_file(cfg_path)
        topo = topologies()
        topo.load_arrays(topofile=topo_path, mnk_inputs=True)
        layout = layouts()
        layout.load_arrays(layoutfile=layout_path)
    layer = single_layer_sim()
    layer.set_params(layer_id=0, config_obj=config, topology_obj=topo, layout_obj=layout, verbose=False)
    layer.memory_system = _scratchpad_class()()
    start = time.perf_counter()
    try:
        layer.run()
    except TypeError as e:
        if "0-dimensional" in str(e) and bandwidth:
            raise RuntimeError(
                "SCALE-Sim's user-bandwidth mode fails on NumPy >= 2.4 inside its read buffers "
                f"({e}); run it with NumPy < 2.4, or use bandwidth=None (estimation mode)") from e
        raise
    items = layer.get_compute_report_items()
    seconds = time.perf_counter() - start
    total, stalls = int(items[1]), int(items[2])
    return SimResult(total, stalls, total - stalls + 1, seconds)
