"""Whole runs against their steps: what ``python -m mil_jax.bench --run`` adds.

The benchmark times whole epochs of the training steps alone (``epoch_s``);
a user waits for whole runs, whose epochs also validate, save checkpoints,
log, and start up once. ``command`` is the run of ``train_pretrain.py``
itself on the same synthetic data, ``epoch_records`` reads where its time
went (``mil_jax.timing``) and ``summary`` sets its epochs beside the steps'.
"""
from __future__ import annotations

import os
import pathlib
import statistics
import sys
from collections.abc import Sequence
from typing import Any

from mil_jax import config_files, platform, timing
from mil_jax.metric_writers import read_metrics

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Validation images per training image: CIFAR's 10,000 test images to its 50,000.
EVAL_FRACTION = 0.2


def command(spec: str, *, batch: int, dtype: str, steps_per_dispatch: int, num_classes: int,
            images: int, epochs: int, workdir: pathlib.Path, compile_cache: bool,
            speed: dict[str, str] | None = None) -> list[str]:
  """The ``train_pretrain.py`` command of ``spec`` (``'name[:variant]'``) on fake data of
  ``images`` training and ``EVAL_FRACTION`` of that many validation images
  (``speed``: fields of the speed block set)."""
  name, _, variant = spec.partition(':')
  config = config_files.CONFIG_DIR / f'{name}.py'
  overrides = {'batch_size': batch, 'model.dtype': dtype, 'num_epochs': epochs,
               'data.source': 'fake', 'data.fake_train_size': images,
               'data.fake_test_size': max(1, round(images * EVAL_FRACTION)),
               'data.fake_num_classes': num_classes}
  if steps_per_dispatch:
    overrides['steps_per_dispatch'] = steps_per_dispatch
  overrides.update({f'speed.{k}': v for k, v in (speed or {}).items()})
  return [sys.executable, str(ROOT / 'train_pretrain.py'),
          f'--config={config}' + (f':{variant}' if variant else ''),
          *(f'--config.{k}={v}' for k, v in overrides.items()), f'--workdir={workdir}',
          '--compile_cache' if compile_cache else '--nocompile_cache']


def environment() -> dict[str, str]:
  """This process's environment without the XLA flags ``platform.configure`` added.

  The run must decide them as a user's command does: a device count found in
  ``XLA_FLAGS`` counts as the user's, and puts the FC autoencoder on every
  CPU device instead of one (several times slower).
  """
  added = set(platform.applied())
  env = dict(os.environ)
  env['XLA_FLAGS'] = ' '.join(f for f in env.get('XLA_FLAGS', '').split() if f not in added)
  return env


def epoch_records(workdir: pathlib.Path) -> list[dict[str, Any]]:
  """The records of ``workdir/metrics.jsonl`` that end an epoch, in order."""
  return [r for r in read_metrics(workdir) if 'time/epoch_s' in r]


def summary(step_epochs: Sequence[float], epochs: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """The run's epochs beside the steps-only ones.

  Args:
    step_epochs: wall seconds of whole epochs of the training steps alone.
    epochs: the run's epoch records (``epoch_records``), at least two.

  Returns:
    ``step_epoch_s`` and ``run_epoch_s`` (medians; the run's first epoch,
    which compiles, left out), ``ratio`` of the two, the run's median of each
    phase (``run_train_s``, ...), its ``startup_s`` and every epoch's time.
  """
  later = epochs[1:]
  step = round(statistics.median(step_epochs), 4)
  run = round(statistics.median(r['time/epoch_s'] for r in later), 4)
  phases = {f'run_{name}_s': round(statistics.median(r[f'time/{name}_s'] for r in later), 4)
            for name in (*timing.PHASES, 'other')}
  return {'step_epoch_s': step,
          'step_epoch_s_windows': [round(t, 4) for t in step_epochs],
          'run_epoch_s': run,
          'run_epoch_s_windows': [r['time/epoch_s'] for r in epochs],
          'ratio': round(run / step, 3), **phases,
          'startup_s': epochs[-1]['time/startup_s']}
