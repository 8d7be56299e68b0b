"""Precision sweeps vmapped through one compiled sampler, quality–latency Pareto fronts, latency-budgeted allocation.

:mod:`jdq.sweep.core` builds stacked quantizer states from a grid of settings and runs them as
``jax.vmap`` of the jitted sampler; :mod:`jdq.sweep.pareto` finds and plots Pareto fronts;
:mod:`jdq.sweep.latency` prices plans with the accelerator cost model (:mod:`jdq.hw`) for
allocation under a latency or energy budget. ``jdq sweep`` is the command line.
"""

from jdq.sweep.core import (
    SETTINGS,
    Group,
    MemoryEstimate,
    SamplerSpec,
    Setting,
    SweepError,
    build_groups,
    chunk_size,
    class_spec,
    grid,
    jaxpr_bytes,
    looped_sampler,
    parse_vary,
    point_bytes,
    point_label,
    run_group,
    run_loop,
    spec_operands,
    structure_report,
    sweep_bytes,
    vmapped_sampler,
)
