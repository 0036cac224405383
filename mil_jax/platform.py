"""CPU settings of XLA for the training programs.

``configure()`` sets process-wide flags and must run before the first jax call
that touches a device (importing jax is fine: XLA reads ``XLA_FLAGS`` when the
backend is created). ``cli.run`` calls it before the command's ``main``, so
every command (``train_pretrain.py``, ``train_classifier.py``,
``mil_jax.reproduce``, ``mil_jax.bench``) has it. It only acts when the run will be on the CPU
(``JAX_PLATFORMS`` says cpu, or no GPU/TPU plugin is installed) and never
overrides a flag the user set in ``XLA_FLAGS``.

It also splits the CPU into one XLA device per core (up to
``CPU_MAX_DEVICES``): XLA:CPU runs the small ops of a step one after another,
so one device keeps about one core busy, while a batch split over two devices
keeps two. ``sharding.training_mesh`` then puts the models of
``CPU_DATA_PARALLEL`` on every such device and the others on one.

``compiler_options(model)`` gives per-model options for ``jax.jit``, which
the trainer applies to its programs when the backend is the CPU.
"""
from __future__ import annotations

import importlib.util
import os

# XLA flags for the training steps on XLA:CPU (see mil_jax.bench): keep the
# YNNPACK library for dots and elementwise fusions but not for reductions,
# whose YNN kernels were slower than XLA's own on the attention softmax and
# LayerNorm backward of the MAE.
CPU_XLA_FLAGS: dict[str, str] = {'xla_cpu_experimental_ynn_fusion_type': '-reduce'}

# Per-model options of the train and eval programs on XLA:CPU, each measured
# with the benchmark (README, Performance). Without YNNPACK: the Conv
# autoencoder, whose dots are tiny (at most 48 channels) and cheaper in XLA's
# own loops, and the MAE, whose dots in Eigen and fusions in XLA's emitters
# beat YNNPACK's by a few percent, and the masked UNet (the Conv's convs with
# skips). The FC autoencoder's large dots are faster in YNNPACK.
_NO_YNNPACK = {'xla_cpu_experimental_ynn_fusion_type': ''}
CPU_COMPILER_OPTIONS: dict[str, dict[str, str]] = {'conv': _NO_YNNPACK, 'mae': _NO_YNNPACK,
                                                     'masked_unet': _NO_YNNPACK}

# Most XLA devices the CPU is split into (one per usable core up to this).
CPU_MAX_DEVICES = 8
_DEVICE_COUNT_FLAG = 'xla_force_host_platform_device_count'

# Models whose training step splits its batch over the CPU devices, each
# measured with the benchmark on 2 cores (README, Performance): Conv, MAE and
# the masked UNet gain from it. The FC autoencoder's large dots already use
# every core and it lost to the gradient all-reduce of its 12.4 M parameters;
# the classifier on cached features is too small to split.
CPU_DATA_PARALLEL = frozenset({'conv', 'mae', 'masked_unet'})

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
  """Adds the CPU tuning to ``XLA_FLAGS`` when running on the CPU.

  Args:
    split: split the CPU into one device per core. A run of several
      processes passes False: its processes may share one machine's cores
      (each would split all of them), and its steps span every device
      anyway, so each process keeps one device unless the user set a count.
  """
  if _applied or not _will_run_on_cpu():
    return
  flags = os.environ.get('XLA_FLAGS', '')
  wanted = dict(CPU_XLA_FLAGS)
  devices = min(_usable_cores(), CPU_MAX_DEVICES)
  if devices > 1 and split:
    wanted[_DEVICE_COUNT_FLAG] = str(devices)
  extra = [f'--{k}={v}' for k, v in wanted.items() if f'--{k}' not in flags]
  if extra:
    os.environ['XLA_FLAGS'] = ' '.join([flags, *extra]).strip()
  _applied.extend(extra or ['none'])


def split_cpu() -> bool:
  """Whether ``configure`` split the CPU into several devices (the user did not choose)."""
  return any(a.startswith(f'--{_DEVICE_COUNT_FLAG}=') for a in _applied)


def applied() -> list[str]:
  """What ``configure`` changed (for benchmark records)."""
  return [a for a in _applied if a != 'none']


def compiler_options(model: str | None) -> dict[str, str] | None:
  """``jax.jit`` compiler options for the programs of ``model`` (None: XLA's defaults)."""
  import jax  # pylint: disable=import-outside-toplevel  (keeps this module importable first)
  if model is None or jax.default_backend() != 'cpu':
    return None
  return CPU_COMPILER_OPTIONS.get(model)
