"""BOS-aware cross-attention (MixDQ): the first text token's K and V in floating point, the rest quantized.

CLIP text encoders give their first token (BOS) activations far larger than any other token's,
in a few channels, and — because CLIP's text attention is causal — the same for every prompt.
Through a cross-attention ``to_k`` / ``to_v`` with a per-tensor (static) activation scale, that
one token sets the scale and every other token quantizes to a handful of levels. MixDQ
(thu-nics/MixDQ, ``QuantAttnProcessor`` with ``bos_aware``) runs the BOS token through the
floating-point projections on its unquantized input and concatenates its K and V with the
quantized K and V of the remaining tokens; in deployment the BOS K and V are constants.

Here that is three transforms, bound by :func:`bos_aware_rules` to a model's cross-attention
(jdq's site names: ``<attn>.to_k`` / ``<attn>.to_v`` for the projections, ``<attn>.qk`` role ``k``
and ``<attn>.pv`` role ``v`` for the attention's key and value):

* :func:`skip_first_token` on the projection inputs: ``inner`` quantizes tokens ``1 …`` only and
  is calibrated on their statistics (``"rest:*"`` entries, :func:`bos_stats`), so the BOS no
  longer sets the scale;
* :func:`first_token_float` on the key and value: token 0 is replaced by the floating-point K / V
  row precomputed once per model from the unquantized model (:func:`bos_stats`); its quantized
  projection (weight error times a huge input) is discarded.

The constants cost ``2 · heads · head_dim`` floats per cross-attention layer. They are valid
when the first text token is the same for every prompt (CLIP's BOS); :func:`bos_stats` checks
that on the prompts it is given and refuses otherwise (a T5 encoder, as PixArt's, has no BOS:
its first token is the first word, and differs per prompt).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jdq.quant.stats import operand_stats
from jdq.quant.transform import QuantizerBase, QuantTransform, Rule, WrapsInner, identity, operand_key, rule

#: Prefix of the statistics of tokens 1… of a projection input (written by :func:`bos_stats`).
REST_PREFIX = "rest:"
#: Statistic holding the floating-point first-token row of a key / value operand.
BOS_KEY = "bos"
#: Cross-attention sites of the families with text (PixArt-Σ's ``attn2``).
CROSS_ATTENTION = r"re:(.*\.)?attn2"
#: Axis of the text tokens of each operand: projection input (B, L, C); key (B, H, D, L); value (B, H, L, D).
TOKEN_AXIS = {"act": 1, "k": -1, "v": -2}


@dataclasses.dataclass(frozen=True)
class BosMeta(WrapsInner):
    """``meta`` of a BOS-aware stage: ``part`` is ``"skip"`` (projection input) or ``"float"`` (key / value)."""

    kind: ClassVar[str] = "bos_aware"
    part: str
    inner: Any


def _take(x, axis, index):
    return jax.lax.slice_in_dim(x, index, x.shape[axis] if index else 1, axis=axis % x.ndim)


def skip_first_token(inner: QuantTransform) -> QuantTransform:
    """Quantize a projection input (B, L, C) with ``inner`` on tokens ``1 …`` only; token 0 passes unchanged.

    ``init`` hands ``inner`` the ``"rest:*"`` statistics (those of tokens ``1 …``; :func:`bos_stats`).
    """

    def init(stats):
        rest = {k[len(REST_PREFIX):]: v for k, v in stats.items() if k.startswith(REST_PREFIX)}
        if stats and not rest:
            raise KeyError(f"{REST_PREFIX}absmax")
        return {"inner": inner.init(rest)}

    def apply(x, state, ctx):
        axis = TOKEN_AXIS["act"]
        if x.ndim != 3 or x.shape[axis] < 2:
            raise ValueError(f"BOS-aware input at {ctx.site}:{ctx.role} must be (batch, tokens >= 2, channels), "
                             f"got {x.shape}")
        rest = inner.apply(_take(x, axis, 1), state["inner"], ctx)
        return jnp.concatenate([_take(x, axis, 0), rest.astype(x.dtype)], axis=axis)

    return QuantTransform(init, apply, BosMeta("skip", inner.meta))


def first_token_float(inner: QuantTransform | None = None) -> QuantTransform:
    """Key (role ``k``) or value (role ``v``): ``inner`` on every token, then token 0 set to the FP constant.

    State ``{"bos": (heads, head_dim) float32, "inner": ...}``; ``init`` reads statistic ``"bos"``.
    """
    inner = identity() if inner is None else inner

    def init(stats):
        bos = jnp.asarray(stats[BOS_KEY], jnp.float32)
        return {BOS_KEY: bos[0] if bos.ndim == 3 else bos, "inner": inner.init(stats)}  # [0]: a step axis

    def apply(x, state, ctx):
        if ctx.role not in ("k", "v"):
            raise ValueError(f"first_token_float at {ctx.site}:{ctx.role}: bind it to roles 'k' and 'v' only")
        y = inner.apply(x, state["inner"], ctx)
        bos = state[BOS_KEY]
        if ctx.role == "k":  # (B, H, D, L)
            row = jnp.broadcast_to(bos[None, :, :, None], y.shape[:-1] + (1,))
        else:  # (B, H, L, D)
            row = jnp.broadcast_to(bos[None, :, None, :], y.shape[:2] + (1,) + y.shape[3:])
        axis = TOKEN_AXIS[ctx.role]
        return jnp.concatenate([row.astype(y.dtype), _take(y, axis, 1)], axis=axis)

    return QuantTransform(init, apply, BosMeta("float", inner.meta))


def bos_aware_rules(act: QuantTransform, weight: QuantTransform | None, *, sites: str = CROSS_ATTENTION,
                    kv: QuantTransform | None = None) -> list[Rule]:
    """Rules for BOS-aware cross-attention at ``sites`` (a site pattern of the attention modules).

    ``act`` / ``weight``: the projections' quantizers (``act`` sees tokens ``1 …`` only);
    ``kv``: the key / value quantizer inside attention (default none). Put these rules before a
    recipe's generic ones (the first match wins).
    """
    if not sites.startswith("re:"):
        raise ValueError(f"bos_aware_rules: sites must be a 're:' regular expression of attention sites, got {sites!r}")
    base = sites[3:]
    kv_proj = f"re:(?:{base})\\.to_(k|v)"
    out = [rule(kv_proj, skip_first_token(act), roles=("act",), name="BOS-aware k/v inputs")]
    if weight is not None:
        out.append(rule(kv_proj, weight, roles=("weight",), name="k/v weights"))
    out += [rule(f"re:(?:{base})\\.qk", first_token_float(kv), roles=("k",), name="BOS key in float"),
            rule(f"re:(?:{base})\\.pv", first_token_float(kv), roles=("v",), name="BOS value in float")]
    return out


class _BosCollector(QuantizerBase):
    """Pass-through quantizer recording, at the cross-attention sites, what :func:`bos_stats` returns."""

    def __init__(self, pattern: str):
        if not pattern.startswith("re:"):
            raise ValueError(f"bos_stats: sites must be a 're:' regular expression of attention sites, got {pattern!r}")
        self.regex = re.compile(pattern[3:])
        self.stats: dict[str, dict[str, Any]] = {}

    def _attention_of(self, site: str) -> str | None:
        head, _, tail = site.rpartition(".")
        if tail in ("to_k", "to_v", "qk", "pv") and self.regex.fullmatch(head):
            return head
        return None

    def __call__(self, x, site, role, axis=-1):
        head = self._attention_of(site)
        if head is None:
            return x
        tail = site.rpartition(".")[2]
        key = operand_key(site, role)
        if tail in ("to_k", "to_v") and role in TOKEN_AXIS:
            rest = operand_stats(_take(x, TOKEN_AXIS["act"], 1), axis)
            self.stats[key] = {REST_PREFIX + k: v for k, v in rest.items()}
        elif (tail, role) in (("qk", "k"), ("pv", "v")):
            first = jnp.squeeze(_take(x, TOKEN_AXIS[role], 0), TOKEN_AXIS[role] % x.ndim)  # (B, H, D)
            self.stats[key] = {"bos_rows": first.astype(jnp.float32)}
        return x


def bos_stats(fn: Callable[..., Any], *args, sites: str = CROSS_ATTENTION, rtol: float = 1e-3, **kwargs) -> dict[str, dict[str, Any]]:
    """One floating-point forward ``fn(*args, quant=…)``: the statistics the BOS-aware transforms need.

    Returns ``{key: stats}`` for the cross-attention projections (``"rest:*"``: statistics of
    tokens ``1 …``) and keys / values (``"bos"``: the first token's row, (heads, head_dim)). The
    text path does not depend on the latent or the timestep, so any ``x``, ``t`` will do; merge the
    result into the calibration statistics with :func:`merge_bos_stats`.
    Raises ``ValueError`` when the first token's K / V differ across the batch's prompts by more than
    ``rtol`` of their magnitude (a per-prompt first token, as T5's, cannot be one constant).
    """

    def run(*a):
        collector = _BosCollector(sites)
        fn(*a, quant=collector, **kwargs)
        return collector.stats

    raw = jax.jit(run)(*args)
    if not raw:
        raise ValueError(f"bos_stats: the model has no cross-attention matching {sites!r}")
    out = {}
    for key, st in raw.items():
        if "bos_rows" in st:
            rows = np.asarray(st["bos_rows"], np.float64)
            spread = float(np.max(np.abs(rows - rows[:1])))
            scale = float(np.max(np.abs(rows)))
            if spread > rtol * max(scale, 1e-12):
                raise ValueError(f"bos_stats: the first text token's {key.rpartition(':')[2]} at {key} differs across "
                                 f"prompts (max difference {spread:.3g} for values up to {scale:.3g}); BOS-aware "
                                 "quantization needs a prompt-independent first token (CLIP's BOS, not T5's first word)")
            st = {BOS_KEY: jnp.asarray(rows.mean(0), jnp.float32)}
        out[key] = st
    return out


def merge_bos_stats(stats, bos) -> dict[str, dict[str, Any]]:
    """Calibration statistics with :func:`bos_stats`' entries added to (or creating) each operand's dict."""
    out = {k: dict(v) for k, v in stats.items()}
    for key, st in bos.items():
        out.setdefault(key, {}).update(st)
    return out
