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

import functools
import json
import pathlib
import shutil
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocp_managers

from mil_jax.errors import UserError
from mil_jax.paths import user_path

BEST_METRIC = 'eval/loss'
DAMAGED_DIR = 'damaged_checkpoints'
T = TypeVar('T')


def _best_metric(metrics: dict[str, float]) -> float:
  return metrics[BEST_METRIC]


@functools.cache
def _one_writer_per_host() -> None:
  """On one host, each array is written whole from one device.

  By default orbax (except on GPUs) splits a replicated array between its
  replicas and writes the parts in parallel, which pays across hosts. On one
  host it only costs a slicing program per parameter shape and device in every
  process that saves (0.2-0.3 s at the first save of a tiny Conv run, 2-core
  CPU), for no faster write of parameters this size.
  """
  if jax.process_count() == 1:
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)


def manager(directory: str | pathlib.Path, *, keep: int = 1, create: bool = True
            ) -> ocp.CheckpointManager:
  """A manager that keeps the ``keep`` latest steps and the one of lowest eval/loss.

  ``best_fn`` makes orbax write each step's metrics next to it (so "best"
  survives a restart); the preservation policy decides what is deleted.
  """
  _one_writer_per_host()
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


def _is_step_dir(path: pathlib.Path) -> bool:
  return path.name.isdigit() and (path / 'meta').is_dir()


def find_checkpoint(path: str | pathlib.Path) -> tuple[pathlib.Path, int]:
  """Resolves a run directory, its ``checkpoints/`` or one step directory.

  Returns:
    ``(absolute checkpoints directory, step)``: the best step of a run (the
    latest where no step has a validation loss), or the given one.

  Raises:
    UserError: the path does not exist or holds no complete checkpoint.
  """
  path = user_path(path, 'checkpoint path')
  if not path.exists():
    raise UserError(f'checkpoint path {path} does not exist.')
  if _is_step_dir(path):
    return path.parent, int(path.name)
  directory = path / 'checkpoints' if (path / 'checkpoints').is_dir() else path
  mngr = manager(directory, create=False)
  try:
    try:
      step = mngr.best_step()
    except Exception:  # noqa: BLE001  (a damaged metrics file: fall back to the latest)
      step = None
    step = mngr.latest_step() if step is None else step  # no step had metrics
  finally:
    mngr.close()
  if step is None:
    raise UserError(f'{path} holds no complete checkpoint; pass a pretraining '
                    'workdir or one of its checkpoints/<step> directories.')
  return directory.absolute(), step  # orbax restores from absolute paths only


def verify(directory: pathlib.Path, step: int) -> None:
  """Reads every stored byte of checkpoint ``step``, in this thread.

  A file deleted or cut short raises here, synchronously, before orbax
  restores: a failed orbax restore leaves reads of its other arrays
  pending, which report on stderr long after the error was handled.

  Raises:
    ValueError, OSError: what cannot be read.
  """
  import tensorstore as ts  # noqa: PLC0415  (orbax's own storage layer)

  step_dir = pathlib.Path(directory) / str(step)
  json.loads((step_dir / 'meta' / 'metadata').read_text())
  for item in step_dir.iterdir():
    if (item / '_METADATA').exists():
      json.loads((item / '_METADATA').read_text())
    if (item / 'manifest.ocdbt').exists():
      store = ts.KvStore.open({'driver': 'ocdbt', 'base': f'file://{item}/'}).result()
      for key in store.list().result():
        store.read(key).result()


def _reason(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return (text[0][:160] if text else '') or type(error).__name__


def newest_readable(mngr: ocp.CheckpointManager, restore: Callable[[int], T],
                    workdir: pathlib.Path) -> tuple[int, T] | None:
  """``(step, restore(step))`` of the newest checkpoint of ``mngr`` that can be read.

  Each one that cannot (a file deleted or cut short) is reported on stderr
  and, once an older one was read, moved to ``workdir/damaged_checkpoints``,
  so that the run goes on from there and the files stay for inspection.

  Returns:
    None when ``mngr`` has no checkpoint.

  Raises:
    UserError: it has checkpoints, but none can be read.
  """
  damaged: dict[int, str] = {}
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      verify(pathlib.Path(mngr.directory), step)
      restored = restore(step)
    except Exception as e:  # noqa: BLE001  (orbax and tensorstore raise many kinds)
      damaged[step] = _reason(e)
      continue
    if damaged and jax.process_index() == 0:
      aside = workdir / DAMAGED_DIR
      aside.mkdir(exist_ok=True)
      for bad, reason in damaged.items():
        print(f'checkpoint {bad} in {mngr.directory} cannot be read ({reason}); moved to '
              f'{aside}.', file=sys.stderr, flush=True)
        shutil.move(pathlib.Path(mngr.directory) / str(bad), aside / f'{bad}.{time.time_ns()}')
      mngr.reload()
    return step, restored
  if damaged:
    newest = max(damaged)
    raise UserError(f'no checkpoint in {mngr.directory} can be read (steps '
                    f'{", ".join(map(str, damaged))}; step {newest}: {damaged[newest]}); add '
                    '--overwrite to start the run again.')
  return None


def restore_encoder_source(path: str | pathlib.Path
                           ) -> tuple[pathlib.Path, int, dict[str, Any], Any]:
  """The best readable checkpoint of a run (or the given step): ``(directory,
  step, meta, params)``, params on the first device.

  When the best checkpoint of a run cannot be read, the newest that can is
  used, with a line on stderr.

  Raises:
    UserError: no checkpoint there can be read.
  """
  directory, best = find_checkpoint(path)
  if _is_step_dir(user_path(path)):
    candidates = [best]
  else:
    mngr = manager(directory, create=False)
    try:
      candidates = [best, *(s for s in sorted(mngr.all_steps(), reverse=True) if s != best)]
    finally:
      mngr.close()
  damaged: dict[int, str] = {}
  for step in candidates:
    try:
      verify(directory, step)
      found = directory, step, read_meta(directory, step), restore_params(directory, step)
    except Exception as e:  # noqa: BLE001  (orbax and tensorstore raise many kinds)
      damaged[step] = _reason(e)
      continue
    for bad, reason in damaged.items():
      print(f'checkpoint {bad} in {directory} cannot be read ({reason}); using {step}.',
            file=sys.stderr, flush=True)
    return found
  raise UserError(f'no checkpoint of {user_path(path)} can be read (step {candidates[0]}: '
                  f'{damaged[candidates[0]]}); pass another --pretrained_path, or pretrain again.')


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
