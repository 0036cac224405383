"""Shared test fixtures: paths, the real CIFAR-10 copy, subprocess runs."""
from __future__ import annotations

import fcntl
import json
import os
import pathlib
import shutil
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
# The tests' programs are tiny and compiled far more often than run.
# XLA's cheapest backend optimization level: about 30% faster to compile.
FAST_COMPILE_FLAGS = ('--xla_backend_optimization_level=0',)
# XLA:CPU's elemental emitters in place of its fusion emitters: a tiny Conv run
# with no cache 11.5 s -> 6.7 s, the suite with an empty cache about a third
# faster. The programs differ in rounding only (tests/test_bench.py). A newer
# flag than the jax the project allows, so it is probed first.
PROBED_FAST_COMPILE_FLAGS = ('--xla_cpu_use_fusion_emitters=false',)


def _xla_knows(flag: str) -> bool:
  """Whether this jaxlib's XLA accepts ``flag`` (an unknown flag in XLA_FLAGS aborts)."""
  probe = subprocess.run([sys.executable, '-c', 'import jax; jax.devices()'], check=False,
                         env={**os.environ, 'XLA_FLAGS': flag, 'JAX_PLATFORMS': 'cpu'},
                         capture_output=True)
  return probe.returncode == 0


# Set once, in the process that starts pytest; its workers inherit the variable
# (a flag given twice would give every program another compilation cache key).
_flags = os.environ.get('XLA_FLAGS', '')
for _flag in (*FAST_COMPILE_FLAGS, *PROBED_FAST_COMPILE_FLAGS):
  if _flag.split('=')[0] not in _flags and (_flag in FAST_COMPILE_FLAGS or _xla_knows(_flag)):
    _flags = f'{_flags} {_flag}'.strip()
os.environ['XLA_FLAGS'] = _flags
# Lowering records up to 10 Python frames per operation as its source location
# (for profiles and HLO dumps, which no test reads): without them the tiny runs'
# programs lower faster (a 14-cell grid of Conv and MAE cells: 25 s -> 22-24 s).
os.environ.setdefault('JAX_TRACEBACK_IN_LOCATIONS_LIMIT', '0')


# The longest tests (about 8 s to a minute each on 2 cores), longest first.
# pytest-xdist hands tests out in collection order, so they start first and the
# many short ones even the workers out at the end, instead of one worker
# running a long test alone while the other idles. An entry is the start of
# test ids; the other tests keep their order, after these. A test missing here
# only starts later.
LONGEST_FIRST = (
    'tests/test_readme.py::test_readme_commands_run_as_typed',
    'tests/test_reproduce.py::test_runlocal_grid_end_to_end',
    'tests/test_interrupt.py::test_sigkill_at_named_points_then_rerun_is_bit_identical',
    'tests/test_multihost.py::test_two_processes_train_as_one_process_of_four_devices',
    'tests/test_sweep.py::test_runlocal_sweep_command_and_rerun',
    'tests/test_user_path.py::test_a_damaged_checkpoint_falls_back_to_the_one_before',
    'tests/test_multihost.py::test_reproduce_runs_in_two_processes',
    'tests/test_cli.py::test_a_rerun_reads_every_program_from_the_cache',
    'tests/test_multihost.py::test_classifier_and_knn_over_that_checkpoint_run_in_two_processes',
    'tests/test_recipe.py::test_finetune_command_over_a_tiny_mae',
    'tests/test_masked_unet.py::test_pretrain_and_classifiers_from_the_command_line',
    'tests/test_bench.py::test_run_command_sets_a_whole_run_beside_its_steps',
    'tests/test_user_path.py::test_a_larger_num_epochs_extends_a_finished_run',
    'tests/test_interrupt.py::test_sigterm_saves_the_current_step',
    'tests/test_classify.py::test_command_line',
    'tests/test_user_path.py::test_one_run_per_workdir',
    'tests/test_pretrain.py::test_interrupted_run_resumes_bit_identical',
    'tests/test_user_path.py::test_relative_and_home_paths_reach_the_same_encoder',
    'tests/test_bench.py::test_command_prints_one_json_line_per_configuration',
    'tests/test_user_path.py::test_a_rejected_value_writes_nothing',
    'tests/test_notebook.py::test_notebook_runs_on_cpu',
    'tests/test_pretrain.py::test_command_line_variants_overrides_and_type',
    'tests/test_multihost.py::test_sigterm_to_one_process_stops_both_at_one_saved_step',
    'tests/test_pretrain.py::test_eight_devices_match_one',
    'tests/test_reproduce.py::test_failed_cell_is_recorded_and_rerun_skips_finished',
    'tests/test_user_path.py::test_a_refused_rerun_names_the_fields_and_both_ways_forward',
)


def pytest_configure(config: pytest.Config) -> None:
  """Tests go to the pytest-xdist workers one at a time, in order (unless the
  command line sets --maxschedchunk): by default each worker first gets a
  quarter of its share in one consecutive block, which gave every test of
  ``LONGEST_FIRST`` to the first worker."""
  if config.pluginmanager.hasplugin('xdist') and config.getoption('maxschedchunk') is None:
    config.option.maxschedchunk = 1


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
  """Puts the tests of ``LONGEST_FIRST`` first, in its order (a stable sort)."""
  def rank(item: pytest.Item) -> int:
    return next((i for i, start in enumerate(LONGEST_FIRST) if item.nodeid.startswith(start)),
                len(LONGEST_FIRST))
  items.sort(key=rank)


# For commands that must run on the CPU whatever else is installed.
CPU_ONLY = {'JAX_PLATFORMS': 'cpu'}


