"""Shared layers. ``qlinear`` and ``qmatmul`` are the ONLY places a jdq model multiplies
matrices, and so the only places quantization meets a model.

Weights are stored in the JAX layout ``(in_features, out_features)``; the contraction axis of a
weight is therefore ``-2`` and that of an activation ``-1``. A ``quant`` argument is ``None``
(the plain model) or a :class:`jdq.quant.QuantizerBase`, called once per operand with the
operand's site path, role and contraction axis.

**Site naming.** Every :class:`Linear` is built with its ``site``, which is also its path in the
module tree, so the weight of site ``S`` lives at ``params`` path ``S + ".kernel"`` (and
``S + ".bias"``). Sites are dot-joined: ``blocks.3.attn.qkv``. :func:`attention` called with
``site="blocks.3.attn"`` adds the two attention-matmul sites ``blocks.3.attn.qk`` and
``blocks.3.attn.pv``. Names shared by all families (so one recipe fits DiT, PixArt-Σ and SD3):

* ``<block>.attn.qkv`` / ``<block>.attn.proj``: fused self-attention projections
  (:class:`SelfAttention`); ``<block>.attn.qk`` / ``.pv``: its two matmuls;
* ``<block>.mlp.fc1`` / ``<block>.mlp.fc2``: the MLP (:class:`Mlp`), ``fc2``'s input has role
  ``post_gelu``;
* ``t_embedder.mlp.0`` / ``t_embedder.mlp.2``: the timestep MLP (:class:`TimestepEmbedder`,
  numbered as in facebookresearch/DiT, where ``mlp.1`` is the SiLU);
* ``x_embedder``: the patch embedding (:class:`PatchEmbed`, a linear over flattened patches).

PixArt-Σ and SD3 keep diffusers' module paths instead (``attn1.to_q``, ``ff.net.0.proj``,
``pos_embed.proj``), built from the diffusers-named blocks at the end of this module
(:class:`Attention`, :class:`FeedForward`, :class:`TwoLayer`, :class:`PatchEmbedding`), so a
rule written against a PyTorch model reads the same here.

**Dtypes.** Parameters are stored in their own dtype (float32 by default); a matmul computes in
the dtype of its activation (``qlinear`` casts the weight), so a model runs in bfloat16 by
casting its input. Norms and softmax compute in float32 and return the input's dtype.

**Initialisation.** Parameters are initialised randomly (kernels ``N(0, 1/fan_in)``, biases
``N(0, 0.02)``), not with the papers' training initialisations (adaLN-Zero zeros would make a
random model output zeros): jdq never trains, it loads converted checkpoints, and random models
are for tests and benchmarks.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jdq.kernels.activations import ACTIVATIONS
from jdq.quant.transform import QuantizerBase


#: Environment variable: ``0`` computes ``qlinear``'s ``norm`` / ``residual`` / ``split`` as separate XLA
#: ops around a lowered site's kernel instead of handing them to its kernels (default ``1``; the
#: unlowered path is the same either way). Read at trace time; for A/B timing (``benchmarks/e2e.py``).
FUSED_BLOCK_ENV = "JDQ_FUSED_BLOCK"


def _fuse_block_ops() -> bool:
    import os

    choice = os.environ.get(FUSED_BLOCK_ENV, "1")
    if choice not in ("0", "1"):
        raise ValueError(f"{FUSED_BLOCK_ENV}={choice!r}; use 0 or 1")
    return choice == "1"


class AdaNorm(NamedTuple):
    """A linear's pre-norm ``modulate(layer_norm(x, eps), shift, scale)`` (adaLN), for ``qlinear(norm=)``.

    ``shift`` / ``scale``: (B, D), one row per sample of ``x`` (B, L, D). Calling it computes the
    norm; a lowered W8A8 / FP8 site on the GPU computes it inside its activation quantization.
    """

    shift: jax.Array
    scale: jax.Array
    eps: float = 1e-6

    def __call__(self, x):
        return modulate(layer_norm(x, eps=self.eps), self.shift, self.scale)


class GatedResidual(NamedTuple):
    """A linear's gated residual ``x + gate[:, None, :] · y`` (adaLN-Zero), for ``qlinear(residual=)``.

    ``x``: (B, L, N), ``gate``: (B, N). Calling it on ``y`` adds it; a lowered W8A8 / FP8 site on
    the GPU adds it in its GEMM epilogue.
    """

    x: jax.Array
    gate: jax.Array

    def __call__(self, y):
        return self.x + self.gate[:, None, :] * y


def qlinear(x, w, b=None, *, site: str, quant: QuantizerBase | None = None, act_role: str = "act",
            activation: str | None = None, norm: AdaNorm | None = None, residual: GatedResidual | None = None,
            split: int = 1, cast_input: bool = True):
    """``residual(act(norm(x) @ w + b))`` with the input (role ``act_role``) and weight (role ``weight``) quantized.

    ``activation`` (a name in :data:`ACTIVATIONS`, default none) is applied to the output; a
    lowered site may fuse it into its kernel's epilogue (computed in float32 before the output
    cast, so it differs from the unfused path by the output dtype's rounding only). ``norm``
    (:class:`AdaNorm`) and ``residual`` (:class:`GatedResidual`), default none, are the ops around
    the linear in an adaLN block; a lowered site may fuse them into its kernels (its quantized
    input is ``norm(x)`` either way). ``split`` > 1 returns the output's ``split`` column parts as a
    tuple (the fused ``qkv``: q, k, v): slices of one matmul here (three matmuls of a third of the
    columns measured no faster with cuBLAS), separate buffers written by a lowered W8A8 kernel.
    ``cast_input=False``: ``x`` already went through the plan's input transform (a fused producer
    applied it, :class:`Mlp`), so only the weight is cast here.
    """
    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(f"qlinear at {site!r}: unknown activation {activation!r}; known: {sorted(ACTIVATIONS)}")
    if (norm is not None or residual is not None or split > 1) and not _fuse_block_ops():
        y = qlinear(x if norm is None else norm(x), w, b, site=site, quant=quant, act_role=act_role,
                    activation=activation, cast_input=cast_input)
        y = y if residual is None else residual(y)
        return tuple(jnp.split(y, split, axis=-1)) if split > 1 else y
    if w.shape[-1] % split or (split > 1 and residual is not None):
        raise ValueError(f"qlinear at {site!r}: {w.shape[-1]} output features do not split into {split} parts "
                         f"(or split with a residual)")
    if quant is not None and cast_input:
        lowered = quant.lowered(site)
        if lowered is not None:
            # The speed path: a packed weight and a Pallas kernel that quantizes x itself.
            from jdq.kernels import lowered_linear

            return lowered_linear(x, lowered, b, site=site, quant=quant, act_role=act_role, activation=activation,
                                  norm=norm, residual=residual, split=split)
    if norm is not None:
        x = norm(x)
    if quant is not None:
        if cast_input:
            routed = _split_on_kernel(quant, site, act_role, x)
            x = quant(x, site, act_role, -1) if routed is None else routed
        w = quant(w, site, "weight", -2)
    y = jnp.matmul(x, w.astype(x.dtype))
    if b is not None:
        y = y + b.astype(y.dtype)
    y = y if activation is None else ACTIVATIONS[activation](y)
    y = y if residual is None else residual(y)
    return tuple(jnp.split(y, split, axis=-1)) if split > 1 else y


def qmatmul(a, b, *, site: str, roles: tuple[str, str], quant: QuantizerBase | None = None):
    """``a @ b`` over the last two axes (attention matmuls), both operands quantized by ``quant``.

    For q·kᵀ pass ``a = q`` (…, Lq, d), ``b = kᵀ`` (…, d, Lk) and ``roles=("q", "k")``; for p·v
    pass ``a = p`` (…, Lq, Lk), ``b = v`` (…, Lk, d) and ``roles=("attn_prob", "v")``. The
    contraction axis is ``-1`` of ``a`` and ``-2`` of ``b``.
    """
    if quant is not None:
        a = quant(a, site, roles[0], -1)
        b = quant(b, site, roles[1], -2)
    return jnp.matmul(a, b.astype(a.dtype))


#: Environment variable choosing how a fake-quant attention runs: ``auto`` (default: on a GPU, bf16
#: operands without a mask or bias whose probability cast :func:`jdq.kernels.quant_attention.prob_cast_of`
#: accepts run :func:`jdq.kernels.quant_attention.quant_attention`; elsewhere the explicit XLA path),
#: ``xla`` (always explicit), ``kernel`` (``quant_attention`` on any backend wherever the plan allows:
#: its XLA reference off a GPU) or ``reference`` (the fused path's q / k / v casts, then
#: ``quant_attention``'s XLA reference instead of the kernel). Read at trace time.
QUANT_ATTENTION_ENV = "JDQ_QUANT_ATTENTION"
QUANT_ATTENTION_CHOICES = ("reference",)


def _described(quant, site, role):
    """The :class:`~jdq.quant.reader.OperandPlan` of the operand's transform, or ``None`` when ``quant`` does not
    expose its transforms (calibration collectors, operand tracing: they keep the unfused paths)."""
    from jdq.quant.reader import describe_transform

    try:
        return describe_transform(quant.transform_for(site, role))
    except NotImplementedError:
        return None


def _layout_free(quant, site, role) -> bool:
    """Whether the operand's transform is casts and token centring only, which give the same values in any layout
    of the operand with the same contraction axis (other stages, e.g. BOS-aware ones, index a fixed layout)."""
    described = _described(quant, site, role)
    return described is not None and set(described.stages) <= {"cast", "center_tokens"}


#: Environment variable choosing whether the fused fake-quant attention zero-pads q, k and v to the
#: kernel's head dim (a multiple of 16) before the plan casts them: ``auto`` (default: where the casts
#: give the same values on the padded operands, :func:`_zero_pad_neutral`), ``xla`` (the casts on the
#: head dim as it is, then the kernel's own padding: the earlier path) or ``kernel`` (as ``auto``).
ATTENTION_PAD_ENV = "JDQ_ATTENTION_PAD"


def _zero_pad_neutral(quant, site, role, d: int, dp: int) -> bool:
    """Whether the operand's transform gives the same values on the operand zero-padded from ``d`` to ``dp`` head channels.

    Block casts (MX / SMX: the formats zero-pad a short last block themselves) and block outlier splits
    per row with the same number of blocks along the head dim; anything that counts or scales over the
    whole operand keeps the unpadded path.
    """
    from jdq.quant.outliers import OutlierMeta

    described = _described(quant, site, role)
    if described is None:
        return False
    if described.stages == ("cast",):
        return described.scaling == "block" and getattr(described.spec, "kind", None) in ("mx", "smx")
    meta = getattr(quant.transform_for(site, role), "meta", None)
    return (isinstance(meta, OutlierMeta) and meta.granularity == "block" and meta.scope == "row"
            and -(-d // meta.block_size) == -(-dp // meta.block_size))


def _reduces_along_tokens(quant, qk_site, pv_site) -> bool:
    """Whether a cast of q, k or v reduces over a whole axis (a dynamic per-token / per-channel / per-tensor
    scale, token centring) rather than within MX blocks of 32 or by a static scale."""
    for site, role in ((qk_site, "q"), (qk_site, "k"), (pv_site, "v")):
        described = _described(quant, site, role)
        if described is None or described.centered or described.scaling == "dynamic":
            return True
    return False


#: Environment variable choosing how an MLP's activation and fc2's input cast run in a fake-quant
#: plan: ``auto`` (default: on a GPU, for bf16, when the cast is one MX / MX9-MX6-MX4 block cast that
#: :func:`jdq.kernels.act_cast.supports_cast` takes, one pass :func:`jdq.kernels.act_cast.act_cast`),
#: ``xla`` (always the activation, then the plan's cast) or ``kernel`` (the one pass on any backend).
ACT_CAST_ENV = "JDQ_ACT_CAST"


def _env_choice(name: str, extra: tuple[str, ...] = ()) -> str:
    from jdq.kernels.op import route_choice

    return route_choice(name, extra)


def _fused_act_cast(quant, fc1_site, fc2_site, role, activation, dtype, hidden):
    """The :mod:`jdq.formats` spec of fc2's input cast when the activation and the cast run as one pass, else ``None``."""
    if quant is None:
        return None
    choice = _env_choice(ACT_CAST_ENV)
    if choice == "xla" or (choice == "auto" and jax.default_backend() != "gpu"):
        return None
    from jdq.kernels.act_cast import ACTIVATIONS as FUSABLE, supports_cast

    if dtype != jnp.bfloat16 or activation not in FUSABLE or hidden % 32:
        return None
    if quant.lowered(fc1_site) is not None or quant.lowered(fc2_site) is not None:
        return None
    described = _described(quant, fc2_site, role)
    if described is None or described.stages != ("cast",) or described.scaling != "block" or supports_cast(described.spec):
        return None
    return described.spec


