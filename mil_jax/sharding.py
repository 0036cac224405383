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

from mil_jax import distributed, platform
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


def devices_for_batch(batch_size: int, devices: int) -> int:
  """The most of ``devices`` (at least 1) that split ``batch_size`` evenly."""
  return max(n for n in range(1, devices + 1) if batch_size % n == 0)


def training_mesh(model: str, batch_size: int,
                  devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The mesh a training stage of ``model`` runs on: every device, as a rule.

  On a CPU that ``platform.configure`` split into one device per core, the
  models of ``platform.CPU_DATA_PARALLEL`` take as many devices as divide
  ``batch_size`` evenly, and any other ``model`` (FC, the classifier on
  cached features) takes one. A device count the user set in ``XLA_FLAGS``
  is used whole, as on GPUs and TPUs.
  """
  devices = jax.devices() if devices is None else list(devices)
  if platform.split_cpu() and devices[0].platform == 'cpu' and jax.process_count() == 1:
    usable = len(devices) if model in platform.CPU_DATA_PARALLEL else 1
    devices = devices[:devices_for_batch(batch_size, usable)]
  return make_mesh(devices)


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
