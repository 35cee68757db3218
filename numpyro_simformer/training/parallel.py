"""Data parallelism on JAX's own machinery: one mesh axis ``"data"`` over all devices.

Training shards each batch over the devices and replicates the parameters; ``jax.jit``
inserts the gradient all-reduce, so a sharded run computes the same steps as a
single-device run up to floating-point reduction order. Simulation shards the keys of
each chunk the same way; each draw depends only on its own key, so the draws are the same
as unsharded ones.

Several hosts: start one process per host, call ``jax.distributed.initialize()`` in each
before anything else (see ``examples/multihost.py``); ``jax.devices()`` then lists every
host's devices and the same code runs unchanged.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
from jax.sharding import NamedSharding, PartitionSpec

__all__ = ["DataParallel", "data_parallel", "resolve_devices"]


class DataParallel(NamedTuple):
    """Shardings of a one-axis ``"data"`` mesh."""

    mesh: jax.sharding.Mesh
    batch: NamedSharding
    replicated: NamedSharding

    @property
    def num_devices(self) -> int:
        return self.mesh.devices.size


def data_parallel(devices=None) -> DataParallel:
    """A ``"data"`` mesh over ``devices`` (default: all of ``jax.devices()``)."""
    devices = list(jax.devices() if devices is None else devices)
    # Auto axes: jit propagates the batch sharding and inserts the gradient all-reduce.
    mesh = jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)
    return DataParallel(mesh, NamedSharding(mesh, PartitionSpec("data")), NamedSharding(mesh, PartitionSpec()))


def resolve_devices(option) -> DataParallel | None:
    """Interpret a ``data_parallel`` option: ``None`` = auto (all devices if more than one),
    ``False`` = one device, ``True`` = all devices, or an explicit list of devices."""
    if option is False:
        return None
    if option is None or option is True:
        if jax.device_count() == 1:
            return None
        return data_parallel()
    return data_parallel(option)
