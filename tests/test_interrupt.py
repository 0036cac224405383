"""Interrupted runs lose nothing: SIGKILL anywhere, SIGTERM saves the current step."""
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np

from .conftest import ROOT, latest_params, run_command

ARGS = ['train_pretrain.py', '--config', 'configs/conv.py:192,runlocal',
        '--config.data.fake_train_size=512', '--config.log_every_steps=1',
        '--config.checkpoint_every_steps=3', '--config.optim.lr=0.001',
        '--config.steps_per_dispatch=1']  # a checkpoint can then fall on any step
TOTAL_STEPS = 32  # 2 epochs of 16 steps


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


def test_sigkill_at_random_steps_then_rerun_is_bit_identical(tmp_path):
  out = run_command([*ARGS, f'--workdir={tmp_path / "whole"}'])
  assert out.returncode == 0, out.stderr[-3000:]
  step, whole = latest_params(tmp_path / 'whole')
  assert step == TOTAL_STEPS

  seed = random.randrange(1 << 30)
  targets = sorted(random.Random(seed).sample(range(2, TOTAL_STEPS - 4), 3))
  for target in targets:
    workdir = tmp_path / f'killed_at_{target}'
    proc = start(workdir)
    wait_for_steps(proc, workdir, target)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    out = run_command([*ARGS, f'--workdir={workdir}'])
    assert out.returncode == 0, (seed, target, out.stderr[-3000:])
    step, resumed = latest_params(workdir)
    assert step == TOTAL_STEPS
    jax.tree.map(np.testing.assert_array_equal, whole, resumed)


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
