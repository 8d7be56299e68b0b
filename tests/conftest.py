"""Shared test configuration: float32 reference precision on CPU, deterministic hypothesis, benchmark loading."""

import importlib.util
import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# Synchronous CPU dispatch: a Pallas kernel in interpret mode runs host callbacks on XLA's CPU threads, and an eager
# op issued by the test while they run deadlocked a 2-core machine once (every wait is then in the computation itself).
jax.config.update("jax_cpu_enable_async_dispatch", False)

try:
    from hypothesis import settings

    settings.register_profile("jdq", deadline=None, derandomize=True, print_blob=True)
    settings.load_profile("jdq")
except ImportError:  # pragma: no cover
    pass


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="session")
def load_benchmark():
    """``load_benchmark(name)`` imports ``benchmarks/<name>.py`` (scripts, not a package) once per session.

    A script puts ``benchmarks/`` on ``sys.path`` and imports its siblings by bare name (``import kernels``);
    those names are taken out of ``sys.modules`` again, and ``sys.path`` restored, so that a later import of a
    distribution of the same name (the ``kernels`` package ``diffusers`` imports) finds the distribution.
    """
    import sys

    loaded = {}

    def load(name: str):
        if name not in loaded:
            path, before = list(sys.path), set(sys.modules)
            spec = importlib.util.spec_from_file_location(f"jdq_benchmark_{name}", BENCHMARKS / f"{name}.py")
            module = importlib.util.module_from_spec(spec)
            try:
                spec.loader.exec_module(module)
            finally:
                sys.path[:] = path
                for key in set(sys.modules) - before:
                    origin = getattr(sys.modules[key], "__file__", None) or ""
                    if Path(origin).resolve().parent == BENCHMARKS:
                        del sys.modules[key]
            loaded[name] = module
        return loaded[name]

    return load
