"""What every ``jdq`` sub-command shares: the error type and where the embedded model lives."""

from __future__ import annotations

from pathlib import Path

#: Where the embedded default model lives (inside the installed package).
ASSETS = Path(__file__).resolve().parents[1] / "assets"
DEFAULT_MODEL = ASSETS / "animal_dit"
DEFAULT_CLASSIFIER = ASSETS / "animal_classifier.safetensors"


class CliError(Exception):
    """A problem with the command's arguments or inputs; printed as one line, exit status 2."""


#: Sub-command name -> (module under ``jdq.cli``, one-line help shown without importing it).
#: A new sub-command is a module ``jdq/cli/<module>.py`` (``add_parser(subparsers)``, ``run(args)``)
#: plus one line here.
COMMANDS = {
    "sample": ("sample", "sample a model (default: the embedded Animal-MNIST DiT) to a PNG grid and .npz"),
    "convert": ("convert", "convert an official checkpoint (DiT .pt, Inception .pth, diffusers folder) to a jdq folder"),
    "eval": ("eval", "sample quality (FID, precision/recall, PSNR/SSIM vs FP) with intervals, resumable"),
    "encode-prompts": ("encode_prompts", "encode prompts with a pipeline's text encoders to a .safetensors cache"),
    "quantize": ("quantize", "calibrate a recipe (tq-dit, ptq4dit, q-dit, ...) and write the quantized model to a folder"),
    "cost": ("cost", "latency/energy of a plan on a hardware preset (accelerator cost model)"),
    "sensitivity": ("sensitivity", "per-layer, per-bit-width sensitivity (SSIM / SQNR vs FP) as JSON and a bar chart"),
    "sweep": ("sweep", "precision sweep vmapped in one compiled sampler: quality vs latency, Pareto front, resumable"),
}


def require_writable(path, what: str, *, folder: bool = False):
    """Raise :class:`CliError` now if ``path`` cannot be written (see :func:`jdq.io.check_writable`)."""
    from jdq.io import check_writable

    try:
        return check_writable(path, folder=folder)
    except OSError as e:
        raise CliError(f"{what}: {e}") from None


def require_finite(value, flag: str, *, minimum: float | None = None, strictly: bool = False):
    """Raise :class:`CliError` unless ``value`` is None or a finite number (``>= minimum``, or ``>`` if ``strictly``)."""
    import math

    if value is None:
        return value
    if not math.isfinite(value):
        raise CliError(f"{flag} must be a finite number, got {value}")
    if minimum is not None and (value <= minimum if strictly else value < minimum):
        raise CliError(f"{flag} must be {'>' if strictly else '>='} {minimum:g}, got {value:g}")
    return value
