"""Several processes in one run: joining them, and stopping them together.

Every process of a run executes the same command. :func:`resolve` reads who
this process is from the flags ``--coordinator_address``,
``--num_processes`` and ``--process_id`` or, for each one not given, from
``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``.
Either all three are set, or none: then a SLURM job step or an Open MPI run of
several tasks, or a Cloud TPU VM, lets ``jax.distributed.initialize`` find
them itself, and anything else is a run of one process. :func:`start` joins
the run before the first device is touched, waiting at most
``initialization_timeout`` seconds for the other processes.

A preemption (SIGTERM) reaches one process, but a checkpoint is written by
all of them: :class:`StopRequests` lets JAX's preemption service spread the
notice and name the step at which every process saves and stops.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import signal
import socket
import sys
import threading
from collections.abc import Mapping
from typing import Any

from mil_jax.errors import UserError

ENV_VARS = {'coordinator_address': 'JAX_COORDINATOR_ADDRESS',
            'num_processes': 'JAX_NUM_PROCESSES', 'process_id': 'JAX_PROCESS_ID'}
DEFAULT_INITIALIZATION_TIMEOUT_S = 300  # jax.distributed.initialize's own default
# JAX aborts the process (a C++ fatal error, no Python exception) when its own
# wait ends; it gets this much longer than ours, so that our sentence comes first.
_JAX_TIMEOUT_MARGIN_S = 30
# What JAX's SLURM detection reads (jax._src.clusters.slurm_cluster).
_SLURM_VARS = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID',
               'SLURM_LOCALID')


@dataclasses.dataclass(frozen=True)
class Launch:
  """How this process joins its run.

  Attributes:
    coordinator_address: ``host:port`` of process 0's coordinator (None: not given).
    num_processes, process_id: this run's process count and this process's
      index in ``0..num_processes-1`` (None: not given).
    cluster: the environment ``jax.distributed.initialize`` will read the
      three from when none is given (``'SLURM'``, ``'Open MPI'``,
      ``'Cloud TPU'``), else None.
    initialization_timeout: seconds to wait for every process to join.
  """
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  cluster: str | None = None
  initialization_timeout: int = DEFAULT_INITIALIZATION_TIMEOUT_S

  @property
  def explicit(self) -> bool:
    """Whether the user gave the three settings."""
    return self.coordinator_address is not None

  @property
  def several_processes(self) -> bool:
    """Whether this run is known, before joining, to have more than one process.

    A Cloud TPU VM answers that only once JAX has asked it (False here).
    """
    return (self.num_processes or 1) > 1 or self.cluster in ('SLURM', 'Open MPI')


def _flag_or_env(value: Any, field: str, environ: Mapping[str, str]) -> tuple[Any, str]:
  """The flag's value (flags win) or the environment's, and how to name it in a message."""
  if value is not None:
    return value, f'--{field}'
  env = ENV_VARS[field]
  return (environ.get(env, '').strip() or None), env


def _as_int(value: Any, where: str) -> int | None:
  if value is None or isinstance(value, int):
    return value
  try:
    return int(value)
  except ValueError:
    raise UserError(f'{where} must be a whole number, got {value!r}.') from None


def _on_tpu(environ: Mapping[str, str]) -> bool:
  platforms = environ.get('JAX_PLATFORMS', '') or environ.get('JAX_PLATFORM_NAME', '')
  if platforms and 'tpu' not in platforms.lower():
    return False
  return importlib.util.find_spec('libtpu') is not None


def detect_cluster(environ: Mapping[str, str]) -> str | None:
  """The launcher JAX will read the process settings from, when the user gave none.

  SLURM and Open MPI count only with more than one task: a single task keeps
  every device of its machine, as a plain run does (JAX's detection would give
  a SLURM task one GPU).
  """
  if all(v in environ for v in _SLURM_VARS) and _as_int(environ['SLURM_NTASKS'],
                                                         'SLURM_NTASKS') > 1:
    return 'SLURM'
  if ('OMPI_MCA_orte_hnp_uri' in environ
      and _as_int(environ.get('OMPI_COMM_WORLD_SIZE', '1'), 'OMPI_COMM_WORLD_SIZE') > 1):
    return 'Open MPI'
  if _on_tpu(environ):
    return 'Cloud TPU'
  return None


def resolve(*, coordinator_address: str | None = None, num_processes: int | None = None,
            process_id: int | None = None,
            initialization_timeout: int = DEFAULT_INITIALIZATION_TIMEOUT_S,
            environ: Mapping[str, str] | None = None) -> Launch:
  """This process's launch from flags (those not None) and the environment.

  Raises:
    UserError: some but not all of the three are set, a value is malformed, or
      the process id is outside ``0..num_processes-1``; found before any wait.
  """
  environ = os.environ if environ is None else environ
  values, names = {}, {}
  for field, flag in (('coordinator_address', coordinator_address),
                      ('num_processes', num_processes), ('process_id', process_id)):
    values[field], names[field] = _flag_or_env(flag, field, environ)
  address = values['coordinator_address']
  count = _as_int(values['num_processes'], names['num_processes'])
  index = _as_int(values['process_id'], names['process_id'])
  if initialization_timeout < 1:
    raise UserError(f'--initialization_timeout must be at least 1 second, got '
                    f'{initialization_timeout}.')
  given = [names[f] for f, v in zip(ENV_VARS, (address, count, index)) if v is not None]
  if not given:
    return Launch(cluster=detect_cluster(environ),
                  initialization_timeout=initialization_timeout)
  missing = [f'{env} (or --{f})' for f, env in ENV_VARS.items() if names[f] not in given]
  if missing:
    raise UserError(f'{" and ".join(given)} {"is" if len(given) == 1 else "are"} set but not '
                    f'{" and ".join(missing)}; set all three on every process, or none of '
                    'them under SLURM, Open MPI or on a Cloud TPU.')
  host, _, port = address.rpartition(':')
  if not host or not port.isdigit():
    raise UserError(f'{names["coordinator_address"]} {address!r} is not host:port, e.g. '
                    '10.0.0.1:8476.')
  if count < 1:
    raise UserError(f'{names["num_processes"]} must be at least 1, got {count}.')
  if not 0 <= index < count:
    raise UserError(f'{names["process_id"]} {index} is outside 0..{count - 1} for {count} '
                    'processes.')
  return Launch(address, count, index, initialization_timeout=initialization_timeout)


def _give_up(launch: Launch) -> None:
  """Ends a process whose peers did not all join in time (called from a timer thread)."""
  who = (f'process {launch.process_id} of {launch.num_processes}' if launch.explicit
         else f'this {launch.cluster} process')
  where = f' at {launch.coordinator_address}' if launch.explicit else ''
  print(f'error: {who} waited {launch.initialization_timeout} s{where} for the other '
        'processes to join; start the same command on every process (process ids 0 to '
        'N-1, process 0 reachable at the address), or raise --initialization_timeout.',
        file=sys.stderr, flush=True)
  # The main thread is inside JAX's blocking connect (which released the GIL):
  # no exception can reach it, and nothing has been written yet.
  os._exit(2)


def _port_error(launch: Launch, reason: str) -> UserError:
  port = launch.coordinator_address.rpartition(':')[2]
  return UserError(f'process {launch.process_id} could not start the coordinator on port '
                   f'{port} ({reason}); another program may be using that port: '
                   'choose another one in the address, the same on every process.')


def _check_port_free(launch: Launch) -> None:
  """Raises the user error of a coordinator port already in use, before JAX's
  server tries it (which at times crashed the process instead of raising)."""
  port = int(launch.coordinator_address.rpartition(':')[2])
  for family, host in ((socket.AF_INET, ''), (socket.AF_INET6, '::')):
    try:
      probe = socket.socket(family, socket.SOCK_STREAM)
    except OSError:  # no IPv6 here
      continue
    with probe:
      try:
        probe.bind((host, port))
      except OSError as e:
        raise _port_error(launch, e.strerror or str(e)) from None


def start(launch: Launch) -> None:
  """Joins the run described by ``launch`` (a no-op for a run of one process).

  Call before anything touches a device. On the CPU, collectives between
  processes go through gloo (TCP). A wait longer than
  ``launch.initialization_timeout`` ends the process with one sentence and
  exit code 2.
  """
  import jax  # noqa: PLC0415  (here, not at the top: a mistake in the flags exits before jax loads)
  if jax.distributed.is_initialized() or not (launch.explicit or launch.cluster):
    return
  if 'JAX_CPU_COLLECTIVES_IMPLEMENTATION' not in os.environ:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  timer = threading.Timer(launch.initialization_timeout, _give_up, (launch,))
  timer.daemon = True
  timer.start()
  if launch.explicit and launch.process_id == 0:
    _check_port_free(launch)
  try:
    if launch.explicit:
      try:
        jax.distributed.initialize(
            launch.coordinator_address, launch.num_processes, launch.process_id,
            initialization_timeout=launch.initialization_timeout + _JAX_TIMEOUT_MARGIN_S)
      except jax.errors.JaxRuntimeError as e:
        # Process 0 could not open the coordinator's port (the other failures
        # end in the timer or in JAX's own fatal error).
        raise _port_error(launch, str(e).strip()) from None
    elif launch.cluster == 'Cloud TPU':
      try:
        jax.distributed.initialize(
            initialization_timeout=launch.initialization_timeout + _JAX_TIMEOUT_MARGIN_S)
      except (ValueError, OSError):
        # No TPU worker list found (a Colab TPU, a TPU machine outside Google
        # Cloud): one process, whose TPU runtime still joins a slice's hosts itself.
        pass
    else:
      jax.distributed.initialize(
          initialization_timeout=launch.initialization_timeout + _JAX_TIMEOUT_MARGIN_S)
  finally:
    timer.cancel()


def barrier(name: str) -> None:
  """Waits until every process of the run got here (a no-op with one process).

  ``name`` must be the same on every process (JAX checks it).
  """
  import jax  # noqa: PLC0415
  from jax.experimental import multihost_utils  # noqa: PLC0415
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


class StopRequests:
  """SIGINT and SIGTERM during training, turned into one step where all processes stop.

  With one process, a signal is caught by a Python handler and the next
  :meth:`poll` returns it. With several, SIGTERM is left to JAX's preemption
  service, which tells every process and picks the poll (the one after the
  latest any process has made) at which all of them save and stop; a SIGINT
  (Ctrl-C) is passed on to it as a SIGTERM. The handlers are installed on
  construction and removed by :meth:`close`; call :meth:`poll` after every
  dispatched call of the training loop (the same number of times on every
  process).
  """

  def __init__(self):
    import jax  # noqa: PLC0415
    self._several = jax.process_count() > 1
    self._signals: list[int] = []
    self._polls = 0
    if self._several:
      self._old = {signal.SIGINT: signal.signal(signal.SIGINT, self._forward_sigint)}
    else:
      self._old = {s: signal.signal(s, lambda signum, _: self._signals.append(signum))
                   for s in (signal.SIGINT, signal.SIGTERM)}

  def close(self) -> None:
    """Puts the previous handlers back."""
    for s, handler in self._old.items():
      signal.signal(s, handler)

  def _forward_sigint(self, signum: int, _) -> None:
    self._signals.append(signum)
    os.kill(os.getpid(), signal.SIGTERM)  # JAX's preemption notifier listens for SIGTERM

  def poll(self) -> int | None:
    """The signal to stop for now (None: go on)."""
    if not self._several:
      return self._signals[0] if self._signals else None
    from jax.experimental import multihost_utils  # noqa: PLC0415
    self._polls += 1
    if multihost_utils.reached_preemption_sync_point(self._polls):
      return self._signals[0] if self._signals else signal.SIGTERM
    return None
