"""Tests of mil_jax.distributed's launch settings and of the CPU split of a process of several.

The runs of real processes are in test_multihost.py.
"""
import pytest

from mil_jax import distributed, platform
from mil_jax.errors import UserError


def test_flags_win_over_the_environment():
  env = {'JAX_COORDINATOR_ADDRESS': 'node0:1234', 'JAX_NUM_PROCESSES': '4',
         'JAX_PROCESS_ID': '3'}
  launch = distributed.resolve(environ=env)
  assert (launch.coordinator_address, launch.num_processes, launch.process_id) == (
      'node0:1234', 4, 3)
  assert launch.several_processes and launch.cluster is None
  launch = distributed.resolve(coordinator_address='localhost:99', process_id=1, environ=env)
  assert (launch.coordinator_address, launch.num_processes, launch.process_id) == (
      'localhost:99', 4, 1)


@pytest.mark.parametrize('flags,env,message', [
    ({}, {'JAX_COORDINATOR_ADDRESS': 'node0:1234', 'JAX_PROCESS_ID': '0'},
     'JAX_COORDINATOR_ADDRESS and JAX_PROCESS_ID are set but not JAX_NUM_PROCESSES (or '
     '--num_processes);'),
    ({'num_processes': 2}, {}, '--num_processes is set but not JAX_COORDINATOR_ADDRESS (or '
     '--coordinator_address) and JAX_PROCESS_ID (or --process_id);'),
    ({'process_id': 2}, {'JAX_COORDINATOR_ADDRESS': 'h:1', 'JAX_NUM_PROCESSES': '2'},
     '--process_id 2 is outside 0..1 for 2 processes'),
    ({}, {'JAX_COORDINATOR_ADDRESS': 'h:1', 'JAX_NUM_PROCESSES': '2', 'JAX_PROCESS_ID': '-1'},
     'JAX_PROCESS_ID -1 is outside 0..1'),
    ({}, {'JAX_COORDINATOR_ADDRESS': 'h:1', 'JAX_NUM_PROCESSES': 'two', 'JAX_PROCESS_ID': '0'},
     "JAX_NUM_PROCESSES must be a whole number, got 'two'"),
    ({'coordinator_address': 'node0'}, {'JAX_NUM_PROCESSES': '2', 'JAX_PROCESS_ID': '0'},
     "--coordinator_address 'node0' is not host:port"),
    ({'coordinator_address': 'h:1', 'num_processes': 0, 'process_id': 0}, {},
     '--num_processes must be at least 1'),
    ({'initialization_timeout': 0}, {}, '--initialization_timeout must be at least 1'),
])
def test_partial_or_wrong_settings_are_user_errors(flags, env, message):
  with pytest.raises(UserError) as e:
    distributed.resolve(environ=env, **flags)
  assert message in str(e.value)


def test_launchers_are_detected_only_with_several_tasks(monkeypatch):
  monkeypatch.setattr(distributed, '_on_tpu', lambda environ: False)
  slurm = {'SLURM_JOB_ID': '7', 'SLURM_STEP_NODELIST': 'n[1-2]', 'SLURM_NTASKS': '2',
           'SLURM_PROCID': '1', 'SLURM_LOCALID': '0'}
  assert distributed.resolve(environ=slurm).cluster == 'SLURM'
  assert distributed.resolve(environ=slurm).several_processes
  assert distributed.resolve(environ={**slurm, 'SLURM_NTASKS': '1'}).cluster is None
  mpi = {'OMPI_MCA_orte_hnp_uri': '1.0;tcp://10.0.0.1:1', 'OMPI_COMM_WORLD_SIZE': '4'}
  assert distributed.resolve(environ=mpi).cluster == 'Open MPI'
  assert distributed.resolve(environ={**mpi, 'OMPI_COMM_WORLD_SIZE': '1'}).cluster is None
  # Settings given by the user win over the launcher's.
  assert distributed.resolve(environ={**slurm, 'JAX_COORDINATOR_ADDRESS': 'h:1',
                                      'JAX_NUM_PROCESSES': '1',
                                      'JAX_PROCESS_ID': '0'}).cluster is None
  plain = distributed.resolve(environ={})
  assert plain.cluster is None and not plain.several_processes and not plain.explicit


def test_a_process_of_several_keeps_one_cpu_device(monkeypatch):
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  monkeypatch.setattr(platform, '_usable_cores', lambda: 4)
  for split, devices in ((True, '4'), (False, None)):
    monkeypatch.setattr(platform, '_applied', [])
    monkeypatch.setenv('XLA_FLAGS', '')
    platform.configure(split=split)
    count = [f.split('=')[1] for f in platform.os.environ['XLA_FLAGS'].split()
             if f.startswith('--xla_force_host_platform_device_count=')]
    assert count == ([devices] if devices else []), split
    assert platform.split_cpu() == split
