"""The CPU split into one XLA device per core, before the backend exists.

``configure()`` sets a process-wide flag and must run before the first jax
call that touches a device (importing jax is fine: XLA reads ``XLA_FLAGS``
when the backend is created). ``cli.run`` calls it before the command's
``main``, so every command (``train_pretrain.py``, ``train_classifier.py``,
``mil_jax.reproduce``, ``mil_jax.bench``) has it. It only acts when the run
will be on the CPU (``JAX_PLATFORMS`` says cpu, or no GPU/TPU plugin is
installed) and never overrides a flag the user set in ``XLA_FLAGS``.

XLA:CPU runs the small ops of a step one after another, so one device keeps
about one core busy, while a batch split over two devices keeps two. How many
of those devices a run uses, and every other speed choice, is decided by
``mil_jax.tuning`` from the config's ``speed`` block.
"""
from __future__ import annotations

import importlib.util
import os

# Most XLA devices the CPU is split into (one per usable core up to this).
CPU_MAX_DEVICES = 8
_DEVICE_COUNT_FLAG = 'xla_force_host_platform_device_count'

_applied: list[str] = []


def _will_run_on_cpu() -> bool:
  platforms = os.environ.get('JAX_PLATFORMS', '') or os.environ.get('JAX_PLATFORM_NAME', '')
  if platforms:
    return platforms.split(',')[0].strip().lower() == 'cpu'
  accelerators = ('jax_cuda12_plugin', 'jax_cuda13_plugin', 'jax_rocm60_plugin', 'libtpu')
  return not any(importlib.util.find_spec(m) for m in accelerators)


def _usable_cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # macOS, Windows
    return os.cpu_count() or 1


def configure(*, split: bool = True) -> None:
  """Splits the CPU into one XLA device per core when running on the CPU.

  Args:
    split: split the CPU into one device per core. A run of several
      processes passes False: its processes may share one machine's cores
      (each would split all of them), and its steps span every device
      anyway, so each process keeps one device unless the user set a count.
  """
  if _applied or not _will_run_on_cpu():
    return
  flags = os.environ.get('XLA_FLAGS', '')
  devices = min(_usable_cores(), CPU_MAX_DEVICES)
  extra = []
  if devices > 1 and split and f'--{_DEVICE_COUNT_FLAG}' not in flags:
    extra.append(f'--{_DEVICE_COUNT_FLAG}={devices}')
  if extra:
    os.environ['XLA_FLAGS'] = ' '.join([flags, *extra]).strip()
  _applied.extend(extra or ['none'])


def split_cpu() -> bool:
  """Whether ``configure`` split the CPU into several devices (the user did not choose)."""
  return any(a.startswith(f'--{_DEVICE_COUNT_FLAG}=') for a in _applied)


def applied() -> list[str]:
  """What ``configure`` changed (for benchmark records)."""
  return [a for a in _applied if a != 'none']
