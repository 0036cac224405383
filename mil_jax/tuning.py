"""Speed settings: how a run computes, never what it learns, decided in one place.

Every config has a ``speed`` block (``configs/common.py:speed_config``) whose
fields are ``'auto'`` unless a config or the command line chose. :func:`resolve`
turns them into a :class:`Speed` for the platform the run is on; the stages
record it in the run's ``config.json`` (``speed``), build their mesh, models,
compiler options and trainer from it, and nothing else asks which backend,
CPU or device count it runs on. The choices and what they were measured
against are in ``docs/performance.md``.

====================== ===================================== ===================
field                  'auto' on a CPU                       'auto' elsewhere
====================== ===================================== ===================
devices                ``cpu_devices`` of a CPU split into   every device
                       cores (as many as divide the batch)
conv_impl              'dots'                                'dots'
attention_chunk_bytes  2 MiB of attention weights per chunk  0 (whole batch)
grad_norm_every        ``steps_per_dispatch``                1 (every step)
max_in_flight          2                                     0 (unbounded)
cpu_ynn_fusions        by CPU kind and architecture          (not used)
====================== ===================================== ===================
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from mil_jax import platform
from mil_jax.errors import UserError

AUTO = 'auto'
FIELDS = ('devices', 'cpu_devices', 'conv_impl', 'attention_chunk_bytes', 'grad_norm_every',
          'max_in_flight', 'cpu_ynn_fusions')
CONV_IMPLS = ('dots', 'xla')
ATTENTIONS = ('xla', 'cudnn')
# XLA:CPU's YNNPACK fusions, as the value of the compiler option that selects
# them: 'all' keeps XLA's default (single dots and convolutions, and
# reductions), 'no_reduce' that default without reductions, 'none' no YNNPACK.
YNN_FUSIONS = {'all': None,
               'no_reduce': ('LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,'
                             'LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION'),
               'none': ''}
_YNN_OPTION = 'xla_cpu_experimental_ynn_fusion_type'

# Attention weights [c, H, T, T] per chunk on a CPU: they stay in cache through
# the softmax and its gradient instead of streaming through memory.
CPU_ATTENTION_CHUNK_BYTES = 2 << 20
# Dispatched calls unfinished at once on a CPU: an unbounded queue deadlocked
# XLA:CPU's in-process all-reduce between CPU devices.
CPU_MAX_IN_FLIGHT = 2

# YNNPACK fusions per CPU kind and architecture, measured with the benchmark on
# a 2-core AMD EPYC (AVX2) and a 2-core Intel Xeon (AVX-512, AMX): the same
# choices won on both (docs/performance.md). A kind that measures otherwise gets
# its own row. 'head' (a classifier on cached features) and any other: the default.
_MEASURED = {'fc': 'no_reduce', 'conv': 'none', 'mae': 'none', 'masked_unet': 'none'}
CPU_YNN_FUSIONS: dict[str, dict[str, str]] = {'avx2': _MEASURED, 'avx512': _MEASURED}
DEFAULT_YNN_FUSIONS = 'no_reduce'


def kind_of(cpuinfo: str) -> str:
  """'avx512' (AVX-512, e.g. an Intel Xeon), 'avx2' (e.g. an AMD EPYC before Zen 4) or
  'other', from the text of ``/proc/cpuinfo``."""
  flags = next((line.split(':', 1)[1].split() for line in cpuinfo.splitlines()
                if line.startswith('flags')), [])
  return 'avx512' if 'avx512f' in flags else 'avx2' if 'avx2' in flags else 'other'


@functools.cache
def cpu_kind() -> str:
  """This machine's :func:`kind_of` ('other' where there is no ``/proc/cpuinfo``)."""
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      return kind_of(f.read())
  except OSError:  # not Linux
    return 'other'