def _fused_act_split(quant, fc1_site, fc2_site, role, activation, hidden_shape, dtype):
    """``(meta, ratio)`` of fc2's input split when the MLP's activation and that split run as one kernel, else ``None``."""
    from jdq.kernels.act_cast import ACTIVATIONS as FUSABLE

    if quant is None or activation not in FUSABLE:
        return None
    if quant.lowered(fc1_site) is not None or quant.lowered(fc2_site) is not None:
        return None
    return _split_cast_route(quant, fc2_site, role, hidden_shape, dtype)


#: Environment variable choosing how a GPU selects MixDiT's outlier blocks of a linear input: ``auto``
#: (default: the ``jdq.kernels.row_select`` op on a GPU for bf16 / fp16 rows of more than 16 blocks — its
#: kernel from one CTA per SM of rows, else a sort), ``xla`` (the plan's own selection: a sort) or
#: ``kernel`` (the op on any backend).
ROW_SELECT_ENV = "JDQ_ROW_SELECT"


#: Environment variable choosing whether MixDiT's outlier split of a linear input runs as one kernel:
#: ``kernel`` (:func:`jdq.kernels.split_cast.split_cast` — the MLP's GELU included for fc2's input — on
#: bf16 inputs whose split it takes; the kernel where the rows tile, else its reference), ``auto`` and
#: ``xla`` (default: XLA's block maxima and cast around :data:`ROW_SELECT_ENV`'s selection). ``auto``
#: does not take the kernel: on an H200 it was slower than that route (RESULTS §3 "Thirteenth round").
SPLIT_CAST_ENV = "JDQ_SPLIT_CAST"


