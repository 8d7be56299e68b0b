"""OCP MX and shared-microexponent formats, one recipe per format: every matmul operand in the blocks.

``mxfp8_e4m3``, ``mxfp8_e5m2``, ``mxfp6_e3m2``, ``mxfp6_e2m3``, ``mxfp4_e2m1``, ``mxint8``, ``mx9``,
``mx6``, ``mx4``: weights and activations, attention included, in that format (block scales along
the contraction axis).
"""

from __future__ import annotations

from jdq import quant as Q
from jdq.recipes.core import BLOCKS, Recipe, register

MX_FORMATS = ("mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4_e2m1", "mxint8", "mx9", "mx6", "mx4")


def _mx(fmt: str):
    return lambda: [Q.rule(BLOCKS, Q.cast(fmt), name=f"{fmt} operands")]


for _fmt in MX_FORMATS:
    register(Recipe(_fmt, f"every matmul operand in the blocks in {_fmt}", _mx(_fmt)))
