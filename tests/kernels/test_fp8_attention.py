"""FP8 E4M3 flash attention: the reference is the w8a8-fp8attn fake-quant attention (within a derived
bound), the Mosaic GPU kernel in interpret mode is the reference, the real kernel lowers to Mosaic GPU
at the DiT-XL/2 and PixArt-Σ shapes, lowered plans route attention to it, and its error against float32
attention is the FP8 one (larger than bf16's, as large as the fake-quant's)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_testutil import lowers_to_mosaic_gpu, relerr

from jdq import recipes
from jdq.kernels import fp8_attention, lower
from jdq.kernels.fp8_attention import ref
from jdq.kernels.fp8_attention.gpu import Config, fp8_attention_gpu
from jdq.models.layers import attention
from jdq.quant import trace_operands

SITE = "blocks.0.attn"


def _qkv(key, b=1, l=128, h=2, d=72, offset=2.0, dtype=jnp.float32):
    k1, k2, k3, k4 = jax.random.split(jax.random.key(key), 4)
    q = jax.random.normal(k1, (b, l, h, d)) * 1.5
    k = jax.random.normal(k2, (b, l, h, d)) * 1.5 + offset * jax.random.normal(k4, (1, 1, h, d))  # shared key offset
    v = jax.random.normal(k3, (b, l, h, d))
    return tuple(x.astype(dtype) for x in (q, k, v))


def _attn(q, k, v, quant):
    return attention(q, k, v, site=SITE, quant=quant)


def _fake_quant(q, k, v):
    """The w8a8-fp8attn plan's fake-quant attention (the explicit XLA path of ``jdq.models.layers.attention``)."""
    plan = recipes.plan_for("w8a8-fp8attn", trace_operands(_attn, q, k, v))
    return _attn(q, k, v, plan.bind(plan.init())), plan


def _grid_bound(q, k, v, slack=0.01):
    """Bound on |a − b| for two FP8 attentions that quantize the same probabilities on E4M3 grids.

    Both quantize ``p_j`` (exact: softmax of the dequantized q·k̂ᵀ) to E4M3 relative to some maximum
    ≥ it — the plan per query row of the normalized p, the kernel per key block with the running
    maximum, rescaled after — so each is within half an E4M3 step of ``p_j``: ``2⁻⁴·p_j`` (3
    mantissa bits) in the normal range, ``2⁻¹⁰`` code units (``2⁻¹⁰ / (448·l)`` in p, with the
    maximum at most the row's) below it. Two of them differ by twice that; with the same v̂:
    ``|Δout_ic| ≤ Σ_j (2⁻³·p_ij + 2⁻⁹/(448·l_i)) |v̂_jc|``. ``slack`` (1 %) covers float32 rounding of
    the logits, exponentials and sums (relative errors ~1e-6, approximate exp2 on a GPU ~1e-6).
    """
    f64 = lambda x: np.asarray(x, np.float64)  # noqa: E731
    qc, qs, kc, ks, vtc, vs = ref.quantize_operands(q, k, v)
    d = q.shape[-1]
    qh = f64(qc.astype(jnp.float32)) * f64(qs)[..., None]
    kh = f64(kc.astype(jnp.float32)) * f64(ks)[..., None]
    vh = np.swapaxes(f64(vtc.astype(jnp.float32)) * f64(vs)[..., None], 1, 2)  # (BH, Lk, Dp)
    s = np.einsum("bqd,bkd->bqk", qh, kh) / math.sqrt(d)
    e = np.exp(s - s.max(-1, keepdims=True))
    lsum = e.sum(-1, keepdims=True)
    p = e / lsum
    w = (2.0**-3 * p + 2.0**-9 / (448.0 * lsum)) * (1 + slack)
    bound = np.einsum("bqk,bkd->bqd", w, np.abs(vh)) + slack * 1e-3 * np.einsum("bqk,bkd->bqd", p, np.abs(vh))
    b, _, h, _ = q.shape
    return np.asarray(ref.unpack_output(jnp.asarray(bound), b, h, d))


def _assert_within(got, want, bound):
    diff = np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))
    excess = diff - bound
    assert np.max(excess) <= 0, f"{int(np.sum(excess > 0))} elements exceed the E4M3 grid bound (worst {np.max(excess):.3g})"


def _operands_via_formats(q, k, v, dp):
    """The kernel's operands built from :func:`quantize_rows` (``jdq.formats``' cast) on the heads-first layout."""
    from jdq.kernels.token_quant.ref import quantize_rows

    hf = ref._heads_first
    qc, qs = quantize_rows(hf(q, dp), "fp8_e4m3")
    kc, ks = quantize_rows(hf(ref.center_keys(k), dp), "fp8_e4m3")
    vtc, vs = quantize_rows(jnp.swapaxes(hf(v, dp), 1, 2), "fp8_e4m3")
    return qc, qs, kc, ks, vtc, vs


