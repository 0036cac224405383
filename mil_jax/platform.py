"""CPU runtime settings that must be in place before JAX creates its backend.

``configure()`` must run before the first jax call that touches a device
(importing jax is fine: XLA reads ``XLA_FLAGS`` when the backend is created).
``python -m mil_jax.bench`` calls it at import; a program calls it first thing
in ``main``. It only acts when the run will be on the CPU (``JAX_PLATFORMS``
says cpu, or no GPU/TPU plugin is installed) and never overrides a flag the
user set in ``XLA_FLAGS``.
"""
from __future__ import annotations

import importlib.util
import os

# XLA flags for the training steps on XLA:CPU (see mil_jax.bench): keep the
# YNNPACK library for dots and elementwise fusions but not for reductions,
# whose YNN kernels were slower than XLA's own on the attention softmax and
# LayerNorm backward of the MAE.
CPU_XLA_FLAGS: dict[str, str] = {'xla_cpu_experimental_ynn_fusion_type': '-reduce'}

_applied: list[str] = []


def _will_run_on_cpu() -> bool:
  platforms = os.environ.get('JAX_PLATFORMS', '') or os.environ.get('JAX_PLATFORM_NAME', '')
  if platforms:
    return platforms.split(',')[0].strip().lower() == 'cpu'
  accelerators = ('jax_cuda12_plugin', 'jax_cuda13_plugin', 'jax_rocm60_plugin', 'libtpu')
  return not any(importlib.util.find_spec(m) for m in accelerators)


def configure() -> None:
  """Adds the CPU tuning to ``XLA_FLAGS`` when running on the CPU."""
  if _applied or not _will_run_on_cpu():
    return
  flags = os.environ.get('XLA_FLAGS', '')
  extra = [f'--{k}={v}' for k, v in CPU_XLA_FLAGS.items() if f'--{k}' not in flags]
  if extra:
    os.environ['XLA_FLAGS'] = ' '.join([flags, *extra]).strip()
  _applied.extend(extra or ['none'])


def applied() -> list[str]:
  """What ``configure`` changed (for benchmark records)."""
  return [a for a in _applied if a != 'none']
