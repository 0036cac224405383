r"""The study's table in one command: ``python -m mil_jax.reproduce``.

  python -m mil_jax.reproduce --config configs/reproduce.py:quick --workdir runs/grid
  python -m mil_jax.reproduce --config configs/reproduce.py:runlocal --workdir /tmp/grid

Pretrains the autoencoder of every row of ``configs/reproduce.py``, trains a
classifier over its encoder in every protocol column, measures its kNN
accuracy, and writes into ``--workdir``:

  ``results.json``  every cell: row, column, status ``ok``/``failed``, metrics,
                    the cell's whole config, wall time, hardware, git commit,
                    error text; rewritten (atomically) after each cell.
  ``results.md``    the study's table: our top-1 with the reference's beside
                    it, plus kNN accuracy and reconstruction PSNR per row.
  ``report.png``    accuracy per protocol and encoder as grouped bars, and a
                    reconstruction strip per encoder.

Each cell runs in its own workdir (``pretrain/<row>``,
``classify/<row>/<column>``), so rerunning skips the cells recorded as
finished with the same config and resumes a half-finished one from its latest
checkpoint. A cell that raises is recorded with its error and the grid goes
on; the command then exits 1. A mistake in the grid's own config (a bad
variant, a missing data set) exits 2 before any cell runs.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import time
import traceback
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np

from mil_jax import (
  checkpoint,
  classify,
  config_files,
  distributed,
  models,
  paths,
  pretrain,
  report,
  timing,
  trainer,
)
from mil_jax import input_pipeline as ip
from mil_jax.errors import UserError

RESULTS_JSON, RESULTS_MD, REPORT_PNG = 'results.json', 'results.md', 'report.png'
PRETRAIN, KNN = 'pretrain', 'knn'  # the columns of a row besides the protocols
STRIP_FILE = 'strip.npz'           # a row's reconstruction strip, cached for report.png


@dataclasses.dataclass(frozen=True)
class Cell:
  """One run of the grid: ``column`` is a protocol key, ``'pretrain'`` or ``'knn'``."""
  row: str
  column: str
  config: ml_collections.ConfigDict
  workdir: pathlib.Path

  @property
  def key(self) -> str:
    return f'{self.row}/{self.column}'

  @property
  def stage(self) -> str:
    return PRETRAIN if self.column == PRETRAIN else 'classify'


# --------------------------------------------------------------------------
# Cell configs.


def _merge(config: ml_collections.ConfigDict, overrides: ml_collections.ConfigDict,
           where: str, prefix: str = '') -> None:
  """Sets every leaf of ``overrides`` in ``config``; a field it lacks is a user error."""
  for name, value in overrides.items():
    if name not in config:
      raise UserError(f'{where} sets {prefix}{name}, which its config does not have.')
    if isinstance(value, ml_collections.ConfigDict):
      _merge(config[name], value, where, f'{prefix}{name}.')
    else:
      config[name] = value


def _with_grid_data(config: ml_collections.ConfigDict, grid: ml_collections.ConfigDict
                    ) -> ml_collections.ConfigDict:
  config.seed = grid.seed
  _merge(config.data, grid.data, 'config.data')
  return config


def _keys(text: str, known: ml_collections.ConfigDict, what: str) -> list[str]:
  keys = [k.strip() for k in text.split(',') if k.strip()]
  unknown = [k for k in keys if k not in known]
  if unknown:
    raise UserError(f'unknown {what} {unknown[0]!r} in config.{what}s; known: '
                    f'{", ".join(known.keys())}.')
  return keys


def pretrain_config(grid: ml_collections.ConfigDict, row: str) -> ml_collections.ConfigDict:
  """The pretraining config of ``row``: its config file and variant, then the grid's fields."""
  try:
    config = config_files.pretraining(grid.row[row].pretrain)
  except ValueError as e:
    raise UserError(f'row {row}: {e}.') from None
  if grid.row[row].num_epochs:
    config.num_epochs = grid.row[row].num_epochs
  if 'model' in grid.row[row].overrides:
    raise UserError(f'row {row} overrides its model; the No pretrain column rebuilds the '
                    'encoder from the config file alone, so name a variant in pretrain instead.')
  _merge(config, grid.row[row].overrides, f'config.row.{row}.overrides')
  return _with_grid_data(config, grid)