@pytest.mark.parametrize("dtype,d_pad", [(jnp.float32, None), (jnp.bfloat16, 128)])
def test_operand_codes_are_the_formats_casts(dtype, d_pad):
    """``quantize_operands`` (hardware E4M3 conversion, quantized before the layout change) gives the codes and
    scales of ``jdq.formats``' casts bit for bit — subnormal codes, a zero head row and a zero channel included."""
    q, k, v = _qkv(7, b=2, l=64, dtype=dtype)
    q = q.at[0, 3, 1].set(0.0).at[1, 5, 0, :8].multiply(1e-5)  # a zero token row; tiny values -> subnormal codes
    v = v.at[1, :, 0, 7].set(0.0)  # a zero channel: scale clamps to 2^-126
    got = ref.quantize_operands(q, k, v, d_pad)
    want = _operands_via_formats(q, k, v, d_pad or 96)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_array_equal(np.asarray(g.astype(jnp.float32)), np.asarray(w.astype(jnp.float32)))


@pytest.mark.parametrize("block_kv", [64, 128])
def test_reference_equals_the_fake_quant_plan(block_kv):
    """One key block (block_kv = L): the same grids; two blocks: the first block may sit on a lower maximum's grid."""
    q, k, v = _qkv(0)
    fake, plan = _fake_quant(q, k, v)
    assert set(plan.quantized_keys) == {f"{SITE}.qk:q", f"{SITE}.qk:k", f"{SITE}.pv:attn_prob", f"{SITE}.pv:v"}
    got = ref.fp8_attention_ref(q, k, v, block_kv=block_kv)
    _assert_within(got, fake, _grid_bound(q, k, v))
    exact = _attn(q, k, v, None)
    # the grids agree on all but a few elements: far closer to each other than either is to float32 attention
    assert relerr(got, fake) < 0.25 * relerr(fake, exact), (relerr(got, fake), relerr(fake, exact))
    if block_kv == q.shape[1]:  # every row's running maximum is its final one: the same codes up to float ties
        assert relerr(got, fake) < 0.01 * relerr(fake, exact), (relerr(got, fake), relerr(fake, exact))


@pytest.mark.parametrize("cfg,d_pad", [(Config(64, 64, 2), None), (Config(128, 64, 1), 128),
                                       (Config(64, 64, 1, kind="ws"), None), (Config(64, 64, 2, kind="sw"), None)])
def test_gpu_kernel_interpret_equals_reference(cfg, d_pad):
    """pipe: 2 query blocks of 64 (or one of 128, D padded to 128); ws: 2 warpgroups of 64 rows, one key buffer
    refilled; sw: the next block's q·kᵀ issued before this block's softmax (the interpreter checks the barrier
    protocols: every phase arrived on and waited for)."""
    q, k, v = _qkv(1, h=1)
    ops = ref.quantize_operands(q, k, v, d_pad)
    scale = 1 / math.sqrt(q.shape[-1])
    want = ref.attention_from_codes(*ops, scale, cfg.block_kv, jnp.float32)
    got = fp8_attention_gpu(*ops, scale=scale, out_dtype=jnp.float32, config=cfg, interpret=True)
    assert got.shape == want.shape == (1, 128, d_pad or 96)
    assert not bool(jnp.any(got[..., 72:]))  # padded head columns stay zero
    b, _, h, d = q.shape
    got4, want4 = ref.unpack_output(got, b, h, d), ref.unpack_output(want, b, h, d)
    _assert_within(got4, want4, _grid_bound(q, k, v))  # same order of operations: codes differ at most on ties
    assert relerr(got4, want4) < 0.02 * relerr(want4, _attn(q, k, v, None))


def test_api_pads_queries_and_falls_back_where_keys_do_not_tile():
    q, k, v = _qkv(2, l=64, h=1, dtype=jnp.bfloat16)
    q = q[:, :40]  # Lq = 40: padded to one 64-row block, the extra rows dropped
    cfg = Config(64, 64, 2)
    got = fp8_attention(q, k, v, impl="gpu_interpret", config=cfg)
    want = fp8_attention(q, k, v, impl="xla", config=cfg)
    assert got.shape == q.shape and got.dtype == jnp.bfloat16
    assert relerr(got, want) < 0.02
    k2, v2 = k[:, :50], v[:, :50]  # Lk = 50 does not tile: the XLA reference runs
    np.testing.assert_array_equal(np.asarray(fp8_attention(q, k2, v2, impl="gpu_interpret", config=cfg)),
                                  np.asarray(fp8_attention(q, k2, v2, impl="xla", config=cfg)))


