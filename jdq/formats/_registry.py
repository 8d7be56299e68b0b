"""How a format module registers its kind: a :class:`FormatKind` record, looked up by ``spec.kind``.

A format module (``mx``, ``smx``, ``uniform``, ``fp8``) defines its spec class (a frozen dataclass
with ``name``, ``kind``, ``options``, ``bits_per_element``, ``element_bits``) and ends with
``register(FormatKind(...))``: its names, how a name becomes a spec, and its fake-quantize /
quantize / dequantize / scale functions in the common signatures below. :mod:`jdq.formats` (its
face, :mod:`._api`) resolves names and dispatches through :func:`kind_of`; adding a format is
its module plus its import line in :mod:`._api`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class FormatKind:
    """One kind of number format (``spec.kind``) and its functions.

    * ``names()``: the format names of this kind (for listings; ``from_name`` may accept more);
    * ``from_name(name)``: the spec of ``name``, or ``None`` when the name is not of this kind;
    * ``fake(x, spec, axis, scale, zero)``: quantize-dequantize (``scale``/``zero``: static
      parameters or ``None``);
    * ``quantize(x, spec, axis, scale, zero)``: ``(codes, scale, zero, micro)`` (``None`` where the
      kind has no such field);
    * ``dequantize(codes, scale, zero, micro, spec, axis, dtype)``: the values;
    * ``compute_scale(x, spec, axis)``: the dynamic ``(scale, zero)``, or ``None`` for kinds whose
      block scales are computed inside the cast (MX, SMX);
    * ``accepts_zero``: whether a static zero point means anything (asymmetric integers);
    * ``signed_codes(spec)``: whether unpacked codes are two's-complement integers.
    """

    kind: str
    spec_type: type
    names: Callable[[], tuple[str, ...]]
    from_name: Callable[[str], Any]
    fake: Callable[..., Any]
    quantize: Callable[..., tuple]
    dequantize: Callable[..., Any]
    compute_scale: Callable[..., tuple] | None = None
    accepts_zero: bool = False
    signed_codes: Callable[[Any], bool] = lambda spec: False


_KINDS: dict[str, FormatKind] = {}


def register(kind: FormatKind) -> FormatKind:
    """Add a format kind (a kind may be registered once)."""
    if kind.kind in _KINDS:
        raise ValueError(f"format kind {kind.kind!r} is already registered")
    _KINDS[kind.kind] = kind
    return kind


def kinds() -> tuple[FormatKind, ...]:
    """The registered format kinds, in registration order."""
    return tuple(_KINDS.values())


def kind_of(spec) -> FormatKind:
    """The :class:`FormatKind` of a spec (by ``spec.kind``)."""
    return _KINDS[spec.kind]
