"""Where a run's wall time goes: each epoch split into phases, and the start-up.

Every epoch record of ``metrics.jsonl`` carries ``time/epoch_s`` and its
parts ``time/train_s`` (dispatching the training steps and waiting for them),
``time/eval_s``, ``time/checkpoint_s`` and ``time/other_s`` (all the rest:
logging, the progress bar, the epoch's permutation); the parts add up to the
epoch. An epoch's clock runs from the end of the previous epoch's record to
the writing of its own, so the epochs of a run cover it without gaps.
"""
from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

PHASES = ('train', 'eval', 'checkpoint')
DIGITS = 4  # seconds are recorded to 0.1 ms

_IMPORTED = time.monotonic()


def process_age() -> float:
  """Seconds since this process started.

  On Linux from the kernel's record of the start (10 ms resolution), so the
  interpreter's start-up and the imports count too; elsewhere since this module
  was imported.
  """
  try:
    with open(f'/proc/{os.getpid()}/stat') as f:
      # Field 22, start time in clock ticks since boot; the command name (field
      # 2) may hold spaces, hence the split after its closing parenthesis.
      ticks = int(f.read().rsplit(')', 1)[1].split()[19])
    return time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf('SC_CLK_TCK')
  except (OSError, ValueError, IndexError, AttributeError):
    return time.monotonic() - _IMPORTED


_run_started: float | None = None


def start_run() -> None:
  """Marks the start of one run among several in this process (a cell of the
  study grid or of a sweep): its start-up counts from here."""
  global _run_started
  _run_started = time.monotonic()


def startup_age() -> float:
  """Seconds since the current run started: since :func:`start_run` where a
  process runs several, else since the process started (see :func:`process_age`)."""
  if _run_started is None:
    return process_age()
  return time.monotonic() - _run_started


class PhaseClock:
  """Times the phases of each epoch; what no phase claims is ``other``.

  ``with clock.phase('eval'): ...`` adds the block's wall time to that phase of
  the current epoch; ``lap()`` ends the epoch, returns its record and starts
  the next. ``totals`` sums the laps, for the run's closing line.
  """

  def __init__(self):
    self._start = time.perf_counter()
    self._spent = dict.fromkeys(PHASES, 0.0)
    self.totals = dict.fromkeys(('epoch', *PHASES, 'other'), 0.0)

  @contextlib.contextmanager
  def phase(self, name: str) -> Iterator[None]:
    """Counts the wall time of the ``with`` block as ``name`` (one of ``PHASES``)."""
    t0 = time.perf_counter()
    try:
      yield
    finally:
      self._spent[name] += time.perf_counter() - t0

  def lap(self) -> dict[str, float]:
    """``{'time/epoch_s', 'time/train_s', 'time/eval_s', 'time/checkpoint_s', 'time/other_s'}``
    of the epoch that ends now; the next one starts."""
    now = time.perf_counter()
    parts = {name: round(s, DIGITS) for name, s in self._spent.items()}
    epoch = round(now - self._start, DIGITS)
    # Rounded from the rounded parts, so that they add up to the epoch exactly.
    parts['other'] = round(epoch - sum(parts.values()), DIGITS)
    for name, s in {'epoch': epoch, **parts}.items():
      self.totals[name] += s
    self._start, self._spent = now, dict.fromkeys(PHASES, 0.0)
    return {f'time/{name}_s': s for name, s in {'epoch': epoch, **parts}.items()}


def breakdown(totals: dict[str, float], startup_s: float, epochs: int) -> str:
  """The run's closing line: the start-up, then the epochs' time by phase, e.g.

  ``time: start-up 4.2 s (to the first step, compiling included); 2 epochs
  10.0 s: train 9.0 s (90%), eval 0.5 s (5%), checkpoint 0.2 s (2%), other 0.3 s (3%)``
  """
  whole = max(totals['epoch'], 1e-9)
  parts = ', '.join(f'{name} {totals[name]:.1f} s ({100 * totals[name] / whole:.0f}%)'
                    for name in (*PHASES, 'other'))
  return (f'time: start-up {startup_s:.1f} s (to the first step, compiling included); '
          f'{epochs} epoch{"s" if epochs != 1 else ""} {totals["epoch"]:.1f} s: {parts}')
