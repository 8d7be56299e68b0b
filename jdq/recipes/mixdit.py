"""MixDiT (arXiv 2504.08398): activations split by magnitude into MX9 outliers and an MX6 rest; weights in MX6.

``mixdit``: the top 5 % of blocks of the linear layers' activations and the top 20 % of the
attention operands in MX9, the rest in MX6.
"""

from __future__ import annotations

from jdq import quant as Q
from jdq.recipes.core import BLOCKS, LINEAR_ACTS, Recipe, register


def _mixdit(linear_ratio: float = 0.05, attn_ratio: float = 0.20):
    def rules():
        return [
            Q.rule(BLOCKS, Q.cast("mx6"), roles=("weight",), name="mx6 weights"),
            Q.rule(BLOCKS, Q.outlier_split(linear_ratio, hi="mx9", lo="mx6"), roles=LINEAR_ACTS,
                   name=f"linear activations: top {linear_ratio:.0%} blocks mx9, rest mx6"),
            Q.rule(BLOCKS, Q.outlier_split(attn_ratio, hi="mx9", lo="mx6"), roles=Q.ATTENTION_ROLES,
                   name=f"attention operands: top {attn_ratio:.0%} blocks mx9, rest mx6"),
        ]
    return rules


register(Recipe("mixdit", "MixDiT: activation outliers (5% linear, 20% attention) in mx9, the rest and weights in mx6",
                _mixdit()))
