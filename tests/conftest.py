"""Shared test fixtures: paths, the real CIFAR-10 copy, subprocess runs."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / 'shared' / 'data'


def run_command(args: list[str], *, env: dict[str, str] | None = None, timeout: float = 300,
                cwd: pathlib.Path | None = None) -> subprocess.CompletedProcess:
  """Runs ``python ARGS`` from the repository root and captures its output."""
  full_env = {**os.environ, 'PYTHONPATH': str(ROOT), **(env or {})}
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
