"""The lowered GEMM ops, one line each: the list :func:`jdq.kernels.lower` and :func:`jdq.kernels.lowered_linear` loop over.

Adding a kernel is its folder ``jdq/kernels/<op>/`` (``ref.py``, ``gpu.py`` / ``tpu.py``, and
``api.py`` defining its :class:`~jdq.kernels.op.KernelOp` ``OP``) plus one entry here (and its
block sizes in :mod:`jdq.kernels.tuning` if it has a tuned GPU kernel). Lowering asks the ops in
this order; the first whose ``supports`` accepts a site runs it.
"""

from __future__ import annotations

from jdq.kernels.mixdit.api import OP as MIXDIT
from jdq.kernels.mx.api import OP as MX
from jdq.kernels.op import KernelOp
from jdq.kernels.w4a8.api import OP as W4A8
from jdq.kernels.w8a8.api import OP as W8A8
from jdq.kernels.weight_only.api import OP as WEIGHT_ONLY

#: Every lowered GEMM op, in the order lowering asks them.
OPS: tuple[KernelOp, ...] = (W8A8, W4A8, WEIGHT_ONLY, MIXDIT, MX)

#: Lowered weight kind -> the op that runs it.
BY_KIND: dict[str, KernelOp] = {kind: op for op in OPS for kind in op.kinds}

#: Every lowered weight kind.
KINDS: tuple[str, ...] = tuple(BY_KIND)


def op_for_kind(kind: str) -> KernelOp:
    """The op that runs lowered weights of ``kind``; an unknown kind is an error listing :data:`KINDS`."""
    try:
        return BY_KIND[kind]
    except KeyError:
        raise ValueError(f"unknown lowered kind {kind!r}; known: {KINDS}") from None
