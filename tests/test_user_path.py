"""The commands as a person types them, from a copy of the repository: relative
paths and default workdirs, mistakes that must not cost a run, reruns that
extend a run, two commands on one workdir, damaged checkpoints."""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from .conftest import copy_repository, latest_params, run_in, shared

FC = ['train_pretrain.py', '--config', 'configs/fc.py:runlocal']
KNN = ['train_classifier.py', '--mode', 'knn', '--config', 'configs/classifier.py:runlocal']
RUN = pathlib.Path('runs/pretrain_fc')  # FC's default workdir, relative to the copy


def ok(out: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'Traceback' not in out.stderr
  return out


def refused(out: subprocess.CompletedProcess, message: str) -> str:
  """The one line of a rejected command, which must contain ``message``."""
  assert out.returncode == 2, (out.stdout[-2000:], out.stderr[-3000:])
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), out.stderr[-3000:]
  assert message in lines[0], lines[0]
  assert '\\n' not in lines[0] and "\\'" not in lines[0], lines[0]
  return lines[0]


def snapshot(directory: pathlib.Path) -> dict[str, str]:
  """Every file under ``directory`` (relative name -> content hash)."""
  return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(directory.rglob('*')) if p.is_file()}


def epochs_logged(workdir: pathlib.Path) -> list[float]:
  lines = (workdir / 'metrics.jsonl').read_text().splitlines()
  return [r['epoch'] for r in map(json.loads, lines) if 'eval/loss' in r]


@pytest.fixture(scope='session')
def trained_copy(tmp_path_factory) -> pathlib.Path:
  """A repository copy in which FC (runlocal) trained one epoch into its default workdir
  (one per test session; tests change a private ``copy`` of it)."""
  def make(directory):
    ok(run_in(copy_repository(directory / 'mil_jax'), [*FC, '--config.num_epochs=1']))
  directory, _ = shared(tmp_path_factory, 'user_trained_copy', make)
  return directory / 'mil_jax'


@pytest.fixture
def copy(trained_copy, tmp_path) -> pathlib.Path:
  """A private copy of ``trained_copy``, to change."""
  return shutil.copytree(trained_copy, tmp_path / 'mil_jax', symlinks=True)


def test_relative_and_home_paths_reach_the_same_encoder(copy):
  step = max(int(p.name) for p in (copy / RUN / 'checkpoints').iterdir() if p.name.isdigit())
  said = []
  for extra, env in [([], {}),  # the newest run under runs/, from the repository root
                     (['--pretrained_path', str(RUN), '--workdir', 'runs/knn_rel'], {}),
                     (['--pretrained_path', f'{RUN}/checkpoints/{step}',
                       '--workdir=runs/knn_step'], {}),
                     (['--pretrained_path', f'~/{RUN}', '--workdir', '~/runs/knn_home'],
                      {'HOME': str(copy)})]:
    out = ok(run_in(copy, [*KNN, *extra], env=env))
    said.append([ln for ln in out.stdout.splitlines() if ln.startswith('k-NN accuracy')])
    if not extra:
      assert f'using the newest pretraining run: {copy / RUN}' in out.stdout
  assert len(said[0]) == 1 and said == [said[0]] * 4  # one encoder, one accuracy
  for name in ('classify_knn_frozen_fc', 'knn_rel', 'knn_step', 'knn_home'):
    assert (copy / 'runs' / name / 'metrics.jsonl').exists(), name


@pytest.mark.parametrize('bad', ['--config.loss=l3', '--config.optim.lr=nan',
                                 '--config.checkpoint_every_steps=-1'])
def test_overwrite_with_a_mistake_leaves_the_run_byte_identical(copy, bad):
  before = snapshot(copy / RUN)
  refused(run_in(copy, [*FC, '--overwrite', bad]), bad.split('.')[-1].split('=')[0])
  assert snapshot(copy / RUN) == before


def test_a_rejected_value_writes_nothing_and_a_run_that_saved_no_step_locks_in_nothing(
    tmp_path):
  copy = copy_repository(tmp_path / 'mil_jax')
  refused(run_in(copy, [*FC, '--config.loss=l3']), "unknown loss 'l3'")
  assert not (copy / 'runs').exists()
  # Diverges before its first checkpoint; the advice is a lower learning rate.
  line = refused(run_in(copy, [*FC, '--config.optim.lr=1e12', '--config.num_epochs=1']),
                 'the training loss became')
  assert 'lower --config.optim.lr' in line
  assert not any((copy / RUN / 'checkpoints').glob('[0-9]*'))
  ok(run_in(copy, [*FC, '--config.optim.lr=1e-3', '--config.num_epochs=1']))
  assert epochs_logged(copy / RUN) == [1.0]  # nothing of the diverged attempt is left
  assert json.loads((copy / RUN / 'config.json').read_text())['optim']['lr'] == 1e-3


