r"""mil_jax's training steps against the reference's, timed alternately.

On a shared machine either program's speed moves from minute to minute, so
the two are never compared from separate runs: each round times every
configuration with ``python -m mil_jax.bench`` and with
``benchmarks/torch_reference.py`` one right after the other (which goes first
alternates from round to round), and the summary compares the medians over
the rounds. It needs PyTorch for the reference (``pip install torch``).

  python benchmarks/side_by_side.py                          # the CPU reference set, 3 rounds
  python benchmarks/side_by_side.py --config fc:128 --rounds 9
  python benchmarks/side_by_side.py --out rounds.jsonl       # keep every record

Every record is printed as a JSON line as it comes (with ``impl`` and
``round``), then a Markdown table: each round's images/s, the ratio of each
round (mil_jax over the reference), the ratio of the medians, and the target
of docs/performance.md ("Against the PyTorch reference").
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence

ROOT = pathlib.Path(__file__).resolve().parent.parent

# (model, batch): the CPU reference set, with mil_jax's target ratio over the
# reference step (docs/performance.md).
TARGETS = {('fc', 128): 1.8, ('conv:192', 32): 1.8, ('conv:192', 128): 1.0,
           ('conv:256', 32): 1.8, ('mae:seed', 128): 1.0}
# The MAE's step takes seconds: longer windows so each holds several steps.
SECONDS = {'mae:seed': 4.0}

Runner = Callable[[Sequence[str]], dict]


class UsageError(Exception):
  """A mistake in the command line, reported in one sentence."""


def parse_config(text: str) -> tuple[str, int]:
  """``'conv:192:32'`` -> ``('conv:192', 32)``: the model spec, then the batch."""
  model, _, batch = text.rpartition(':')
  if not model or not batch.isdigit() or int(batch) < 1:
    raise UsageError(f'--config takes MODEL:BATCH such as fc:128 or conv:192:32, got {text!r}.')
  return model, int(batch)


def commands(model: str, batch: int, seconds: float, windows: int,
             threads: int) -> dict[str, list[str]]:
  """The two timing commands of one configuration, by implementation."""
  common = ['--model', model, '--batch', str(batch), '--seconds', str(seconds),
            '--windows', str(windows)]
  return {'mil_jax': [sys.executable, '-m', 'mil_jax.bench', *common],
          'torch': [sys.executable, str(ROOT / 'benchmarks' / 'torch_reference.py'), *common,
                    '--threads', str(threads)]}


def run_json(cmd: Sequence[str]) -> dict:
  """Runs one timing command from the repository root; its last JSON line."""
  out = subprocess.run(list(cmd), cwd=ROOT, text=True, capture_output=True, check=False)
  lines = [ln for ln in out.stdout.splitlines() if ln.startswith('{')]
  if out.returncode or not lines:
    tail = (out.stderr.strip().splitlines() or ['no output'])[-1]
    raise RuntimeError(f'{" ".join(cmd[1:3])} ... failed (exit {out.returncode}): {tail}')
  return json.loads(lines[-1])


def run_rounds(configs: Sequence[tuple[str, int]], rounds: int, *, seconds: float,
               windows: int, threads: int, run: Runner = run_json,
               emit: Callable[[dict], None] = lambda record: None) -> list[dict]:
  """Times every configuration with both implementations, ``rounds`` times.

  Returns:
    every record, each with ``impl`` ('mil_jax' | 'torch'), ``round``,
    ``model`` and ``batch`` set.
  """
  records = []
  for r in range(rounds):
    for model, batch in configs:
      cmds = commands(model, batch, SECONDS.get(model, seconds), windows, threads)
      order = ('mil_jax', 'torch') if r % 2 == 0 else ('torch', 'mil_jax')
      for impl in order:
        record = {**run(cmds[impl]), 'impl': impl, 'round': r, 'model': model, 'batch': batch}
        records.append(record)
        emit(record)
  return records


def summarize(records: Sequence[dict]) -> list[dict]:
  """One row per configuration: images/s per round, ratios and ratio of medians."""
  rows = {}
  for rec in records:
    row = rows.setdefault((rec['model'], rec['batch']), {'mil_jax': {}, 'torch': {}})
    row[rec['impl']][rec['round']] = rec['images_per_s']
  out = []
  for (model, batch), row in rows.items():
    rounds = sorted(set(row['mil_jax']) & set(row['torch']))
    ours = [row['mil_jax'][r] for r in rounds]
    ref = [row['torch'][r] for r in rounds]
    out.append({
        'model': model, 'batch': batch, 'mil_jax': ours, 'torch': ref,
        'ratios': [a / b for a, b in zip(ours, ref)],
        'ratio_of_medians': statistics.median(ours) / statistics.median(ref),
        'target': TARGETS.get((model, batch)),
    })
  return out


def markdown(rows: Sequence[dict]) -> str:
  """The summary as the table of docs/performance.md."""
  def figures(values, fmt):
    return ' / '.join(fmt.format(v) for v in values)

  lines = ['| config | mil_jax | PyTorch reference | ratio | ratio of medians | target |',
           '| --- | --- | --- | --- | --- | --- |']
  for row in rows:
    fmt = '{:,.1f}' if max(row['mil_jax'] + row['torch'], default=0) < 100 else '{:,.0f}'
    target = row['target']
    cells = [f"{row['model']} b{row['batch']}", figures(row['mil_jax'], fmt),
             figures(row['torch'], fmt), figures(row['ratios'], '{:.2f}x'),
             f"{row['ratio_of_medians']:.2f}x",
             '-' if target is None else f'{target:g}x']
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', action='append', metavar='MODEL:BATCH',
                      help='a configuration, e.g. fc:128 or conv:192:32; repeat for several '
                           '(default: the CPU reference set)')
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--seconds', type=float, default=2.0,
                      help='length of each timed window (the MAE takes 4)')
  parser.add_argument('--windows', type=int, default=3)
  parser.add_argument('--threads', type=int, default=2, help="the reference's torch threads")
  parser.add_argument('--out', type=pathlib.Path, help='append every record to this JSONL file')
  args = parser.parse_args(argv)
  try:
    configs = [parse_config(c) for c in args.config] if args.config else list(TARGETS)
    if args.rounds < 1 or args.windows < 1 or args.seconds <= 0:
      raise UsageError('--rounds and --windows take 1 or more, --seconds a positive number.')
    if args.out and not args.out.parent.is_dir():
      raise UsageError(f'--out: the folder {args.out.parent} does not exist.')
    try:
      import torch  # noqa: F401, PLC0415
    except ImportError:
      raise UsageError('the reference step needs PyTorch: pip install torch') from None
  except UsageError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2

  def emit(record):
    line = json.dumps(record)
    print(line, flush=True)
    if args.out:
      with args.out.open('a') as f:
        f.write(line + '\n')

  try:
    records = run_rounds(configs, args.rounds, seconds=args.seconds, windows=args.windows,
                         threads=args.threads, emit=emit)
  except RuntimeError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(markdown(summarize(records)))
  return 0


if __name__ == '__main__':
  sys.exit(main())
