"""Device mesh and shardings, declared once.

Axes: `data` (batch) and `model` (optional FSDP of the frozen backbones for the large variants).
Batches are split over `data`; the trainable state is replicated (it is small: ~6 M adapter
parameters plus the decoder); frozen backbone weights are either replicated or sharded over
`model` along their largest evenly divisible axis.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from spectralmoe_jax.errors import UserError


def make_mesh(mesh_config) -> jax.sharding.Mesh:
    """`mesh.model` devices per model group; `mesh.data` = -1 takes the rest."""
    devices = jax.device_count()
    model, data = int(mesh_config.model), int(mesh_config.data)
    if data == -1:
        data = devices // model
    if data * model != devices:
        raise UserError(f"config mesh.data={data} x mesh.model={model} does not use the "
                        f"{devices} devices")
    # Auto axes on purpose: shardings are given explicitly at the jit boundary.
    return jax.make_mesh((data, model), ("data", "model"), axis_types=(AxisType.Auto, AxisType.Auto))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def fsdp_sharding(mesh, array) -> NamedSharding:
    """Shards the largest axis divisible by the model axis size; replicates small arrays."""
    size = mesh.shape["model"]
    if size == 1 or array.ndim == 0 or int(np.prod(array.shape)) < 2**16:
        return replicated(mesh)
    for axis in np.argsort(array.shape)[::-1]:
        if array.shape[axis] % size == 0:
            spec = [None] * array.ndim
            spec[axis] = "model"
            return NamedSharding(mesh, P(*spec))
    return replicated(mesh)


def param_sharding(mesh, fsdp: bool, is_frozen):
    """(path, array) -> where the parameter lives: frozen backbone weights sharded over `model`
    when `fsdp`, everything else replicated. `is_frozen(path)` tells them apart."""
    def place(path, array):
        return fsdp_sharding(mesh, array) if fsdp and is_frozen(path) else replicated(mesh)

    return place


def global_batch(batch: dict, mesh) -> dict:
    """Process-local numpy batch -> global arrays sharded over `data` (works on many hosts)."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items() if not isinstance(v, (str, bytes)) and np.asarray(v).dtype != object}