def test_a_larger_num_epochs_extends_a_finished_run(copy, tmp_path):
  pictures = {name: copy / RUN / name for name in ('loss.png', 'reconstructions.png')}
  drawn = {name: path.stat().st_mtime_ns for name, path in pictures.items()}
  pictures['loss.png'].unlink()
  out = ok(run_in(copy, [*FC, '--config.num_epochs=1']))
  assert 'has finished' in out.stdout and 'epoch 1/' not in out.stdout
  # The finished run keeps its pictures; only the missing one is drawn again.
  assert pictures['reconstructions.png'].stat().st_mtime_ns == drawn['reconstructions.png']
  assert pictures['loss.png'].stat().st_mtime_ns > drawn['loss.png']
  drawn = {name: path.stat().st_mtime_ns for name, path in pictures.items()}
  out = ok(run_in(copy, [*FC, '--config.num_epochs=3', '--config.log_every_steps=2']))
  assert 'resuming from step 8' in out.stdout, out.stdout
  assert epochs_logged(copy / RUN) == [1.0, 2.0, 3.0]
  for name, path in pictures.items():  # the extended run draws its own
    assert path.stat().st_mtime_ns > drawn[name], name
  # FC's schedule decays per epoch, whatever the length: the extended run is
  # the run that was asked for 3 epochs from the start.
  ok(run_in(copy, [*FC, '--config.num_epochs=3', '--workdir', 'runs/straight']))
  step, extended = latest_params(copy / RUN)
  step_straight, straight = latest_params(copy / 'runs/straight')
  assert step == step_straight == 24
  for a, b in zip(_leaves(extended), _leaves(straight), strict=True):
    np.testing.assert_array_equal(a, b)


def _leaves(tree):
  import jax  # noqa: PLC0415
  return jax.tree.leaves(tree)


def test_a_refused_rerun_names_the_fields_and_both_ways_forward(copy):
  before = snapshot(copy / RUN)
  line = refused(run_in(copy, [*FC, '--config.optim.lr=0.5', '--config.seed=3']),
                 'holds a run of a different config')
  assert 'optim.lr (0.0001 there, 0.5 now)' in line and 'seed (0 there, 3 now)' in line
  assert '--workdir' in line and '--overwrite' in line
  assert snapshot(copy / RUN) == before
  ok(run_in(copy, [*FC, '--config.optim.lr=0.5', '--overwrite', '--config.num_epochs=1']))
  assert json.loads((copy / RUN / 'config.json').read_text())['optim']['lr'] == 0.5


def _wait_for(predicate, seconds: float, what: str) -> None:
  deadline = time.monotonic() + seconds
  while not predicate():
    assert time.monotonic() < deadline, f'waited {seconds} s for {what}'
    time.sleep(0.2)


def test_one_run_per_workdir(tmp_path):
  copy = copy_repository(tmp_path / 'mil_jax')
  env = {**os.environ, 'PYTHONPATH': str(copy)}
  first = subprocess.Popen([sys.executable, *FC, '--config.num_epochs=500'], cwd=copy, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  try:
    _wait_for(lambda: (copy / RUN / 'metrics.jsonl').exists() or first.poll() is not None,
              240, 'the first run to start training')
    assert first.poll() is None, first.stderr.read()
    line = refused(run_in(copy, [*FC, '--config.num_epochs=500'], timeout=120), 'is in use by')
    assert f'process {first.pid} ' in line and '--workdir' in line
  finally:
    first.kill()  # SIGKILL: the lock must not outlive the process
    first.wait(timeout=60)
  out = ok(run_in(copy, [*FC, '--config.num_epochs=1'], timeout=240))
  assert 'has finished' in out.stdout or 'epoch 1/1' in out.stdout, out.stdout


def _damage(checkpoint_dir: pathlib.Path) -> None:
  """Removes the array data of a checkpoint's params, as a disk or a user might."""
  removed = [p for p in (checkpoint_dir / 'params').rglob('*') if p.is_file() and
             p.parent.name == 'd']
  assert removed
  for p in removed:
    p.unlink()


def test_a_damaged_checkpoint_falls_back_to_the_one_before(copy):
  ok(run_in(copy, [*FC, '--config.num_epochs=2', '--config.keep_checkpoints=2',
                    '--config.checkpoint_every_steps=8']))
  steps = sorted(int(p.name) for p in (copy / RUN / 'checkpoints').iterdir()
                 if p.name.isdigit())
  assert steps == [8, 16]
  _damage(copy / RUN / 'checkpoints' / '16')
  knn = ok(run_in(copy, [*KNN, '--pretrained_path', str(RUN), '--workdir', 'runs/knn']))
  assert 'checkpoint 16 ' in knn.stderr and 'cannot be read' in knn.stderr
  assert f'from {copy / RUN}/checkpoints/8' in knn.stdout
  out = ok(run_in(copy, [*FC, '--config.num_epochs=3', '--config.keep_checkpoints=2']))
  assert 'checkpoint 16 ' in out.stderr and 'resuming from step 8' in out.stdout
  assert [p.name.split('.')[0] for p in (copy / RUN / 'damaged_checkpoints').iterdir()] == ['16']
  assert epochs_logged(copy / RUN) == [1.0, 2.0, 3.0]
  for step in sorted(int(p.name) for p in (copy / RUN / 'checkpoints').iterdir()
                     if p.name.isdigit()):
    _damage(copy / RUN / 'checkpoints' / str(step))
  refused(run_in(copy, [*FC, '--config.num_epochs=3']), 'can be read')
  refused(run_in(copy, [*KNN, '--pretrained_path', str(RUN)]), 'can be read')
