"""Named quantization plans (``jdq sample --quant NAME``, ``jdq quantize --recipe NAME``), one file per paper.

This package is a face: the registry and the user flow live in :mod:`jdq.recipes.core`
(:class:`Recipe`, :func:`register`, :func:`get`, :func:`names`, :func:`plan_for`, and
:func:`quantize`, which runs recipe → calibrate → init → bind and returns a ready
:class:`Quantized`); each paper's recipes live in their own module and register themselves:

* :mod:`.baselines` — round-to-nearest ``w8a8``, ``w8a8-static``, ``w8a8-fp8attn``, ``w4a8``;
* :mod:`.mx` — one recipe per OCP MX / shared-microexponent format;
* :mod:`.mixdit` — ``mixdit``;
* :mod:`.tqdit` — ``tq-dit`` (TQ-DiT);
* :mod:`.ptq4dit` — ``ptq4dit`` (PTQ4DiT);
* :mod:`.qdit` — ``q-dit`` (Q-DiT);
* :mod:`.vidit_q` — ``vidit-q`` (ViDiT-Q);
* :mod:`.mixdq` — ``mixdq`` (MixDQ).

Which operands a recipe quantizes: the matmuls inside the transformer blocks of every family
(``blocks.*`` in DiT, ``transformer_blocks.*`` in PixArt-Σ and SD3, ``joint_transformer_blocks.*``
/ ``single_transformer_blocks.*`` where present; the layers of the text encoders, ``encoder.block.*``
in T5 and ``text_model.encoder.layers.*`` / ``vision_model.encoder.layers.*`` in CLIP); the embedders, the adaLN-single / time MLPs
outside the blocks and the final layer stay in floating point (the common skip list of ViDiT-Q,
Q-DiT and PTQ4DiT). Weights are cast along their contraction (input) axis, so an integer
weight's ``"row"`` scale is per output channel.

Other modules may add recipes with :func:`register`.
"""

from jdq.recipes.core import (
    ATTENTION_SITES,
    BLOCKS,
    LINEAR_ACTS,
    Quantized,
    Recipe,
    RecipeError,
    calibration_stats,
    encoder_quantizers,
    get,
    model_operands,
    names,
    plan_for,
    quantize,
    register,
)
from jdq.recipes import baselines, mx, mixdit, tqdit, ptq4dit, qdit, vidit_q, mixdq  # noqa: E402,F401  (registration order = names() order)
from jdq.recipes import saved  # noqa: E402
from jdq.recipes.saved import load, save  # noqa: E402
from jdq.recipes.baselines import fp8_attention_rules  # noqa: E402
from jdq.recipes.mx import MX_FORMATS  # noqa: E402
