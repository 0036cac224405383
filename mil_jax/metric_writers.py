"""Where metrics go: ``metrics.jsonl`` (one JSON object per line) and TensorBoard.

Only process 0 writes, so a multi-host run leaves one copy.
"""
from __future__ import annotations

import json
import math
import pathlib
from typing import Any

import jax


class MetricWriter:
  """Appends ``{'step', 'epoch', 'train/loss', ...}`` records to both sinks."""

  def __init__(self, workdir: str | pathlib.Path):
    self._active = jax.process_index() == 0
    self._path = pathlib.Path(workdir) / 'metrics.jsonl'
    self._tb = None
    if self._active:
      from tensorboardX import SummaryWriter  # Imported here: slow, and process 0 only.
      self._tb = SummaryWriter(str(workdir), flush_secs=30)

  def write(self, step: int, epoch: float, metrics: dict[str, Any]) -> None:
    if not self._active:
      return
    record = {'step': int(step), 'epoch': float(epoch)}
    record.update({k: _plain(v) for k, v in metrics.items()})
    with self._path.open('a') as f:
      f.write(json.dumps(record) + '\n')
    for name, value in record.items():
      if name not in ('step', 'epoch') and isinstance(value, float) and math.isfinite(value):
        self._tb.add_scalar(name, value, int(step))

  def drop_after(self, step: int) -> None:
    """Removes the records of steps after ``step``: a run resumed from the
    checkpoint of ``step`` logs them again (a run starting at 0, all of them)."""
    if not self._active or not self._path.exists():
      return
    lines = self._path.read_text().splitlines(keepends=True)
    kept = [ln for ln in lines if not ln.strip() or _step_of(ln) <= step]
    if len(kept) != len(lines):
      tmp = self._path.with_suffix('.jsonl.tmp')
      tmp.write_text(''.join(kept))
      tmp.replace(self._path)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _step_of(line: str) -> float:
  try:
    return json.loads(line)['step']
  except (ValueError, KeyError, TypeError):
    return float('inf')  # a line cut short by a kill: dropped with the steps after it


def _plain(value: Any) -> Any:
  try:
    return float(value)
  except (TypeError, ValueError):
    return value


def read_metrics(workdir: str | pathlib.Path) -> list[dict[str, Any]]:
  """All records of ``workdir/metrics.jsonl`` (empty when there is none)."""
  path = pathlib.Path(workdir) / 'metrics.jsonl'
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