def classifier_config(grid: ml_collections.ConfigDict, row: str, column: str,
                      pretrained: pathlib.Path) -> ml_collections.ConfigDict:
  """The classifier config of one cell (``column`` a protocol key or ``'knn'``)."""
  try:
    config = config_files.classifier(grid.classifier or None)
  except ValueError as e:
    raise UserError(f'config.classifier: {e}.') from None
  if column == KNN:
    config.mode, config.freeze, config.from_scratch = 'knn', True, False
  else:
    protocol = grid.column[column]
    config.mode, config.freeze = protocol.mode, protocol.freeze
    config.from_scratch = protocol.from_scratch
  # The architecture the checkpoint must hold, or the fresh encoder to build.
  config.model_type = grid.row[row].pretrain
  config.pretrained_path = '' if config.from_scratch else str(pretrained)
  if grid.classifier_epochs:
    config.num_epochs = grid.classifier_epochs
  # The encoder sets the cost of a step, so its row's dispatch grouping fits here too.
  config.steps_per_dispatch = pretrain_config(grid, row).steps_per_dispatch
  _merge(config, grid.classifier_overrides, 'config.classifier_overrides')
  return _with_grid_data(config, grid)


def make_cells(grid: ml_collections.ConfigDict, workdir: pathlib.Path) -> list[Cell]:
  """Every cell of the grid in run order: per row, pretraining, the protocols, kNN."""
  rows = _keys(grid.rows, grid.row, 'row')
  columns = _keys(grid.columns, grid.column, 'column')
  cells = []
  for row in rows:
    pretrained = workdir / PRETRAIN / row
    cells.append(Cell(row, PRETRAIN, pretrain_config(grid, row), pretrained))
    for column in columns + ([KNN] if grid.knn else []):
      cells.append(Cell(row, column, classifier_config(grid, row, column, pretrained),
                        workdir / 'classify' / row / column))
  return cells


# --------------------------------------------------------------------------
# Records.


def hardware() -> dict[str, Any]:
  """What ran the cells: device kind, platform and count."""
  devices = jax.devices()
  return {'device_kind': devices[0].device_kind, 'platform': devices[0].platform,
          'device_count': len(devices), 'process_count': jax.process_count()}


def git_commit() -> str | None:
  """The commit of the checkout this module lives in, or None outside git."""
  try:
    out = subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True,
                         timeout=10, check=True, cwd=pathlib.Path(__file__).resolve().parent)
  except (OSError, subprocess.SubprocessError):
    return None
  return out.stdout.strip() or None


def _comparable(config: dict[str, Any], workdir: pathlib.Path) -> str:
  """A cell's config as text, with the grid's workdir abstracted (a moved grid still matches)."""
  return json.dumps(config, sort_keys=True).replace(str(workdir.absolute()), '<workdir>')


def read_results(workdir: str | pathlib.Path) -> dict[str, Any]:
  """The ``results.json`` of a grid (``{'cells': {}}`` when there is none yet)."""
  path = pathlib.Path(workdir) / RESULTS_JSON
  return json.loads(path.read_text()) if path.exists() else {'cells': {}}


def write_atomically(path: pathlib.Path, text: str) -> None:
  """Replaces ``path`` with ``text`` in one step."""
  tmp = path.with_name(path.name + '.tmp')
  tmp.write_text(text)
  os.replace(tmp, path)  # a reader never sees half a file, a crash never leaves one


# --------------------------------------------------------------------------
# Running.


