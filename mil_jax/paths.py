"""Paths as people type them: relative to the current directory, with ``~``.

Every path a user gives (``--workdir``, ``--pretrained_path``, ``runs_dir``,
``data.data_dir``, ``npz:`` sources) is made absolute once, where a stage
starts, so that libraries which insist on absolute paths (orbax) and a later
change of directory never see a relative one, and so that ``config.json``
records where the data and the encoder really came from.
"""
from __future__ import annotations

import os
import pathlib

import ml_collections

from mil_jax.errors import UserError

# The longest file-name component most file systems take (ext4, APFS, NTFS).
_NAME_MAX = 255


def user_path(path: str | os.PathLike[str], what: str = 'path') -> pathlib.Path:
  """``path`` with ``~`` expanded, made absolute against the current directory.

  Raises:
    UserError: a component is longer than file systems allow.
  """
  resolved = pathlib.Path(os.path.expanduser(os.fspath(path))).absolute()
  for part in resolved.parts:
    if len(part.encode()) > _NAME_MAX:
      raise UserError(f'the {what} {str(path)[:60]!r}... has a name longer than '
                      f'{_NAME_MAX} bytes, which file systems refuse; choose a shorter one.')
  return resolved


def resolve_data_paths(data: ml_collections.ConfigDict) -> None:
  """Makes ``data.data_dir`` and an ``npz:`` source absolute, in place."""
  if data.data_dir:
    data.data_dir = str(user_path(data.data_dir, 'data.data_dir'))
  kind, sep, arg = data.source.partition(':')
  if kind == 'npz' and sep and arg:
    data.source = f'npz:{user_path(arg, "npz file")}'


def resolve_classifier_paths(config: ml_collections.ConfigDict) -> None:
  """Makes the classifier config's ``pretrained_path``, ``runs_dir`` and data paths absolute."""
  if config.pretrained_path:
    config.pretrained_path = str(user_path(config.pretrained_path, 'pretrained_path'))
  config.runs_dir = str(user_path(config.runs_dir or '.', 'runs_dir'))
  resolve_data_paths(config.data)