def test_direct_output_layout():
    """``direct_out``: the kernel stores each head's 72 real columns into (B, Lq, H·D); no unpacking pass."""
    q, k, v = _qkv(2, b=2, l=64, h=1, dtype=jnp.bfloat16)
    cfg = Config(64, 64, 1, direct_out=True)
    got = fp8_attention(q, k, v, impl="gpu_interpret", config=cfg)
    want = fp8_attention(q, k, v, impl="xla", config=cfg)
    assert got.shape == q.shape and relerr(got, want) < 0.02


def test_error_against_float32_is_the_fp8_error():
    """FP8 attention loses more than bf16 attention and about as much as the plan's fake-quant attention;
    with the keys' shared offset centred away the error does not grow with the offset."""
    errs = {}
    for offset in (0.0, 6.0):
        q, k, v = _qkv(3, offset=offset)
        exact = _attn(q, k, v, None)
        errs[offset] = relerr(ref.fp8_attention_ref(q, k, v), exact)
        fake, _ = _fake_quant(q, k, v)
        bf16 = relerr(_attn(*(x.astype(jnp.bfloat16) for x in (q, k, v)), None), exact)
        assert bf16 < errs[offset] < 0.15, (bf16, errs[offset])
        assert 0.5 < errs[offset] / relerr(fake, exact) < 2.0
    assert errs[6.0] < 1.5 * errs[0.0], errs


def _bench_shapes():
    return {"dit_b64": (64 * 16, 256, 96), "pixart_1024": (2 * 16, 4096, 96)}


@pytest.mark.parametrize("name,cfg", [("dit_b64", None), ("pixart_1024", None),
                                      ("dit_b64", Config(64, 64, 2, acc_in_place=True)),
                                      ("dit_b64", Config(64, 64, 2, kind="ws")),
                                      ("pixart_1024", Config(64, 128, 3, acc_in_place=True, kind="ws")),
                                      ("dit_b64", Config(64, 64, 2, direct_out=True)),
                                      ("pixart_1024", Config(64, 128, 2, True, kind="ws", direct_out=True)),
                                      ("dit_b64", Config(64, 64, 2, True, kind="sw", direct_out=True)),
                                      ("pixart_1024", Config(64, 128, 3, True, kind="sw"))])
def test_gpu_kernel_lowers_to_mosaic_gpu(name, cfg):
    """The tuned config (None) and the in-place-accumulator, warp-specialised, software-pipelined and direct-output
    variants lower for CUDA."""
    from jdq.kernels.fp8_attention.api import _config

    bh, l, dp = _bench_shapes()[name]
    f8, f32 = jnp.float8_e4m3fn, jnp.float32
    cfg = cfg or _config(l)
    f = functools.partial(fp8_attention_gpu, scale=1 / math.sqrt(72), config=cfg, heads=16 if cfg.direct_out else None,
                          d=72 if cfg.direct_out else None)
    assert lowers_to_mosaic_gpu(f, ((bh, l, dp), f8), ((bh, l), f32), ((bh, l, dp), f8), ((bh, l), f32),
                                ((bh, dp, l), f8), ((bh, dp), f32))


def test_wrapper_lowers_with_the_kernel():
    """The whole op (XLA quantization, the kernel, the unpacking) at DiT-XL/2's shape, b8, lowers for CUDA."""
    f = functools.partial(fp8_attention, impl="gpu")
    assert lowers_to_mosaic_gpu(f, *[((8, 256, 16, 72), jnp.bfloat16)] * 3)


def test_lowered_plan_routes_attention_to_the_kernel():
    q, k, v = _qkv(4, l=64, h=1, dtype=jnp.bfloat16)
    fake, plan = _fake_quant(q, k, v)
    low = lower(plan, {})
    assert low.lowered_attention(SITE) and "fp8_attention" in low.report()
    got = _attn(q, k, v, low.with_impl("xla"))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(fp8_attention(q, k, v, impl="xla")))
    got_k = _attn(q, k, v, low.with_impl("gpu_interpret"))
    assert relerr(got_k, got) < 0.02 and relerr(got, fake) < 0.05
    low_off = lower(plan, {}, attention=False)
    assert not low_off.lowered_attention(SITE)


def test_other_attention_casts_are_declined():
    from jdq.quant import cast, keep_float, resolve, rule

    q, k, v = _qkv(5, l=64)
    e4m3 = cast("fp8_e4m3", granularity="row")
    rules = [rule("*.qk", e4m3, roles=("q", "k")), rule("*.pv", e4m3, roles=("attn_prob", "v")), keep_float("*")]
    plan = resolve(rules, trace_operands(_attn, q, k, v))  # k not centred
    low = lower(plan, {})
    assert not low.lowered_attention(SITE)
    assert "qk:k transform has stages ('cast',)" in low.declined[SITE]


