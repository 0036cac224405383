"""Config files, loaded by path: the one place the library reads ``configs/``.

The programs take ``--config FILE[:variant]`` (``ml_collections.config_flags``);
where the library itself needs a config (``--type mae:fast``, the grid's cells,
the benchmark) it loads the file of that name from :data:`CONFIG_DIR` the same
way, so ``mil_jax`` never imports the ``configs`` package as a module.
"""
from __future__ import annotations

import importlib.util
import pathlib
import sys

import ml_collections

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / 'configs'
PRETRAINING = ('fc', 'conv', 'mae', 'masked_unet')
PRETRAINING_NAMES = f"{', '.join(PRETRAINING[:-1])} or {PRETRAINING[-1]}"  # for messages


def load(path: str | pathlib.Path, arg: str | None = None) -> ml_collections.ConfigDict:
  """``get_config(arg)`` of the config file at ``path``, as ``--config path:arg`` gives it.

  Raises:
    ValueError: an unknown variant (the callers turn it into a user error).
  """
  path = pathlib.Path(path)
  # Config files import their shared pieces as ``configs.common``, as they do
  # under ``--config``, where the program's folder is on the path.
  root = str(path.resolve().parent.parent)
  if root not in sys.path:
    sys.path.append(root)
  spec = importlib.util.spec_from_file_location(f'_mil_jax_config_{path.stem}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg or None)


def pretraining(spec: str) -> ml_collections.ConfigDict:
  """The config of ``'<name>[:variant]'`` (a name in PRETRAINING): ``configs/<name>.py:variant``.

  Raises:
    ValueError: an unknown name or variant.
  """
  name, _, variant = spec.partition(':')
  if name not in PRETRAINING:
    raise ValueError(f'unknown model type {name!r}; use {PRETRAINING_NAMES} (with :variant)')
  return load(CONFIG_DIR / f'{name}.py', variant)


def classifier(arg: str | None = None) -> ml_collections.ConfigDict:
  """``configs/classifier.py:arg``."""
  return load(CONFIG_DIR / 'classifier.py', arg)
