"""The README is executable: each of its shell commands runs, as typed, in a copy
of the repository.

Commands are read from the README's ```bash blocks, in order, and run with
the copy as the current directory (relative paths, default workdirs). They
are only made small by what the README documents: the ``runlocal`` variant
added to ``--config`` (fake data, tiny models), fake data in place of an
``npz:`` file, one row and one column of the grid (one point of the size
sweep), a small batch and short windows for the benchmark.
Each training command then runs a second time and must resume or say that it
has finished. A command that cannot run here is listed in ``NOT_RUN`` with
the reason; any other new command is run without editing this file.
"""
from __future__ import annotations

import re
import shlex

import pytest

from .conftest import ROOT, copy_repository, run_in

# README commands not run here, and why: each is recognized by words it contains.
NOT_RUN = {
    ('srun',): 'needs a SLURM cluster',
    ('--num_processes=2', 'wait'):
        'a shell loop of two processes on one port; tests/test_multihost.py runs this launch',
}
TRAINING_SCRIPTS = ('train_pretrain.py', 'train_classifier.py')
GRIDS = (('-m', 'mil_jax.reproduce'), ('-m', 'mil_jax.sweep'))


def readme_sections() -> dict[str, list[list[str]]]:
  """The shell commands of the README's bash blocks as argv lists, in order, by section."""
  sections: dict[str, list[list[str]]] = {}
  title = 'top'
  for part in re.split(r'^(## .*)$', (ROOT / 'README.md').read_text(), flags=re.M):
    if part.startswith('## '):
      title = part[3:].strip()
      continue
    for block in re.findall(r'```bash\n(.*?)```', part, flags=re.S):
      for line in block.replace('\\\n', ' ').splitlines():
        argv = shlex.split(line, comments=True)
        if argv:
          sections.setdefault(title, []).append(argv)
  return sections


def readme_commands() -> list[list[str]]:
  """Every shell command of the README, in order."""
  return [argv for commands in readme_sections().values() for argv in commands]


def not_run_reason(argv: list[str]) -> str | None:
  for words, reason in NOT_RUN.items():
    if all(w in argv for w in words):
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
  if program == 'mil_jax.sweep' and not any(a.startswith('--config.rows') for a in args):
    args.append('--config.rows=conv_4_2_6')
  if program == 'mil_jax.bench':
    args = [_with_runlocal(a) if args[i - 1] == '--model' else a for i, a in enumerate(args)]
    args += ['--batch=32', '--seconds=0.02', '--windows=1']
  return args


def _runs_a_stage(argv: list[str]) -> bool:
  return any(a in TRAINING_SCRIPTS for a in argv) or tuple(argv[1:3]) in GRIDS


def _uses_newest_run(argv: list[str]) -> bool:
  return ('train_classifier.py' in argv and '--from_scratch' not in argv
          and not any(a.startswith('--pretrained_path') for a in argv))


def _flows() -> dict[str, list[list[str]]]:
  """The runnable commands of each README section, in order, each section in a copy
  of its own. A section whose classifiers use the newest pretraining run first
  runs the last pretraining command before it, as the reader has."""
  flows, last_pretraining = {}, None
  for title, commands in readme_sections().items():
    runnable = [argv for argv in commands if not not_run_reason(argv)]
    first_stage = next((a for a in runnable if any(s in a for s in TRAINING_SCRIPTS)), None)
    if first_stage and _uses_newest_run(first_stage) and last_pretraining:
      runnable.insert(0, last_pretraining)
    if runnable:
      flows[title] = runnable
    last_pretraining = next((a for a in reversed(commands) if 'train_pretrain.py' in a),
                            last_pretraining)
  return flows


def test_every_readme_command_is_run_or_listed():
  commands = readme_commands()
  assert len(commands) >= 10, 'the README lost its commands, or this parser broke'
  for words in NOT_RUN:  # a reason kept for a command the README no longer has would hide one
    assert any(all(w in argv for w in words) for argv in commands), f'stale NOT_RUN entry {words}'
  for argv in commands:
    if not not_run_reason(argv):
      shrink(argv)  # fails for a command this test does not know how to run
  run = [c for flow in _flows().values() for c in flow]
  assert all(c in run for c in commands if not not_run_reason(c))
  assert any('train_pretrain.py' in c for c in run) and any('train_classifier.py' in c
                                                            for c in run)


@pytest.mark.parametrize('section', list(_flows()))
def test_readme_commands_run_as_typed(tmp_path, section):
  copy = copy_repository(tmp_path / 'mil_jax')
  for argv in _flows()[section]:
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