def _split_cast_route(quant, site, role, shape, dtype):
    """``(meta, ratio)`` of a linear input's outlier split when :func:`jdq.kernels.split_cast.split_cast` runs it, else ``None``."""
    if quant is None or _env_choice(SPLIT_CAST_ENV) != "kernel" or dtype != jnp.bfloat16:
        return None
    from jdq.kernels.split_cast import unsupported
    from jdq.quant.outliers import OutlierMeta

    try:
        meta = getattr(quant.transform_for(site, role), "meta", None)
        if not isinstance(meta, OutlierMeta) or unsupported(meta) or shape[-1] % meta.block_size:
            return None
        return meta, quant.state_for(site, role)["ratio"]
    except NotImplementedError:
        return None


def _split_on_kernel(quant, site, role, x):
    """The plan's outlier split of a linear input by :func:`jdq.kernels.split_cast.split_cast` or with
    ``jdq.kernels.row_select``'s selection, or ``None`` where neither route runs."""
    route = _split_cast_route(quant, site, role, x.shape, x.dtype)
    if route is None:
        return _split_on_row_select(quant, site, role, x)
    from jdq.kernels.split_cast import split_cast

    return split_cast(x, route[1], route[0], impl=getattr(quant, "impl", "auto"))


def _split_on_row_select(quant, site, role, x):
    """The plan's outlier split of a linear input with its top-k selection by ``jdq.kernels.row_select``, or ``None``.

    The same blocks as the plan's own selection (the kernel's threshold of position-tied keys);
    ``None`` where the route does not run (another transform, a quantizer that does not expose its
    transforms and state, rows the elementwise rank count takes).
    """
    choice = _env_choice(ROW_SELECT_ENV)
    if choice == "xla" or x.dtype not in (jnp.bfloat16, jnp.float16):
        return None
    if choice == "auto" and jax.default_backend() != "gpu":
        return None
    from jdq.quant.outliers import _UNROLLED_RANK_ANY, OutlierMeta, split_dynamic

    try:
        meta = getattr(quant.transform_for(site, role), "meta", None)
        if not isinstance(meta, OutlierMeta) or meta.granularity == "channel" or meta.scope != "row":
            return None
        units = x.shape[-1] if meta.granularity == "element" else -(-x.shape[-1] // meta.block_size)
        if units <= _UNROLLED_RANK_ANY:
            return None
        state = quant.state_for(site, role)
    except NotImplementedError:
        return None
    from jdq.kernels import row_select

    return split_dynamic(meta, x, state, -1, top=functools.partial(row_select.top_mask, impl=getattr(quant, "impl", "auto")))


def _fused_prob_cast(quant, pv_site, dtype, mask, bias):
    """``(ProbCast, ratio, impl)`` of the probabilities when the fused fake-quant attention runs, else ``None``.

    ``ratio``: a split's state (the kernel selects the blocks itself), else ``None``; ``impl``: the
    op's implementation (``"xla"`` — its reference — under ``JDQ_QUANT_ATTENTION=reference``, else the plan's).
    """
    choice = _env_choice(QUANT_ATTENTION_ENV, QUANT_ATTENTION_CHOICES)
    if choice == "xla" or mask is not None or bias is not None:
        return None
    impl = "xla" if choice == "reference" else getattr(quant, "impl", "auto")
    if choice == "auto" and (dtype != jnp.bfloat16 or jax.default_backend() != "gpu"):
        return None
    try:
        transform = quant.transform_for(pv_site, "attn_prob")
    except NotImplementedError:
        return None
    from jdq.kernels.quant_attention import prob_cast_of

    prob = prob_cast_of(transform)
    if isinstance(prob, str):
        return None
    if prob.kind != "split":
        return prob, None, impl
    try:
        return prob, quant.state_for(pv_site, "attn_prob")["ratio"], impl
    except NotImplementedError:
        return None


#: Environment variable choosing the fused (unquantized) attention: ``auto`` (default: cuDNN flash
#: attention on a GPU for bf16/fp16 without a mask, else XLA), ``xla`` or ``cudnn``. Read at trace time.
FUSED_ATTENTION_ENV = "JDQ_FUSED_ATTENTION"


def _fused_attention(q, k, v, mask, scale, bias=None):
    """``jax.nn.dot_product_attention``, with cuDNN's fused kernel where it applies.

    XLA's implementation materialises the (B, H, Lq, Lk) logits in float32; on a GPU that memory
    traffic costs a DiT-XL/2 forward at batch 32 several milliseconds, which cuDNN's flash
    attention avoids. cuDNN is tried only for bf16/fp16 without a mask; if it rejects the shapes
    (at trace time) XLA's runs.
    """
    import os

    choice = os.environ.get(FUSED_ATTENTION_ENV, "auto")
    if choice not in ("auto", "xla", "cudnn"):
        raise ValueError(f"{FUSED_ATTENTION_ENV}={choice!r}; use auto, xla or cudnn")
    want_cudnn = choice == "cudnn" or (
        choice == "auto" and mask is None and bias is None and q.dtype in (jnp.bfloat16, jnp.float16)
        and jax.default_backend() == "gpu")
    if want_cudnn:
        try:
            return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale, implementation="cudnn")
        except Exception:  # noqa: BLE001  (unsupported here: fall back to XLA unless cuDNN was demanded)
            if choice == "cudnn":
                raise
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale, implementation="xla")


