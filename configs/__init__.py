"""Experiment configs: ``--config configs/<name>.py[:variant]``."""
from __future__ import annotations

import importlib

import ml_collections

PRETRAINING = ('fc', 'conv', 'mae', 'masked_unet')


def pretraining_config(spec: str) -> ml_collections.ConfigDict:
  """The config of ``'<name>[:variant]'`` (a name in PRETRAINING): ``configs/<name>.py:variant``.

  Raises:
    ValueError: an unknown name or variant (callers turn it into a user error).
  """
  name, _, variant = spec.partition(':')
  if name not in PRETRAINING:
    raise ValueError(f'unknown model type {name!r}; use fc, conv, mae or masked_unet '
                     '(with :variant)')
  return importlib.import_module(f'configs.{name}').get_config(variant or None)
