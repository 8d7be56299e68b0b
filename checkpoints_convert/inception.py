"""torch-fidelity's / pytorch-fid's FID Inception-v3 ``.pth`` -> jdq ``inception`` params.

Both files (``weights-inception-2015-12-05-6726825d.pth``, ``pt_inception-2015-12-05-6726825d.pth``)
hold a state dict with torchvision's Inception-v3 names: ``<block>.conv.weight`` (out, in, kh, kw),
``<block>.bn.{weight,bias,running_mean,running_var}`` and ``fc.weight`` (1008, 2048), ``fc.bias``;
a BatchNorm's ``num_batches_tracked`` counter (training bookkeeping) is accepted and dropped. Every
other key is consumed and shape-checked against the jdq model; the result is read with
:func:`checkpoints_convert.common.read_torch_checkpoint` (``weights_only=True``).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from checkpoints_convert.common import CheckpointError, StateDict, check_like

#: A key that only the FID Inception's state dict has (how ``jdq convert`` recognises the file).
SIGNATURE = "Mixed_7c.branch3x3dbl_3b.conv.weight"


def is_inception_state_dict(state: Mapping[str, Any]) -> bool:
    """Whether ``state`` looks like an Inception-v3 state dict."""
    return SIGNATURE in state and "fc.weight" in state


def convert_inception(state_dict: Mapping[str, Any]):
    """A torch-fidelity / pytorch-fid Inception state dict -> ``(params, inception.Config)``."""
    from flax import nnx

    from jdq.models import inception

    what = "FID Inception-v3 checkpoint"
    tensors = {k: v for k, v in state_dict.items() if not k.endswith(".num_batches_tracked")}
    sd = StateDict(tensors, what)
    if "fc.weight" not in sd:
        raise CheckpointError(f"{what}: missing key 'fc.weight' (is this an Inception-v3 state dict?)")
    num_classes = sd.shape("fc.weight")[0]
    cfg = inception.Config(num_classes=num_classes, source="tensorflow/inception-2015-12-05")
    module = nnx.eval_shape(lambda: inception.build(cfg))
    params: dict = {}

    def put(path, name, value):
        node = params
        for k in path:
            node = node.setdefault(k, {})
        node[name] = np.ascontiguousarray(value, dtype=np.float32)

    for path, m in nnx.iter_modules(module):
        key = ".".join(str(p) for p in path)
        if isinstance(m, inception.Conv):
            kh, kw, c_in, c_out = m.kernel.shape
            put(path, "kernel", sd.take(f"{key}.weight", (c_out, c_in, kh, kw)).transpose(2, 3, 1, 0))
        elif isinstance(m, inception.BatchNorm):
            (c,) = m.scale.shape
            put(path, "scale", sd.take(f"{key}.weight", (c,)))
            put(path, "bias", sd.take(f"{key}.bias", (c,)))
            put(path, "mean", sd.take(f"{key}.running_mean", (c,)))
            var = sd.take(f"{key}.running_var", (c,))
            if np.any(var < 0) or not np.all(np.isfinite(var)):
                raise CheckpointError(f"{what}: {key}.running_var has negative or non-finite entries")
            put(path, "var", var)
        elif isinstance(m, inception.Linear):
            d_in, d_out = m.kernel.shape
            put(path, "kernel", sd.take(f"{key}.weight", (d_out, d_in)).T)
            put(path, "bias", sd.take(f"{key}.bias", (d_out,)))
    sd.finish()
    check_like(params, nnx.to_pure_dict(nnx.state(module)), what)
    return params, cfg