def test_bad_inputs_raise():
    q, k, v = _qkv(6, l=64)
    ops = ref.quantize_operands(q, k, v)
    with pytest.raises(ValueError, match="do not fit"):
        fp8_attention_gpu(*ops, scale=0.1, config=Config(block_q=32), interpret=True)
    with pytest.raises(ValueError, match="direct_out needs heads"):
        fp8_attention_gpu(*ops, scale=0.1, config=Config(direct_out=True), interpret=True)
    with pytest.raises(ValueError, match="do not fit"):  # sw needs two key buffers
        fp8_attention_gpu(*ops, scale=0.1, config=Config(64, 64, 1, kind="sw"), interpret=True)
    with pytest.raises(ValueError, match="do not fit"):  # ws needs Lq a multiple of 2·block_q
        fp8_attention_gpu(*ops, scale=0.1, config=Config(64, 64, kind="ws"), interpret=True)
    with pytest.raises(ValueError, match="shapes"):
        ref.attention_from_codes(ops[0], ops[1], ops[2][:, :32], *ops[3:], 0.1)
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        ref.attention_from_codes(ops[0].astype(jnp.bfloat16), *ops[1:], 0.1)
    with pytest.raises(ValueError, match="multiple of 32"):
        ref.quantize_operands(q, k, v, d_pad=80)
    with pytest.raises(ValueError, match=r"\(B, L, H, D\)"):
        ref.quantize_operands(q[0], k, v)


def test_benchmark_configs_and_render(load_benchmark):
    fb = load_benchmark("fp8_attention")
    assert fb.parse_config("128x64s3") == Config(128, 64, 3)
    assert fb.parse_config("ws64x128s3i") == Config(64, 128, 3, acc_in_place=True, kind="ws")
    assert fb.config_name(Config(64, 128, 3, acc_in_place=True, kind="ws")) == "ws64x128s3i"
    assert fb.parse_config("64x64s2o") == Config(64, 64, 2, direct_out=True)
    assert fb.config_name(fb.parse_config("sw64x128s3io")) == "sw64x128s3io"
    with pytest.raises(SystemExit, match="cannot parse"):
        fb.parse_config("128x64")
    res = {"jax": "x", "device": "d", "checks": {"a@64x64s2": {"ok": True, "relerr_vs_ref": 1e-7}},
           "rows": {"dit.b64": {"gflop": 19.3, "us": {"cudnn_bf16": 100.0, "xla_bf16": 200.0, "jdq_fp8": 50.0},
                                "errors": {"jdq_fp8_kernel@32x64s2": "ValueError: do not fit"}}}}
    md = fb.render(res)
    assert "| dit.b64 | jdq_fp8 | 50.0 | 386 | 2.00 | 4.00 |" in md and "failed: ValueError" in md


@pytest.mark.slow
def test_benchmark_tiny_run_survives_a_failing_config(load_benchmark, tmp_path):
    """The --tiny CPU run checks and times the kernel (interpret mode); a config the kernel rejects is reported, not fatal."""
    import json

    fb = load_benchmark("fp8_attention")
    assert fb.main(["--tiny", "--out", str(tmp_path), "--configs", "32x64s2,64x64s2"]) == 0
    res = json.loads((tmp_path / "fp8_attention.json").read_text())
    assert res["checks"]["tiny@64x64s2"]["ok"] and "error" in res["checks"]["tiny@32x64s2"]
    assert "jdq_fp8_kernel@64x64s2" in res["rows"]["tiny"]["us"]
    assert "failed its check" in res["rows"]["tiny"]["errors"]["jdq_fp8_kernel@32x64s2"]


@pytest.mark.slow
def test_lowered_dit_runs_fp8_attention_and_matches_the_fake_quant_model():
    """A w8a8-fp8attn DiT lowered with ``jdq.kernels.lower``: the attention site runs the FP8 op (its report says so)
    and the model's output is the fake-quant model's, far closer to it than either is to the float model."""
    from jdq.models import dit

    cfg = dit.Config(input_size=8, patch_size=2, hidden_size=144, depth=1, num_heads=2, num_classes=10)  # D = 72
    model = dit.from_config(cfg, key=0)
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
    t, y = jnp.array([10.0, 500.0]), jnp.array([3, 10])
    fn = lambda *a, quant: model.apply(model.params, *a, quant=quant)  # noqa: E731
    plan = recipes.plan_for("w8a8-fp8attn", trace_operands(fn, x, t, y))
    low = lower(plan, model.params, impl="xla")
    assert low.attention == {"blocks.0.attn"} and "blocks.0.attn: fp8_attention" in low.report()
    fake, got, exact = fn(x, t, y, quant=plan.bind(plan.init())), fn(x, t, y, quant=low), fn(x, t, y, quant=None)
    assert relerr(got, fake) < 0.1 * relerr(fake, exact), (relerr(got, fake), relerr(fake, exact))
