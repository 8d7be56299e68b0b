"""BOS-aware cross-attention (MixDQ) on a tiny PixArt-Σ: the first text token's K/V in float, the rest quantized.

The text is built like a CLIP encoder's output: the first token is the same vector for every
prompt (CLIP's causal attention makes the BOS state prompt-independent) and carries a few
channels two orders of magnitude larger than any other token's (the massive BOS activations of
CLIP text encoders); the other tokens are N(0, 1) and differ per prompt.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdq import quant as Q
from jdq.models import pixart
from jdq.quant.bos import bos_aware_rules, bos_stats, merge_bos_stats

B, L, CAPTION = 4, 8, 48


def tiny():
    cfg = pixart.Config(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
                        cross_attention_dim=32, sample_size=8, patch_size=2, caption_channels=CAPTION,
                        use_additional_conditions=False)
    return pixart.from_config(cfg, key=0)


def inputs(outlier: float, seed=0, same_first=True):
    rng = np.random.default_rng(seed)
    text = rng.standard_normal((B, L, CAPTION)).astype(np.float32)
    if same_first:
        text[:, 0] = text[0, 0]
    text[:, 0, [5, 17, 30]] *= outlier  # the BOS outlier channels
    x = rng.standard_normal((B, 8, 8, 4)).astype(np.float32)
    return jnp.asarray(x), jnp.asarray([999.0, 700.0, 300.0, 10.0]), jnp.asarray(text)


class Tap(Q.QuantizerBase):
    """Delegates to ``inner`` (or passes through) and records the cross-attention keys and values it returns."""

    def __init__(self, inner=None):
        self.inner, self.seen = inner, {}

    def __call__(self, x, site, role, axis=-1):
        y = x if self.inner is None else self.inner(x, site, role, axis)
        if ".attn2." in site + "." and role in ("k", "v"):
            self.seen[f"{site}:{role}"] = y
        return y


def kv(model, quantizer, args):
    def run(params, *a):
        tap = Tap(quantizer)
        out = model.apply(params, *a, quant=tap)
        return out, tap.seen
    return jax.jit(run)(model.params, *args)


W8 = Q.cast("int8", granularity="row")
A8_STATIC = Q.cast("int8", granularity="tensor", static=True)  # MixDQ: per-tensor static activations
KV_SITES = r"re:transformer_blocks\.\d+\.attn2\.to_(k|v)"


def plans(model, args):
    ops = Q.trace_operands(model.apply, model.params, *args)
    tap_kv = [Q.rule(r"re:.*attn2\.(qk|pv)", Q.identity(), roles=("k", "v"))]
    naive = Q.resolve([Q.rule(KV_SITES, A8_STATIC, roles=("act",)), Q.rule(KV_SITES, W8, roles=("weight",))]
                      + tap_kv + [Q.keep_float("*")], ops)
    bos = Q.resolve(bos_aware_rules(A8_STATIC, W8) + [Q.keep_float("*")], ops)
    _, stats = Q.collect_stats(model.apply, model.params, *args)
    bstats = merge_bos_stats(stats, bos_stats(model.apply, model.params, *args))
    return naive.bind(naive.init(stats)), bos.bind(bos.init(bstats)), bos


def first(key, a):
    """Token 0 of a key (B, H, D, L) or value (B, H, L, D)."""
    return a[..., 0] if key.endswith(":k") else a[:, :, 0]


def rest(key, a):
    """Tokens 1 … of a key or value."""
    return a[..., 1:] if key.endswith(":k") else a[:, :, 1:]


def errors(model, args):
    """Relative errors vs float of the prompt tokens' K/V, the first token's K/V, and the model output."""
    (out_fp, fp), *quantized = (kv(model, q, args) for q in (None, *plans(model, args)[:2]))
    rel = lambda part, got: np.sqrt(sum(float(jnp.sum((part(k, got[k]) - part(k, fp[k])) ** 2)) for k in fp)
                                    / sum(float(jnp.sum(part(k, fp[k]) ** 2)) for k in fp))
    return [{"rest": rel(rest, got), "first": rel(first, got), "all": rel(lambda k, a: a, got),
             "output": float(jnp.linalg.norm(out - out_fp) / jnp.linalg.norm(out_fp))} for out, got in quantized]


def test_bos_aware_removes_the_error_the_first_token_outlier_causes():
    naive, bos = errors(tiny(), inputs(outlier=100.0))
    # the BOS sets the naive per-tensor scale: the prompt tokens' K/V lose ~3 bits (after the FP caption
    # projection has mixed the 100x channels into all 32); BOS-aware calibrates on the prompt tokens
    assert naive["rest"] > 5 * bos["rest"], (naive, bos)
    # token 0 is the float constant: exact up to float32 summation order
    assert bos["first"] < 1e-5 < naive["first"], (naive, bos)
    assert naive["output"] > 5 * bos["output"], (naive, bos)


def test_without_the_outlier_bos_aware_changes_little():
    naive, bos = errors(tiny(), inputs(outlier=1.0))
    # token 0 becomes exact, the scale barely moves: at most the first token's share of the error goes
    assert 0.6 * naive["all"] < bos["all"] <= 1.05 * naive["all"], (naive, bos)
    assert abs(bos["output"] - naive["output"]) < 0.25 * naive["output"], (naive, bos)


def test_a_prompt_dependent_first_token_is_refused():
    model = tiny()
    with pytest.raises(ValueError, match="prompt-independent first token"):
        bos_stats(model.apply, model.params, *inputs(outlier=100.0, same_first=False))
    with pytest.raises(ValueError, match="regular expression"):
        bos_aware_rules(A8_STATIC, W8, sites="*.attn2")


def test_bos_state_is_two_rows_per_cross_attention_layer():
    model = tiny()
    args = inputs(outlier=100.0)
    *_, plan = plans(model, args)
    state = plan.init(merge_bos_stats({}, bos_stats(model.apply, model.params, *args)))
    bos_rows = {k: v["bos"].shape for k, v in state.items() if "bos" in v}
    assert bos_rows == {f"transformer_blocks.{i}.attn2.{s}": (2, 16) for i in range(2) for s in ("qk:k", "pv:v")}
