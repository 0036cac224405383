"""Experiment configs: ``--config configs/<name>.py[:variant]``."""
from __future__ import annotations

import importlib

import ml_collections

PRETRAINING = ('fc', 'conv', 'mae')


def pretraining_config(spec: str) -> ml_collections.ConfigDict:
  """The config of ``'<fc|conv|mae>[:variant]'``, as ``--config configs/<name>.py:variant``.

  Raises:
    ValueError: an unknown name or variant (callers turn it into a user error).
  """
  name, _, variant = spec.partition(':')
  if name not in PRETRAINING:
    raise ValueError(f'unknown model type {name!r}; use fc, conv or mae (with :variant)')
  return importlib.import_module(f'configs.{name}').get_config(variant or None)
