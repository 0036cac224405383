"""Where a run's time goes: the epoch's phases and the process's age."""
import subprocess
import sys
import time

import pytest

from mil_jax import timing

from .conftest import ROOT


def test_phases_add_up_to_the_epoch_and_the_rest_is_other(monkeypatch):
  now = iter([0.0,             # the clock starts
              1.0, 3.0,        # train
              3.0, 3.5,        # eval
              4.0, 4.25,       # checkpoint
              5.0,             # first lap
              6.0, 8.5,        # train
              9.0])            # second lap
  monkeypatch.setattr(timing.time, 'perf_counter', lambda: next(now))
  clock = timing.PhaseClock()
  for name in ('train', 'eval', 'checkpoint'):
    with clock.phase(name):
      pass
  assert clock.lap() == {'time/epoch_s': 5.0, 'time/train_s': 2.0, 'time/eval_s': 0.5,
                         'time/checkpoint_s': 0.25, 'time/other_s': 2.25}
  with clock.phase('train'):
    pass
  assert clock.lap() == {'time/epoch_s': 4.0, 'time/train_s': 2.5, 'time/eval_s': 0.0,
                         'time/checkpoint_s': 0.0, 'time/other_s': 1.5}
  assert clock.totals == {'epoch': 9.0, 'train': 4.5, 'eval': 0.5, 'checkpoint': 0.25,
                          'other': 3.75}


def test_a_phase_that_raises_still_counts(monkeypatch):
  now = iter([0.0, 1.0, 2.5, 3.0])
  monkeypatch.setattr(timing.time, 'perf_counter', lambda: next(now))
  clock = timing.PhaseClock()
  with pytest.raises(KeyError), clock.phase('checkpoint'):
    raise KeyError('x')
  assert clock.lap()['time/checkpoint_s'] == 1.5


def test_process_age_counts_from_the_start_of_the_process():
  script = 'import time; time.sleep(0.6); from mil_jax import timing; print(timing.process_age())'
  t0 = time.monotonic()
  out = subprocess.run([sys.executable, '-c', script], cwd=ROOT, capture_output=True, text=True,
                       check=True, env={'PYTHONPATH': str(ROOT)})
  wall = time.monotonic() - t0
  age = float(out.stdout)
  assert 0.6 <= age <= wall + 0.02  # the kernel's start time has 10 ms ticks
