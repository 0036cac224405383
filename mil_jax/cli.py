"""What the command-line entry points share: flag parsing and exit codes.

Exit codes (the design's contract): 0 done, 2 the user's mistake (one sentence
on stderr), 1 a bug (with its traceback). ``--debug`` shows the traceback of a
user error too.
"""
from __future__ import annotations

import functools
import os
import pathlib
import re
import sys
import traceback
from collections.abc import Callable, Sequence

from absl import app, flags, logging

from mil_jax import config_files, distributed, platform
from mil_jax.errors import Interrupted, UserError

CONFIG_DIR = config_files.CONFIG_DIR

flags.DEFINE_bool('debug', False, 'Show the full traceback of a user error, and INFO logs.')
# Compiled programs are kept on disk, so that a rerun of a config starts
# without compiling; MIL_JAX_COMPILE_CACHE=0 turns that off like --nocompile_cache.
COMPILE_CACHE_ENV = 'MIL_JAX_COMPILE_CACHE'
flags.DEFINE_bool('compile_cache', os.environ.get(COMPILE_CACHE_ENV, '1') != '0',
                  'Keep compiled programs in a per-user folder ($XDG_CACHE_HOME/mil_jax/jax, '
                  'else ~/.cache/mil_jax/jax; JAX_COMPILATION_CACHE_DIR picks another) and '
                  f'reuse them; --nocompile_cache or {COMPILE_CACHE_ENV}=0 turns it off.')

# TensorFlow (imported by TFDS) prints C++ notices on import; keep them for --debug.
if '--debug' not in sys.argv:
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')


def fail(message: str) -> None:
  """Prints one sentence to stderr and exits with status 2."""
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def _last_line(text: str) -> str:
  lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
  line = lines[-1] if lines else text
  return re.sub(r'^\w+(Error|Exception): ', '', line)


def _config_path(argv: Sequence[str]) -> str | None:
  """The value of the last ``--config`` in ``argv`` (the one absl keeps)."""
  path = None
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      path = arg.split('=', 1)[1]
    elif arg == '--config' and i + 1 < len(argv):
      path = argv[i + 1]
  return path


def expand_type_flag(argv: list[str]) -> list[str]:
  """Turns the study's ``--type fc|conv|mae`` into ``--config configs/<type>.py``.

  ``--type`` is kept in argv (the programs define it) but only used when no
  ``--config`` is given.
  """
  kind = None
  for i, arg in enumerate(argv):
    if arg.startswith('--type='):
      kind = arg.split('=', 1)[1]
    elif arg == '--type' and i + 1 < len(argv):
      kind = argv[i + 1]
  if kind is None or _config_path(argv) is not None:
    return argv
  if kind not in config_files.PRETRAINING:
    fail(f'unknown --type {kind!r}; use {config_files.PRETRAINING_NAMES}.')
  return [argv[0], f'--config={CONFIG_DIR / kind}.py', *argv[1:]]


def parse_flags(argv: list[str], *, type_picks_config: bool = False) -> list[str]:
  """Parses flags (config file and overrides included); mistakes exit 2.

  Args:
    argv: the command line.
    type_picks_config: ``--type X`` stands for ``--config configs/X.py``
      (pretraining); elsewhere ``--type`` is an ordinary flag.
  """
  if type_picks_config:
    argv = expand_type_flag(list(argv))
  path = _config_path(argv)
  if path is not None:
    file = path.split(':', 1)[0]
    if not pathlib.Path(file).is_file():
      fail(f'config file {file!r} does not exist; configs live in {CONFIG_DIR}.')
  try:
    rest = flags.FLAGS(argv)
    if path is not None:
      flags.FLAGS['config'].value  # noqa: B018  (loading happens on first access)
  except flags.Error as e:
    fail(_flag_error(str(e)))
  except (AttributeError, KeyError) as e:
    fail(_unknown_field(e))
  except ValueError as e:
    fail(_last_line(str(e)).rstrip('.') + '.')
  return rest


def _flag_error(text: str) -> str:
  """absl's message, with the spelling of boolean negation pointed out."""
  message = _last_line(text).rstrip('.').replace(' ?', '?')
  m = re.search(r"Unknown command line flag '(no-?)(\w+)'", message)
  if m and m.group(1) == 'no-':
    return f"unknown flag --no-{m.group(2)}; booleans are negated as --no{m.group(2)}."
  return message[0].lower() + message[1:] + '.'


def _unknown_field(error: BaseException) -> str:
  """ml_collections' KeyError/AttributeError for a missing field, as one sentence."""
  while error.args and isinstance(error.args[0], BaseException):
    error = error.args[0]
  text = str(error.args[0]) if error.args else str(error)
  name = re.search(r'Key "([^"]+)"', text) or re.match(r"""\s*['"]?([\w.]+)""", text)
  hint = re.search(r'Did you mean "([^"]+)"', text)
  return (f'the config has no field {name.group(1) if name else text.splitlines()[0]}'
          + (f' (did you mean {hint.group(1)}?)' if hint else '')
          + '; check the spelling of --config.<field>.')


def check_config_kind(expected: str) -> None:
  """Exits 2 unless ``--config`` is a config file of the ``expected`` kind."""
  from mil_jax import config_checks  # noqa: PLC0415
  config = flags.FLAGS.config
  if config is None:
    return
  path = _config_path(sys.argv) or str(CONFIG_DIR / 'classifier.py')
  try:
    config_checks.check_kind(config, expected, path.split(':', 1)[0])
  except UserError as e:
    fail(str(e))


