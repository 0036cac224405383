"""Runs of several processes: localhost, the CPU, 2 processes x 2 devices each.

The commands run as a user starts them: from a copy of the repository, with
relative paths, one process per launch setting. Every wait is bounded, and
processes still running when a test ends (or fails) are killed.
"""
import contextlib
import dataclasses
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import pytest

from configs import classifier as classifier_config
from configs import reproduce as reproduce_config
from mil_jax import classify, distributed, reproduce

from .conftest import ROOT, latest_params, shared

# The FC autoencoder: its training is well-conditioned, so runs whose
# gradient all-reduce sums in another order stay within float rounding (the
# Conv's LayerNorms over 6 to 48 channels amplify such differences to percents
# of a parameter within 16 steps, between any two device layouts).
PRETRAIN = ['train_pretrain.py', '--config', 'configs/fc.py:runlocal',
            '--config.steps_per_dispatch=2', '--config.checkpoint_every_steps=4',
            '--config.keep_checkpoints=4']
TOTAL_STEPS = 16  # 256 fake images, batch 32, 2 epochs
CLASSIFY = ['train_classifier.py', '--config', 'configs/classifier.py:runlocal']
# A run of these tiny commands takes a minute or two when the 2 cores are
# shared; the bound only keeps a hang from blocking the suite.
TIMEOUT_S = 900


@dataclasses.dataclass
class Finished:
  returncode: int
  stdout: str
  stderr: str


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def copy_repo(dest: pathlib.Path) -> pathlib.Path:
  """The code a user runs: the packages and the two programs."""
  for name in ('mil_jax', 'configs'):
    shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns('__pycache__'))
  for name in ('train_pretrain.py', 'train_classifier.py'):
    shutil.copy(ROOT / name, dest / name)
  return dest


def launch_flags(i: int, count: int, port: int) -> list[str]:
  return [f'--coordinator_address=localhost:{port}', f'--num_processes={count}',
          f'--process_id={i}']


class Launched:
  """Processes started together; their stdout and stderr go to temporary files."""

  def __init__(self):
    self.popens: list[subprocess.Popen] = []
    self._logs: list[tuple] = []

  def start(self, args: list[str], cwd: pathlib.Path, env: dict[str, str]) -> None:
    out, err = tempfile.TemporaryFile('w+'), tempfile.TemporaryFile('w+')
    self._logs.append((out, err))
    self.popens.append(subprocess.Popen([sys.executable, *args], cwd=cwd, text=True,
                                        stdout=out, stderr=err, env=env))

  def output(self) -> list[Finished]:
    """What each process has printed so far, with its exit code (None: running)."""
    results = []
    for p, (out, err) in zip(self.popens, self._logs):
      out.seek(0)
      err.seek(0)
      results.append(Finished(p.poll(), out.read(), err.read()))
    return results

  def finish(self) -> list[Finished]:
    """Waits at most TIMEOUT_S for every process to end."""
    deadline = time.monotonic() + TIMEOUT_S
    for p in self.popens:
      p.wait(timeout=max(deadline - time.monotonic(), 1))
    return self.output()

  def close(self) -> None:
    """Kills what still runs."""
    for p in self.popens:
      if p.poll() is None:
        p.kill()
        p.wait(timeout=60)
    for out, err in self._logs:
      out.close()
      err.close()


@contextlib.contextmanager
def started(repo: pathlib.Path, args: list[str], *, processes: int = 2, devices: int = 2,
            launch=launch_flags, env=None):
  """Starts ``processes`` copies of ``python ARGS`` in ``repo``, each with ``devices``
  CPU devices; ``launch(i, n, port)`` gives process ``i``'s extra flags and
  ``env(i, n, port)`` its extra environment. Kills any still running at the end.
  """
  port = free_port()
  base = {k: v for k, v in os.environ.items() if k not in distributed.ENV_VARS.values()}
  base.update(PYTHONPATH=str(repo), JAX_PLATFORMS='cpu',
              XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} "
                        f'--xla_force_host_platform_device_count={devices}')
  launched = Launched()
  try:
    for i in range(processes):
      extra = launch(i, processes, port) if processes > 1 else []
      launched.start([*args, *extra], repo, {**base, **(env(i, processes, port) if env else {})})
    yield launched
  finally:
    launched.close()


def run_processes(repo: pathlib.Path, args: list[str], **kwargs) -> list[Finished]:
  with started(repo, args, **kwargs) as launched:
    return launched.finish()


def assert_ok(results: list[Finished]) -> None:
  for i, r in enumerate(results):
    assert r.returncode == 0, f'process {i}: {r.stderr[-3000:]}'


def epoch_lines(text: str) -> list[str]:
  """The epoch summary lines of ``text`` without the wall time each ends with."""
  return [re.sub(r' \([\d.]+ s\)$', '', line) for line in text.splitlines()
          if line.startswith('epoch ')]


