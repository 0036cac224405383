"""The README is executable: each of its shell commands runs, as typed, in a copy
of the repository.

Commands are read from the README's ```bash blocks, in order, and run with
the copy as the current directory (relative paths, default workdirs). They
are only made small by what the README documents: the ``runlocal`` variant
added to ``--config`` (fake data, tiny models), fake data in place of an
``npz:`` file, one row and one column of the grid, short benchmark windows.
Each training command then runs a second time and must resume or say that it
has finished. A command that cannot run here is listed in ``NOT_RUN`` with
the reason; any other new command is run without editing this file.
"""
from __future__ import annotations

import re
import shlex

import pytest

from .conftest import ROOT, copy_repository, run_in

# argv prefixes of README commands that are not run here, and why.
NOT_RUN = {
    ('pip', 'install'): 'installs the package: the install step of CI is this command',
    ('python', '-m', 'pytest'): 'runs this test suite',
    ('python', '-m', 'mil_jax.bench', '--all'):
        'times every reference model for minutes by design; the other bench commands run',
    ('bash', 'benchmarks/gpu.sh'): 'times the GPU set: needs a GPU',
    ('python', 'benchmarks/torch_reference.py'): 'needs PyTorch, which mil_jax does not install',
    ('python', 'benchmarks/side_by_side.py'): 'needs PyTorch, which mil_jax does not install',
}
TRAINING_SCRIPTS = ('train_pretrain.py', 'train_classifier.py')
GRID = ('-m', 'mil_jax.reproduce')


def readme_commands() -> list[list[str]]:
  """The shell commands of the README's bash blocks, in order, as argv lists."""
  text = (ROOT / 'README.md').read_text()
  commands = []
  for block in re.findall(r'```bash\n(.*?)```', text, flags=re.S):
    for line in block.replace('\\\n', ' ').splitlines():
      argv = shlex.split(line, comments=True)
      if argv:
        commands.append(argv)
  return commands


def not_run_reason(argv: list[str]) -> str | None:
  for prefix, reason in NOT_RUN.items():
    if tuple(argv[:len(prefix)]) == prefix:
      return reason
  return None


def _value(argv: list[str], flag: str) -> tuple[int, str] | None:
  """``(index, value)`` of ``--flag VALUE`` or ``--flag=VALUE`` in ``argv``."""
  for i, arg in enumerate(argv):
    if arg == flag and i + 1 < len(argv):
      return i + 1, argv[i + 1]
    if arg.startswith(flag + '='):
      return i, None
  return None


def _with_runlocal(spec: str) -> str:
  if 'runlocal' in spec.partition(':')[2].split(','):
    return spec
  return spec + (',runlocal' if ':' in spec else ':runlocal')


def shrink(argv: list[str]) -> list[str]:
  """``argv`` made small by documented overrides only (see the module docstring);
  the arguments of ``python``."""
  assert argv[0] == 'python', f'README command {shlex.join(argv)} is not run by this test'
  args = list(argv[1:])
  program = args[0] if args[0] != '-m' else args[1]
  config = _value(args, '--config')
  if config is not None:
    i, spec = config
    if spec is None:
      spec = args[i].split('=', 1)[1]
      args[i] = f'--config={_with_runlocal(spec)}'
    else:
      args[i] = _with_runlocal(spec)
  elif program == 'train_pretrain.py':
    args.append(f'--config=configs/{_value(args, "--type")[1]}.py:runlocal')
  elif program == 'train_classifier.py':
    args.append('--config=configs/classifier.py:runlocal')
  if program == 'train_classifier.py' and _value(args, '--type'):
    spec = _value(args, '--type')[1]
    args.append(f'--type={_with_runlocal(spec)}')
  if any(a.startswith('--config.data.source=npz:') for a in args):
    args += ['--config.data.source=fake', '--config.data.train_split=train',
             '--config.data.eval_split=test']
  if program == 'mil_jax.reproduce':
    if not any(a.startswith('--config.rows') for a in args):
      args.append('--config.rows=fc_l2')
    if not any(a.startswith('--config.columns') for a in args):
      args.append('--config.columns=linear_frozen')
  if program == 'mil_jax.bench':
    args = [_with_runlocal(a) if args[i - 1] == '--model' else a for i, a in enumerate(args)]
    args += ['--seconds=0.02', '--windows=1']
  return args


def _runs_a_stage(argv: list[str]) -> bool:
  return any(a in TRAINING_SCRIPTS for a in argv) or tuple(argv[1:3]) == GRID


def _groups() -> dict[str, list[list[str]]]:
  """The runnable commands in README order: the stages' flow, and the rest."""
  groups = {'stages': [], 'grid_and_tools': []}
  for argv in readme_commands():
    if not_run_reason(argv):
      continue
    key = 'stages' if any(a in TRAINING_SCRIPTS for a in argv) else 'grid_and_tools'
    groups[key].append(argv)
  return groups


def test_every_readme_command_is_run_or_listed():
  commands = readme_commands()
  assert len(commands) >= 10, 'the README lost its commands, or this parser broke'
  for argv in commands:
    if not not_run_reason(argv):
      shrink(argv)  # fails for a command this test does not know how to run
  run = [c for group in _groups().values() for c in group]
  assert any('train_pretrain.py' in c for c in run) and any('train_classifier.py' in c
                                                            for c in run)


@pytest.mark.parametrize('group', ['stages', 'grid_and_tools'])
def test_readme_commands_run_as_typed(tmp_path, group):
  copy = copy_repository(tmp_path / 'mil_jax')
  commands = _groups()[group]
  assert commands
  for argv in commands:
    shrunk = shrink(argv)
    shown = shlex.join(argv)
    out = run_in(copy, shrunk, timeout=600)
    assert out.returncode == 0, (
        f'{shown}\n(run as python {shlex.join(shrunk)})\n{out.stderr[-3000:]}')
    assert 'Traceback' not in out.stderr, shown
    if not _runs_a_stage(argv):
      continue
    again = run_in(copy, shrunk, timeout=600)
    assert again.returncode == 0, f'rerun of {shown}\n{again.stderr[-3000:]}'
    said = again.stdout + again.stderr
    if '--mode' in argv and argv[argv.index('--mode') + 1] == 'knn':
      assert 'k-NN accuracy' in said, f'rerun of {shown}: {said[-2000:]}'
    elif 'train_pretrain.py' in argv or 'train_classifier.py' in argv:
      assert 'has finished' in said and 'epoch 1/' not in said, f'rerun of {shown}: {said[-2000:]}'
    else:
      assert 'finished before, skipped' in said, f'rerun of {shown}: {said[-2000:]}'