def define_run_flags(default_config: str | None, config_help: str, workdir_help: str
                     ) -> tuple[flags.FlagHolder, flags.FlagHolder, flags.FlagHolder]:
  """``--config`` (locked), ``--workdir`` and ``--overwrite``, as every program has them.

  Also the flags of a run of several processes (:func:`define_launch_flags`).
  """
  from ml_collections import config_flags  # noqa: PLC0415

  define_launch_flags()
  return (config_flags.DEFINE_config_file('config', default_config, config_help,
                                          lock_config=True),
          flags.DEFINE_string('workdir', None, workdir_help),
          flags.DEFINE_bool('overwrite', False,
                            'Replace a run of a different config found in --workdir.'))


def define_launch_flags() -> None:
  """``--coordinator_address``, ``--num_processes``, ``--process_id``, ``--initialization_timeout``.

  Each of the first three, when not given, comes from its ``JAX_*`` variable
  (``mil_jax.distributed``); :func:`run` joins the run before ``main``.
  """
  flags.DEFINE_string('coordinator_address', None,
                      'host:port of process 0 in a run of several processes '
                      '(default: $JAX_COORDINATOR_ADDRESS).')
  flags.DEFINE_integer('num_processes', None,
                       'Processes in the run (default: $JAX_NUM_PROCESSES).')
  flags.DEFINE_integer('process_id', None,
                       "This process's index, 0 to num_processes-1 (default: $JAX_PROCESS_ID).")
  flags.DEFINE_integer('initialization_timeout', distributed.DEFAULT_INITIALIZATION_TIMEOUT_S,
                       'Seconds to wait for every process of the run to join.')


def _join_processes() -> None:
  """Joins a run of several processes when the program has the launch flags."""
  if 'num_processes' not in flags.FLAGS:  # a program without them (bench, models)
    platform.configure()
    return
  f = flags.FLAGS
  launch = distributed.resolve(coordinator_address=f.coordinator_address,
                               num_processes=f.num_processes, process_id=f.process_id,
                               initialization_timeout=f.initialization_timeout)
  # The processes of a run may share one machine's cores: each keeps one CPU
  # device unless the user set a count.
  platform.configure(split=not launch.several_processes)
  distributed.start(launch)


def compile_cache_dir() -> pathlib.Path:
  """The per-user folder of compiled programs: ``$XDG_CACHE_HOME/mil_jax/jax``."""
  base = os.environ.get('XDG_CACHE_HOME') or pathlib.Path.home() / '.cache'
  return pathlib.Path(base) / 'mil_jax' / 'jax'


def start_compile_cache(enabled: bool) -> None:
  """Turns JAX's persistent compilation cache on (in :func:`compile_cache_dir`
  unless ``JAX_COMPILATION_CACHE_DIR`` names a folder) or off; before the
  first compilation, which fixes it."""
  import jax  # noqa: PLC0415  (after platform.configure, like every other jax use)
  if not enabled:
    jax.config.update('jax_enable_compilation_cache', False)
    return
  if jax.config.jax_compilation_cache_dir:
    return  # the user's own setting, with its own thresholds
  jax.config.update('jax_compilation_cache_dir', str(compile_cache_dir()))
  # Small programs too (the permutation, the optimizer's init): together they
  # are a good part of a warm start.
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)


def run(main: Callable[[list[str]], None], *, kind: str | None = None,
        type_picks_config: bool = False, compile_cache: bool = True) -> None:
  """Runs ``main`` under absl with the design's exit codes (see :func:`parse_flags`).

  Args:
    main: the program.
    kind: the kind of config file ``--config`` must be: 'pretraining',
      'classifier' or 'grid' (None: the program has no ``--config``).
    type_picks_config: see :func:`parse_flags`.
    compile_cache: False: the persistent compilation cache stays off unless
      ``--compile_cache`` is given (the benchmark, which times compiling).
  """

  def wrapped(argv: list[str]) -> None:
    if len(argv) > 1:
      fail(f'unexpected arguments {" ".join(argv[1:])}; flags are written --name=value.')
    if kind is not None:
      check_config_kind(kind)
    # Orbax and TFDS log every file they touch, and warn about things that are
    # fine here; the user wants the progress bar and our own messages.
    logging.set_verbosity(logging.INFO if flags.FLAGS.debug else logging.ERROR)
    try:
      _join_processes()  # XLA:CPU flags and other processes, before anything creates the backend
      cache = flags.FLAGS['compile_cache']
      start_compile_cache(cache.value if compile_cache or cache.present else False)
      main(argv)
    except UserError as e:
      if flags.FLAGS.debug:
        traceback.print_exc()
      logging.flush()
      fail(str(e))
    except Interrupted as e:
      print(str(e), file=sys.stderr)
      sys.exit(128 + e.signum)
    except KeyboardInterrupt:
      # Ctrl-C before training started (loading data, compiling): nothing to save.
      print('interrupted before the first training step; nothing was saved.', file=sys.stderr)
      sys.exit(130)

  app.run(wrapped, flags_parser=functools.partial(parse_flags,
                                                  type_picks_config=type_picks_config))
