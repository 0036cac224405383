"""Shared test fixtures: paths, the real CIFAR-10 copy, subprocess runs."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import tempfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / 'shared' / 'data'

# Every test compiles the same tiny programs again, in this process and in the
# commands it starts: JAX's persistent compilation cache cuts the suite's time
# by more than half on a 2-core machine. Set before anything imports jax.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(tempfile.gettempdir(), 'mil_jax_tests_jax_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '-1')
# The tests' programs are tiny and compiled far more often than run: XLA's
# cheapest backend optimization level compiles them about 30% faster.
FAST_COMPILE_FLAGS = '--xla_backend_optimization_level=0'
os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_FLAGS}".strip()


def run_command(args: list[str], *, env: dict[str, str] | None = None, timeout: float = 300,
                cwd: pathlib.Path | None = None) -> subprocess.CompletedProcess:
  """Runs ``python ARGS`` from the repository root and captures its output."""
  env = dict(env or {})
  if 'XLA_FLAGS' in env:
    env['XLA_FLAGS'] = f"{os.environ['XLA_FLAGS']} {env['XLA_FLAGS']}"
  full_env = {**os.environ, 'PYTHONPATH': str(ROOT), **env}
  return subprocess.run([sys.executable, *args], cwd=cwd or ROOT, env=full_env, text=True,
                        capture_output=True, timeout=timeout, check=False)


@pytest.fixture(scope='session')
def cifar10_npz(tmp_path_factory) -> pathlib.Path:
  """The real CIFAR-10 training images as a keras-style .npz (skips when absent)."""
  decoder = SHARED_DATA / 'decode_cifar10.py'
  if not decoder.exists():
    pytest.skip('the real CIFAR-10 copy (../shared/data) is not on this machine')
  out = tmp_path_factory.mktemp('cifar10') / 'cifar10.npz'
  subprocess.run([sys.executable, str(decoder), str(out)], check=True, capture_output=True)
  return out


def latest_params(workdir: pathlib.Path):
  """``(step, params)`` of the latest checkpoint of a run's workdir."""
  from mil_jax import checkpoint  # noqa: PLC0415
  directory = workdir / 'checkpoints'
  mngr = checkpoint.manager(directory, create=False)
  step = mngr.latest_step()
  mngr.close()
  return step, checkpoint.restore_params(directory, step)


def pretrain_tiny_conv(workdir: pathlib.Path) -> pathlib.Path:
  """Pretrains a tiny Conv autoencoder for one epoch on fake data into ``workdir``."""
  from configs import conv as conv_config  # noqa: PLC0415
  from mil_jax import pretrain  # noqa: PLC0415
  config = conv_config.get_config('192,runlocal')
  config.num_epochs = 1
  config.data.fake_train_size = 128
  config.data.fake_test_size = 64
  pretrain.train_and_evaluate(config, workdir)
  return workdir


@pytest.fixture(scope='session')
def pretrained(tmp_path_factory) -> pathlib.Path:
  """A pretraining workdir with a finished tiny Conv run (one per test process)."""
  return pretrain_tiny_conv(tmp_path_factory.mktemp('runs') / 'pretrain_conv')


def copy_repo(dest: pathlib.Path) -> pathlib.Path:
  """A copy of the programs, packages and configs in ``dest``, to run commands from as a user."""
  import shutil  # noqa: PLC0415
  dest.mkdir(parents=True, exist_ok=True)
  for name in ('mil_jax', 'configs'):
    shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns('__pycache__'))
  for name in ('train_pretrain.py', 'train_classifier.py', 'pyproject.toml'):
    shutil.copy2(ROOT / name, dest / name)
  return dest
