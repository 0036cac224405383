"""A run's directory: created once, tied to one config, never silently mixed."""
from __future__ import annotations

import json
import os
import pathlib
import shutil

import jax
import ml_collections

from mil_jax import distributed
from mil_jax.errors import UserError

CONFIG_FILE = 'config.json'
RUN_OUTPUTS = ('checkpoints', 'metrics.jsonl', CONFIG_FILE)


def _differences(old: dict, new: dict, prefix: str = '') -> list[str]:
  out = []
  for key in sorted(set(old) | set(new)):
    a, b = old.get(key), new.get(key)
    if isinstance(a, dict) and isinstance(b, dict):
      out.extend(_differences(a, b, f'{prefix}{key}.'))
    elif a != b:
      out.append(f'{prefix}{key} ({a!r} there, {b!r} now)')
  return out


def prepare(workdir: str | pathlib.Path, config: ml_collections.ConfigDict, *,
            overwrite: bool = False) -> pathlib.Path:
  """Creates ``workdir`` for ``config``, or checks that it belongs to it.

  A workdir that holds a run of another config is refused, unless
  ``overwrite``, in which case that run's outputs are removed first.

  Raises:
    UserError: the workdir cannot be written, or holds another config's run.
  """
  workdir = pathlib.Path(workdir)
  config_json = json.loads(config.to_json())
  stored = workdir / CONFIG_FILE
  if stored.exists():
    diff = _differences(json.loads(stored.read_text()), config_json)
    if diff and not overwrite:
      raise UserError(
          f'{workdir} holds a run of a different config (differs in {"; ".join(diff[:3])}); '
          'pass another --workdir, or --overwrite to replace that run.')
    if diff and jax.process_index() == 0:
      for name in RUN_OUTPUTS:
        target = workdir / name
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    if not os.access(workdir, os.W_OK):
      raise PermissionError(workdir)
    if jax.process_index() == 0:
      # Replaced in one step: the other processes of the run read it meanwhile.
      tmp = stored.with_name(f'{CONFIG_FILE}.tmp')
      tmp.write_text(json.dumps(config_json, indent=2) + '\n')
      os.replace(tmp, stored)
  except OSError as e:
    raise UserError(f'cannot write to workdir {str(workdir)!r} ({e.strerror or e}); '
                    'choose a writable --workdir.') from None
  # No process opens the checkpoints before process 0 has removed a replaced run's.
  distributed.barrier(f'workdir prepared: {workdir.absolute()}')
  return workdir
