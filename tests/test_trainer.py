"""The training loop's host side: when it saves, what it logs, where its time goes."""
import json
import re

import jax
import numpy as np
import pytest

from configs import fc as fc_config
from mil_jax import checkpoint, pretrain, trainer
from mil_jax.metric_writers import read_metrics

from .conftest import run_command

PHASES = ('train', 'eval', 'checkpoint', 'other')


def tiny_fc(**loop):
  """FC autoencoder, 4 steps per epoch of 16 images, 2 steps per call, no timed saves."""
  config = fc_config.get_config('l1,runlocal')
  config.data.fake_train_size, config.data.fake_test_size = 64, 16
  config.batch_size, config.steps_per_dispatch = 16, 2
  config.checkpoint_every_secs, config.checkpoint_every_steps = 0.0, 0
  config.update(loop)
  return config


@pytest.fixture
def saves(monkeypatch):
  """Every checkpoint.save of the test: ``(step, metrics, params on the host)``."""
  saved, original = [], checkpoint.save

  def save(mngr, step, **items):
    saved.append((step, items['metrics'], jax.device_get(items['params'])))
    original(mngr, step, **items)

  monkeypatch.setattr(checkpoint, 'save', save)
  return saved


def script_eval_losses(monkeypatch, losses, params=None):
  """Makes Trainer.evaluate return ``losses`` in turn (then the last again); returns the
  steps it was called at, and puts the params it saw in ``params`` by step."""
  calls = []

  def evaluate(self, state):
    calls.append(int(state.step))
    if params is not None:
      params[int(state.step)] = jax.device_get(state.params)
    loss = losses[min(len(calls), len(losses)) - 1]
    return {'eval/loss': loss, 'eval/mse': loss, 'eval/psnr': 0.0}

  monkeypatch.setattr(trainer.Trainer, 'evaluate', evaluate)
  return calls


def test_a_best_state_is_kept_until_the_next_save_and_then_found(tmp_path, monkeypatch, saves):
  evaluated = {}
  script_eval_losses(monkeypatch, [3.0, 2.0, 2.5, 1.0, 1.5], evaluated)
  # 4 steps an epoch in calls of 2, the latest due every 6 steps.
  pretrain.train_and_evaluate(tiny_fc(num_epochs=5, checkpoint_every_steps=6), tmp_path)
  assert [(s, m) for s, m, _ in saves] == [
      (4, {'eval/loss': 3.0}),   # the best of epoch 1, kept, written before ...
      (6, None),                 # ... the latest, due 6 steps after the start
      (8, {'eval/loss': 2.0}),   # epoch 2's better one, kept until ...
      (12, {'eval/loss': 2.5}),  # ... the end of epoch 3, when the latest is due
      (16, {'eval/loss': 1.0}),  # epoch 4's best, kept until ...
      (18, None),                # ... the latest at step 18
      (20, {'eval/loss': 1.5})]  # the end
  directory, best = checkpoint.find_checkpoint(tmp_path)
  assert best == 16
  # What was written for step 16 is the state that was evaluated there.
  jax.tree.map(np.testing.assert_array_equal, evaluated[16],
               checkpoint.restore_params(directory, best))


def test_without_timed_saves_the_best_and_the_end_are_written(tmp_path, monkeypatch, saves):
  script_eval_losses(monkeypatch, [3.0, 1.0, 2.0])
  pretrain.train_and_evaluate(tiny_fc(num_epochs=3), tmp_path)
  assert [(s, m) for s, m, _ in saves] == [(8, {'eval/loss': 1.0}), (12, {'eval/loss': 2.0})]
  assert checkpoint.find_checkpoint(tmp_path)[1] == 8


