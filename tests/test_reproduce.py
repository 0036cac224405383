"""Tests of the study grid: every cell reported, failures recorded, reruns skip."""
import json
import re

import pytest

from configs import reproduce as reproduce_config
from mil_jax import classify, reproduce
from mil_jax.errors import UserError
from mil_jax.metric_writers import read_metrics

from .conftest import CPU_ONLY, assert_picture, run_command

# A part of the grid for the tests that do not need all of it: one row (FC: it
# compiles fastest), the No pretrain column (no checkpoint needed) and one
# column over the pretrained encoder.
SMALL = ['--config.rows=fc_l1', '--config.columns=no_pretrain,linear_frozen',
         '--config.knn=False']


def small_grid():
  grid = reproduce_config.get_config('runlocal')
  grid.rows, grid.columns, grid.knn = 'fc_l1', 'no_pretrain,linear_frozen', False
  return grid


def test_every_variant_builds_every_cell(tmp_path):
  for variant in ('seed', 'quick', 'cpu', 'runlocal', 'cpu,pretrain_epochs=2,classifier_epochs=3'):
    grid = reproduce_config.get_config(variant)
    cells = reproduce.make_cells(grid, tmp_path)
    assert len(cells) == 6 * (1 + 5 + 1), variant
    for cell in cells:  # the grid's data block reaches every cell
      assert cell.config.data.source == grid.data.source, (variant, cell.key)
  seed = {c.key: c.config for c in reproduce.make_cells(reproduce_config.get_config('seed'),
                                                        tmp_path)}
  assert [seed[f'{r}/pretrain'].num_epochs for r in ('fc_l1', 'conv_256', 'mae')] == [100, 100,
                                                                                       2000]
  assert seed['mae/linear_frozen'].num_epochs == 40
  assert (seed['mae/linear_frozen'].mode, seed['mae/linear_frozen'].freeze) == ('probing', True)
  assert seed['fc_l2/no_pretrain'].from_scratch and not seed['fc_l2/no_pretrain'].freeze
  assert seed['fc_l2/mlp_tune'].pretrained_path == str(tmp_path / 'pretrain' / 'fc_l2')
  assert seed['masked_unet/pretrain'].num_epochs == 100
  assert seed['masked_unet/pretrain'].model.name == 'masked_unet'
  assert seed['masked_unet/no_pretrain'].model_type == 'masked_unet:base'
  cpu = reproduce.make_cells(reproduce_config.get_config('cpu,pretrain_epochs=3'), tmp_path)
  epochs = {c.key: c.config.num_epochs for c in cpu}
  assert epochs['fc_l1/pretrain'] == epochs['masked_unet/pretrain'] == 3
  cpu = {c.key: c.config for c in reproduce.make_cells(reproduce_config.get_config('cpu'),
                                                       tmp_path)}
  assert cpu['masked_unet/pretrain'].num_epochs == cpu['conv_256/pretrain'].num_epochs == 2


@pytest.mark.parametrize('field,value,message', [
    ('rows', 'fc_l1,vit', "unknown row 'vit'"),
    ('columns', 'svm', "unknown column 'svm'"),
])
def test_grid_mistakes_are_user_errors(tmp_path, field, value, message):
  grid = reproduce_config.get_config('runlocal')
  grid[field] = value
  with pytest.raises(UserError, match=message):
    reproduce.run_grid(grid, tmp_path)
  assert not list(tmp_path.iterdir())  # nothing written before the check


GRID_ROWS = ('fc_l1', 'conv_192', 'mae', 'masked_unet')


