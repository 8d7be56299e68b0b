"""Meshes and data-parallel placement (``jax.sharding``) for sampling, evaluation and sweeps.

Data parallelism here is a one-axis mesh over devices named ``"batch"``: inputs with a leading
batch axis are split over it, everything else (params, quantization state, sampler tables) is
replicated, and ``jax.jit`` partitions the computation from the input shardings. Code written
this way runs unchanged on one device, on all local GPUs, or on CPU with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

#: Name of the data-parallel mesh axis.
BATCH_AXIS = "batch"


def batch_mesh(devices: Sequence[jax.Device] | None = None, num_devices: int | None = None) -> Mesh:
    """A one-axis mesh (``"batch"``) over ``devices`` (default: all local devices, or the first ``num_devices``)."""
    devices = list(jax.local_devices() if devices is None else devices)
    if num_devices is not None:
        if not 1 <= num_devices <= len(devices):
            raise ValueError(f"num_devices={num_devices}, but {len(devices)} device(s) are available")
        devices = devices[:num_devices]
    return Mesh(np.array(devices), (BATCH_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding that splits the leading axis over the mesh's batch axis."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding that copies an array to every device of the mesh."""
    return NamedSharding(mesh, PartitionSpec())


def padded_size(batch: int, mesh: Mesh | None) -> int:
    """The smallest multiple of the mesh's device count that is ``>= batch``."""
    n = 1 if mesh is None else mesh.devices.size
    return -(-batch // n) * n


def shard_batch(tree, mesh: Mesh | None):
    """Place every leaf of ``tree`` with its leading axis split over ``mesh`` (no-op without a mesh).

    The leading axis must be divisible by the number of devices (see :func:`padded_size`).
    """
    if mesh is None:
        return tree
    n = mesh.devices.size
    for leaf in jax.tree.leaves(tree):
        if np.ndim(leaf) == 0 or np.shape(leaf)[0] % n:
            raise ValueError(f"cannot split a leading axis of shape {np.shape(leaf)} over {n} devices; "
                             f"pad the batch to a multiple of {n}")
    return jax.device_put(tree, batch_sharding(mesh))


def replicate(tree, mesh: Mesh | None):
    """Copy every leaf of ``tree`` to all devices of ``mesh`` (no-op without a mesh)."""
    if mesh is None:
        return tree
    return jax.device_put(tree, replicated(mesh))
