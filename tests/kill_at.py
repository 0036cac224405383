"""Runs a training command and SIGKILLs it at one named point (for test_interrupt.py).

  python tests/kill_at.py chunk:3 train_pretrain.py --config ...   # in the chunk from step 3
  python tests/kill_at.py saved:8 train_pretrain.py ...     # once checkpoint 8 is complete
  python tests/kill_at.py saving:11 train_pretrain.py ...   # while checkpoint 11 is written

``chunk:S`` dispatches the train call that starts at step S (its steps run on
the devices) and kills the process before that call returns its result, once
any save still in flight is complete, so that what is on disk does not depend
on timing. ``saved:S`` kills once the checkpoint of step S is complete;
``saving:S`` as soon as the asynchronous save of step S has started, before
orbax renames its temporary directory. Everything up to that point is the
real command: only ``checkpoint.save`` and ``Trainer.train_chunk`` are
wrapped, here, never in the library.
"""
from __future__ import annotations

import os
import runpy
import signal
import sys

from mil_jax import checkpoint, trainer

POINTS = ('chunk', 'saved', 'saving')
_managers = []  # every checkpoint manager a save went through


def _kill() -> None:
  sys.stdout.flush()
  os.kill(os.getpid(), signal.SIGKILL)


def _wrap_train_chunk(at: int) -> None:
  original_init = trainer.Trainer.__init__

  def init(self, *args, **kwargs):
    original_init(self, *args, **kwargs)
    train_chunk = self.train_chunk

    def chunk(state, *rest):
      start = int(state.step)  # read before the call donates the state
      out = train_chunk(state, *rest)
      if start == at:
        for mngr in _managers:
          mngr.wait_until_finished()
        _kill()
      return out

    self.train_chunk = chunk

  trainer.Trainer.__init__ = init


def _wrap_save(at: int | None, wait: bool) -> None:
  original_save = checkpoint.save

  def save(mngr, step, **kwargs):
    original_save(mngr, step, **kwargs)
    if mngr not in _managers:
      _managers.append(mngr)
    if step == at:
      if wait:
        mngr.wait_until_finished()
      _kill()

  checkpoint.save = save


def main() -> None:
  spec, script, *args = sys.argv[1:]
  point, _, at = spec.partition(':')
  if point not in POINTS or not at.isdigit():
    raise SystemExit(f'usage: kill_at.py {{{"|".join(POINTS)}}}:STEP SCRIPT [ARGS...]')
  if point == 'chunk':
    _wrap_train_chunk(int(at))
  _wrap_save(None if point == 'chunk' else int(at), wait=point == 'saved')
  sys.argv = [script, *args]
  try:
    runpy.run_path(script, run_name='__main__')
  except SystemExit as e:
    if e.code not in (0, None):
      raise
  raise SystemExit(f'{script} finished without reaching {spec}')


if __name__ == '__main__':
  main()