def test_validation_every_n_epochs_and_the_latest_saved_by_time(tmp_path, monkeypatch, saves):
  calls = script_eval_losses(monkeypatch, [2.0, 1.0])
  # Any time is enough: the latest is due after every call of 2 steps.
  config = tiny_fc(num_epochs=3, eval_every_epochs=2, checkpoint_every_secs=1e-9)
  pretrain.train_and_evaluate(config, tmp_path)
  assert calls[:2] == [8, 12]  # after epoch 2, and after the last (then run()'s final one)
  assert [s for s, _, _ in saves] == [2, 4, 6, 8, 10, 12]
  assert {s: m for s, m, _ in saves if m} == {8: {'eval/loss': 2.0}, 12: {'eval/loss': 1.0}}
  epochs = [r for r in read_metrics(tmp_path) if 'time/epoch_s' in r]
  assert [('eval/loss' in r) for r in epochs] == [False, True, True]


def test_the_latest_saved_every_n_steps(tmp_path, monkeypatch, saves):
  script_eval_losses(monkeypatch, [1.0])  # never better after the first epoch
  config = tiny_fc(num_epochs=3, steps_per_dispatch=1, checkpoint_every_steps=3)
  pretrain.train_and_evaluate(config, tmp_path)
  steps = [s for s, _, _ in saves]
  assert steps[-1] == 12 and 4 in steps  # the end, and the first (best) validation
  assert all(0 < b - a <= 3 for a, b in zip([0, *steps], steps)), steps


def test_logs_leave_the_newest_call_running(tmp_path):
  # 4 steps per epoch, one per call, a log every 2: the log at step 2 takes step 1
  # only (step 2 may still run); the epoch's end takes every step.
  config = tiny_fc(num_epochs=2, steps_per_dispatch=1, log_every_steps=2)
  pretrain.train_and_evaluate(config, tmp_path)
  logged = [r['step'] for r in read_metrics(tmp_path) if 'train/lr' in r]
  assert logged == [1, 4, 5, 8]


def test_epoch_records_say_where_the_time_went(tmp_path):
  out = run_command(['train_pretrain.py', '--config', 'configs/fc.py:l1,runlocal',
                     '--config.num_epochs=3', '--config.eval_every_epochs=2',
                     f'--workdir={tmp_path}'])
  assert out.returncode == 0, out.stderr[-3000:]
  epochs = [r for r in read_metrics(tmp_path) if 'time/epoch_s' in r]
  assert [r['epoch'] for r in epochs] == [1.0, 2.0, 3.0]
  for r in epochs:
    parts = [r[f'time/{name}_s'] for name in PHASES]
    assert min(parts) >= -3e-4 and r['time/train_s'] > 0, r
    assert sum(parts) == pytest.approx(r['time/epoch_s'], abs=5e-4), r
  # Validation after epoch 2 and the last only; a checkpoint at the end at least.
  assert [r['time/eval_s'] > 0 for r in epochs] == [False, True, True]
  assert epochs[-1]['time/checkpoint_s'] > 0
  assert 'time/startup_s' in epochs[-1] and epochs[-1]['time/startup_s'] > 0
  # The closing line adds up the epochs' records.
  line = next(ln for ln in out.stdout.splitlines() if ln.startswith('time: start-up'))
  numbers = dict(re.findall(r'([\w-]+(?: epochs)?) ([\d.]+) s', line))
  assert float(numbers['start-up']) == pytest.approx(epochs[-1]['time/startup_s'], abs=0.051)
  assert float(numbers['3 epochs']) == pytest.approx(
      sum(r['time/epoch_s'] for r in epochs), abs=0.051)
  for name in PHASES:
    assert float(numbers[name]) == pytest.approx(
        sum(r[f'time/{name}_s'] for r in epochs), abs=0.051), name
  # And TensorBoard has them too.
  events = b''.join(p.read_bytes() for p in tmp_path.glob('events.out.tfevents.*'))
  for name in (*PHASES, 'epoch', 'startup'):
    assert f'time/{name}_s'.encode() in events, name
  assert json.loads((tmp_path / 'config.json').read_text())['eval_every_epochs'] == 2
