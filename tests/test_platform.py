"""Tests of mil_jax.platform (the XLA:CPU settings) and the trainer's dispatch bound."""
import pytest

from mil_jax import platform, trainer

DEVICE_COUNT = '--xla_force_host_platform_device_count'


@pytest.fixture
def fresh(monkeypatch):
  """configure() as in a new process on the CPU, with a settable core count."""
  monkeypatch.setattr(platform, '_applied', [])
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  monkeypatch.delenv('XLA_FLAGS', raising=False)

  def configure(cores: int, xla_flags: str = '') -> str:
    monkeypatch.setattr(platform, '_applied', [])
    monkeypatch.setattr(platform, '_usable_cores', lambda: cores)
    monkeypatch.setenv('XLA_FLAGS', xla_flags)
    platform.configure()
    return platform.os.environ['XLA_FLAGS']

  return configure


@pytest.mark.parametrize('cores,devices', [(2, 2), (6, 6), (64, platform.CPU_MAX_DEVICES)])
def test_configure_splits_the_cpu_into_one_device_per_core(fresh, cores, devices):
  flags = fresh(cores)
  assert f'{DEVICE_COUNT}={devices}' in flags.split()
  assert platform.split_cpu()
  assert f'{DEVICE_COUNT}={devices}' in platform.applied()


def test_configure_leaves_one_core_and_the_users_count_alone(fresh):
  assert DEVICE_COUNT not in fresh(1)
  assert not platform.split_cpu()
  flags = fresh(4, f'{DEVICE_COUNT}=3')
  assert flags.count(DEVICE_COUNT) == 1 and f'{DEVICE_COUNT}=3' in flags
  assert not platform.split_cpu()  # the user chose: speed.devices 'auto' takes every device


def test_configure_does_nothing_off_the_cpu(fresh, monkeypatch):
  monkeypatch.setattr(platform, '_will_run_on_cpu', lambda: False)
  assert fresh(8) == ''
  assert not platform.split_cpu()


def test_configure_adds_no_compiler_flags_beyond_the_split(fresh):
  assert fresh(2).split() == [f'{DEVICE_COUNT}=2']  # YNNPACK's fusions are per program


def test_in_flight_keeps_at_most_limit_calls_unfinished():
  waited = []
  in_flight = trainer.InFlight(limit=2, wait=waited.append)
  for call in range(5):
    in_flight.add(call)
    assert waited == list(range(max(0, call - 1)))  # calls call-1 and call still running


def test_in_flight_without_a_bound_never_waits():
  waited = []
  in_flight = trainer.InFlight(limit=0, wait=waited.append)
  for call in range(50):
    in_flight.add(call)
  assert waited == []
