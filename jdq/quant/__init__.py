"""Quantization as composable transforms (``init``/``apply``), rules, plans and calibration.

The protocol (:mod:`jdq.quant.transform`) and a library of transforms:

* :func:`cast` — any :mod:`jdq.formats` format, static or dynamic scales (:mod:`.casts`);
* :func:`outlier_split` / :func:`outlier_weight` — MixDiT magnitude outliers in a high-precision
  format (:mod:`.outliers`);
* :func:`time_grouped` — one state per time group, picked by the sampler step (:mod:`.timegroup`);
* :func:`softmax_two_region` / :func:`post_gelu_two_sided` — TQ-DiT multi-region quantizers
  (:mod:`.regions`);
* :class:`ChannelBalance` — SmoothQuant / ViDiT-Q / PTQ4DiT channel balancing with
  re-parameterisation into the weights (:mod:`.balance`);
* :func:`center_tokens` — SageAttention's smoothing of K before a low-precision q·kᵀ (:mod:`.smoothing`).

Searches and allocation: :func:`search_scales` (TQ-DiT interval search, MSE / cosine /
Hessian-guided, :mod:`.search`), :func:`gptq` (:mod:`.gptq`), :func:`evolution_search` (Q-DiT,
:mod:`.evolution`), :func:`allocate` / :func:`allocate_bits` (exact integer programming,
:mod:`.allocate`).
"""

from jdq.quant.transform import (
    ACTIVATION_ROLES,
    ATTENTION_ROLES,
    ROLES,
    ChainMeta,
    Context,
    Operand,
    OperandRecorder,
    Plan,
    QuantTransform,
    Quantizer,
    QuantizerBase,
    Rule,
    chain,
    find_stages,
    identity,
    keep_float,
    map_stages,
    operand_key,
    resolve,
    rule,
    stateless,
    trace_operands,
)
from jdq.quant.calibrate import StatsCollector, collect_stats, operand_stats, reduce_steps, stack_stats
from jdq.quant.casts import CastMeta, cast
from jdq.quant.timegroup import (PerTimeGroupMeta, TimeGroupMeta, TimeGroups, per_time_group, stack_states, time_grouped,
                                  unstack_state)
from jdq.quant.regions import (
    RegionMeta,
    post_gelu_two_sided,
    search_delta_pos,
    search_split,
    softmax_two_region,
    split_stats,
)
from jdq.quant.balance import (
    BalanceMeta,
    ChannelBalance,
    fold_balance,
    fold_into_affine,
    fold_into_modulation,
    fold_into_weight,
    link_stats,
    pop_act_scales,
)
from jdq.quant.outliers import (
    OutlierMeta,
    OutlierWeightMeta,
    channel_permutation,
    outlier_count,
    outlier_fraction,
    outlier_mask,
    outlier_split,
    outlier_weight,
    set_outlier_ratio,
)

from jdq.quant.smoothing import CenterMeta, center_tokens  # noqa: E402

# The one reader of a plan (lowering and the cost model use it).
from jdq.quant.reader import OperandPlan, Outliers, describe, describe_transform  # noqa: E402

from jdq.quant.search import (  # noqa: E402
    SearchResult,
    denoising_loss,
    interval_candidates,
    output_gradient,
    search_scales,
    similarity,
)
from jdq.quant.evolution import EvolutionResult, evolution_search, mean_at_least  # noqa: E402

# The functions ``allocate`` and ``gptq`` shadow their submodules on purpose.
from jdq.quant.allocate import Allocation, InfeasibleAllocation, allocate, allocate_bits  # noqa: E402
from jdq.quant.gptq import GPTQResult, gptq  # noqa: E402
