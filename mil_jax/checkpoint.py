"""Orbax checkpoints: the latest for resuming, the best by validation loss.

A checkpoint is one step directory under ``workdir/checkpoints`` with the
items ``params``, ``opt_state``, ``model_state`` (only for models with
non-trained collections such as BatchNorm statistics) and ``meta`` (JSON: the
whole run config, which lets a later stage rebuild the model from the
checkpoint alone, and the data position). Orbax writes into a temporary
directory and renames it when complete, so a run killed mid-write never leaves
a checkpoint that loads.
"""
from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocp_managers

from mil_jax.errors import UserError

BEST_METRIC = 'eval/loss'


def _best_metric(metrics: dict[str, float]) -> float:
  return metrics[BEST_METRIC]


def manager(directory: str | pathlib.Path, *, keep: int = 1, create: bool = True
            ) -> ocp.CheckpointManager:
  """A manager that keeps the ``keep`` latest steps and the one of lowest eval/loss.

  ``best_fn`` makes orbax write each step's metrics next to it (so "best"
  survives a restart); the preservation policy decides what is deleted.
  """
  policy = ocp_managers.AnyPreservationPolicy([
      ocp_managers.LatestN(n=keep),
      ocp_managers.BestN(get_metric_fn=_best_metric, reverse=True, n=1,
                         keep_checkpoints_without_metrics=False),
  ])
  options = ocp.CheckpointManagerOptions(preservation_policy=policy, best_fn=_best_metric,
                                         best_mode='min', create=create)
  return ocp.CheckpointManager(pathlib.Path(directory).absolute(), options=options,
                               item_names=('params', 'opt_state', 'model_state', 'meta'))


def save(mngr: ocp.CheckpointManager, step: int, *, params: Any, opt_state: Any,
         model_state: Any, meta: dict[str, Any],
         metrics: dict[str, float] | None = None) -> None:
  """Starts an asynchronous save of ``step``; ``mngr.wait_until_finished()`` ends it."""
  items = dict(params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
               meta=ocp.args.JsonSave(meta))
  if jax.tree.leaves(model_state):
    items['model_state'] = ocp.args.StandardSave(model_state)
  mngr.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)


def restore(mngr: ocp.CheckpointManager, step: int, *, params: Any, opt_state: Any,
            model_state: Any) -> dict[str, Any]:
  """Restores ``step`` into the structure, dtypes and shardings of the given trees.

  Returns:
    ``{'params', 'opt_state', 'meta'}`` and ``'model_state'`` when there is one.
  """
  abstract = lambda tree: jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
  items = dict(params=ocp.args.StandardRestore(abstract(params)),
               opt_state=ocp.args.StandardRestore(abstract(opt_state)),
               meta=ocp.args.JsonRestore())
  if jax.tree.leaves(model_state):
    items['model_state'] = ocp.args.StandardRestore(abstract(model_state))
  return dict(mngr.restore(step, args=ocp.args.Composite(**items)).items())


def find_checkpoint(path: str | pathlib.Path) -> tuple[pathlib.Path, int]:
  """Resolves a run directory, its ``checkpoints/`` or one step directory.

  Returns:
    ``(checkpoints directory, step)``: the best step of a run, or the given one.

  Raises:
    UserError: the path does not exist or holds no complete checkpoint.
  """
  path = pathlib.Path(path)
  if not path.exists():
    raise UserError(f'checkpoint path {str(path)!r} does not exist.')
  if (path / 'meta').is_dir() and path.name.isdigit():
    return path.parent, int(path.name)
  directory = path / 'checkpoints' if (path / 'checkpoints').is_dir() else path
  mngr = manager(directory, create=False)
  try:
    step = mngr.best_step()
    step = mngr.latest_step() if step is None else step  # no step had metrics
  finally:
    mngr.close()
  if step is None:
    raise UserError(f'{str(path)!r} holds no complete checkpoint; pass a pretraining '
                    'workdir or one of its checkpoints/<step> directories.')
  return directory, step


def read_meta(directory: pathlib.Path, step: int) -> dict[str, Any]:
  """The JSON ``meta`` item of a checkpoint (no arrays are read)."""
  return json.loads((directory / str(step) / 'meta' / 'metadata').read_text())


def restore_params(directory: pathlib.Path, step: int) -> Any:
  """The ``params`` item of a checkpoint, with its saved structure, on this process's first device.

  Whatever devices and processes saved it (8 GPUs, the CPU split into cores,
  several hosts): the target is built from the saved shapes and dtypes, not
  from the saved sharding, which orbax refuses to restore on another device
  count. In a run of several processes every process calls it.
  """
  on_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  item = pathlib.Path(directory).absolute() / str(step) / 'params'  # orbax reads absolute paths
  saved = ocp.StandardCheckpointHandler().metadata(item).tree
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=on_device),
                        saved)
  mngr = manager(directory, create=False)
  try:
    return mngr.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(target))).params
  finally:
    mngr.close()


def config_from_meta(meta: dict[str, Any]) -> ml_collections.ConfigDict:
  """The run config stored in a checkpoint's meta."""
  return ml_collections.ConfigDict(meta['config'])