def attention(q, k, v, *, site: str, quant: QuantizerBase | None = None, mask=None, scale: float | None = None,
              bias=None):
    """Multi-head attention ``softmax(q·kᵀ·scale [+mask]) · v`` with both matmuls as quantization sites.

    ``q``: (B, Lq, H, D), ``k``/``v``: (B, Lk, H, D); returns (B, Lq, H, D). ``mask`` is a
    boolean array broadcastable to (B, H, Lq, Lk), ``True`` where attention is allowed; ``bias``
    (broadcastable to (B, H, Lq, Lk), e.g. T5's relative positions) is added to the scaled logits. The
    matmul sites are ``f"{site}.qk"`` (roles ``q``, ``k``) and ``f"{site}.pv"`` (roles
    ``attn_prob``, ``v``); the softmax scale is applied after q·kᵀ and the softmax runs in
    float32. When ``quant`` transforms none of the four operands, the fused
    ``jax.nn.dot_product_attention`` runs instead (same function, faster on GPU; cuDNN flash
    attention for bf16/fp16 on a GPU, see :data:`FUSED_ATTENTION_ENV`). When ``quant`` is a
    lowered quantizer (:func:`jdq.kernels.lower`) that routes ``site`` to the FP8 attention kernel
    (``quant.lowered_attention(site)``: the casts of ``jdq.recipes.fp8_attention_rules``) and there
    is no mask or bias, :func:`jdq.kernels.fp8_attention` runs (same casts; the probabilities on
    the kernel's static per-block grid, see :mod:`jdq.kernels.fp8_attention.ref`). Otherwise a
    fake-quant attention runs explicitly: the plan's casts of q, k and v, then — where
    :data:`QUANT_ATTENTION_ENV` allows (by default on a GPU, for bf16 without a mask or bias, when the
    probabilities' cast is an MX, an MX9 / MX6 / MX4 or a per-row FP8 cast) —
    :func:`jdq.kernels.quant_attention.quant_attention`, a flash kernel that casts the probabilities
    in registers, else the two matmuls and the softmax in XLA with the probabilities' cast between
    them. Both compute the same program; they differ only where floats are summed in another order
    or XLA keeps a bf16 value in float32 (see :mod:`jdq.kernels.quant_attention.ref`).
    """
    d = q.shape[-1]
    scale = (1.0 / d**0.5) if scale is None else scale
    qk_site, pv_site = f"{site}.qk", f"{site}.pv"
    explicit = quant is not None and (
        quant.quantizes(qk_site, "q") or quant.quantizes(qk_site, "k")
        or quant.quantizes(pv_site, "attn_prob") or quant.quantizes(pv_site, "v")
    )
    if not explicit:
        return _fused_attention(q, k, v, mask, scale, bias)
    lowered = getattr(quant, "lowered_attention", None)
    if lowered is not None and mask is None and bias is None and lowered(site):
        # the speed path: a lowered plan whose q / k / p / v casts are the FP8 attention kernel's
        from jdq.kernels import fp8_attention

        return fp8_attention(q, k, v, scale=float(scale), impl=getattr(quant, "impl", "auto"))
    qh = jnp.swapaxes(q, 1, 2)  # (B, H, Lq, D)
    kt = jnp.transpose(k, (0, 2, 3, 1))  # (B, H, D, Lk)
    vh = jnp.swapaxes(v, 1, 2)  # (B, H, Lk, D)
    fused = _fused_prob_cast(quant, pv_site, q.dtype, mask, bias)
    if fused is not None:
        prob, ratio, impl = fused
        # the same casts of q / k / v, then a flash kernel that casts the probabilities in registers
        from jdq.kernels.quant_attention import quant_attention
        from jdq.kernels.quant_attention.gpu import D_MULTIPLE

        dp = -(-d // D_MULTIPLE) * D_MULTIPLE
        if dp != d and _env_choice(ATTENTION_PAD_ENV) != "xla" and all(
                _zero_pad_neutral(quant, s_, r_, d, dp) for s_, r_ in ((qk_site, "q"), (qk_site, "k"), (pv_site, "v"))):
            # the kernel's head dim from the start: the casts then see whole blocks (the one-pass word form) and the
            # kernel's layout needs no second pad; the zero channels add nothing to q·kᵀ and give zero outputs
            widths = ((0, 0),) * (q.ndim - 1) + ((0, dp - d),)
            qh, vh = jnp.swapaxes(jnp.pad(q, widths), 1, 2), jnp.swapaxes(jnp.pad(v, widths), 1, 2)
            k = jnp.pad(k, widths)
        kh = jnp.swapaxes(k, 1, 2)
        if _reduces_along_tokens(quant, qk_site, pv_site):
            # q, k, v copied to (B, H, L, D) first, one transposing pass over bf16 values: fused into
            # casts that reduce over a whole axis, XLA split each cast into several transposing fusions
            # writing float32 intermediates (MX block casts fuse the transpose well: no copy for them)
            qh, kh, vh = jax.lax.optimization_barrier((qh, kh, vh))
        qh, vh = quant(qh, qk_site, "q", -1), quant(vh, pv_site, "v", -2)
        if _layout_free(quant, qk_site, "k"):
            # the same cast on (B, H, Lk, D), contraction axis last: the layout the kernel reads, so XLA
            # does not lay k out as (B, H, D, Lk) for the reductions and transpose it back
            kt = jnp.swapaxes(quant(kh, qk_site, "k", -1), -1, -2)
        else:
            kt = quant(jnp.swapaxes(kh, -1, -2), qk_site, "k", -2)
        out = quant_attention(qh, kt, vh, ratio, prob=prob, scale=float(scale), impl=impl)
        return jnp.swapaxes(out[..., :d], 1, 2)
    logits = qmatmul(qh, kt, site=qk_site, roles=("q", "k"), quant=quant).astype(jnp.float32) * scale
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(q.dtype)
    out = qmatmul(probs, vh, site=pv_site, roles=("attn_prob", "v"), quant=quant)
    return jnp.swapaxes(out, 1, 2)


# --------------------------------------------------------------------------------------------
# Parameterised layers (NNX modules; every matmul goes through qlinear / attention)
# --------------------------------------------------------------------------------------------


def _normal(rngs: nnx.Rngs, shape, std, dtype):
    return jax.random.normal(rngs.params(), shape, jnp.float32).astype(dtype) * jnp.asarray(std, dtype)


class Linear(nnx.Module):
    """A linear layer that is a quantization site: ``kernel`` (in, out), optional ``bias`` (out,)."""

    def __init__(self, in_features: int, out_features: int, *, site: str, rngs: nnx.Rngs,
                 use_bias: bool = True, act_role: str = "act", param_dtype=jnp.float32):
        self.kernel = nnx.Param(_normal(rngs, (in_features, out_features), 1.0 / math.sqrt(in_features), param_dtype))
        self.bias = nnx.Param(_normal(rngs, (out_features,), 0.02, param_dtype)) if use_bias else None
        self.site = site
        self.act_role = act_role

    def __call__(self, x, quant: QuantizerBase | None = None, activation: str | None = None, norm=None, residual=None,
                 split: int = 1, cast_input: bool = True):
        b = None if self.bias is None else self.bias[...]
        return qlinear(x, self.kernel[...], b, site=self.site, quant=quant, act_role=self.act_role, activation=activation,
                       norm=norm, residual=residual, split=split, cast_input=cast_input)


class Embedding(nnx.Module):
    """A lookup table ``weight`` (rows, dim): no matmul, so no quantization site."""

    def __init__(self, rows: int, dim: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.weight = nnx.Param(jax.random.normal(rngs.params(), (rows, dim), param_dtype))

    def __call__(self, ids):
        return jnp.take(self.weight[...], ids, axis=0)


def layer_norm(x, scale=None, bias=None, *, eps: float = 1e-6):
    """LayerNorm over the last axis (biased variance, as PyTorch), in float32; returns ``x.dtype``."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps)
    if scale is not None:
        y = y * scale.astype(jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype)


def rms_norm(x, scale=None, *, eps: float = 1e-6):
    """RMSNorm over the last axis, in float32; returns ``x.dtype``."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + eps)
    if scale is not None:
        y = y * scale.astype(jnp.float32)
    return y.astype(x.dtype)


def group_norm(x, num_groups: int, scale=None, bias=None, *, eps: float = 1e-6):
    """GroupNorm of a channels-last array (groups split the last axis), in float32; returns ``x.dtype``."""
    c = x.shape[-1]
    if c % num_groups:
        raise ValueError(f"group_norm: {c} channels are not divisible into {num_groups} groups")
    xf = x.astype(jnp.float32).reshape(x.shape[0], -1, num_groups, c // num_groups)
    mean = jnp.mean(xf, axis=(1, 3), keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=(1, 3), keepdims=True)
    y = ((xf - mean) * jax.lax.rsqrt(var + eps)).reshape(x.shape)
    if scale is not None:
        y = y * scale.astype(jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis; ``affine=True`` adds ``scale`` and ``bias`` (no matmul)."""

    def __init__(self, dim: int, *, eps: float = 1e-6, affine: bool = False, use_bias: bool = True,
                 rngs: nnx.Rngs | None = None, param_dtype=jnp.float32):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype)) if affine else None
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype)) if affine and use_bias else None

    def __call__(self, x):
        return layer_norm(x, None if self.scale is None else self.scale[...],
                          None if self.bias is None else self.bias[...], eps=self.eps)


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis with a learned ``scale`` (``affine=False``: none)."""

    def __init__(self, dim: int, *, eps: float = 1e-6, affine: bool = True,
                 rngs: nnx.Rngs | None = None, param_dtype=jnp.float32):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype)) if affine else None

    def __call__(self, x):
        return rms_norm(x, None if self.scale is None else self.scale[...], eps=self.eps)


def modulate(x, shift, scale):
    """adaLN modulation ``x * (1 + scale) + shift`` with per-sample ``shift``/``scale`` (B, D) over tokens."""
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


def _check_activation(activation: str, what: str) -> str:
    """``activation`` if known, else a ValueError naming ``what``; returns the role of its output."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"{what}: unknown activation {activation!r}; known: {sorted(ACTIVATIONS)}")
    return "post_gelu" if activation.startswith("gelu") else "act"


class Mlp(nnx.Module):
    """Two-layer MLP ``fc2(act(fc1(x)))``; sites ``{site}.fc1`` and ``{site}.fc2``.

    ``activation``: ``"gelu_tanh"`` (DiT, PixArt-Σ, SD3), ``"gelu"`` or ``"silu"``. After a GELU
    the input of ``fc2`` has role ``post_gelu``, otherwise ``act``.
    """

    def __init__(self, dim: int, hidden: int, out_dim: int | None = None, *, site: str, rngs: nnx.Rngs,
                 activation: str = "gelu_tanh", use_bias: bool = True, param_dtype=jnp.float32):
        role = _check_activation(activation, f"Mlp {site!r}")
        self.activation = activation
        self.fc1 = Linear(dim, hidden, site=f"{site}.fc1", rngs=rngs, use_bias=use_bias, param_dtype=param_dtype)
        self.fc2 = Linear(hidden, out_dim or dim, site=f"{site}.fc2", rngs=rngs, use_bias=use_bias,
                          act_role=role, param_dtype=param_dtype)

    def __call__(self, x, quant: QuantizerBase | None = None, norm: AdaNorm | None = None,
                 residual: GatedResidual | None = None):
        """``residual(fc2(act(fc1(norm(x)))))``; ``norm`` / ``residual`` (default none) as in :func:`qlinear`.

        Where :data:`ACT_CAST_ENV` allows (by default on a GPU, bf16, fake quant) and the plan casts
        fc2's input with one MX / MX9-MX6-MX4 block cast, the activation and that cast run as one pass
        (:func:`jdq.kernels.act_cast.act_cast`: the same activation, operation by operation rounded to
        bf16, and the same cast — see :mod:`jdq.kernels.act_cast.ref`). With ``JDQ_SPLIT_CAST=kernel``
        (:data:`SPLIT_CAST_ENV`) a MixDiT split of fc2's input runs with the activation in
        :func:`jdq.kernels.split_cast.split_cast`.
        """
        hidden = self.fc2.kernel[...].shape[0]
        split = _fused_act_split(quant, self.fc1.site, self.fc2.site, self.fc2.act_role, self.activation,
                                 x.shape[:-1] + (hidden,), x.dtype)
        if split is not None:
            from jdq.kernels.split_cast import split_cast

            h = split_cast(self.fc1(x, quant, norm=norm), split[1], split[0], self.activation,
                           impl=getattr(quant, "impl", "auto"))
            return self.fc2(h, quant, residual=residual, cast_input=False)
        spec = _fused_act_cast(quant, self.fc1.site, self.fc2.site, self.fc2.act_role, self.activation,
                               x.dtype, hidden)
        if spec is not None:
            from jdq.kernels.act_cast import act_cast

            h = act_cast(self.fc1(x, quant, norm=norm), spec, self.activation, impl=getattr(quant, "impl", "auto"))
            return self.fc2(h, quant, residual=residual, cast_input=False)
        return self.fc2(self.fc1(x, quant, activation=self.activation, norm=norm), quant, residual=residual)


def head_norm(head_dim: int, kind: str | None, *, site: str = "", eps: float = 1e-6, param_dtype=jnp.float32):
    """The per-head QK-norm of diffusers' ``Attention(qk_norm=kind)``, learned scale, or ``None``.

    ``kind``: ``None``, ``"rms_norm"`` (SD3.5) or ``"layer_norm"``; ``site`` names the attention
    in the error for any other value.
    """
    if kind is None:
        return None
    if kind == "rms_norm":
        return RMSNorm(head_dim, eps=eps, param_dtype=param_dtype)
    if kind == "layer_norm":
        return LayerNorm(head_dim, eps=eps, affine=True, param_dtype=param_dtype)
    raise ValueError(f"{site or 'attention'}: qk_norm must be None, 'rms_norm' or 'layer_norm', got {kind!r}")


class SelfAttention(nnx.Module):
    """Multi-head self-attention with a fused ``qkv`` projection (timm/DiT layout) and ``proj``.

    Sites ``{site}.qkv`` (output features ordered ``[q | k | v]``, each ``[head0 | head1 | ...]``),
    ``{site}.proj``, and the matmuls ``{site}.qk`` / ``{site}.pv``. ``qk_norm`` (see
    :func:`head_norm`: ``"rms_norm"`` or ``"layer_norm"``) normalises q and k per head over the
    head dimension, with learned scales ``norm_q.scale``/``norm_k.scale``.
    """

    def __init__(self, dim: int, num_heads: int, *, site: str, rngs: nnx.Rngs, qkv_bias: bool = True,
                 proj_bias: bool = True, qk_norm: str | None = None, qk_norm_eps: float = 1e-6,
                 param_dtype=jnp.float32):
        if dim % num_heads:
            raise ValueError(f"SelfAttention {site!r}: dim {dim} is not divisible by num_heads {num_heads}")
        self.site = site
        self.num_heads = num_heads
        self.qkv = Linear(dim, 3 * dim, site=f"{site}.qkv", rngs=rngs, use_bias=qkv_bias, param_dtype=param_dtype)
        self.proj = Linear(dim, dim, site=f"{site}.proj", rngs=rngs, use_bias=proj_bias, param_dtype=param_dtype)
        head_dim = dim // num_heads
        self.norm_q = head_norm(head_dim, qk_norm, site=site, eps=qk_norm_eps, param_dtype=param_dtype)
        self.norm_k = head_norm(head_dim, qk_norm, site=site, eps=qk_norm_eps, param_dtype=param_dtype)

    def __call__(self, x, quant: QuantizerBase | None = None, mask=None, norm: AdaNorm | None = None,
                 residual: GatedResidual | None = None):
        """``residual(proj(attention(qkv(norm(x)))))``; ``norm`` / ``residual`` (default none) as in :func:`qlinear`."""
        b, n, d = x.shape
        heads = lambda t: t.reshape(b, n, self.num_heads, d // self.num_heads)  # noqa: E731
        q, k, v = map(heads, self.qkv(x, quant, norm=norm, split=3))
        if self.norm_q is not None:
            q, k = self.norm_q(q), self.norm_k(k)
        out = attention(q, k, v, site=self.site, quant=quant, mask=mask)
        return self.proj(out.reshape(b, n, d), quant, residual=residual)


# --------------------------------------------------------------------------------------------
# Patches, positions, timesteps
# --------------------------------------------------------------------------------------------


def patchify(x, patch_size: int):
    """(B, H, W, C) -> (B, H/p·W/p, p·p·C), tokens row-major, features ordered (p_h, p_w, C)."""
    b, h, w, c = x.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"patchify: spatial size {h}x{w} is not divisible by patch size {p}")
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x, patch_size: int, height: int, width: int):
    """(B, h·w, p·p·C) -> (B, h·p, w·p, C) for a token grid of ``height`` x ``width`` patches."""
    b, n, f = x.shape
    p = patch_size
    if n != height * width or f % (p * p):
        raise ValueError(f"unpatchify: got {n} tokens of {f} features for a {height}x{width} grid, patch {p}")
    c = f // (p * p)
    x = x.reshape(b, height, width, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, height * p, width * p, c)


class PatchEmbed(Linear):
    """Patch embedding as a linear over flattened patches (a stride=kernel conv *is* one): a site.

    Input (B, H, W, C) channels-last, output (B, H/p·W/p, dim). The kernel is (p·p·C, dim) with
    rows ordered (p_h, p_w, C); a PyTorch conv weight (dim, C, p, p) converts by
    ``w.transpose(2, 3, 1, 0).reshape(p*p*C, dim)``.
    """

    def __init__(self, in_channels: int, patch_size: int, dim: int, *, site: str, rngs: nnx.Rngs,
                 use_bias: bool = True, param_dtype=jnp.float32):
        super().__init__(patch_size * patch_size * in_channels, dim, site=site, rngs=rngs,
                         use_bias=use_bias, param_dtype=param_dtype)
        self.patch_size = patch_size

    def __call__(self, x, quant: QuantizerBase | None = None):
        return super().__call__(patchify(x, self.patch_size), quant)


def sincos_pos_embed_1d(dim: int, pos) -> np.ndarray:
    """1-D sin-cos embedding ``[sin(pos·ω), cos(pos·ω)]``, ``ω_i = 10000^(-2i/dim)``, in float64."""
    if dim % 2:
        raise ValueError(f"sincos_pos_embed_1d: dim must be even, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.outer(np.asarray(pos, np.float64).reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int | None = None, *, base_size: float | None = None,
                        interpolation_scale: float = 1.0) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding (MAE/DiT/diffusers convention), (grid_h·grid_w, dim) float32.

    Tokens are row-major over (h, w). The first ``dim/2`` features embed the *column* (w) index,
    the last ``dim/2`` the row (h) index, as in facebookresearch/DiT and diffusers. Positions are
    ``arange(n) / (n / base_size) / interpolation_scale`` computed in float32 (diffusers);
    ``base_size=None`` means ``base_size = n`` (plain ``arange``, DiT).
    """
    if dim % 4:
        raise ValueError(f"sincos_pos_embed_2d: dim must be divisible by 4, got {dim}")
    grid_w = grid_h if grid_w is None else grid_w

    def positions(n):
        base = n if base_size is None else base_size
        return np.arange(n, dtype=np.float32) / np.float32(n / base) / np.float32(interpolation_scale)

    ww, hh = np.meshgrid(positions(grid_w), positions(grid_h))  # (grid_h, grid_w) each
    emb = np.concatenate([sincos_pos_embed_1d(dim // 2, ww), sincos_pos_embed_1d(dim // 2, hh)], axis=1)
    return emb.astype(np.float32)


def timestep_embedding(t, dim: int, *, flip_sin_to_cos: bool = True, freq_shift: float = 0.0,
                       max_period: float = 10000.0, scale: float = 1.0):
    """Sinusoidal timestep features (B,) -> (B, dim), float32.

    Frequencies ``exp(-ln(max_period)·i / (dim/2 - freq_shift))``, ``i < dim/2``; output
    ``[cos, sin]`` if ``flip_sin_to_cos`` else ``[sin, cos]``, zero-padded to odd ``dim``.
    facebookresearch/DiT is ``flip_sin_to_cos=True, freq_shift=0``; diffusers' DiT port uses
    ``freq_shift=1`` (``downscale_freq_shift=1``); diffusers' PixArt-Σ and SD3 use ``freq_shift=0``.
    """
    t = jnp.asarray(t, jnp.float32)
    if t.ndim == 0:
        t = t[None]
    half = dim // 2
    # The frequencies are a constant computed as PyTorch computes them (float32 exponent, exp
    # rounded to float32): t·freq reaches ~1000 rad, where one ulp of freq shows in sin/cos.
    exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32) / np.float32(half - freq_shift)
    freqs = np.exp(exponent.astype(np.float64)).astype(np.float32)
    args = t[:, None] * jnp.asarray(freqs)[None, :]
    if scale != 1:
        args = scale * args
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedder(nnx.Module):
    """Timestep -> vector: sinusoidal features, then ``mlp.0`` (Linear), SiLU, ``mlp.2`` (Linear).

    Sites ``{site}.mlp.0`` and ``{site}.mlp.2``. The frequency convention (``flip_sin_to_cos``,
    ``freq_shift``) is that of :func:`timestep_embedding` and must match the checkpoint's source.
    """

    def __init__(self, dim: int, *, site: str, rngs: nnx.Rngs, freq_dim: int = 256, out_dim: int | None = None,
                 flip_sin_to_cos: bool = True, freq_shift: float = 0.0, param_dtype=jnp.float32):
        self.freq_dim = freq_dim
        self.flip_sin_to_cos = flip_sin_to_cos
        self.freq_shift = freq_shift
        self.mlp = nnx.Dict({
            "0": Linear(freq_dim, dim, site=f"{site}.mlp.0", rngs=rngs, param_dtype=param_dtype),
            "2": Linear(dim, out_dim or dim, site=f"{site}.mlp.2", rngs=rngs, param_dtype=param_dtype),
        })

    def __call__(self, t, quant: QuantizerBase | None = None, dtype=jnp.float32):
        f = timestep_embedding(t, self.freq_dim, flip_sin_to_cos=self.flip_sin_to_cos,
                               freq_shift=self.freq_shift).astype(dtype)
        return self.mlp["2"](jax.nn.silu(self.mlp["0"](f, quant)), quant)


# --------------------------------------------------------------------------------------------
# Blocks named as diffusers names them (PixArt-Σ, SD3): their paths are diffusers' module paths
# --------------------------------------------------------------------------------------------


def split_heads(x, heads: int):
    """(B, L, H·D) → (B, L, H, D)."""
    b, n, d = x.shape
    return x.reshape(b, n, heads, d // heads)


def merge_heads(x):
    """(B, L, H, D) → (B, L, H·D)."""
    b, n, h, d = x.shape
    return x.reshape(b, n, h * d)


class TwoLayer(nnx.Module):
    """``linear_2(act(linear_1(x)))``: diffusers' ``TimestepEmbedding`` (SiLU) and ``PixArtAlphaTextProjection``.

    ``act`` is an :class:`Mlp` activation name; after a GELU ``linear_2``'s input has role ``post_gelu``.
    """

    def __init__(self, din: int, dout: int, *, site: str, rngs: nnx.Rngs, act: str = "silu"):
        role = _check_activation(act, f"TwoLayer {site!r}")
        self.act = act
        self.linear_1 = Linear(din, dout, site=f"{site}.linear_1", rngs=rngs)
        self.linear_2 = Linear(dout, dout, site=f"{site}.linear_2", rngs=rngs, act_role=role)

    def __call__(self, x, quant=None):
        return self.linear_2(self.linear_1(x, quant, activation=self.act), quant)


class GeluProj(nnx.Module):
    """diffusers' ``GELU`` activation module: ``gelu(proj(x))``."""

    def __init__(self, din: int, dout: int, *, site: str, rngs: nnx.Rngs, approximate: bool = True):
        self.approximate = approximate
        self.proj = Linear(din, dout, site=f"{site}.proj", rngs=rngs)

    def __call__(self, x, quant=None):
        return self.proj(x, quant, activation="gelu_tanh" if self.approximate else "gelu")


class FeedForward(nnx.Module):
    """diffusers' ``FeedForward`` with GELU: sites ``{site}.net.0.proj`` and ``{site}.net.2`` (post_gelu)."""

    def __init__(self, dim: int, *, site: str, rngs: nnx.Rngs, mult: int = 4, approximate: bool = True):
        inner = dim * mult
        self.net = nnx.Dict({
            "0": GeluProj(dim, inner, site=f"{site}.net.0", rngs=rngs, approximate=approximate),
            "2": Linear(inner, dim, site=f"{site}.net.2", rngs=rngs, act_role="post_gelu"),
        })

    def __call__(self, x, quant=None):
        return self.net["2"](self.net["0"](x, quant), quant)


class Attention(nnx.Module):
    """diffusers' ``Attention``: to_q/to_k/to_v → softmax(q·kᵀ/√d)·v (site ``{site}``) → ``to_out.0``.

    ``kv_dim`` is the width of the keys' source (cross-attention); ``qk_norm`` (``"rms_norm"``
    or ``"layer_norm"``, :func:`head_norm`) normalises q and k per head with learned weights
    (``norm_q``/``norm_k``).
    """

    def __init__(self, dim: int, heads: int, head_dim: int, *, site: str, rngs: nnx.Rngs,
                 kv_dim: int | None = None, bias: bool = True, qk_norm: str | None = None):
        inner = heads * head_dim
        kv_dim = dim if kv_dim is None else kv_dim
        self.heads = heads
        self.site = site
        self.to_q = Linear(dim, inner, site=f"{site}.to_q", rngs=rngs, use_bias=bias)
        self.to_k = Linear(kv_dim, inner, site=f"{site}.to_k", rngs=rngs, use_bias=bias)
        self.to_v = Linear(kv_dim, inner, site=f"{site}.to_v", rngs=rngs, use_bias=bias)
        self.to_out = nnx.Dict({"0": Linear(inner, dim, site=f"{site}.to_out.0", rngs=rngs)})
        self.norm_q = head_norm(head_dim, qk_norm, site=site)
        self.norm_k = head_norm(head_dim, qk_norm, site=site)

    def project(self, x, context=None, quant=None):
        """Per-head (q, k, v), each (B, L, H, D), q-/k-normalised if configured."""
        context = x if context is None else context
        q = split_heads(self.to_q(x, quant), self.heads)
        k = split_heads(self.to_k(context, quant), self.heads)
        v = split_heads(self.to_v(context, quant), self.heads)
        if self.norm_q is not None:
            q, k = self.norm_q(q), self.norm_k(k)
        return q, k, v

    def __call__(self, x, context=None, mask=None, quant=None):
        q, k, v = self.project(x, context, quant)
        out = attention(q, k, v, site=self.site, quant=quant, mask=mask)
        return self.to_out["0"](merge_heads(out), quant)


class PatchEmbedding(nnx.Module):
    """diffusers' ``PatchEmbed`` without a stored table: ``{site}.proj`` (a :class:`PatchEmbed` site) + positions.

    ``__call__(x, pos)`` adds the (tokens, dim) position table ``pos`` in float32 and returns
    the dtype of ``x``; the families compute ``pos`` for the latent's grid.
    """

    def __init__(self, in_channels: int, patch_size: int, dim: int, *, rngs: nnx.Rngs, site: str = "pos_embed"):
        self.proj = PatchEmbed(in_channels, patch_size, dim, site=f"{site}.proj", rngs=rngs)

    def __call__(self, x, pos, quant=None):
        h = self.proj(x, quant)
        return (h.astype(jnp.float32) + jnp.asarray(pos, jnp.float32)[None]).astype(x.dtype)