@pytest.fixture(scope='session')
def two_process_pretraining(tmp_path_factory):
  """An FC pretraining in 2 processes x 2 devices: ``(repo, [Finished, Finished])``."""
  def make(directory):
    repo = copy_repo(directory)
    return [dataclasses.asdict(r) for r in run_processes(repo, [*PRETRAIN, '--workdir=runs/pre'])]
  repo, results = shared(tmp_path_factory, 'two_process_pretraining', make)
  results = [Finished(**r) for r in results]
  assert_ok(results)
  return repo / 'runs' / 'pre', results


@pytest.fixture(scope='session')
def four_device_pretraining(tmp_path_factory):
  """The same pretraining in 1 process x 4 devices: its workdir."""
  def make(directory):
    repo = copy_repo(directory)
    return [dataclasses.asdict(r) for r in run_processes(
        repo, [*PRETRAIN, '--workdir=runs/pre'], processes=1, devices=4)]
  repo, results = shared(tmp_path_factory, 'four_device_pretraining', make)
  assert_ok([Finished(**r) for r in results])
  return repo / 'runs' / 'pre'


def assert_params_close(a, b) -> None:
  """Equal up to the summation order of the gradient all-reduce (gloo between processes)."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7), a, b)


def test_two_processes_train_as_one_process_of_four_devices(two_process_pretraining,
                                                            four_device_pretraining):
  workdir, results = two_process_pretraining
  # Both processes took part in every step and saw the same losses.
  lines = [epoch_lines(r.stdout) for r in results]
  assert len(lines[0]) == 2 and lines[0] == lines[1]
  step, params = latest_params(workdir)
  ref_step, ref_params = latest_params(four_device_pretraining)
  assert step == ref_step == TOTAL_STEPS
  assert_params_close(params, ref_params)
  # Only process 0 wrote the run's files: one record per logged step, one event file.
  records = [json.loads(x) for x in (workdir / 'metrics.jsonl').read_text().splitlines()]
  ref = [json.loads(x) for x in (four_device_pretraining / 'metrics.jsonl').read_text()
         .splitlines()]
  assert [r['step'] for r in records] == [r['step'] for r in ref]
  for name in ('train/loss', 'train/grad_norm', 'eval/loss'):
    np.testing.assert_allclose([r.get(name, np.nan) for r in records],
                               [r.get(name, np.nan) for r in ref], rtol=1e-5, err_msg=name)
  assert len(list(workdir.glob('events.out.tfevents.*'))) == 1
  assert {'config.json', 'loss.png', 'reconstructions.png'} <= {p.name for p in
                                                               workdir.iterdir()}
  assert not list(workdir.glob('*.tmp'))


def test_checkpoint_of_two_processes_resumes_in_one(tmp_path, two_process_pretraining,
                                                    four_device_pretraining):
  workdir, _ = two_process_pretraining
  repo = copy_repo(tmp_path)
  resumed = repo / 'runs' / 'pre'
  shutil.copytree(workdir, resumed)
  # As if the two processes had been killed after the save at step 4.
  for step_dir in (resumed / 'checkpoints').iterdir():
    if step_dir.name.isdigit() and int(step_dir.name) > 4:
      shutil.rmtree(step_dir)
  [out] = run_processes(repo, [*PRETRAIN, '--workdir=runs/pre'], processes=1, devices=4)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'resuming from step 4' in out.stdout
  step, params = latest_params(resumed)
  assert step == TOTAL_STEPS
  assert_params_close(params, latest_params(four_device_pretraining)[1])


def classifier_reference(pretrained: pathlib.Path, workdir: pathlib.Path, mode: str) -> dict:
  """The classifier stage in this (one-device) process, restoring the 2-process checkpoint."""
  config = classifier_config.get_config('runlocal')
  config.mode, config.pretrained_path = mode, str(pretrained)
  return classify.train_and_evaluate(config, workdir)


def test_classifier_and_knn_over_that_checkpoint_run_in_two_processes(
    tmp_path, two_process_pretraining):
  pretrained, _ = two_process_pretraining
  repo = copy_repo(tmp_path / 'repo')
  shutil.copytree(pretrained, repo / 'runs' / 'pre')
  for mode in ('probing', 'knn'):
    results = run_processes(repo, [*CLASSIFY, f'--mode={mode}', '--pretrained_path=runs/pre',
                                   f'--workdir=runs/{mode}'])
    assert_ok(results)
    assert all(f'encoder: fc from {repo / "runs" / "pre" / "checkpoints"}' in r.stdout
               for r in results), results[0].stdout
    expected = classifier_reference(pretrained, tmp_path / f'reference_{mode}', mode)
    records = [json.loads(x) for x in (repo / 'runs' / mode / 'metrics.jsonl').read_text()
               .splitlines()]
    ref = [json.loads(x) for x in (tmp_path / f'reference_{mode}' / 'metrics.jsonl').read_text()
           .splitlines()]
    assert [r['step'] for r in records] == [r['step'] for r in ref]  # written once
    for name, value in expected.items():
      np.testing.assert_allclose(records[-1][name], value, rtol=1e-4, err_msg=f'{mode} {name}')
  assert (repo / 'runs' / 'probing' / 'accuracy.png').exists()
  knn_lines = [[x for x in r.stdout.splitlines() if x.startswith('k-NN accuracy')]
               for r in results]
  assert len(knn_lines[0]) == 1 and knn_lines[0] == knn_lines[1]


def test_reproduce_runs_in_two_processes(tmp_path):
  repo = copy_repo(tmp_path / 'repo')
  grid = ['--config.rows=fc_l1', '--config.columns=linear_frozen']
  results = run_processes(repo, ['-m', 'mil_jax.reproduce', '--config',
                                 'configs/reproduce.py:runlocal', *grid, '--workdir=grid'])
  assert_ok(results)
  assert results[0].stdout.count(': ok ') == results[1].stdout.count(': ok ') == 3
  cells = json.loads((repo / 'grid' / 'results.json').read_text())['cells']
  assert {r['status'] for r in cells.values()} == {'ok'}
  assert {r['hardware']['process_count'] for r in cells.values()} == {2}
  for name in ('results.md', 'report.png', 'pretrain/fc_l1/strip.npz'):
    assert (repo / 'grid' / name).exists(), name
  # The same grid in this one-device process.
  grid_config = reproduce_config.get_config('runlocal')
  grid_config.rows, grid_config.columns = 'fc_l1', 'linear_frozen'
  expected = reproduce.run_grid(grid_config, tmp_path / 'reference', log=lambda _: None)['cells']
  for key, record in expected.items():
    for name, value in record['metrics'].items():
      np.testing.assert_allclose(cells[key]['metrics'][name], value, rtol=1e-4,
                                 err_msg=f'{key} {name}')


def test_sigterm_to_one_process_stops_both_at_one_saved_step(tmp_path):
  repo = copy_repo(tmp_path)
  args = [*PRETRAIN[:3], '--config.num_epochs=500', '--config.log_every_steps=1',
          '--config.steps_per_dispatch=1', '--workdir=runs/pre']
  metrics = repo / 'runs' / 'pre' / 'metrics.jsonl'
  with started(repo, args) as launched:
    deadline = time.monotonic() + TIMEOUT_S
    while not metrics.exists() or len(metrics.read_text().splitlines()) < 3:
      assert all(r.returncode is None for r in launched.output()), launched.output()
      assert time.monotonic() < deadline, launched.output()
      time.sleep(0.05)
    launched.popens[1].send_signal(signal.SIGTERM)
    results = launched.finish()
  stops = []
  for i, r in enumerate(results):
    assert r.returncode == 128 + signal.SIGTERM, f'process {i}: {r.stderr[-3000:]}'
    [line] = [x for x in r.stderr.splitlines() if x.startswith('stopped by SIGTERM at step ')]
    assert line.endswith('a checkpoint was saved, rerun the same command to resume.')
    stops.append(int(line.split(' at step ')[1].split(';')[0]))
  assert stops[0] == stops[1] >= 3
  step, params = latest_params(repo / 'runs' / 'pre')
  assert step == stops[0]  # saved by both, at the step they stopped together
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_a_launch_without_a_count_exits_2_in_every_process(tmp_path):
  repo = copy_repo(tmp_path)
  env = lambda i, n, port: {'JAX_COORDINATOR_ADDRESS': f'localhost:{port}',
                            'JAX_PROCESS_ID': str(i)}
  results = run_processes(repo, [*PRETRAIN, '--workdir=runs/pre'], launch=lambda *_: [],
                          env=env)
  for r in results:
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.strip().splitlines() == [
        'error: JAX_COORDINATOR_ADDRESS and JAX_PROCESS_ID are set but not JAX_NUM_PROCESSES '
        '(or --num_processes); set all three on every process, or none of them under '
        'SLURM, Open MPI or on a Cloud TPU.']
  assert not (repo / 'runs').exists()


def test_a_peer_that_never_comes_ends_the_wait(tmp_path):
  repo = copy_repo(tmp_path)
  [out] = run_processes(repo, [*PRETRAIN, '--workdir=runs/pre', '--initialization_timeout=2',
                               '--coordinator_address=localhost:1', '--num_processes=2',
                               '--process_id=1'], processes=1)
  assert out.returncode == 2, out.stderr[-3000:]
  assert out.stderr.strip().splitlines()[-1] == (
      'error: process 1 of 2 waited 2 s at localhost:1 for the other processes to join; '
      'start the same command on every process (process ids 0 to N-1, process 0 reachable '
      'at the address), or raise --initialization_timeout.')
  assert not (repo / 'runs').exists()


def test_a_port_in_use_is_a_user_error(tmp_path):
  repo = copy_repo(tmp_path)
  with socket.socket() as taken:
    taken.bind(('', 0))
    taken.listen()
    port = taken.getsockname()[1]
    [out] = run_processes(repo, [*PRETRAIN, '--workdir=runs/pre', '--num_processes=2',
                                 f'--coordinator_address=localhost:{port}', '--process_id=0'],
                          processes=1)
  assert out.returncode == 2, out.stderr[-3000:]
  assert out.stderr.strip().splitlines()[-1].startswith(
      f'error: process 0 could not start the coordinator on port {port} (')
  assert not (repo / 'runs').exists()
