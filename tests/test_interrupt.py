"""Interrupted runs lose nothing: SIGKILL at named points, SIGTERM saves the current step."""
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from .conftest import ROOT, checkpoint_steps, latest_params, read_checkpoint_item, run_command

CONFIGS = {'conv': 'configs/conv.py:192,runlocal', 'mae': 'configs/mae.py:seed,runlocal'}
# 8 steps an epoch, 2 epochs, 3 steps per dispatch: the calls end at steps 3,
# 6, 8 | 11, 14, 16 and the checkpoints fall at 6 (the first call past 5), 8
# (end of epoch 1), 11 (past 10) and 16. All of them are kept.
LOOP = ['--config.data.fake_train_size=256', '--config.data.fake_test_size=40',
        '--config.steps_per_dispatch=3', '--config.checkpoint_every_steps=5',
        '--config.keep_checkpoints=10']
ALL_STEPS = [6, 8, 11, 16]
# One workdir killed at each point in turn, each rerun resuming where the last
# kill left it: (the point, tests/kill_at.py's spec, complete checkpoints after it).
KILLS = [
    ('before the first checkpoint (in the call of steps 3-5)', 'chunk:3', []),
    ('at the epoch boundary (checkpoint 8 complete)', 'saved:8', [6, 8]),
    ('during the save of step 11', 'saving:11', [6, 8]),
    ('mid-chunk (in the 3-step call of steps 11-13)', 'chunk:11', [6, 8, 11]),
]


def assert_same_checkpoint(whole, cut, step, where):
  for item in ('params', 'opt_state'):
    want = read_checkpoint_item(whole / 'checkpoints' / str(step), item)
    got = read_checkpoint_item(cut / 'checkpoints' / str(step), item)
    assert jax.tree.structure(want) == jax.tree.structure(got), (where, item)
    same = jax.tree.leaves(jax.tree.map(np.array_equal, want, got))
    assert all(same), (f'{item} of checkpoint {step}, written after the SIGKILL {where}, '
                       'differs from the uninterrupted run')


@pytest.mark.parametrize('model', ['conv', 'mae'])
def test_sigkill_at_named_points_then_rerun_is_bit_identical(tmp_path, model):
  args = ['train_pretrain.py', '--config', CONFIGS[model], *LOOP]
  whole, cut = tmp_path / 'whole', tmp_path / 'cut'
  out = run_command([*args, f'--workdir={whole}'])
  assert out.returncode == 0, out.stderr[-3000:]
  # The final validation metrics as printed (the epoch's train/loss of a
  # resumed run averages only the steps after the resume).
  # (without the epoch's wall time, which the line ends with)
  last_epoch = lambda text: [re.sub(r' \([\d.]+ s\)$', '', ln.split(', eval/', 1)[1])
                             for ln in text.splitlines() if ln.startswith('epoch 2/2 step 16: ')]
  whole_summary = last_epoch(out.stdout)
  assert len(whole_summary) == 1, out.stdout
  assert checkpoint_steps(whole) == ALL_STEPS

  previous = 'nowhere (a fresh run)'
  for point, spec, on_disk in KILLS:
    before = checkpoint_steps(cut)
    out = run_command(['tests/kill_at.py', spec, *args, f'--workdir={cut}'])
    assert out.returncode == -signal.SIGKILL, (
        f'the run after the SIGKILL {previous} ended ({out.returncode}) before the SIGKILL '
        f'{point}', out.stdout[-2000:], out.stderr[-3000:])
    if before:
      assert f'resuming from step {before[-1]}' in out.stdout, (point, out.stdout)
    assert checkpoint_steps(cut) == on_disk, point
    for step in sorted(set(on_disk) - set(before)):
      assert_same_checkpoint(whole, cut, step, f'{previous}, resumed from step '
                             f'{before[-1] if before else 0}')
    previous = point
  assert list((cut / 'checkpoints').glob('11.orbax-checkpoint-tmp*')) == [], (
      'the rerun after the SIGKILL during a save left its temporary directory')

  out = run_command([*args, f'--workdir={cut}'])
  assert out.returncode == 0, (f'the rerun after the SIGKILL {previous} failed',
                               out.stderr[-3000:])
  assert 'resuming from step 11' in out.stdout, out.stdout
  assert checkpoint_steps(cut) == ALL_STEPS
  assert_same_checkpoint(whole, cut, 16, f'{previous}, resumed from step 11')
  assert last_epoch(out.stdout) == whole_summary


ARGS = ['train_pretrain.py', '--config', 'configs/conv.py:192,runlocal',
        '--config.data.fake_train_size=512', '--config.log_every_steps=1',
        '--config.checkpoint_every_steps=3', '--config.optim.lr=0.001',
        '--config.steps_per_dispatch=1']  # the stop comes one step after the signal


def logged_steps(workdir):
  path = workdir / 'metrics.jsonl'
  if not path.exists():
    return 0
  return sum('train/lr' in line for line in path.read_text().splitlines())


def start(workdir):
  import os  # noqa: PLC0415
  return subprocess.Popen([sys.executable, *ARGS, f'--workdir={workdir}'], cwd=ROOT,
                          env={**os.environ, 'PYTHONPATH': str(ROOT)}, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for_steps(proc, workdir, steps, timeout=240):
  deadline = time.monotonic() + timeout
  while logged_steps(workdir) < steps:
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    assert time.monotonic() < deadline
    time.sleep(0.005)


def test_sigterm_saves_the_current_step(tmp_path):
  proc = start(tmp_path)
  wait_for_steps(proc, tmp_path, 5)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
  assert 'rerun the same command to resume' in stderr
  stopped_at = int(stderr.split(' at step ')[1].split(';')[0])
  assert stopped_at >= 5
  step, _ = latest_params(tmp_path)
  assert step == stopped_at  # saved at the step it stopped, not at the last periodic save
  out = run_command([*ARGS, f'--workdir={tmp_path}'])
  assert out.returncode == 0 and f'resuming from step {stopped_at}' in out.stdout
