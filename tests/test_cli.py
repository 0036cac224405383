"""What every command shares: the persistent compilation cache."""
import pytest

from mil_jax.metric_writers import read_metrics

from .conftest import run_command

RUN = ['train_pretrain.py', '--config', 'configs/fc.py:l1,runlocal', '--config.num_epochs=1']
# What the commands do with the cache settings, without compiling anything.
SETTINGS = """
import sys
from absl import flags
from mil_jax import cli
flags.FLAGS(sys.argv)
cli.start_compile_cache(flags.FLAGS.compile_cache)
import jax
print(jax.config.jax_enable_compilation_cache, jax.config.jax_compilation_cache_dir)
"""


def cache_entries(folder):
  return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} if folder.exists() else {}


@pytest.mark.parametrize('env,args,expected', [
    ({'XDG_CACHE_HOME': '{tmp}/xdg'}, [], 'True {tmp}/xdg/mil_jax/jax'),
    ({'XDG_CACHE_HOME': '', 'HOME': '{tmp}/home'}, [], 'True {tmp}/home/.cache/mil_jax/jax'),
    ({'JAX_COMPILATION_CACHE_DIR': '{tmp}/mine'}, [], 'True {tmp}/mine'),
    ({'XDG_CACHE_HOME': '{tmp}/xdg'}, ['--nocompile_cache'], 'False'),
    ({'XDG_CACHE_HOME': '{tmp}/xdg', 'MIL_JAX_COMPILE_CACHE': '0'}, [], 'False'),
])
def test_where_the_cache_goes_and_how_it_is_turned_off(tmp_path, env, args, expected):
  env = {'JAX_COMPILATION_CACHE_DIR': '', **{k: v.format(tmp=tmp_path) for k, v in env.items()}}
  out = run_command(['-c', SETTINGS, *args], env=env, timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.split()[:2] == expected.format(tmp=tmp_path).split()[:2]


def test_a_rerun_reads_every_program_from_the_cache(tmp_path):
  env = {'JAX_COMPILATION_CACHE_DIR': '', 'XDG_CACHE_HOME': str(tmp_path / 'xdg')}
  folder = tmp_path / 'xdg' / 'mil_jax' / 'jax'
  out = run_command([*RUN, f'--workdir={tmp_path / "cold"}'], env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  cold = cache_entries(folder)
  assert any('train_chunk' in name for name in cold), sorted(cold)
  out = run_command([*RUN, f'--workdir={tmp_path / "warm"}'], env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  assert cache_entries(folder) == cold  # nothing compiled anew, nothing rewritten
  startup = [r['time/startup_s'] for r in read_metrics(tmp_path / 'warm') if 'time/startup_s' in r]
  assert len(startup) == 1 and startup[0] > 0

  # Turned off, a command writes no cache: the finished run's rerun still
  # compiles its start (initializing, restoring), in a second rather than a run.
  env['XDG_CACHE_HOME'] = str(tmp_path / 'off')
  out = run_command([*RUN, '--nocompile_cache', f'--workdir={tmp_path / "cold"}'], env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'has finished' in out.stdout, out.stdout
  assert not (tmp_path / 'off' / 'mil_jax').exists()
