"""Tests of the size sweep: its grid, its table from the cells' records, the command."""
from __future__ import annotations

import json

import pytest

from configs import sweep as sweep_config
from mil_jax import reproduce, sweep

from .conftest import CPU_ONLY, copy_repo, run_command

KEYS = ['conv_4_2_6', 'conv_4_3_6', 'conv_4_2_8', 'conv_5_2_8', 'conv_3_2_16']


def _conv_sizes(layers: int, factor: int, filters: int) -> tuple[int, int, int]:
  """(params, encoder params, latent size) of the Conv autoencoder, from its description."""
  widths = [filters * factor ** i for i in range(layers)]
  conv = lambda cin, cout: 16 * cin * cout + cout   # 4x4 kernel and bias
  encoder = sum(conv(cin, c) for cin, c in zip([3, *widths], widths)) + sum(
      2 * c for c in widths[1:])                     # LayerNorms after all convs but the first
  decoder = sum(conv(cout * factor, cout) + 2 * cout for cout in widths[:-1]) + conv(widths[0], 3)
  side = 32 // 2 ** layers
  return encoder + decoder, encoder, side * side * widths[-1]


@pytest.mark.parametrize('variant, epochs, source', [
    (None, 0, 'tfds:cifar100'), ('quick', 5, 'tfds:cifar100'), ('cpu', 2, 'tfds:cifar100'),
    ('runlocal', 1, 'fake'), ('cpu,pretrain_epochs=7', 7, 'tfds:cifar100')])
def test_every_point_is_a_pretraining_and_a_knn_cell(tmp_path, variant, epochs, source):
  grid = sweep_config.get_config(variant)
  cells = reproduce.make_cells(grid, tmp_path)
  assert [c.key for c in cells] == [f'{k}/{c}' for k in KEYS for c in ('pretrain', 'knn')]
  for key, (layers, factor, filters) in zip(KEYS, sweep_config.POINTS):
    pretrain = {c.key: c.config for c in cells}[f'{key}/pretrain']
    model = pretrain.model
    assert (model.name, model.num_layers, model.channel_factor, model.start_filters) == (
        'conv', layers, factor, filters)
    assert pretrain.num_epochs == (epochs or 100)
    assert pretrain.data.source == source
  knn = {c.key: c.config for c in cells}['conv_5_2_8/knn']
  assert (knn.mode, knn.pretrained_path) == ('knn', str(tmp_path / 'pretrain' / 'conv_5_2_8'))


@pytest.mark.parametrize('variant', ['cpu,quick', 'bogus', 'pretrain_epochs=x'])
def test_bad_variants_raise_value_error(variant):
  with pytest.raises(ValueError):
    sweep_config.get_config(variant)


def test_table_reports_finished_failed_and_missing_points():
  grid = sweep_config.get_config('runlocal')
  grid.rows = 'conv_4_2_6,conv_5_2_8,conv_3_2_16'
  ok = lambda metrics: {'status': 'ok', 'metrics': metrics}
  results = {'cells': {
      'conv_4_2_6/pretrain': ok({'eval/psnr': 17.125}),
      'conv_4_2_6/knn': ok({'eval/knn_accuracy': 0.3125}),
      'conv_5_2_8/pretrain': ok({'eval/psnr': 15.5}),
      'conv_5_2_8/knn': {'status': 'failed', 'metrics': {}, 'error': 'RuntimeError: x'},
  }}
  records = sweep.point_records(grid, results)
  assert [(r['row'], r['status'], r['knn_accuracy'], r['psnr']) for r in records] == [
      ('conv_4_2_6', 'ok', 0.3125, 17.125), ('conv_5_2_8', 'failed', None, 15.5),
      ('conv_3_2_16', 'not run', None, None)]
  assert _conv_sizes(4, 2, 6) == (49_347, 24_738, 192)    # reference/SEED.md: Conv-192
  assert [(r['params'], r['encoder_params'], r['latent_dim']) for r in records] == [
      _conv_sizes(4, 2, 6), _conv_sizes(5, 2, 8), _conv_sizes(3, 2, 16)]
  lines = sweep.sweep_markdown(grid, records).splitlines()
  assert '| Conv (4,2,6) | 49,347 | 24,738 | 192 | **0.312** | 17.12 |' in lines
  assert '| Conv (5,2,8) | 350,019 | 175,192 | 128 | failed | 15.50 |' in lines
  assert '| Conv (3,2,16) | 83,907 | 42,032 | 1,024 | — | — |' in lines