def test_runlocal_grid_end_to_end(tmp_path):
  """The runlocal grid through the command line: every cell in every output.

  One row of each model (FC, Conv, MAE, Masked UNet) with every column: 28
  cells. The other two rows differ from these only in their pretraining
  config, which the README's commands run (FC+l2 in its grid, Conv-256 alone).
  """
  # Half the runlocal images: each cell still trains and evaluates, in a quarter less time.
  out = run_command(['-m', 'mil_jax.reproduce', '--config', 'configs/reproduce.py:runlocal',
                     f'--config.rows={",".join(GRID_ROWS)}',
                     '--config.data.fake_train_size=64', '--config.data.fake_test_size=32',
                     f'--workdir={tmp_path}'], env=CPU_ONLY, timeout=1800)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  results = json.loads((tmp_path / 'results.json').read_text())
  columns = reproduce_config.get_config('runlocal').columns.split(',')
  expected = {f'{r}/{c}' for r in GRID_ROWS for c in ['pretrain', *columns, 'knn']}
  assert len(expected) == 4 * 7
  assert set(results['cells']) == expected
  for key, record in results['cells'].items():
    assert record['status'] == 'ok', (key, record['error'])
    assert record['wall_s'] > 0 and record['hardware']['platform'] == 'cpu'
    assert record['config']['data']['source'] == 'fake'
    assert record['config']['data']['fake_train_size'] == 64, key  # the grid's data block
    assert 'git_commit' in record
    if record['column'] != 'knn':  # each cell's start-up is its own, not the grid's so far
      startup = [r['time/startup_s'] for r in read_metrics(tmp_path / record['workdir'])
                 if 'time/startup_s' in r]
      assert startup and 0 < startup[-1] < record['wall_s'], (key, startup, record['wall_s'])
  assert 0 <= results['cells']['mae/linear_frozen']['metrics']['eval/accuracy'] <= 1
  assert results['cells']['fc_l1/knn']['metrics']['eval/knn_accuracy'] >= 0
  assert results['cells']['conv_192/pretrain']['metrics']['eval/psnr'] > 0

  table = (tmp_path / 'results.md').read_text()
  lines = [ln for ln in table.splitlines() if ln.startswith('| ')]
  assert lines[0].split(' | ')[1:] == ['No pretrain', 'MLP + fine-tune', 'MLP frozen',
                                       'Linear + fine-tune', 'Linear frozen', 'kNN',
                                       'PSNR (dB)', 'masked PSNR (dB) |']
  assert [ln.split(' | ')[0] for ln in lines[1:]] == [
      '| FC+l1', '| Conv-192', '| MAE', '| Masked UNet']
  fc_l1 = lines[1].split(' | ')
  assert re.fullmatch(r'\.\d{3} \(\.186\)', fc_l1[1]), fc_l1   # ours (the reference's)
  assert fc_l1[-1] == '— |'                                      # masks nothing
  for line in lines[-2:]:                                        # MAE, Masked UNet
    cells = line.split(' | ')
    assert re.fullmatch(r'\.\d{3}', cells[1]), cells           # the reference has none
    psnr = results['cells'][f"{'mae' if 'MAE' in cells[0] else 'masked_unet'}/pretrain"][
        'metrics']
    assert cells[-2:] == [f"{psnr['eval/psnr']:.2f}", f"{psnr['eval/masked_psnr']:.2f} |"]
  assert_picture(tmp_path / 'report.png')
  assert_picture(tmp_path / 'classify' / 'mae' / 'mlp_tune' / 'accuracy.png', curves=2)
  mlp_tune = json.loads((tmp_path / 'classify' / 'mae' / 'mlp_tune' / 'metrics.jsonl')
                        .read_text().splitlines()[-1])
  assert mlp_tune['eval/accuracy'] == pytest.approx(
      results['cells']['mae/mlp_tune']['metrics']['eval/accuracy'], rel=1e-6)


def test_table_has_a_masked_psnr_only_for_masking_rows():
  grid = reproduce_config.get_config('runlocal')
  grid.rows, grid.columns = 'conv_192,mae,masked_unet', 'linear_frozen'
  ok = lambda metrics: {'status': 'ok', 'metrics': metrics, 'wall_s': 1.0, 'error': None,
                        'hardware': {'device_kind': 'cpu'}, 'git_commit': None}
  results = {'cells': {
      'conv_192/pretrain': ok({'eval/psnr': 17.5}),
      'mae/pretrain': ok({'eval/psnr': 21.25, 'eval/masked_psnr': 15.125}),
      'masked_unet/pretrain': ok({'eval/psnr': 20.75, 'eval/masked_psnr': 18.5}),
      'masked_unet/linear_frozen': ok({'eval/accuracy': 0.25}),
  }}
  lines = [ln for ln in reproduce.results_markdown(grid, results).splitlines()
           if ln.startswith('| ')]
  assert lines[0] == '|  | Linear frozen | kNN | PSNR (dB) | masked PSNR (dB) |'
  assert lines[1:] == ['| Conv-192 | — (.134) | — | 17.50 | — |',
                       '| MAE | — (.088) | — | 21.25 | 15.12 |',
                       '| Masked UNet | .250 | — | 20.75 | 18.50 |']


