"""Every value of a run's config checked before anything is written.

A stage calls :func:`check_pretraining` or :func:`check_classifier` first, so
that a mistake ends with one sentence (a :class:`UserError`) before a workdir
is created, replaced or resumed. Model fields are checked where the model is
built (``mil_jax.models``); the values here are those of the loop, the
optimizer, the data and the heads.
"""
from __future__ import annotations

import math

import ml_collections

from mil_jax.errors import UserError

# What tells the kinds of config file apart: a field only that kind has.
KIND_FIELDS = {'pretraining': ('loss', 'model'), 'classifier': ('mode', 'head'),
               'grid': ('rows', 'columns')}
KIND_EXAMPLES = {'pretraining': 'configs/fc.py, configs/conv.py or configs/mae.py',
                 'classifier': 'configs/classifier.py', 'grid': 'configs/reproduce.py'}
OPTIMIZERS = ('adam', 'adamw', 'sgd')
SCHEDULES = ('constant', 'exponential', 'cosine', 'warmup_cosine')
CLASSIFIER_MODES = ('probing', 'fine_tune', 'knn')


def config_kind(config: ml_collections.ConfigDict) -> str | None:
  """``'pretraining'``, ``'classifier'`` or ``'grid'``: which program ``config`` is for."""
  for kind, fields in KIND_FIELDS.items():
    if all(f in config for f in fields):
      return kind
  return None


def check_kind(config: ml_collections.ConfigDict, expected: str, path: str) -> None:
  """Raises unless ``config`` (loaded from ``path``) is a config of the ``expected`` kind."""
  kind = config_kind(config)
  if kind != expected:
    what = f'a {kind} config' if kind else 'not a mil_jax config'
    raise UserError(f'{path} is {what}, not a {expected} config; pass '
                    f'{KIND_EXAMPLES[expected]}.')


def _at_least(config: ml_collections.ConfigDict, names: tuple[str, ...], low: int,
              prefix: str = '') -> None:
  for name in names:
    if config[name] < low:
      raise UserError(f'{prefix}{name} must be at least {low}, got {config[name]}.')


def _in_range(value: float, name: str, low: float, high: float, *, high_open: bool = True,
              low_open: bool = False) -> None:
  ok = math.isfinite(value) and (value > low if low_open else value >= low) and (
      value < high if high_open else value <= high)
  if not ok:
    brackets = ('(' if low_open else '[', ')' if high_open else ']')
    raise UserError(f'{name} must be in {brackets[0]}{low:g}, {high:g}{brackets[1]}, '
                    f'got {value}.')


def _positive(value: float, name: str) -> None:
  if not (math.isfinite(value) and value > 0):
    raise UserError(f'{name} must be a finite number above 0, got {value}.')


def _non_negative(value: float, name: str) -> None:
  if not (math.isfinite(value) and value >= 0):
    raise UserError(f'{name} must be a finite number of at least 0, got {value}.')


def check_loop(config: ml_collections.ConfigDict) -> None:
  """The training loop's sizes and intervals: each at least 1, the checkpoint bounds
  at least 0 (off)."""
  _at_least(config, ('batch_size', 'num_epochs', 'steps_per_dispatch', 'log_every_steps',
                     'eval_every_epochs', 'keep_checkpoints'), 1)
  _at_least(config, ('checkpoint_every_steps',), 0)  # 0: no bound by steps
  _non_negative(config.checkpoint_every_secs, 'checkpoint_every_secs')  # 0: none by time
  from mil_jax import tuning  # noqa: PLC0415 (imports jax; configs stay light)
  tuning.check(config.get('speed'))


def check_optim(optim: ml_collections.ConfigDict, *, prefix: str = 'optim.') -> None:
  """The optimizer block: known names, a finite positive learning rate, sane factors."""
  if optim.name not in OPTIMIZERS:
    raise UserError(f'unknown {prefix}name {optim.name!r}; use {", ".join(OPTIMIZERS)}.')
  if optim.schedule not in SCHEDULES:
    raise UserError(f'unknown {prefix}schedule {optim.schedule!r}; use '
                    f'{", ".join(SCHEDULES)}.')
  _positive(optim.lr, f'{prefix}lr')
  _non_negative(optim.weight_decay, f'{prefix}weight_decay')
  _non_negative(optim.grad_clip_norm, f'{prefix}grad_clip_norm')
  _positive(optim.decay_rate, f'{prefix}decay_rate')
  _in_range(optim.b1, f'{prefix}b1', 0.0, 1.0)
  _in_range(optim.b2, f'{prefix}b2', 0.0, 1.0)
  _at_least(optim, ('warmup_epochs', 'cosine_steps'), 0, prefix)


def check_data(data: ml_collections.ConfigDict) -> None:
  """The data block: a known kind of source, split strings, fake sizes."""
  from mil_jax import input_pipeline as ip  # noqa: PLC0415 (imports jax; configs stay light)

  kind, sep, arg = data.source.partition(':')
  if not (data.source == 'fake' or (kind in ('tfds', 'npz') and sep and arg)):
    raise UserError(f'unknown data source {data.source!r}; use tfds:<name>, npz:<path> or fake.')
  for field in ('train_split', 'eval_split'):
    ip.parse_split(data[field])
  _at_least(data, ('fake_train_size', 'fake_test_size'), 1, 'data.')
  _at_least(data, ('fake_num_classes',), 2, 'data.')


def check_pretraining(config: ml_collections.ConfigDict) -> None:
  """Every field of a pretraining config (the model's in ``mil_jax.models``)."""
  from mil_jax import losses, models  # noqa: PLC0415

  check_loop(config)
  check_optim(config.optim)
  check_data(config.data)
  models.build_autoencoder(config.model)
  if config.loss not in losses.LOSSES:
    known = ', '.join(sorted(losses.LOSSES))
    raise UserError(f'unknown loss {config.loss!r}; known losses: {known}.')


def check_classifier(config: ml_collections.ConfigDict) -> None:
  """Every field of a classifier config (the encoder's come from its checkpoint)."""
  from mil_jax import augment  # noqa: PLC0415
  if config.mode not in CLASSIFIER_MODES:
    raise UserError(f'unknown mode {config.mode!r}; use {", ".join(CLASSIFIER_MODES)}.')
  check_loop(config)
  check_optim(config.optim)
  check_data(config.data)
  _non_negative(config.frozen_lr, 'frozen_lr')
  _in_range(config.label_smoothing, 'label_smoothing', 0.0, 1.0)
  _in_range(config.head.dropout_rate, 'head.dropout_rate', 0.0, 1.0)
  _at_least(config.head, ('hidden_dim',), 0, 'head.')
  _at_least(config.knn, ('k',), 1, 'knn.')
  _positive(config.knn.temperature, 'knn.temperature')
  augment.check(config)