def _run_cell(cell: Cell, overwrite: bool) -> dict[str, float]:
  timing.start_run()
  if cell.stage == PRETRAIN:
    return pretrain.train_and_evaluate(cell.config, cell.workdir, overwrite=overwrite)
  return classify.train_and_evaluate(cell.config, cell.workdir, overwrite=overwrite)


def _check_data(grid: ml_collections.ConfigDict) -> None:
  """Loads both splits once, so a missing data set stops the grid before any cell."""
  ip.load_split(grid.data, grid.data.train_split)
  ip.load_split(grid.data, grid.data.eval_split)


def run_grid(grid: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
             overwrite: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
  """Runs every unfinished cell of ``grid`` and writes the results and the report.

  Args:
    grid: a ``configs/reproduce.py`` config.
    workdir: the grid's directory; rerunning with it skips finished cells.
    overwrite: passed to each cell (replace a run of another config in its workdir).
    log: where progress lines go.

  Returns:
    The content of ``results.json``: ``{'grid', 'cells': {'<row>/<column>': record}}``.

  Raises:
    UserError: the grid's config is wrong or its data cannot be loaded.
  """
  workdir = paths.user_path(workdir, 'workdir')
  paths.resolve_data_paths(grid.data)
  cells = make_cells(grid, workdir)
  _check_data(grid)
  workdir.mkdir(parents=True, exist_ok=True)
  results = read_results(workdir)
  results['grid'] = grid.to_dict()
  commit, device = git_commit(), hardware()
  for i, cell in enumerate(cells):
    config = json.loads(cell.config.to_json())
    done = results['cells'].get(cell.key)
    head = f'[{i + 1}/{len(cells)}] {cell.key}'
    if (done and done['status'] == 'ok'
        and _comparable(done['config'], workdir) == _comparable(config, workdir)):
      log(f'{head}: finished before, skipped')
      continue
    pretrained = results['cells'].get(f'{cell.row}/{PRETRAIN}', {})
    record = {'row': cell.row, 'column': cell.column, 'stage': cell.stage,
              'workdir': str(cell.workdir.relative_to(workdir)), 'config': config,
              'hardware': device, 'git_commit': commit, 'metrics': {}, 'error': None}
    start = time.perf_counter()
    if cell.column != PRETRAIN and not cell.config.from_scratch and (
        pretrained.get('status') != 'ok'):
      record.update(status='failed', error='not run: the pretraining of this row failed.')
    else:
      log(f'{head}: running in {cell.workdir}')
      try:
        record.update(status='ok', metrics=_run_cell(cell, overwrite))
      except trainer.Interrupted:
        raise  # SIGINT/SIGTERM: stop the grid; the cell resumes on the next run
      except Exception as e:  # noqa: BLE001 (one broken cell must not stop the others)
        text = str(e) if isinstance(e, UserError) else traceback.format_exc()
        record.update(status='failed', error=f'{type(e).__name__}: {text}'.strip())
    record['wall_s'] = round(time.perf_counter() - start, 3)
    record['finished'] = time.strftime('%Y-%m-%dT%H:%M:%S')
    results['cells'][cell.key] = record
    log(f'{head}: {record["status"]} {_brief(record)} ({record["wall_s"]:.1f} s)')
    if jax.process_index() == 0:
      write_atomically(workdir / RESULTS_JSON, json.dumps(results, indent=1) + '\n')
      write_atomically(workdir / RESULTS_MD, results_markdown(grid, results))
  if jax.process_index() == 0:
    write_atomically(workdir / RESULTS_JSON, json.dumps(results, indent=1) + '\n')
    write_atomically(workdir / RESULTS_MD, results_markdown(grid, results))
  write_report(grid, results, workdir)  # every process: the strips read checkpoints together
  return results


def _brief(record: dict[str, Any]) -> str:
  if record['status'] != 'ok':
    return record['error'].strip().splitlines()[-1][:200]
  return ', '.join(f'{k} {v:.4g}' for k, v in record['metrics'].items())


# --------------------------------------------------------------------------
# Reporting.


def _fmt(value: float | None) -> str:
  return '—' if value is None else f'{value:.3f}'.replace('0.', '.', 1)


def _metric(results: dict[str, Any], key: str, name: str) -> float | str | None:
  """A cell's metric, ``'failed'`` for a failed cell, None for one not run."""
  record = results['cells'].get(key)
  if record is None:
    return None
  return record['metrics'].get(name) if record['status'] == 'ok' else 'failed'


def results_markdown(grid: ml_collections.ConfigDict, results: dict[str, Any]) -> str:
  """``results.md``: the study's table, ours with the reference's in parentheses."""
  rows = _keys(grid.rows, grid.row, 'row')
  columns = _keys(grid.columns, grid.column, 'column')
  head = ['', *(grid.column[c].label for c in columns)]
  head += ['kNN'] * grid.knn + ['PSNR (dB)', 'masked PSNR (dB)']
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for row in rows:
    cells = [grid.row[row].label]
    for column in columns:
      value = _metric(results, f'{row}/{column}', 'eval/accuracy')
      ref = grid.row[row].reference.get(column)
      text = value if isinstance(value, str) else _fmt(value)
      cells.append(text + (f' ({_fmt(ref)})' if ref is not None else ''))
    if grid.knn:
      value = _metric(results, f'{row}/{KNN}', 'eval/knn_accuracy')
      cells.append(value if isinstance(value, str) else _fmt(value))
    for name in ('eval/psnr', 'eval/masked_psnr'):  # the latter only for masking models
      psnr = _metric(results, f'{row}/{PRETRAIN}', name)
      cells.append(psnr if isinstance(psnr, str) else '—' if psnr is None else f'{psnr:.2f}')
    lines.append('| ' + ' | '.join(cells) + ' |')

  records = list(results['cells'].values())
  data = grid.data
  where = {r['hardware']['device_kind'] for r in records} or {'—'}
  commits = {str(r['git_commit'])[:12] for r in records} or {'—'}
  text = [
      '# Results', '',
      f'Top-1 accuracy on `{data.source}` {data.eval_split} (trained on {data.train_split}); '
      'in parentheses the reference study\'s CIFAR-100 test top-1 (reference/SEED.md). '
      'kNN: weighted k-nearest-neighbour top-1 of the encoder\'s features; PSNR: '
      'reconstruction of the held-out images by the autoencoder (a masking model keeps the '
      'visible pixels of its input); masked PSNR: the removed pixels alone, for the masking '
      'models. — : not run (yet), or no such number.', '',
      *lines, '',
      f'Cells: {sum(r["status"] == "ok" for r in records)} finished, '
      f'{sum(r["status"] != "ok" for r in records)} failed; '
      f'{sum(r["wall_s"] for r in records) / 60:.1f} min of runs on {", ".join(sorted(where))}; '
      f'commit {", ".join(sorted(commits))}. Every cell\'s config and metrics: results.json.',
  ]
  failed = [(k, r) for k, r in results['cells'].items() if r['status'] != 'ok']
  if failed:
    text += ['', '## Failed cells', '']
    text += [f'- `{k}`: {r["error"].strip().splitlines()[-1]}' for k, r in failed]
  return '\n'.join(text) + '\n'


def reconstruction_strip(pretrain_dir: pathlib.Path, count: int) -> tuple[np.ndarray, np.ndarray]:
  """The first ``count`` held-out images and their reconstructions, ``[K, 32, 32, 3]`` in [-1, 1].

  Rebuilt from the row's best checkpoint (the MAE keeps its visible patches, as
  in its own ``reconstructions.png``), and cached in the row's workdir. In a
  run of several processes every process calls it, and process 0 writes the cache.
  """
  cache = pretrain_dir / STRIP_FILE
  if cache.exists():
    with np.load(cache) as f:
      return f['original'], f['reconstruction']
  _, _, meta, params = checkpoint.restore_encoder_source(pretrain_dir)
  config = checkpoint.config_from_meta(meta)
  # Portable choices (the written-out attention): the strip is computed wherever
  # the grid runs, whatever the row's pretraining ran on.
  model = models.build_autoencoder({k: v for k, v in config.model.items() if k != 'attention'})
  images = ip.load_split(config.data, config.data.eval_split).images[:count]
  rows = jax.device_get(pretrain.reconstruction_program(config, model)(params, images))
  original, shown = np.asarray(rows['original']), np.asarray(rows['reconstruction'], np.float32)
  # The cache appears only after every process has looked for it: all of them
  # then agree to restore the checkpoint, which orbax does with all of them.
  distributed.barrier(f'strip computed: {cache}')
  if jax.process_index() == 0:
    tmp = cache.with_name(f'{STRIP_FILE}.tmp')
    with tmp.open('wb') as f:
      np.savez(f, original=original, reconstruction=shown)
    os.replace(tmp, cache)
  return original, shown


def write_report(grid: ml_collections.ConfigDict, results: dict[str, Any],
                 workdir: pathlib.Path) -> None:
  """``report.png``: grouped accuracy bars and one reconstruction strip per encoder.

  Every process of a run calls it (see :func:`reconstruction_strip`); process 0 writes.
  """
  rows = _keys(grid.rows, grid.row, 'row')
  columns = _keys(grid.columns, grid.column, 'column')
  groups = [grid.column[c].label for c in columns] + ['kNN'] * grid.knn
  keys = columns + [KNN] * grid.knn
  bars, references, strips = {}, {}, []
  for row in rows:
    label = grid.row[row].label
    values = [_metric(results, f'{row}/{k}', 'eval/knn_accuracy' if k == KNN else
                      'eval/accuracy') for k in keys]
    bars[label] = [v if isinstance(v, float) else None for v in values]
    references[label] = [grid.row[row].reference.get(k) for k in keys]
    if results['cells'].get(f'{row}/{PRETRAIN}', {}).get('status') == 'ok':
      try:
        original, shown = reconstruction_strip(workdir / PRETRAIN / row, grid.strip_size)
      except Exception as e:  # noqa: BLE001 (a picture must not lose the table)
        print(f'no reconstruction strip for {row}: {e}', flush=True)
        continue
      if not strips:
        strips.append(('original', original))
      strips.append((label, shown))
  if jax.process_index() == 0:
    report.plot_study(groups, bars, references, strips, workdir / REPORT_PNG)


# --------------------------------------------------------------------------
# Command line (flags are defined only when run as a program, so importing
# this module next to another program's flags is harmless).


def exit_if_failed(results: dict[str, Any]) -> None:
  """Says which cells failed and exits 1, when some did."""
  failed = sorted(k for k, r in results['cells'].items() if r['status'] != 'ok')
  if failed:
    print(f'{len(failed)} of {len(results["cells"])} cells failed ({", ".join(failed)}); '
          'their errors are in results.md. Rerun the same command to retry them.', flush=True)
    raise SystemExit(1)


def main(argv: list[str]) -> None:
  """Runs the grid of ``--config`` in ``--workdir``; exits 1 when a cell failed."""
  from absl import flags  # noqa: PLC0415

  from mil_jax import cli  # noqa: PLC0415
  grid = flags.FLAGS.config
  if grid is None:
    cli.fail('no config given; pass --config configs/reproduce.py:seed|quick|cpu|runlocal.')
  workdir = paths.user_path(flags.FLAGS.workdir or 'runs/reproduce', 'workdir')
  results = run_grid(grid, workdir, overwrite=flags.FLAGS.overwrite)
  print(f'results: {workdir / RESULTS_MD}, {workdir / RESULTS_JSON}, {workdir / REPORT_PNG}')
  exit_if_failed(results)


if __name__ == '__main__':
  from mil_jax import cli

  cli.define_run_flags(None, 'The grid and its variant, e.g. configs/reproduce.py:quick.',
                       'Where the grid\'s cells and results go (default: runs/reproduce).')
  cli.run(main, kind='grid')
