"""FID Inception-v3 feature extraction speed: jdq (Flax, jitted) against torch-fidelity's extractor, same run.

::

    python benchmarks/inception.py                  # CPU, batch 16 of 256×256 uint8 images, writes results/inception.md
    python benchmarks/inception.py --batch 8 --repeats 3 --size 64

Both networks get the same random weights (the speed does not depend on their values; torch-fidelity's
module file is loaded as in the tests, without its package's torchvision import) and the same
uint8 NHWC batch (torch-fidelity takes NCHW: the transpose is outside its timing). Each extractor
computes the FID features (pool, unbiased logits; jdq also the sFID spatial features); one warm-up
call (jdq: compilation), then the median of ``--repeats`` calls. torch uses its default intra-op
threads, XLA its own; both see the same cores.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from jdq.io import atomic_write_text  # noqa: E402

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent / "tests" / "metrics"


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _median_seconds(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main(argv=None) -> int:
    """Time both extractors and write the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=256, help="input side (resized to 299 inside both)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=str(HERE / "results" / "inception.md"))
    args = p.parse_args(argv)

    import jax
    import torch

    sys.path.insert(0, str(TESTS))
    refs = _load(TESTS / "metric_references.py", "metric_references")
    helpers = _load(TESTS / "test_inception.py", "jdq_bench_test_inception")
    import tempfile

    from checkpoints_convert.inception import convert_inception
    from jdq.models import inception

    sd = helpers.random_state_dict(seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "w.pth"
        torch.save(sd, path)
        mod = refs.torch_fidelity("feature_extractor_inceptionv3")["feature_extractor_inceptionv3"]
        ref = mod.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                              feature_extractor_weights_path=str(path))
    params, cfg = convert_inception({k: v.numpy() for k, v in sd.items()})
    model = inception.from_config(cfg, abstract=True).replace(params=jax.tree.map(jax.numpy.asarray, params))

    images = np.random.default_rng(0).integers(0, 256, (args.batch, args.size, args.size, 3), dtype=np.uint8)
    nchw = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))

    def run_jdq():
        jax.block_until_ready(model(images))

    def run_torch():
        with torch.no_grad():
            ref(nchw)

    load_before = os.getloadavg()
    t_jdq = _median_seconds(run_jdq, args.repeats)
    t_torch = _median_seconds(run_torch, args.repeats)
    load_after = os.getloadavg()
    rows = [("torch-fidelity `FeatureExtractorInceptionV3` (PyTorch " + torch.__version__ + ")", t_torch),
            ("jdq `jdq.models.inception` (jax " + jax.__version__ + ", jitted)", t_jdq)]
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?") \
        if os.path.exists("/proc/cpuinfo") else "?"
    lines = ["# FID Inception-v3 features per second (CPU)", "",
             f"`python benchmarks/inception.py {' '.join(argv or sys.argv[1:])}` on {datetime.date.today()}: {cpu}, "
             f"{os.cpu_count()} cores, backend {jax.default_backend()}; batch {args.batch} of {args.size}×{args.size} "
             f"uint8 images (resized to 299 inside), median of {args.repeats}; load average {load_before[0]:.1f} "
             f"before, {load_after[0]:.1f} after (shared machine).", "",
             "| extractor | s / batch | features / s | × torch-fidelity |", "|---|---:|---:|---:|"]
    for label, t in rows:
        lines.append(f"| {label} | {t:.2f} | {args.batch / t:.2f} | {t_torch / t:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    atomic_write_text(args.out, text, parents=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