def _last(path, name):
  records = [json.loads(ln) for ln in path.read_text().splitlines()]
  return [r[name] for r in records if name in r][-1]


def test_runlocal_sweep_command_and_rerun(tmp_path):
  repo = copy_repo(tmp_path / 'repo')
  args = ['-m', 'mil_jax.sweep', '--config', 'configs/sweep.py:runlocal',
          '--config.rows=conv_4_2_6,conv_5_2_8', '--config.data.fake_train_size=64',
          '--config.data.fake_test_size=32', '--workdir', 'runs/sweep']
  out = run_command(args, cwd=repo, env=CPU_ONLY, timeout=1800)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  workdir = repo / 'runs' / 'sweep'
  assert f'sweep: {workdir}/sweep.md, {workdir}/sweep.json, {workdir}/sweep.png' in out.stdout
  points = json.loads((workdir / 'sweep.json').read_text())['points']
  table = (workdir / 'sweep.md').read_text().splitlines()
  assert [p['row'] for p in points] == ['conv_4_2_6', 'conv_5_2_8']
  knn = {}
  for point, sizes in zip(points, [(4, 2, 6), (5, 2, 8)]):
    row = point['row']
    # Scores as the cells measured them, sizes as the architecture has them.
    knn[row] = _last(workdir / 'classify' / row / 'knn' / 'metrics.jsonl', 'eval/knn_accuracy')
    psnr = _last(workdir / 'pretrain' / row / 'metrics.jsonl', 'eval/psnr')
    assert point['knn_accuracy'] == pytest.approx(knn[row], abs=1e-6)
    assert point['psnr'] == pytest.approx(psnr, abs=1e-4)
    assert (point['params'], point['encoder_params'], point['latent_dim']) == _conv_sizes(*sizes)
    assert point['status'] == 'ok' and 0.0 <= knn[row] <= 1.0 and psnr > 0
    layers, factor, filters = sizes
    line = next(ln for ln in table if ln.startswith(f'| Conv ({layers},{factor},{filters}) |'))
    cells = [c.strip('* ') for c in line.split('|')[2:-1]]
    assert cells == [f'{point["params"]:,}', f'{point["encoder_params"]:,}',
                     f'{point["latent_dim"]:,}', f'{knn[row]:.3f}', f'{psnr:.2f}']
  best = max(knn, key=knn.get)
  assert sum('**' in ln for ln in table) >= 1
  assert all(('**' in ln) == (knn[r] == knn[best]) for r, ln in zip(
      knn, [ln for ln in table if ln.startswith('| Conv')]))
  assert (workdir / 'sweep.png').stat().st_size > 10_000

  out = run_command(args, cwd=repo, env=CPU_ONLY, timeout=600)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  assert out.stdout.count('finished before, skipped') == 4
  assert json.loads((workdir / 'sweep.json').read_text())['points'] == points


@pytest.mark.parametrize('args, message', [
    (['--config', 'configs/sweep.py:bogus'], "unknown variant 'bogus'"),
    (['--config', 'configs/sweep.py:runlocal', '--config.rows=conv_9_9_9'],
     "unknown row 'conv_9_9_9'"),
    (['--config', 'configs/sweep.py:runlocal', '--config.knn=False'], 'kNN'),
    (['--config', 'configs/sweep.py:runlocal', '--config.data.source=npz:none.npz'],
     'none.npz'),
])
def test_command_line_mistakes_exit_2(tmp_path, args, message):
  repo = copy_repo(tmp_path / 'repo')
  out = run_command(['-m', 'mil_jax.sweep', *args, '--workdir', 'runs/sweep'], cwd=repo,
                    env={'JAX_PLATFORMS': 'cpu'})
  assert out.returncode == 2, out.stderr[-2000:]
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and message in lines[0], out.stderr
  assert not (repo / 'runs').exists()