@dataclasses.dataclass(frozen=True)
class Platform:
  """What the settings are resolved for: the backend, its devices and the CPU."""
  backend: str
  devices: int
  split_cpu: bool   # platform.configure split the CPU into one device per core
  cpu_kind: str
  gpu_compute_capability: float
  processes: int = 1

  @classmethod
  def current(cls) -> Platform:
    device = jax.devices()[0]
    try:
      capability = float(getattr(device, 'compute_capability', '') or 0.0)
    except ValueError:  # not a CUDA device (e.g. ROCm's 'gfx90a')
      capability = 0.0
    backend = jax.default_backend()
    return cls(backend=backend, devices=jax.device_count(),
               split_cpu=backend == 'cpu' and platform.split_cpu() and jax.process_count() == 1,
               cpu_kind=cpu_kind() if backend == 'cpu' else '',
               gpu_compute_capability=capability if backend == 'gpu' else 0.0,
               processes=jax.process_count())


@dataclasses.dataclass(frozen=True)
class Speed:
  """The resolved ``speed`` block of one run."""
  backend: str
  cpu_kind: str
  devices: int
  cpu_devices: int | str   # as asked ('all' or a count); a classifier over its encoder follows it
  conv_impl: str
  attention_chunk_bytes: int
  grad_norm_every: int
  max_in_flight: int
  cpu_ynn_fusions: str
  gpu_compute_capability: float = 0.0

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def compiler_options(self) -> dict[str, str] | None:
    """The ``jax.jit`` options of the train and eval programs (None: XLA's defaults)."""
    value = YNN_FUSIONS[self.cpu_ynn_fusions] if self.backend == 'cpu' else None
    return None if value is None else {_YNN_OPTION: value}

  def model_settings(self, model_config: Mapping[str, Any]) -> dict[str, Any]:
    """Module attributes of ``models.build_*`` that this run decides: how
    attention and convolutions are computed (each model takes those it has)."""
    return {'attention': self._attention(model_config),
            'attention_chunk_bytes': self.attention_chunk_bytes,
            'attention_groups': self.devices, 'conv_impl': self.conv_impl}

  def _attention(self, cfg: Mapping[str, Any]) -> str:
    wanted = cfg.get('attention', AUTO)
    if 'num_heads' not in cfg or wanted == 'xla':
      return 'xla'
    heads = [cfg['width'] // cfg['num_heads']]
    if 'decoder_width' in cfg:
      heads.append(cfg['decoder_width'] // cfg['decoder_num_heads'])
    fits = all(self.cudnn_applies(cfg.get('dtype', 'float32'), h) for h in heads)
    if wanted == 'cudnn' and not fits:
      raise UserError(
          "mae attention 'cudnn' needs dtype bfloat16, an NVIDIA GPU (compute capability 8.0 "
          f'or newer; this run is on {self.backend}) and head widths that are multiples of 8 '
          f"up to 128 (here {', '.join(map(str, heads))}); use attention 'auto'.")
    return 'cudnn' if fits else 'xla'

  def cudnn_applies(self, dtype: Any, head_dim: int) -> bool:
    """Whether cuDNN's flash attention runs here: bfloat16, an NVIDIA GPU of
    compute capability 8.0 or newer (A100, H100, ...), a head width that is a
    multiple of 8 up to 128."""
    return (jnp.dtype(dtype) == jnp.dtype(jnp.bfloat16) and not head_dim % 8
            and head_dim <= 128 and self.gpu_compute_capability >= 8.0)


def _count(name: str, value: Any, *, minimum: int, auto: str = AUTO) -> int | str:
  """``value`` as an int >= ``minimum`` (the command line gives strings), or ``auto``."""
  if value == auto:
    return auto
  try:
    number = int(value)
  except (TypeError, ValueError):
    number = None
  if number is None or number < minimum or isinstance(value, float) and value != number:
    raise UserError(f"speed.{name} must be '{auto}' or a whole number >= {minimum}, got {value!r}.")
  return number


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
  if value != AUTO and value not in choices:
    raise UserError(f"speed.{name} must be 'auto' or one of {', '.join(choices)}, got {value!r}.")
  return value


def _with_defaults(speed: Mapping[str, Any] | None) -> dict[str, Any]:
  """``speed`` with 'auto' for each field it lacks (a run recorded before a field existed)."""
  return {'devices': AUTO, 'cpu_devices': 'all', 'conv_impl': AUTO,
          'attention_chunk_bytes': AUTO, 'grad_norm_every': AUTO, 'max_in_flight': AUTO,
          'cpu_ynn_fusions': AUTO, **(speed or {})}


def _parse(speed: Mapping[str, Any] | None) -> dict[str, Any]:
  """``speed`` with its defaults and each count an int (or 'auto'); a UserError
  for a value no platform accepts."""
  speed = _with_defaults(speed)
  parsed = dict(speed)
  parsed['devices'] = _count('devices', speed['devices'], minimum=1)
  if speed['cpu_devices'] != AUTO:  # a classifier's 'auto': its encoder's choice
    parsed['cpu_devices'] = _count('cpu_devices', speed['cpu_devices'], minimum=1, auto='all')
  _choice('conv_impl', speed['conv_impl'], CONV_IMPLS)
  for name, minimum in (('attention_chunk_bytes', 0), ('grad_norm_every', 1),
                        ('max_in_flight', 0)):
    parsed[name] = _count(name, speed[name], minimum=minimum)
  _choice('cpu_ynn_fusions', speed['cpu_ynn_fusions'], tuple(YNN_FUSIONS))
  return parsed


def check(speed: Mapping[str, Any] | None) -> None:
  """Raises a UserError for a value no platform accepts (before anything runs)."""
  _parse(speed)


def _devices_for_batch(batch_size: int, devices: int) -> int:
  """The most of ``devices`` (at least 1) that split ``batch_size`` evenly."""
  return max(n for n in range(1, devices + 1) if batch_size % n == 0)


def resolve(speed: Mapping[str, Any] | None, *, batch_size: int, steps_per_dispatch: int,
            architecture: str, where: Platform | None = None) -> Speed:
  """The ``speed`` block with every 'auto' decided for ``where`` (default: here).

  Args:
    speed: a config's ``speed`` block (a field it lacks is 'auto').
    batch_size, steps_per_dispatch: the run's loop fields.
    architecture: the model's name, or 'head' for a classifier on cached
      features (it picks the measured YNNPACK fusions on a CPU).
    where: the platform (tests pass one).

  Raises:
    UserError: a value out of range, or more devices than there are.
  """
  speed = _parse(speed)
  where = where or Platform.current()
  on_cpu = where.backend == 'cpu'

  devices = speed['devices']
  cpu_devices = 'all' if speed['cpu_devices'] == AUTO else speed['cpu_devices']
  if devices == AUTO:
    devices = where.devices
    if where.split_cpu:
      devices = _devices_for_batch(
          batch_size, where.devices if cpu_devices == 'all' else min(cpu_devices, where.devices))
  elif where.processes > 1 and devices != where.devices:
    raise UserError(f'speed.devices is {devices}, but a run of {where.processes} processes '
                    f"trains on all {where.devices} of their devices; use 'auto'.")
  elif devices > where.devices:
    raise UserError(f'speed.devices is {devices}, but this run has {where.devices} '
                    f"device{'s' * (where.devices > 1)}; use 'auto' or at most {where.devices}.")

  def pick(name: str, cpu: Any, elsewhere: Any) -> Any:
    return (cpu if on_cpu else elsewhere) if speed[name] == AUTO else speed[name]

  ynn = CPU_YNN_FUSIONS.get(where.cpu_kind, CPU_YNN_FUSIONS['avx2']).get(
      architecture, DEFAULT_YNN_FUSIONS)
  return Speed(
      backend=where.backend, cpu_kind=where.cpu_kind, devices=devices, cpu_devices=cpu_devices,
      conv_impl=pick('conv_impl', 'dots', 'dots'),
      attention_chunk_bytes=pick('attention_chunk_bytes', CPU_ATTENTION_CHUNK_BYTES, 0),
      grad_norm_every=pick('grad_norm_every', max(1, steps_per_dispatch), 1),
      max_in_flight=pick('max_in_flight', CPU_MAX_IN_FLIGHT, 0),
      cpu_ynn_fusions=pick('cpu_ynn_fusions', ynn, 'all'),
      gpu_compute_capability=where.gpu_compute_capability)


def record(config: ml_collections.ConfigDict, speed: Speed) -> None:
  """Puts the resolved settings in ``config.speed`` (what ``config.json`` records)."""
  with config.unlocked():
    config.speed = ml_collections.ConfigDict(speed.to_dict())