def run_command(args: list[str], *, env: dict[str, str] | None = None, timeout: float = 300,
                cwd: pathlib.Path | None = None) -> subprocess.CompletedProcess:
  """Runs ``python ARGS`` from the repository root and captures its output."""
  env = dict(env or {})
  if 'XLA_FLAGS' in env:
    env['XLA_FLAGS'] = f"{os.environ['XLA_FLAGS']} {env['XLA_FLAGS']}"
  full_env = {**os.environ, 'PYTHONPATH': str(ROOT), **env}
  return subprocess.run([sys.executable, *args], cwd=cwd or ROOT, env=full_env, text=True,
                        capture_output=True, timeout=timeout, check=False)


# What a user's checkout holds besides the code: left out of a test's copy.
_NOT_COPIED = shutil.ignore_patterns('.git', '.venv', 'venv', 'runs', '__pycache__', '*.egg-info',
                                     '.pytest_cache', '.ruff_cache', 'build', 'dist')


def copy_repository(dest: pathlib.Path) -> pathlib.Path:
  """A copy of the repository at ``dest``, as a user's checkout (no runs, no caches)."""
  shutil.copytree(ROOT, dest, ignore=_NOT_COPIED)
  return dest


def run_in(copy: pathlib.Path, args: list[str], *, timeout: float = 300,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
  """Runs ``python ARGS`` with ``copy`` as the current directory and its code imported."""
  full_env = {**os.environ, 'PYTHONPATH': str(copy), **(env or {})}
  return subprocess.run([sys.executable, *args], cwd=copy, env=full_env, text=True,
                        capture_output=True, timeout=timeout, check=False)


@pytest.fixture
def repo_copy(tmp_path) -> pathlib.Path:
  """A fresh copy of the repository to run commands in, the way a user does."""
  return copy_repository(tmp_path / 'mil_jax')


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


def checkpoint_steps(workdir: pathlib.Path) -> list[int]:
  """The steps of a run's complete checkpoints, read off the directory names.

  Orbax writes a step into ``<step>.orbax-checkpoint-tmp`` and renames it when
  complete, so only complete ones have a plain number as their name.
  """
  directory = workdir / 'checkpoints'
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def read_checkpoint_item(step_dir: pathlib.Path, item: str = 'params'):
  """One item of a checkpoint as numpy arrays, read by orbax alone.

  Independent of ``mil_jax.checkpoint``, whose restore the tests check: the
  tree comes from the saved metadata and every leaf is restored as a host
  array, whatever devices saved it.
  """
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  import orbax.checkpoint as ocp  # noqa: PLC0415
  path = pathlib.Path(step_dir).absolute() / item
  tree = ocp.PyTreeCheckpointHandler().metadata(path).tree
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  with ocp.PyTreeCheckpointer() as reader:
    return reader.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))


def assert_picture(path: pathlib.Path, min_side: int = 200, curves: int = 0) -> None:
  """``path`` is a PNG of at least ``min_side`` pixels a side with something drawn
  on it, and, for a plot, each of its first ``curves`` lines in matplotlib's
  default colours (C0 blue, C1 orange, ...) on at least 20 pixels."""
  import matplotlib  # noqa: PLC0415
  import matplotlib.image  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n', f'{path} is not a PNG'
  pixels = matplotlib.image.imread(path)
  assert pixels.ndim == 3 and min(pixels.shape[:2]) >= min_side, (path, pixels.shape)
  rgb = np.round(pixels[..., :3] * 255).astype(np.int32)
  assert len(np.unique(rgb.reshape(-1, 3), axis=0)) > 10, f'{path} is blank'
  for colour in matplotlib.rcParams['axes.prop_cycle'].by_key()['color'][:curves]:
    want = np.round(np.array(matplotlib.colors.to_rgb(colour)) * 255).astype(np.int32)
    assert np.all(rgb == want, axis=-1).sum() >= 20, f'{path} has no curve in {colour}'


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


def shared(tmp_path_factory, name: str, make):
  """``make(directory)`` once per test session, also over pytest-xdist workers
  (a session fixture alone runs once in each worker).

  Returns ``(directory, what make returned)`` (JSON-able). What is in
  ``directory`` is for every test to read: a test that changes it copies it first.
  """
  base = tmp_path_factory.getbasetemp()
  root = base.parent if os.environ.get('PYTEST_XDIST_WORKER') else base
  directory, result = root / name, root / f'{name}.json'
  with (root / f'{name}.lock').open('w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # another worker may be making it: wait for it
    if not result.exists():
      shutil.rmtree(directory, ignore_errors=True)
      directory.mkdir()
      result.write_text(json.dumps(make(directory)))
  return directory, json.loads(result.read_text())


@pytest.fixture(scope='session')
def pretrained(tmp_path_factory) -> pathlib.Path:
  """A pretraining workdir with a finished tiny Conv run (one per test session; read only)."""
  directory, _ = shared(tmp_path_factory, 'pretrained',
                        lambda d: str(pretrain_tiny_conv(d / 'pretrain_conv')))
  return directory / 'pretrain_conv'


def copy_repo(dest: pathlib.Path) -> pathlib.Path:
  """A copy of the programs, packages and configs in ``dest``, to run commands from as a user."""
  import shutil  # noqa: PLC0415
  dest.mkdir(parents=True, exist_ok=True)
  for name in ('mil_jax', 'configs'):
    shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns('__pycache__'))
  for name in ('train_pretrain.py', 'train_classifier.py', 'pyproject.toml'):
    shutil.copy2(ROOT / name, dest / name)
  return dest
