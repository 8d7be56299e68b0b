"""jdq.kernels.lower: packing, routing through qlinear, and lowered DiT == fake-quant DiT."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdq.models import dit
from jdq.quant import keep_float, resolve, rule, trace_operands
from jdq.quant.casts import cast
from jdq.kernels.lower import LoweredQuantizer, lower, lowerable_kind, weight_bytes

LINEARS = "re:blocks\\.\\d+\\.(attn\\.(qkv|proj)|mlp\\.fc[12])"


@pytest.fixture(scope="module")
def small_dit():
    cfg = dit.Config(input_size=8, patch_size=2, hidden_size=128, depth=1, num_heads=2, num_classes=10)
    model = dit.from_config(cfg, key=0)
    k1, k2 = jax.random.split(jax.random.key(1))
    x = jax.random.normal(k1, (2, 8, 8, 4))
    t = jnp.array([10.0, 500.0])
    y = jnp.array([3, 10])
    return model, (x, t, y)


def _plan(model, inputs, weight_rule, act_rule=None):
    ops = trace_operands(lambda *a, quant: model.apply(model.params, *a, quant=quant), *inputs)
    rules = [rule(LINEARS, weight_rule, roles=("weight",))]
    if act_rule is not None:
        rules.append(rule(LINEARS, act_rule, roles=("act", "post_gelu")))
    rules.append(keep_float("*"))
    return resolve(rules, ops)


W8A8_RULES = (cast("int8", granularity="row"), cast("int8", granularity="row"))


def test_lowerable_kinds(small_dit):
    model, inputs = small_dit
    plan = _plan(model, inputs, *W8A8_RULES)
    assert lowerable_kind(plan, "blocks.0.mlp.fc2")[0] == "w8a8"
    assert lowerable_kind(plan, "blocks.0.adaLN_modulation")[0] is None
    plan4 = _plan(model, inputs, cast("int4", granularity="group", group_size=128))
    assert lowerable_kind(plan4, "blocks.0.attn.qkv")[0] == "w4a16"
    plan_mx = _plan(model, inputs, cast("mxfp4_e2m1"), cast("mxfp4_e2m1"))
    assert lowerable_kind(plan_mx, "blocks.0.attn.qkv")[0] is None  # no MXFP4 kernel: fake-quant
    plan_away = _plan(model, inputs, cast("int8", granularity="row"), cast("int8", granularity="row", rounding="away"))
    assert lowerable_kind(plan_away, "blocks.0.attn.proj")[0] is None


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["xla", "gpu_interpret"])
def test_lowered_dit_equals_fake_quant_w8a8(small_dit, impl):
    model, inputs = small_dit
    plan = _plan(model, inputs, *W8A8_RULES)
    fake_q = plan.bind(plan.init())
    low_q = lower(plan, model.params, impl=impl)
    assert isinstance(low_q, LoweredQuantizer) and len(low_q.weights) == 4
    assert low_q.lowered("blocks.0.mlp.fc1").codes.shape == (512, 128)  # (N, K) K-major int8
    calls = []
    import jdq.kernels.lowered as kl

    orig = kl.lowered_linear

    def spy(*a, **kw):
        calls.append(kw["site"])
        return orig(*a, **kw)

    import jdq.kernels

    jdq.kernels.lowered_linear, saved = spy, jdq.kernels.lowered_linear
    try:
        got = model.apply(model.params, *inputs, quant=low_q)
    finally:
        jdq.kernels.lowered_linear = saved
    assert sorted(calls) == sorted(low_q.weights)
    want = model.apply(model.params, *inputs, quant=fake_q)
    plain = model.apply(model.params, *inputs)
    err = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
    quant_err = float(jnp.linalg.norm(plain - want) / jnp.linalg.norm(want))
    assert err < 1e-5, err  # float rounding only
    assert quant_err > 100 * err  # ...far below the quantization error itself


def test_mlp_activation_is_fused_into_the_fc1_kernel(small_dit, monkeypatch):
    """The DiT MLP's GELU reaches the W8A8 kernel's epilogue at fc1 (only there), and qlinear
    rejects an unknown activation by name."""
    import jdq.kernels.w8a8.gpu as gpu
    from jdq.models.layers import qlinear

    model, inputs = small_dit
    plan = _plan(model, inputs, *W8A8_RULES)
    low_q = lower(plan, model.params, impl="gpu_interpret")
    seen = []
    orig = gpu.w8a8_matmul_gpu

    def spy(*a, **kw):
        seen.append((a[2].shape, kw.get("activation")))
        return orig(*a, **kw)

    monkeypatch.setattr(gpu, "w8a8_matmul_gpu", spy)
    model.apply(model.params, *inputs, quant=low_q)
    assert sorted(seen, key=str) == sorted([((384, 128), None), ((128, 128), None), ((512, 128), "gelu_tanh"),
                                           ((128, 512), None)], key=str)
    with pytest.raises(ValueError, match="qlinear at 'x': unknown activation 'relu6'"):
        qlinear(jnp.ones((2, 4)), jnp.ones((4, 3)), site="x", activation="relu6")


def test_lowered_dit_weight_only_and_jit(small_dit):
    model, inputs = small_dit
    plan = _plan(model, inputs, cast("int4", granularity="group", group_size=128))
    low_q = lower(plan, model.params, impl="xla")
    assert {w.kind for w in low_q.weights.values()} == {"w4a16"}
    want = model.apply(model.params, *inputs, quant=plan.bind(plan.init()))
    got = jax.jit(lambda p, q, *a: model.apply(p, *a, quant=q))(model.params, low_q, *inputs)
    assert float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)) < 1e-5
    sizes = weight_bytes(model.params, low_q)
    bf16 = weight_bytes(model.params)
    assert sizes["lowered_sites"] == 4 and sizes["bytes"] < bf16["bytes"]


def test_lower_rejects_mismatched_weight(small_dit):
    model, inputs = small_dit
    plan = _plan(model, inputs, *W8A8_RULES)
    with pytest.raises(KeyError, match="no weight"):
        lower(plan, {"blocks": {}})
    with pytest.raises(ValueError, match="impl"):
        lower(plan, model.params, impl="cuda")


@pytest.fixture(scope="module")
def mixdit_plan(small_dit):
    model, inputs = small_dit
    plan, state = _mixdit_plan_and_state(model, inputs)
    return plan, state, model.apply(model.params, *inputs, quant=plan.bind(state))


@pytest.fixture(scope="module")
def float_out(small_dit):
    model, inputs = small_dit
    return model.apply(model.params, *inputs)


def _mixdit_plan_and_state(model, inputs):
    from jdq.quant import collect_stats, stack_stats
    from jdq.quant.balance import link_stats
    from jdq.quant.outliers import outlier_split, outlier_weight

    plan = _plan(model, inputs, outlier_weight(cast("mx6"), 0.05, channel_multiple=16),
                 outlier_split(0.05, hi="mx9", lo="mx6", granularity="channel"))
    _, stats = collect_stats(lambda *a, quant: model.apply(model.params, *a, quant=quant), *inputs)
    return plan, plan.init(link_stats(stack_stats([stats])))


NEW_KINDS = {
    "fp8": (cast("fp8_e4m3"), cast("fp8_e4m3")),
    "w4a8": (cast("int4", granularity="group", group_size=64), cast("int8", granularity="row")),
    "mxfp8": (cast("mxfp8_e4m3"), cast("mxfp8_e4m3")),
    "mxint8": (cast("mxint8"), cast("mxint8")),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind,impl", [("fp8", "xla"), ("w4a8", "gpu_interpret"), ("mxfp8", "xla"),
                                       ("mxint8", "xla"), ("mixdit", "xla"), ("mixdit", "gpu_interpret")])
def test_lowered_dit_equals_fake_quant_new_kinds(small_dit, mixdit_plan, float_out, kind, impl):
    model, inputs = small_dit
    if kind == "mixdit":
        plan, state, want = mixdit_plan
    else:
        plan, state = _plan(model, inputs, *NEW_KINDS[kind]), None
        want = model.apply(model.params, *inputs, quant=plan.bind(plan.init()))
    assert lowerable_kind(plan, "blocks.0.mlp.fc2")[0] == kind
    low_q = lower(plan, model.params, state, impl=impl)
    assert {w.kind for w in low_q.weights.values()} == {kind} and len(low_q.weights) == 4, low_q.skipped
    got = model.apply(model.params, *inputs, quant=low_q)
    err = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
    assert err < 1e-5, err  # float rounding only
    assert float(jnp.linalg.norm(float_out - want) / jnp.linalg.norm(want)) > 100 * err


TPU_KERNELS = {"w8a8": ("w8a8", "w8a8_matmul_tpu"), "fp8": ("w8a8", "w8a8_matmul_tpu"),
               "w4a8": ("w4a8", "w4a8_matmul_tpu"), "w8a16": ("weight_only", "weight_only_matmul_tpu"),
               "w4a16": ("weight_only", "weight_only_matmul_tpu"), "mxfp8": ("mx", "mx_matmul_tpu"),
               "mxint8": ("mx", "mx_matmul_tpu"), "mixdit": ("mixdit", "mixdit_matmul_tpu")}


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(TPU_KERNELS))
def test_lowered_dit_on_tpu_kernels(small_dit, mixdit_plan, kind, monkeypatch):
    """impl="tpu_interpret": every lowered site runs its kind's Pallas TPU kernel (interpret mode),
    and the DiT equals the fake-quant DiT up to float rounding."""
    import importlib

    model, inputs = small_dit
    if kind == "mixdit":
        plan, state, want = mixdit_plan
    else:
        casts = {"w8a8": W8A8_RULES, "w8a16": (cast("int8", granularity="row"),),
                 "w4a16": (cast("int4", granularity="group", group_size=128),)}.get(kind) or NEW_KINDS[kind]
        plan, state = _plan(model, inputs, *casts), None
        want = model.apply(model.params, *inputs, quant=plan.bind(plan.init()))
    module = importlib.import_module(f"jdq.kernels.{TPU_KERNELS[kind][0]}.tpu")
    calls = []
    orig = getattr(module, TPU_KERNELS[kind][1])
    monkeypatch.setattr(module, TPU_KERNELS[kind][1], lambda *a, **kw: calls.append(kw) or orig(*a, **kw))
    low_q = lower(plan, model.params, state, impl="tpu_interpret")
    assert {w.kind for w in low_q.weights.values()} == {kind} and len(low_q.weights) == 4, low_q.skipped
    got = model.apply(model.params, *inputs, quant=low_q)
    assert len(calls) == 4 and all(c["interpret"] for c in calls)
    err = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
    assert err < 1e-5, err


def test_tpu_tiles_divide_the_gemm():
    """TPU tiles shrink to divisors of N and K (DiT-XL/2: K = 1152 -> 384) honouring int4 / MX / group rules."""
    from jdq.kernels.op import tpu_tiles as _tpu_tiles

    assert _tpu_tiles(16384, 3456, 1152) == dict(tm=256, tn=128, tk=384)
    assert _tpu_tiles(8192, 1152, 4608) == dict(tm=256, tn=128, tk=512)
    assert _tpu_tiles(64, 4608, 1152, k_multiple=256, group=128)["tk"] == 1152  # no multiple of 256 divides 1152
    assert _tpu_tiles(64, 4608, 4608, k_multiple=256, group=128) == dict(tm=64, tn=256, tk=512)
    assert _tpu_tiles(64, 1152, 1152, group=256)["tk"] == 128  # 384 does not fit the group of 256; 256 does not divide 1152
    assert _tpu_tiles(64, 1152, 96, k_multiple=32)["tk"] == 96


def test_unsupported_variants_stay_fake_quant(small_dit):
    model, inputs = small_dit
    plan = _plan(model, inputs, cast("int4", granularity="group", group_size=32), cast("int8", granularity="row"))
    kind, why = lowerable_kind(plan, "blocks.0.attn.qkv")
    assert kind is None and "group size 32" in why
    plan = _plan(model, inputs, cast("mxfp8_e4m3"), cast("mxint8"))
    assert lowerable_kind(plan, "blocks.0.attn.qkv")[0] is None
    plan = _plan(model, inputs, cast("fp8_e4m3"), cast("int8", granularity="row"))
    assert "E4M3 per-token" in lowerable_kind(plan, "blocks.0.attn.qkv")[1]


@pytest.mark.slow
def test_w8a8_lowered_forward_cross_lowers_to_mosaic_gpu():
    """The lowered model with the GPU kernels (LayerNorm + modulation + quantization for qkv / fc1,
    token quantization for proj / fc2, warp-specialised W8A8 with split q/k/v outputs and fused gated
    residuals) lowers for CUDA, and each distinct kernel is lowered once however many sites call it."""
    cfg = dit.Config(input_size=32, patch_size=2, hidden_size=1152, depth=2, num_heads=16, num_classes=10,
                     dtype="bfloat16")
    model = dit.from_config(cfg, key=0)
    abstract = jax.eval_shape(lambda: model.params)
    x = jnp.zeros((64, 32, 32, 4), jnp.bfloat16)
    t = jnp.zeros((64,))
    y = jnp.zeros((64,), jnp.int32)
    plan = _plan(model, (x[:2], t[:2], y[:2]), *W8A8_RULES)
    params = jax.tree.map(lambda a: jnp.ones(a.shape, a.dtype), abstract)
    low_q = lower(plan, params, impl="gpu", check=False)
    fwd = jax.jit(lambda p, q, *a: model.apply(p, *a, quant=q))
    text = fwd.trace(params, low_q, x, t, y).lower(lowering_platforms=("cuda",)).as_text()
    assert len(re.findall(r"call @w8a8_matmul_gpu\w*\(", text)) == 8  # 2 blocks x (qkv, proj, fc1, fc2)
    assert len(re.findall(r"call @quantize_rows_gpu\w*\(", text)) == 4  # proj, fc2
    assert len(re.findall(r"call @norm_quantize_rows_gpu\w*\(", text)) == 4  # qkv, fc1
    # 4 GEMMs (qkv split, proj + residual, fc1 + GELU, fc2 + residual) + token quantization at K = 1152 and
    # 4608 + one LayerNorm-quantization shape
    assert len(re.findall(r"stablehlo\.custom_call @mosaic_gpu", text)) == 4 + 2 + 1


@pytest.fixture(scope="module")
def dit64():
    """A one-block DiT with 64 tokens per image: the fused W8A8 epilogue (split, residual) tiles it."""
    cfg = dit.Config(input_size=16, patch_size=2, hidden_size=128, depth=1, num_heads=2, num_classes=10)
    model = dit.from_config(cfg, key=3)
    k1, k2 = jax.random.split(jax.random.key(4))
    return model, (jax.random.normal(k1, (2, 16, 16, 4)), jnp.array([10.0, 500.0]), jnp.array([3, 10]))


def _spy_w8a8(monkeypatch):
    """Record the fused extras each W8A8 GPU kernel call receives."""
    import jdq.kernels.w8a8.gpu as gpu

    calls, orig = [], gpu.w8a8_matmul_gpu

    def spy(*a, **kw):
        calls.append(("split" if kw.get("split", 1) > 1 else "") + ("residual" if kw.get("residual") is not None else ""))
        return orig(*a, **kw)

    monkeypatch.setattr(gpu, "w8a8_matmul_gpu", spy)
    return calls


@pytest.mark.parametrize("impl", ["xla", pytest.param("gpu_interpret", marks=pytest.mark.slow)])
def test_fused_block_ops_equal_fake_quant(dit64, impl, monkeypatch):
    """With norm / residual / split handed to lowered_linear (the norm_quant kernel, the split and
    gated-residual epilogues on the GPU path), the lowered DiT still equals its fake-quant DiT."""
    import jdq.kernels.norm_quant.gpu as nq

    model, inputs = dit64
    plan = _plan(model, inputs, *W8A8_RULES)
    calls = _spy_w8a8(monkeypatch)
    norm_calls = []
    orig_nq = nq.norm_quantize_rows_gpu
    monkeypatch.setattr(nq, "norm_quantize_rows_gpu", lambda *a, **kw: norm_calls.append(1) or orig_nq(*a, **kw))
    got = model.apply(model.params, *inputs, quant=lower(plan, model.params, impl=impl))
    want = model.apply(model.params, *inputs, quant=plan.bind(plan.init()))
    if impl == "gpu_interpret":
        assert sorted(calls) == ["", "residual", "residual", "split"] and len(norm_calls) == 2  # fc1; proj, fc2; qkv
    # float32: the same arithmetic up to summation order (a code at a rounding tie may move one step)
    assert float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)) < 1e-5


def test_unfused_block_ops_match_fused(dit64, monkeypatch):
    """JDQ_FUSED_BLOCK=0 computes norm, residual and the q/k/v split as separate ops: the same model."""
    from jdq.models.layers import FUSED_BLOCK_ENV

    model, inputs = dit64
    plan = _plan(model, inputs, *W8A8_RULES)
    low_q = lower(plan, model.params, impl="xla")
    fused = model.apply(model.params, *inputs, quant=low_q)
    plain = model.apply(model.params, *inputs)
    monkeypatch.setenv(FUSED_BLOCK_ENV, "0")
    np.testing.assert_allclose(np.asarray(model.apply(model.params, *inputs, quant=low_q)), np.asarray(fused), rtol=0,
                               atol=1e-5 * float(jnp.abs(fused).max()))
    # unquantized, both settings emit the same ops in the same order (norm, matmul, bias, residual, split)
    np.testing.assert_array_equal(np.asarray(model.apply(model.params, *inputs)), np.asarray(plain))
    monkeypatch.setenv(FUSED_BLOCK_ENV, "2")
    with pytest.raises(ValueError, match="use 0 or 1"):
        model.apply(model.params, *inputs)