def test_failed_cell_is_recorded_and_rerun_skips_finished(tmp_path, monkeypatch):
  real = classify.train_and_evaluate
  calls = []

  def broken_probe(config, workdir, **kwargs):
    calls.append(str(workdir))
    if config.mode == 'probing':
      raise RuntimeError('a bug in one cell')
    return real(config, workdir, **kwargs)

  monkeypatch.setattr(classify, 'train_and_evaluate', broken_probe)
  results = reproduce.run_grid(small_grid(), tmp_path)
  cells = results['cells']
  assert cells['fc_l1/linear_frozen']['status'] == 'failed'
  assert 'RuntimeError: ' in cells['fc_l1/linear_frozen']['error']
  assert 'a bug in one cell' in cells['fc_l1/linear_frozen']['error']
  assert cells['fc_l1/pretrain']['status'] == cells['fc_l1/no_pretrain']['status'] == 'ok'
  table = (tmp_path / 'results.md').read_text()
  assert '| failed (.190) |' in table and 'a bug in one cell' in table
  assert_picture(tmp_path / 'report.png')
  monkeypatch.undo()

  # The command line reruns the failed cell only, with the same config.
  before = json.loads((tmp_path / 'results.json').read_text())['cells']
  out = run_command(['-m', 'mil_jax.reproduce', '--config', 'configs/reproduce.py:runlocal',
                     *SMALL, f'--workdir={tmp_path}'], env=CPU_ONLY)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  assert out.stdout.count('finished before, skipped') == 2
  after = json.loads((tmp_path / 'results.json').read_text())['cells']
  assert after['fc_l1/linear_frozen']['status'] == 'ok'
  for key in ('fc_l1/pretrain', 'fc_l1/no_pretrain'):
    assert after[key] == before[key]  # untouched, not rerun


def test_failing_cells_make_the_command_exit_1_and_the_others_still_run(tmp_path):
  # The MAE row asks for cuDNN attention, which the float32 runlocal MAE
  # cannot have anywhere: its pretraining and its No pretrain cell fail
  # inside the cell (the grid's own config is fine), the FC row runs.
  out = run_command(['-m', 'mil_jax.reproduce', '--config', 'configs/reproduce.py:runlocal',
                     *SMALL, '--config.rows=fc_l1,mae',
                     '--config.row.mae.pretrain=mae:fast,runlocal,attention=cudnn',
                     f'--workdir={tmp_path}'], env=CPU_ONLY)
  assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
  failed = 'mae/linear_frozen, mae/no_pretrain, mae/pretrain'
  assert f'3 of 6 cells failed ({failed}); their errors are in results.md' in out.stdout
  assert 'Traceback' not in out.stderr
  cells = json.loads((tmp_path / 'results.json').read_text())['cells']
  assert set(cells) == {f'{r}/{c}' for r in ('fc_l1', 'mae')
                        for c in ('pretrain', 'no_pretrain', 'linear_frozen')}
  for key in ('mae/pretrain', 'mae/no_pretrain'):
    assert cells[key]['status'] == 'failed', key
    assert cells[key]['error'].startswith("UserError: mae attention 'cudnn' needs"), key
  assert cells['mae/linear_frozen']['error'] == (
      'not run: the pretraining of this row failed.')
  for key in ('fc_l1/pretrain', 'fc_l1/no_pretrain', 'fc_l1/linear_frozen'):
    assert cells[key]['status'] == 'ok' and cells[key]['error'] is None, key
    assert cells[key]['metrics'], key
  assert 0.0 <= cells['fc_l1/linear_frozen']['metrics']['eval/accuracy'] <= 1.0
  table = (tmp_path / 'results.md').read_text()
  assert '| MAE | failed | failed (.088) | failed |' in table
  assert "- `mae/pretrain`: UserError: mae attention 'cudnn' needs" in table
  assert_picture(tmp_path / 'report.png')


def test_command_line_mistakes_exit_2(tmp_path):
  for args, message in [
      (['--config', 'configs/reproduce.py:fast'], "unknown variant 'fast'"),
      (['--config', 'configs/reproduce.py:runlocal', '--config.rows=vit'], "unknown row 'vit'"),
      (['--config', 'configs/reproduce.py:runlocal', '--config.data.source=tfds:nope',
        '--config.data.download=False'], 'nope'),
  ]:
    out = run_command(['-m', 'mil_jax.reproduce', *args, f'--workdir={tmp_path / "grid"}'])
    assert out.returncode == 2, (args, out.stderr[-2000:])
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], (args, out.stderr)
  assert not (tmp_path / 'grid').exists()
