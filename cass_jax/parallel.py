"""Data parallelism, stated once: a 1-D mesh over every device, the batch split on it, the state replicated.

Works unchanged on one CPU, several local GPUs, and several hosts joined by `jax.distributed.initialize`.
"""

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def data_mesh() -> Mesh:
    """A mesh with one axis, `data`, over all devices of all processes."""
    return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the devices."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device (parameters, optimizer state)."""
    return NamedSharding(mesh, PartitionSpec())


def per_process_batch_size(global_batch_size: int) -> int:
    """This process's share of the global batch; the global batch must split evenly over the devices."""
    devices, processes = jax.device_count(), jax.process_count()
    if global_batch_size % devices:
        raise ValueError(
            f"batch_size={global_batch_size} does not split over {devices} devices; "
            f"set --config.batch_size to a multiple of {devices}.")
    return global_batch_size // processes


def to_global_batch(local_batch: dict[str, Any], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Assembles each process's part of the batch into one global array sharded on the batch axis."""
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)
