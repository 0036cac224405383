r"""The study's sweep of the Conv autoencoder's size: ``python -m mil_jax.sweep``.

  python -m mil_jax.sweep --config configs/sweep.py:quick --workdir runs/sweep
  python -m mil_jax.sweep --config configs/sweep.py:runlocal --workdir /tmp/sweep

Runs the grid of ``configs/sweep.py`` with ``mil_jax.reproduce.run_grid``
(one row per point of the sweep, each pretrained and scored by kNN; rerunning
skips finished cells and resumes a half-finished one) and writes into
``--workdir``, besides the grid's own ``results.*`` and ``report.png``:

  ``sweep.json``  per point: its model config, parameters, encoder parameters,
                  latent size, kNN accuracy and reconstruction PSNR.
  ``sweep.md``    the same as a table.
  ``sweep.png``   parameters and latent size against kNN accuracy and PSNR.

Exit codes as the grid's: 2 for a mistake in the config (before any cell
runs), 1 when a cell failed (the others still run and are reported).
"""
from __future__ import annotations

import json
import pathlib
from collections.abc import Callable
from typing import Any

import ml_collections

from mil_jax import models, paths, report, reproduce
from mil_jax.errors import UserError

SWEEP_JSON, SWEEP_MD, SWEEP_PNG = 'sweep.json', 'sweep.md', 'sweep.png'


def _value(results: dict[str, Any], key: str, name: str) -> float | None:
  record = results['cells'].get(key)
  if record is None or record['status'] != 'ok':
    return None
  return record['metrics'].get(name)


def point_records(grid: ml_collections.ConfigDict, results: dict[str, Any]
                  ) -> list[dict[str, Any]]:
  """One record per row of ``grid``: its size from its config, its scores from ``results``."""
  records = []
  for row in [k.strip() for k in grid.rows.split(',') if k.strip()]:  # run_grid checked them
    model = reproduce.pretrain_config(grid, row).model
    _, summary = models.summarize(model)
    cells = [results['cells'].get(f'{row}/{c}') for c in (reproduce.PRETRAIN, reproduce.KNN)]
    records.append({
        'row': row,
        'label': grid.row[row].label,
        'model': model.to_dict(),
        'params': summary['params'],
        'encoder_params': summary['encoder_params'],
        'latent_dim': summary['feature_dim'],
        'knn_accuracy': _value(results, f'{row}/{reproduce.KNN}', 'eval/knn_accuracy'),
        'psnr': _value(results, f'{row}/{reproduce.PRETRAIN}', 'eval/psnr'),
        'status': ('not run' if None in cells else
                   'ok' if all(c['status'] == 'ok' for c in cells) else 'failed'),
    })
  return records


def sweep_markdown(grid: ml_collections.ConfigDict, records: list[dict[str, Any]]) -> str:
  """``sweep.md``: one line per point, the best kNN accuracy in bold."""
  scored = [r['knn_accuracy'] for r in records if r['knn_accuracy'] is not None]
  best = max(scored, default=None)
  lines = ['| point | params | encoder params | latent size | kNN | PSNR (dB) |',
           '|---|---|---|---|---|---|']
  for r in records:
    knn = '—' if r['knn_accuracy'] is None else f"{r['knn_accuracy']:.3f}"
    if r['knn_accuracy'] is not None and r['knn_accuracy'] == best:
      knn = f'**{knn}**'
    psnr = '—' if r['psnr'] is None else f"{r['psnr']:.2f}"
    if r['status'] == 'failed':
      knn, psnr = (v if v != '—' else 'failed' for v in (knn, psnr))
    lines.append(f"| {r['label']} | {r['params']:,} | {r['encoder_params']:,} | "
                 f"{r['latent_dim']:,} | {knn} | {psnr} |")
  data = grid.data
  return '\n'.join([
      '# Sweep', '',
      f'kNN: weighted k-nearest-neighbour top-1 of the encoder\'s features on `{data.source}` '
      f'{data.eval_split} (neighbours from {data.train_split}); PSNR: reconstruction of '
      f'{data.eval_split}. Parameters of the whole autoencoder and of its encoder; latent size: '
      'the features a classifier sees. — : not run (yet). Every cell: results.json.', '',
      *lines, ''])


def run_sweep(grid: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
              overwrite: bool = False, log: Callable[[str], None] = print
              ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  """Runs the sweep's grid and writes ``sweep.json``, ``sweep.md`` and ``sweep.png``.

  Args:
    grid: a ``configs/sweep.py`` config (any grid config with kNN works).
    workdir: the sweep's directory; rerunning with it skips finished cells.
    overwrite: passed to each cell.
    log: where progress lines go.

  Returns:
    (the grid's ``results.json`` content, the point records of ``sweep.json``).

  Raises:
    UserError: the config is wrong (checked before any cell runs).
  """
  if not grid.knn:
    raise UserError('the sweep scores its points by kNN accuracy; leave config.knn True.')
  workdir = pathlib.Path(workdir)
  results = reproduce.run_grid(grid, workdir, overwrite=overwrite, log=log)
  records = point_records(grid, results)
  reproduce.write_atomically(workdir / SWEEP_JSON, json.dumps({'points': records}, indent=1) + '\n')
  reproduce.write_atomically(workdir / SWEEP_MD, sweep_markdown(grid, records))
  report.plot_sweep(records, workdir / SWEEP_PNG)
  return results, records


def main(argv: list[str]) -> None:
  """Runs the sweep of ``--config`` in ``--workdir``; exits 1 when a cell failed."""
  from absl import flags  # noqa: PLC0415

  from mil_jax import cli  # noqa: PLC0415
  grid = flags.FLAGS.config
  if grid is None:
    cli.fail('no config given; pass --config configs/sweep.py:seed|quick|cpu|runlocal.')
  workdir = paths.user_path(flags.FLAGS.workdir or 'runs/sweep', 'workdir')
  results, _ = run_sweep(grid, workdir, overwrite=flags.FLAGS.overwrite)
  print(f'sweep: {workdir / SWEEP_MD}, {workdir / SWEEP_JSON}, {workdir / SWEEP_PNG}')
  reproduce.exit_if_failed(results)


if __name__ == '__main__':
  from mil_jax import cli

  cli.define_run_flags(None, 'The sweep and its variant, e.g. configs/sweep.py:quick.',
                       'Where the sweep\'s cells and tables go (default: runs/sweep).')
  cli.run(main, kind='grid')
