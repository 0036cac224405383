"""The device mesh: parameters replicated, batches split over the 'data' axis.

One mesh of every device (of every host) with a single axis, ``'data'``. A
jitted step takes replicated params (``P()``) and a batch sharded ``P('data')``;
XLA inserts the gradient all-reduce. This is the jit-and-sharding successor of
``pmap`` and runs unchanged on 1 CPU, N GPUs or a TPU pod.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mil_jax import distributed
from mil_jax.errors import UserError

DATA_AXIS = 'data'


def initialize_distributed() -> None:
  """Joins a run of several processes that ``JAX_COORDINATOR_ADDRESS``,
  ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` describe.

  The commands join before their ``main`` (``cli.run``, with the flags and the
  SLURM / Open MPI / Cloud TPU detection of ``mil_jax.distributed``), which
  makes this a no-op there; it serves ``train_and_evaluate`` called from
  Python. Without those variables it does nothing, so the same code runs
  everywhere.
  """
  launch = distributed.resolve()
  if launch.explicit:
    distributed.start(launch)


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh named ``('data',)`` over ``devices`` (default: all devices)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def training_mesh(devices: int | None = None) -> Mesh:
  """The mesh a training stage runs on: the first ``devices`` devices (all: None).

  How many is a speed setting (``speed.devices``, decided by ``mil_jax.tuning``:
  every device, except on a CPU split into cores, where a config says how
  many of them its model gains from).
  """
  return make_mesh(jax.devices()[:devices])


def replicated(mesh: Mesh) -> NamedSharding:
  """The sharding of parameters, optimizer state and the on-device data set."""
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """The sharding of a batch: its leading axis split over the devices."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
  """Raises a UserError unless ``batch_size`` splits evenly over the mesh."""
  if batch_size < 1:
    raise UserError(f'batch_size must be at least 1, got {batch_size}.')
  if batch_size % mesh.size:
    raise UserError(
        f'batch_size {batch_size} does not divide over the {mesh.size} devices; '
        f'use a multiple of {mesh.size}, e.g. --config.batch_size='
        f'{max(mesh.size, batch_size // mesh.size * mesh.size)}.')


def put_replicated(tree: Any, mesh: Mesh) -> Any:
  """Places a pytree of host arrays on every device of ``mesh``, once.

  Works on several hosts too: every process passes the same full arrays.
  """
  sharding = replicated(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)
