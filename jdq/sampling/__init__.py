"""Schedules and samplers (DDPM, DDIM, DPM-Solver++ 2M, flow-matching Euler) as one jitted ``lax.scan``.

``schedules`` holds the training schedules and respacing; ``samplers`` the per-step tables and
update rules; ``loop`` the compiled loop with classifier-free guidance and per-step quantization;
``generate`` the batched, data-parallel, model-aware front end the command line uses.
"""

from jdq.sampling import schedules
from jdq.sampling.calibrate import calibrate
from jdq.sampling.loop import (
    at_step,
    collect_sampler_stats,
    guided_output,
    initial_noise,
    sample,
    sample_keys,
    step_noise,
    step_progress,
)
from jdq.sampling.samplers import (
    SAMPLERS,
    Sampler,
    ddim,
    ddpm,
    dpm_solver_pp_2m,
    flow_euler,
    make_sampler,
)
