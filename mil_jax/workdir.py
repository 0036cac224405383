"""A run's directory: one process at a time, tied to one config, never silently mixed.

``claim(workdir, config)`` is entered after every input was checked. It locks
the directory for this process (a second command on the same workdir is
refused while the first lives; the lock of a dead process is taken over),
compares ``config`` with the ``config.json`` of a run already there and
records ``config``. A run that saved a training step keeps its config, except
for the fields that do not change what is learned (:data:`RESUMABLE_FIELDS`):
rerunning with a larger ``num_epochs`` extends it. A run that never saved a
step locks in nothing.
"""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections

from mil_jax import distributed
from mil_jax.errors import UserError
from mil_jax.paths import user_path

try:
  import fcntl
except ImportError:  # Windows: no advisory locks; one run per workdir is then up to the user.
  fcntl = None

CONFIG_FILE = 'config.json'
LOCK_FILE = '.lock'
# Written by a run; removed (only) when --overwrite replaces the run.
RUN_OUTPUTS = ('checkpoints', 'damaged_checkpoints', 'metrics.jsonl', CONFIG_FILE,
               'loss.png', 'reconstructions.png', 'accuracy.png')
TENSORBOARD_GLOB = 'events.out.tfevents.*'
# Fields a resumed run may change: how often it logs, evaluates and saves, how
# many steps go in one call, how they are computed (``speed``, which a run
# moved to another machine decides anew), and how long it trains (a larger
# num_epochs extends the run; the learning-rate schedule follows the new length).
RESUMABLE_FIELDS = frozenset({'num_epochs', 'log_every_steps', 'eval_every_epochs',
                              'checkpoint_every_secs', 'checkpoint_every_steps',
                              'keep_checkpoints', 'steps_per_dispatch', 'speed'})


def _describe(value: Any) -> str:
  if isinstance(value, str):
    return repr(value) if value == '' else value
  if isinstance(value, list | tuple):
    return '[' + ', '.join(_describe(v) for v in value) + ']'
  return json.dumps(value)


def differences(old: dict[str, Any], new: dict[str, Any], prefix: str = '') -> list[str]:
  """``'field (OLD there, NEW now)'`` for every leaf that differs, in field order."""
  out = []
  for key in sorted(set(old) | set(new)):
    a, b = old.get(key, '<absent>'), new.get(key, '<absent>')
    if isinstance(a, dict) and isinstance(b, dict):
      out.extend(differences(a, b, f'{prefix}{key}.'))
    elif a != b:
      out.append(f'{prefix}{key} ({_describe(a)} there, {_describe(b)} now)')
  return out


def saved_steps(workdir: pathlib.Path) -> list[int]:
  """The training steps with a checkpoint directory under ``workdir/checkpoints``."""
  directory = workdir / 'checkpoints'
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())


class _Lock:
  """An advisory lock on ``workdir/.lock`` holding the owner's pid.

  The kernel drops the lock when its process dies (even by SIGKILL), so a
  lock left behind by a dead run is simply taken.
  """

  def __init__(self, workdir: pathlib.Path):
    self._path = workdir / LOCK_FILE
    self._file = None

  def acquire(self) -> None:
    if fcntl is None:
      return
    file = self._path.open('a+')
    try:
      fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      file.seek(0)
      owner = file.read().strip() or 'another process'
      file.close()
      raise UserError(f'{self._path.parent} is in use by {owner}; wait for it to end, '
                      'or pass another --workdir.') from None
    file.seek(0)
    file.truncate()
    file.write(f'process {os.getpid()} ({_command_line()})\n')
    file.flush()
    self._file = file

  def release(self) -> None:
    if self._file is not None:
      self._file.truncate(0)  # empty while no process holds it
      self._file.flush()
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()
      self._file = None


def _command_line() -> str:
  try:
    args = pathlib.Path('/proc/self/cmdline').read_bytes().split(b'\0')
    return ' '.join(a.decode(errors='replace') for a in args if a)[:200]
  except OSError:
    return 'python'


def _read_stored(workdir: pathlib.Path) -> dict[str, Any] | None:
  stored = workdir / CONFIG_FILE
  if not stored.exists():
    return None
  try:
    config = json.loads(stored.read_text())
    if not isinstance(config, dict):
      raise ValueError('not a JSON object')
    return config
  except (OSError, ValueError) as e:
    raise UserError(f'{stored} cannot be read ({e}); pass --overwrite to replace the run in '
                    f'{workdir}, or another --workdir.') from None


def _remove_outputs(workdir: pathlib.Path) -> None:
  for target in [*(workdir / n for n in RUN_OUTPUTS), *workdir.glob(TENSORBOARD_GLOB)]:
    if target.is_dir():
      shutil.rmtree(target)
    else:
      target.unlink(missing_ok=True)


def _check_config(workdir: pathlib.Path, config_json: dict[str, Any], overwrite: bool) -> None:
  """Refuses a run of another config in ``workdir`` (or, with ``overwrite``, removes it)."""
  steps = saved_steps(workdir)
  try:
    stored = _read_stored(workdir)
  except UserError:
    if not overwrite:
      raise
    stored = {}
  if overwrite:
    if stored is not None or steps:
      print(f'--overwrite: replacing the run in {workdir}', flush=True)
      _remove_outputs(workdir)
    return
  if stored is None or not steps:
    return  # nothing trained here yet: the new config simply takes over
  diff = [d for d in differences(stored, config_json)
          if d.split(' ')[0].split('.')[0] not in RESUMABLE_FIELDS]
  if diff:
    more = f' and {len(diff) - 4} more' if len(diff) > 4 else ''
    raise UserError(
        f'{workdir} holds a run of a different config ({"; ".join(diff[:4])}{more}); to keep '
        'that run pass another --workdir, to replace it add --overwrite.')


@contextlib.contextmanager
def claim(workdir: str | os.PathLike[str], config: ml_collections.ConfigDict, *,
          overwrite: bool = False) -> Iterator[pathlib.Path]:
  """Holds ``workdir`` for a run of ``config``; yields its absolute path.

  Enter it only once every input has been checked: this is where a run of
  another config is refused, or with ``overwrite`` replaced.

  Raises:
    UserError: the workdir cannot be written, is used by a live process, or
      holds a run of another config (without ``overwrite``).
  """
  path = user_path(workdir, 'workdir')
  main_process = jax.process_index() == 0
  lock = _Lock(path)
  try:
    path.mkdir(parents=True, exist_ok=True)
    if not os.access(path, os.W_OK):
      raise PermissionError(13, 'Permission denied')
    if main_process:
      lock.acquire()
  except OSError as e:
    raise UserError(f'cannot write to workdir {path} ({e.strerror or e}); '
                    'choose a writable --workdir.') from None
  try:
    config_json = json.loads(config.to_json())
    if main_process:
      _check_config(path, config_json, overwrite)
      # Replaced in one step: the other processes of the run read it meanwhile.
      tmp = path / f'{CONFIG_FILE}.tmp'
      tmp.write_text(json.dumps(config_json, indent=2) + '\n')
      os.replace(tmp, path / CONFIG_FILE)
    # No process opens the checkpoints before process 0 has removed a replaced run's.
    distributed.barrier(f'workdir prepared: {path}')
    yield path
  finally:
    lock.release()
