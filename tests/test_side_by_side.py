"""benchmarks/side_by_side.py: alternating rounds, the summary, its mistakes."""
import importlib.util
import sys

import pytest

from .conftest import ROOT

_spec = importlib.util.spec_from_file_location('side_by_side',
                                               ROOT / 'benchmarks' / 'side_by_side.py')
sbs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sbs)


def fake_runner(figures):
  """A runner that answers each command with the next figure of its implementation."""
  calls = []

  def run(cmd):
    impl = 'mil_jax' if '-m' in cmd else 'torch'
    calls.append((impl, cmd[cmd.index('--model') + 1], cmd[cmd.index('--seconds') + 1]))
    return {'images_per_s': figures[impl].pop(0)}

  return run, calls


def test_rounds_alternate_and_compare_medians():
  # In call order: round 0 fc, mae; round 1 fc, mae; round 2 fc, mae.
  run, calls = fake_runner({'mil_jax': [10.0, 30.0, 20.0, 8.0, 12.0, 7.0],
                            'torch': [5.0, 10.0, 4.0, 8.0, 10.0, 7.0]})
  records = sbs.run_rounds([('fc', 128), ('mae:seed', 128)], 3, seconds=2.0, windows=3,
                           threads=2, run=run)
  # Each round times both configs; which implementation goes first alternates.
  assert [c[0] for c in calls] == ['mil_jax', 'torch'] * 2 + ['torch', 'mil_jax'] * 2 + \
      ['mil_jax', 'torch'] * 2
  assert {c[2] for c in calls if c[1] == 'mae:seed'} == {'4.0'}
  assert {c[2] for c in calls if c[1] == 'fc'} == {'2.0'}
  assert len(records) == 12 and {r['round'] for r in records} == {0, 1, 2}

  fc, mae = sbs.summarize(records)
  assert (fc['model'], fc['batch'], fc['target']) == ('fc', 128, 1.8)
  assert fc['mil_jax'] == [10.0, 20.0, 12.0] and fc['torch'] == [5.0, 4.0, 10.0]
  assert fc['ratios'] == pytest.approx([2.0, 5.0, 1.2])
  assert fc['ratio_of_medians'] == pytest.approx(12.0 / 5.0)  # not the median ratio, 2.0
  assert mae['ratio_of_medians'] == pytest.approx(8.0 / 8.0)

  table = sbs.markdown([fc, mae]).splitlines()
  assert table[2] == ('| fc b128 | 10.0 / 20.0 / 12.0 | 5.0 / 4.0 / 10.0 | '
                      '2.00x / 5.00x / 1.20x | 2.40x | 1.8x |')
  assert table[3].endswith('| 1.00x | 1x |')


def test_commands_time_the_same_configuration():
  cmds = sbs.commands('conv:192', 32, 2.0, 3, 2)
  assert cmds['mil_jax'][1:3] == ['-m', 'mil_jax.bench']
  assert cmds['torch'][1].endswith('torch_reference.py')
  assert cmds['torch'][-2:] == ['--threads', '2']
  for cmd in cmds.values():
    assert cmd[cmd.index('--model') + 1] == 'conv:192' and cmd[cmd.index('--batch') + 1] == '32'


def test_run_json_reads_the_last_record_and_reports_failures():
  ok = [sys.executable, '-c', 'print("loading"); print(\'{"images_per_s": 5.5}\')']
  assert sbs.run_json(ok) == {'images_per_s': 5.5}
  with pytest.raises(RuntimeError, match=r'exit 3\): boom'):
    sbs.run_json([sys.executable, '-c', 'import sys; print("boom", file=sys.stderr); sys.exit(3)'])


@pytest.mark.parametrize('argv, message', [
    (['--config', 'fc'], '--config takes MODEL:BATCH'),
    (['--config', 'fc:0'], '--config takes MODEL:BATCH'),
    (['--rounds', '0'], '--rounds and --windows take 1 or more'),
    (['--out', '/nonexistent/dir/rounds.jsonl'], 'does not exist'),
])
def test_mistakes_exit_2_with_one_sentence(argv, message, capsys):
  assert sbs.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith('error: ') and message in err and len(err.splitlines()) == 1


def test_without_torch_it_says_how_to_install_it(monkeypatch, capsys):
  monkeypatch.setitem(sys.modules, 'torch', None)  # makes `import torch` fail
  assert sbs.main(['--config', 'fc:128']) == 2
  assert 'pip install torch' in capsys.readouterr().err
