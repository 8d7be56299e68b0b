"""TQ-DiT (arXiv 2502.04056; zerohye/TQ-DiT): multi-region and time-grouped quantizers, Hessian-guided intervals.

``tq-dit`` (options, the paper's defaults and their source):

* ``wbits`` / ``abits`` = 8 / 8 (the paper's settings are W8A8 and W6A6; ``example/test_all.py``
  ``[(8,8),(6,6)]``): symmetric integers;
* weights: one static symmetric interval per tensor, the fused ``qkv`` weight three (q, k and v
  separately: ``n_V = 3`` of ``qlinear_qkv`` in ``configs/TQ-DiT.py``);
* activations of the linear layers, q, k and v: one static symmetric interval per tensor
  (``n_a = 1``), initialised at ``max|x| / Q`` over the calibration set;
* post-GELU (the input of ``fc2``): MRQ two-sided quantizer (:func:`jdq.quant.post_gelu_two_sided`,
  ``PostGeluPTQSLBatchingQuantLinear``);
* post-softmax (the attention probabilities): MRQ two-region quantizer
  (:func:`jdq.quant.softmax_two_region`, split searched over ``2^0 … 2^−19`` on the calibration
  set) with TGQ (:func:`jdq.quant.time_grouped`): one split per time group. The released code
  uses 25 groups of 10 of its 250 DDPM steps (``timegroup_num``, ``total_timestep``) and groups
  only this quantizer. A sampler of ``S`` steps gets ``min(25, S)`` groups of ``ceil(S / groups)``
  consecutive steps (``time_groups``): each group still spans about 1/25 of the trajectory, so
  the groups follow the same noise levels as the paper's (with fewer steps than 25, one group per
  step);
* interval search (``search`` = ``"hessian"``; ``"mse"``, ``"cosine"`` or ``None`` to skip): for every
  linear layer in the blocks, its weight interval(s) and input interval are searched alternately
  over ``linspace(0.01, 1.2, 100) · Δ_init`` for 3 rounds (:func:`jdq.quant.search_scales`,
  defaults of ``configs/TQ-DiT.py``), scored on the layer output at ``search_points`` calibration
  points (32, the paper's ``calib_size``). The Hessian-guided score weights the output error by
  ``g = ∂L/∂O`` with ``L`` the denoising loss against the true noise (:func:`jdq.quant.denoising_loss`;
  why not the released code's classification KL: ``docs/search-and-allocation.md``): the points
  are ``x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε`` with ``x_0`` the FP sampler's outputs for the calibration
  conditions, ``t`` and ``ε`` drawn with ``seed``. ``g`` of every layer comes from one backward pass
  (a zero perturbation added to each layer's bias). The post-GELU layer's input keeps its MRQ
  quantizer (its weight is searched); the attention matmuls keep their initial intervals (the
  released code searches them too; left out to keep calibration cheap);
* calibration: 32 samples (``calib_size``), every step (TGQ needs every group observed).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jdq import quant as Q
from jdq.quant.calibrate import CalibrationSettings
from jdq.recipes.core import ATTENTION_SITES, BLOCKS, Recipe, register

SEARCH_METRICS = ("hessian", "mse", "cosine", None)


@dataclasses.dataclass(frozen=True)
class IntervalMeta:
    """``meta`` of a static symmetric-interval integer cast (TQ-DiT's quantizer): bits, output-column parts."""

    kind: ClassVar[str] = "interval"
    bits: int
    parts: int = 1


def fake_int(x, delta, bits: int):
    """Symmetric uniform fake quantization ``clip(round(x / Δ), −Q, Q) · Δ``, ``Q = 2^(b−1) − 1`` (ties to even)."""
    q = 2 ** (bits - 1) - 1
    xf = jnp.asarray(x, jnp.float32)
    return (jnp.clip(jnp.round(xf / delta), -q, q) * delta).astype(jnp.result_type(x))


def interval_cast(bits: int, parts: int = 1) -> Q.QuantTransform:
    """A static symmetric per-tensor interval (``parts`` intervals over equal output-column blocks of a weight).

    State ``{"delta": [parts]}``, initialised at ``absmax / Q`` from the statistics (the searched
    intervals replace it in :func:`prepare`).
    """
    q = 2 ** (bits - 1) - 1

    def init(stats):
        hi = jnp.max(jnp.asarray(stats["absmax"], jnp.float32))
        return {"delta": jnp.full((parts,), jnp.maximum(hi, 1e-12) / q, jnp.float32)}

    def apply(x, state, ctx):
        delta = state["delta"]
        if parts == 1:
            return fake_int(x, delta[0], bits)
        cols = jnp.repeat(delta, x.shape[-1] // parts)  # the weight's output columns, in q, k, v order
        return fake_int(x, cols, bits)

    return Q.QuantTransform(init, apply, IntervalMeta(bits, parts))


def time_groups(num_steps: int, paper_groups: int = 25) -> Q.TimeGroups:
    """TGQ groups for a sampler of ``num_steps``: ``min(25, S)`` groups of ``ceil(S / groups)`` steps."""
    g = max(1, min(paper_groups, num_steps))
    length = math.ceil(num_steps / g)
    return Q.TimeGroups.uniform(math.ceil(num_steps / length), length)


def _rules(wbits=8, abits=8, steps=None, search="hessian", search_points=32, seed=0, groups=25):
    if steps is None:
        raise ValueError("tq-dit needs the sampler's number of steps (its time groups follow it)")
    qkv = r"re:.*\.attn\.qkv"
    return [
        Q.rule(qkv, interval_cast(wbits, parts=3), roles=("weight",), name="qkv weight: q, k, v intervals"),
        Q.rule(BLOCKS, interval_cast(wbits), roles=("weight",), name="weights: one interval"),
        Q.rule(BLOCKS, interval_cast(abits), roles=("act",), name="linear inputs: one interval"),
        Q.rule(BLOCKS, Q.post_gelu_two_sided(abits), roles=("post_gelu",), name="post-GELU: MRQ two-sided"),
        Q.rule(ATTENTION_SITES, Q.time_grouped(Q.softmax_two_region(abits), time_groups(steps, groups)),
               roles=("attn_prob",), name="post-softmax: MRQ two-region, TGQ"),
        Q.rule(ATTENTION_SITES, interval_cast(abits), roles=("q", "k", "v"), name="q, k, v: one interval"),
    ]


def _calibration(abits=8, **_):
    return CalibrationSettings(samples=32, steps="all", stats=("range", "split"), split_bits=abits)


def _bias_names(params):
    from jdq.tree import key_name

    return {".".join(key_name(k) for k in path): path for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]}


def calibration_points(model, sampler, cond, n: int, seed: int):
    """``(x_t, t, cond, ε)`` at ``n`` calibration points: ``x_0`` from the FP sampler, ``t`` and ``ε`` drawn with ``seed``."""
    from jdq.sampling.generate import generate

    n = min(n, int(np.shape(jax.tree.leaves(cond)[0])[0]))
    c = jax.tree.map(lambda a: np.asarray(a)[:n], cond)
    x0 = generate(model, c, sampler=sampler, guidance=1.0, seed=seed + 2, batch_size=n, progress=False)
    rng = np.random.default_rng(seed)
    steps = rng.integers(0, sampler.num_steps, n)
    t = np.asarray(sampler.timesteps)[steps].astype(np.float32)
    from jdq.sampling import schedules

    abar = schedules.alphas_cumprod(schedules.dit_betas(1000))  # the DiT training schedule at the model timesteps
    a = abar[np.clip(np.round(t).astype(int), 0, 999)]
    eps = rng.standard_normal(x0.shape).astype(np.float32)
    a = a.reshape(-1, *([1] * (x0.ndim - 1))).astype(np.float32)
    xt = np.sqrt(a) * x0 + np.sqrt(1 - a) * eps
    return jnp.asarray(xt), jnp.asarray(t), jax.tree.map(jnp.asarray, c), jnp.asarray(eps)


class _Capture(Q.QuantizerBase):
    def __init__(self):
        self.inputs = {}

    def __call__(self, x, site, role, axis=-1):
        if role == "act" or role == "post_gelu":
            self.inputs[site] = x
        return x


def _linear_block(bits_w, bits_a, parts, mrq_bits):
    def block(params, x, scales):
        w, b = params
        if scales is None:
            return x @ w + b
        xq = (Q.regions.two_sided_quantize(x, scales["dpos"], mrq_bits) if mrq_bits else fake_int(x, scales["a"], bits_a))
        if parts == 1:
            wq = fake_int(w, scales["w0"], bits_w)
        else:
            cols = jnp.concatenate([jnp.full((w.shape[-1] // parts,), scales[f"w{i}"]) for i in range(parts)])
            wq = fake_int(w, cols, bits_w)
        return xq @ wq + b
    return block


def prepare(plan, stats, model, *, wbits=8, abits=8, steps=None, search="hessian", search_points=32, seed=0,
            groups=25, sampler=None, cond=None):
    """Initial intervals from the statistics, then TQ-DiT's alternate interval search per linear layer."""
    from jdq.models.base import flatten_params

    if search not in SEARCH_METRICS:
        raise ValueError(f"tq-dit: search must be one of {SEARCH_METRICS}, got {search!r}")
    state = plan.init(stats)
    flat = flatten_params(model.params)
    for key in plan.quantized_keys:  # a weight's interval(s) from the weight itself (q, k, v separately)
        op = plan.operand(key)
        meta = plan.transform_for(key).meta
        if op.role == "weight" and isinstance(meta, IntervalMeta):
            w = np.asarray(flat[op.site + ".kernel"], np.float32)
            parts = np.split(np.abs(w), meta.parts, axis=-1)
            q = 2 ** (meta.bits - 1) - 1
            state[key] = {"delta": jnp.asarray([max(p.max(), 1e-12) / q for p in parts], jnp.float32)}
    if search is None or sampler is None or cond is None:
        return state, model.params
    xt, t, c, eps = calibration_points(model, sampler, cond, search_points, seed)
    from jdq.sampling.generate import Denoiser

    fn = Denoiser(model, model.family)
    cap = _Capture()
    fn(model.params, xt, t, c, quant=cap)
    inputs = {s: v for s, v in cap.inputs.items() if f"{s}:weight" in state}
    names = _bias_names(model.params)
    sites = [s for s in inputs if s + ".bias" in names]
    grads = {}
    if search == "hessian":
        def loss(deltas):
            bias_paths = {names[s + ".bias"]: s for s in sites}
            p = jax.tree_util.tree_map_with_path(
                lambda path, v: v + deltas[bias_paths[path]] if path in bias_paths else v, model.params)
            return Q.denoising_loss(fn(p, xt, t, c), eps)

        zeros = {s: jnp.zeros(inputs[s].shape[:-1] + (flat[s + ".kernel"].shape[-1],), jnp.float32) for s in sites}
        grads = jax.jit(jax.grad(loss))(zeros)
    for s in sites:
        wkey, meta_w = f"{s}:weight", plan.transform_for(f"{s}:weight").meta
        act_role = "post_gelu" if f"{s}:post_gelu" in state else "act"
        akey = f"{s}:{act_role}"
        if not isinstance(meta_w, IntervalMeta) or akey not in state:
            continue
        mrq = act_role == "post_gelu"
        init = {f"w{i}": state[wkey]["delta"][i] for i in range(meta_w.parts)}
        if mrq:
            fixed = state[akey]["delta_pos"]
        else:
            init["a"] = state[akey]["delta"][0]
        block = _linear_block(meta_w.bits, abits, meta_w.parts, abits if mrq else 0)
        params = (jnp.asarray(flat[s + ".kernel"], jnp.float32), jnp.asarray(flat[s + ".bias"], jnp.float32))
        x = inputs[s]
        if mrq:
            blk = block
            block = lambda p, xx, sc, blk=blk, fixed=fixed: blk(p, xx, None if sc is None else {**sc, "dpos": fixed})
        res = Q.search_scales(block, params, x, init, grad=grads.get(s), metric=search)
        state[wkey] = {"delta": jnp.stack([res.scales[f"w{i}"] for i in range(meta_w.parts)])}
        if not mrq:
            state[akey] = {"delta": res.scales["a"][None]}
    return state, model.params


register(Recipe("tq-dit", "TQ-DiT: per-tensor intervals (Hessian-searched), MRQ post-softmax/post-GELU, TGQ",
                _rules, calibrated=True, prepare=prepare, calibration=_calibration,
                options=dict(wbits=8, abits=8, steps=None, search="hessian", search_points=32, seed=0, groups=25)))
