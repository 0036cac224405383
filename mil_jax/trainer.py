"""The one training loop both stages share: jitted steps, evaluation, checkpoints.

A stage (pretraining, classification) supplies two pure functions over a batch
of uint8 images gathered on the device, and the trainer does the rest:

  ``loss_fn(params, model_state, images, labels, rngs)
      -> (loss, (metrics, new_model_state))``: the training objective of one
      batch; ``rngs`` a dict of named keys (``'dropout'``, ``'masking'``,
      ``'augment'``); ``model_state`` the model's non-trained collections
      (``{'batch_stats': ...}``, or ``{}``).
  ``eval_fn(params, model_state, images, labels, rng)
      -> {name: [B] per-example values}``: the validation metrics; the trainer
      averages them over every example.

Steps run ``steps_per_dispatch`` at a time under ``lax.scan`` in one jitted
call that donates the state; the batch of step ``t`` comes from the epoch
permutation of ``(seed, t // steps_per_epoch)`` and its randomness from
``fold_in(key(seed), t)``, so a resumed run repeats an uninterrupted one.
Metrics reach the host one call late at logging steps, in full at saves and epoch ends.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import pathlib
import sys
import time
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm
from jax.experimental import multihost_utils

from mil_jax import checkpoint, distributed, optim, sharding, timing, tuning
from mil_jax import input_pipeline as ip
from mil_jax.errors import Interrupted, UserError
from mil_jax.metric_writers import MetricWriter
from mil_jax.progress import Progress

RNG_STREAMS = ('dropout', 'masking', 'augment')
# Folded into a run's seed for validation's randomness (the MAE's masks), so
# that every evaluation of the same params sees the same masks.
EVAL_KEY = 0x5EED
LossFn = Callable[[Any, Any, jax.Array, jax.Array, dict[str, jax.Array]],
                  tuple[jax.Array, tuple[dict[str, jax.Array], Any]]]
EvalFn = Callable[[Any, Any, jax.Array, jax.Array, jax.Array], dict[str, jax.Array]]


class TrainingDiverged(UserError):
  """The loss became NaN or infinite."""


class InFlight:
  """Bounds how far the host runs ahead of the devices.

  ``add`` takes the outputs of a dispatched call and waits until at most
  ``limit`` calls are unfinished (0: no bound), so the host still queues the
  next call while the devices run the current one. The bound is
  ``speed.max_in_flight``: on a CPU, an unbounded queue (the host dispatching
  a whole epoch of small calls ahead) deadlocked XLA:CPU's in-process
  all-reduce between CPU devices.
  """

  def __init__(self, limit: int = tuning.CPU_MAX_IN_FLIGHT,
               wait: Callable[[Any], Any] = jax.block_until_ready):
    self.limit, self._wait = limit, wait
    self._queue: collections.deque[Any] = collections.deque()

  def add(self, outputs: Any) -> None:
    """Records the outputs of one dispatched call; blocks on the oldest beyond ``limit``."""
    self._queue.append(outputs)
    while self.limit and len(self._queue) > self.limit:
      self._wait(self._queue.popleft())


@flax.struct.dataclass
class TrainState:
  """What a step changes: step counter, parameters, optimizer and model state."""
  step: jax.Array
  params: Any
  opt_state: Any
  model_state: Any  # non-trained collections, e.g. {'batch_stats': ...}; {} for most models


def eval_rng(seed: int) -> jax.Array:
  """The key of a run's validation (and of anything shown from it)."""
  return jax.random.fold_in(jax.random.key(seed), EVAL_KEY)


def init_variables(module: Any, seed: int, mesh: jax.sharding.Mesh) -> dict[str, Any]:
  """``module.init`` on one image, created directly replicated on ``mesh``: params
  from ``key(seed)``, any other stream the init draws from (the MAE's masks) from
  ``key(seed + 1)``."""
  rngs = {'params': jax.random.key(seed), 'masking': jax.random.key(seed + 1),
          'dropout': jax.random.key(seed + 1)}
  dummy = jnp.zeros((1, *ip.IMAGE_SHAPE), jnp.float32)
  return jax.jit(lambda: module.init(rngs, dummy, train=False),
                 out_shardings=sharding.replicated(mesh))()


def step_rngs(seed: int, step: jax.Array) -> dict[str, jax.Array]:
  """The named keys of one step: a function of ``(seed, step)`` only."""
  rng = jax.random.fold_in(jax.random.key(seed), step)
  return {name: jax.random.fold_in(rng, i) for i, name in enumerate(RNG_STREAMS)}


@dataclasses.dataclass
class Trainer:
  """Trains ``params`` with ``tx`` on ``train_data``, evaluating on ``eval_data``.

  Attributes:
    config: the run config (its loop fields: ``seed``, ``batch_size``,
      ``num_epochs``, ``steps_per_dispatch``, ``log_every_steps``,
      ``eval_every_epochs``, ``checkpoint_every_secs``, ``checkpoint_every_steps``).
    mesh: the device mesh; batches are split over its ``'data'`` axis.
    loss_fn, eval_fn: see the module docstring.
    tx, schedule: the optimizer and its learning rate per step.
    train_data, eval_data: the splits, already on the devices.
    speed: how the steps are computed (``tuning.resolve``); None: the
      config's ``speed`` block resolved here for ``mesh``.
  """
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  loss_fn: LossFn
  eval_fn: EvalFn
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  train_data: ip.DeviceSplit
  eval_data: ip.DeviceSplit
  speed: tuning.Speed | None = None

  def __post_init__(self):
    cfg = self.config
    sharding.check_batch_size(cfg.batch_size, self.mesh)
    self.steps_per_epoch = ip.steps_per_epoch(len(self.train_data), cfg.batch_size)
    if self.steps_per_epoch < 1:
      raise UserError(f'the training split has {len(self.train_data)} examples, fewer than '
                      f'one batch of {cfg.batch_size}; lower --config.batch_size.')
    self.total_steps = self.steps_per_epoch * cfg.num_epochs
    self.trained = False  # set by run()
    if self.speed is None:
      self.speed = tuning.resolve(
          {**cfg.get('speed', {}), 'devices': self.mesh.size},
          batch_size=cfg.batch_size, steps_per_dispatch=cfg.steps_per_dispatch,
          architecture=cfg.get('model', {}).get('name', 'head'))
    repl = sharding.replicated(self.mesh)
    self._batch_sharding = sharding.batch_sharded(self.mesh)
    # The blocked sum of squares is XLA:CPU's fast form of the norm (optim.global_norm).
    self._grad_norm = optim.global_norm if self.speed.backend == 'cpu' else optax.global_norm
    options = self.speed.compiler_options()
    # The programs; ``train_chunk`` and ``evaluate_fn`` call them (and may be
    # wrapped, by a benchmark, say), ``check_programs`` traces them.
    self._train_program = jax.jit(self._train_chunk, static_argnums=3, donate_argnums=0,
                                  in_shardings=(repl, repl, repl), out_shardings=repl,
                                  compiler_options=options)
    self._eval_program = jax.jit(self._evaluate, out_shardings=repl, compiler_options=options)
    self.train_chunk = self._train_program
    self.evaluate_fn = self._eval_program
    self.permutation = jax.jit(self._permutation, out_shardings=repl)
    idx, valid = ip.eval_indices(len(self.eval_data), cfg.batch_size)
    self._eval_idx, self._eval_valid = sharding.put_replicated((idx, valid), self.mesh)

  # ------------------------------------------------------------------ jitted

  def init_state(self, params: Any, model_state: Any = None) -> TrainState:
    """A state at step 0, replicated over the mesh."""
    repl = sharding.replicated(self.mesh)
    opt_state = jax.jit(self.tx.init, out_shardings=repl)(params)
    return TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), repl), params=params,
                      opt_state=opt_state, model_state=model_state or {})

  def _permutation(self, step: jax.Array) -> jax.Array:
    return ip.epoch_permutation(self.config.seed, step // self.steps_per_epoch,
                                len(self.train_data))

  def train_step(self, state: TrainState, data: ip.DeviceSplit, perm: jax.Array,
                 measure_grad_norm: bool | jax.Array = True
                 ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One train step of the epoch permutation ``perm`` (pure; ``train_chunk`` jits K of them).

    ``measure_grad_norm`` False (a traced bool is fine) gives NaN for
    ``train/grad_norm`` instead of a pass over every gradient.
    """
    step_in_epoch = state.step % self.steps_per_epoch
    images, labels = ip.train_batch(data, perm, step_in_epoch, self.config.batch_size)
    images = jax.lax.with_sharding_constraint(images, self._batch_sharding)
    labels = jax.lax.with_sharding_constraint(labels, self._batch_sharding)
    rngs = step_rngs(self.config.seed, state.step)
    (loss, (metrics, model_state)), grads = jax.value_and_grad(self.loss_fn, has_aux=True)(
        state.params, state.model_state, images, labels, rngs)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = jax.lax.cond(measure_grad_norm, self._grad_norm,
                             lambda _: jnp.float32(jnp.nan), grads)
    metrics = {'train/loss': loss, 'train/grad_norm': grad_norm,
               'train/lr': jnp.asarray(self.schedule(state.step), jnp.float32), **metrics}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                      model_state=model_state), metrics

  def _train_chunk(self, state: TrainState, data: ip.DeviceSplit, perm: jax.Array,
                   num_steps: int) -> tuple[TrainState, dict[str, jax.Array]]:
    """``num_steps`` train steps in one program; metrics stacked ``[num_steps]``.

    The gradient norm is measured every ``speed.grad_norm_every`` steps,
    counted back from the last (NaN on the others): on a CPU that pass over
    every gradient is a good part of a small step. The host logs the mean over
    the steps that have it.
    """
    if num_steps == 1:
      state, metrics = self.train_step(state, data, perm)
      return state, jax.tree.map(lambda m: m[None], metrics)
    every = self.speed.grad_norm_every
    measured = ((lambda i: i == num_steps - 1) if every >= num_steps else
                (lambda i: (num_steps - 1 - i) % every == 0))
    return jax.lax.scan(lambda s, i: self.train_step(s, data, perm, measured(i)), state,
                        jnp.arange(num_steps))

  def _evaluate(self, params: Any, model_state: Any, data: ip.DeviceSplit, idx: jax.Array,
                valid: jax.Array) -> dict[str, jax.Array]:
    """Means of ``eval_fn`` over every example of ``data``, in one program."""
    rng = eval_rng(self.config.seed)

    def batch_sums(b: jax.Array) -> dict[str, jax.Array]:
      images = jax.lax.with_sharding_constraint(data.images[idx[b]], self._batch_sharding)
      labels = jax.lax.with_sharding_constraint(data.labels[idx[b]], self._batch_sharding)
      values = self.eval_fn(params, model_state, images, labels, jax.random.fold_in(rng, b))
      return {k: jnp.sum(jnp.where(valid[b], v.astype(jnp.float32), 0.0))
              for k, v in values.items()}

    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(batch_sums, 0))
    sums = jax.lax.fori_loop(0, idx.shape[0],
                             lambda b, acc: jax.tree.map(jnp.add, acc, batch_sums(b)), zeros)
    count = jnp.sum(valid)
    return {k: v / count for k, v in sums.items()}

  def evaluate(self, state: TrainState) -> dict[str, float]:
    """Validation metrics of ``state`` over the whole eval split (host floats)."""
    out = self.evaluate_fn(state.params, state.model_state, self.eval_data, self._eval_idx,
                           self._eval_valid)
    return {f'eval/{k}': float(v) for k, v in jax.device_get(out).items()}

  # ------------------------------------------------------------------ loop

  def fit(self, state: TrainState, *, writer: MetricWriter, mngr: ocp.CheckpointManager,
          meta: dict[str, Any]) -> TrainState:
    """Trains from ``state.step`` to the end of the run.

    Each epoch runs its steps (``_train_epoch``, which logs, saves the latest
    checkpoint when one is due and stops on a signal), validates when due
    (``_evaluate_epoch``), saves or keeps the best state (``_save_epoch``) and
    writes the epoch's record (``_log_epoch``).
    Stops with :class:`TrainingDiverged` on a non-finite loss without saving
    it, and with :class:`Interrupted` after saving when SIGINT/SIGTERM arrives.
    """
    requests = distributed.StopRequests()  # SIGINT/SIGTERM: one step where every process stops
    run = Progress(step=int(state.step), saved_step=int(state.step), writer=writer,
                   mngr=mngr, meta=meta, stop=[], stop_requests=requests,
                   in_flight=InFlight(self.speed.max_in_flight))
    try:
      while run.step < self.total_steps:
        state, train_loss = self._train_epoch(state, run)
        summary = {'train/loss': train_loss, **self._evaluate_epoch(state, run)}
        self._save_epoch(state, run, summary)
        self._log_epoch(run, summary)
    finally:
      requests.close()
      mngr.wait_until_finished()
    if run.startup_s is not None:
      print(timing.breakdown(run.clock.totals, run.startup_s, run.epochs), flush=True)
    return state

  def _train_epoch(self, state: TrainState, run: Progress) -> tuple[TrainState, float]:
    """The current epoch's remaining steps; returns the state and their mean loss."""
    cfg, spe = self.config, self.steps_per_epoch
    end = (run.step // spe + 1) * spe
    bar = tqdm.tqdm(total=spe, initial=run.step % spe, desc=f'epoch {end // spe}/{cfg.num_epochs}',
                    disable=None, leave=False, unit='step', file=sys.stderr)
    run.logged = (run.step, time.perf_counter())
    perm, losses = self.permutation(state.step), []
    while run.step < end:
      k = min(max(1, cfg.steps_per_dispatch), end - run.step)
      with run.clock.phase('train'):
        state, metrics = self.train_chunk(state, self.train_data, perm, k)
        run.in_flight.add(metrics)
      run.startup_s = run.startup_s or timing.startup_age()
      run.step += k
      run.pending.append((run.step, metrics))
      signum = run.stop_requests.poll()  # after every call, the same number of times everywhere
      if signum is not None and not run.stop:
        run.stop.append(signum)
      log_now = run.step // cfg.log_every_steps > (run.step - k) // cfg.log_every_steps
      save_now = bool(run.stop) or (run.step < end and self._checkpoint_due(run, log_now))
      if save_now or log_now or run.step == end:
        # A save or the epoch's end checks every loss; a log leaves the newest call running.
        losses += self._log_steps(run, bar, keep=0 if save_now or run.step == end else 1)
      if save_now:
        self._save(state, run, None, wait=bool(run.stop))
      if run.stop:
        raise Interrupted(run.stop[0], run.step)
    bar.close()
    return state, float(np.mean(losses))

  def _log_steps(self, run: Progress, bar: tqdm.tqdm, *, keep: int) -> list[float]:
    """Logs the mean metrics of the pending chunks but the newest ``keep``; returns their losses."""
    split = len(run.pending) - keep
    ready, run.pending = run.pending[:split], run.pending[split:]
    if not ready:
      return []
    step = ready[-1][0]
    with run.clock.phase('train'):  # waiting for the steps' results
      host = self._flush([metrics for _, metrics in ready], step)
    now = time.perf_counter()
    rate = (step - run.logged[0]) * self.config.batch_size / max(now - run.logged[1], 1e-9)
    means = {name: float(np.nanmean(v)) for name, v in host.items()}
    run.writer.write(step, step / self.steps_per_epoch, {**means, 'train/images_per_s': rate})
    bar.update(step - run.logged[0])
    bar.set_postfix(loss=f'{means["train/loss"]:.4g}', img_s=f'{rate:,.0f}')
    run.logged = (step, now)
    return list(host['train/loss'])

  def _checkpoint_due(self, run: Progress, log_now: bool) -> bool:
    """Whether the latest checkpoint is due: a multiple of ``checkpoint_every_steps``
    passed since the last save, or ``checkpoint_every_secs`` seconds after it (0 turns
    a bound off).
    Processes must agree to save, so with several process 0's clock decides, at logs."""
    cfg = self.config
    due = 0 < cfg.checkpoint_every_secs <= time.monotonic() - run.saved_time
    if jax.process_count() > 1:
      due = log_now and bool(multihost_utils.broadcast_one_to_all(np.bool_(due)))
    # By steps: at each multiple of checkpoint_every_steps, counted from step 0
    # and not from the last save, so a resumed run saves where an uninterrupted one does.
    every = cfg.checkpoint_every_steps
    return due or (every > 0 and run.step // every > run.saved_step // every)

  def _evaluate_epoch(self, state: TrainState, run: Progress) -> dict[str, float]:
    """Validation metrics every ``eval_every_epochs`` epochs and after the last; else ``{}``."""
    if (run.step // self.steps_per_epoch) % self.config.eval_every_epochs and (
        run.step < self.total_steps):
      return {}
    with run.clock.phase('eval'):
      return self.evaluate(state)

  def _save_epoch(self, state: TrainState, run: Progress, summary: dict[str, float]) -> None:
    """Saves at the end or when due; else keeps a best state, which the next save writes first."""
    metrics = {k: v for k, v in summary.items() if k == checkpoint.BEST_METRIC}
    loss, last = metrics.get(checkpoint.BEST_METRIC, math.nan), run.step == self.total_steps
    best = loss < run.best
    if best:
      run.best, run.kept = loss, None  # a newer best replaces a kept one
    if last or self._checkpoint_due(run, True):
      self._save(state, run, metrics or None, wait=last)
    elif best:
      with run.clock.phase('checkpoint'):  # a copy: the next call donates ``state``
        run.kept = (run.step, jax.tree.map(lambda x: x.copy(), state), metrics)

  def _log_epoch(self, run: Progress, summary: dict[str, float]) -> None:
    """The epoch's record: its metrics and where its time went (the start-up, on the last)."""
    epoch = run.step // self.steps_per_epoch
    record = {**summary, **run.clock.lap()}
    if run.step == self.total_steps:
      record['time/startup_s'] = round(run.startup_s, timing.DIGITS)
    run.writer.write(run.step, epoch, record)
    run.epochs += 1
    print(f'epoch {epoch}/{self.config.num_epochs} step {run.step}: '
          + ', '.join(f'{k} {v:.4g}' for k, v in summary.items())
          + f' ({record["time/epoch_s"]:.1f} s)', flush=True)

  def _flush(self, pending: list[dict[str, jax.Array]], step: int) -> dict[str, np.ndarray]:
    """Brings pending metrics (the last at ``step``) to the host; stops on a non-finite loss."""
    host = jax.device_get(pending)
    merged = {k: np.concatenate([np.asarray(m[k]).reshape(-1) for m in host]) for k in host[0]}
    losses = merged['train/loss']
    bad = np.flatnonzero(~np.isfinite(losses))
    if bad.size:
      first = step - len(losses) + int(bad[0]) + 1
      raise TrainingDiverged(
          f'the training loss became {losses[bad[0]]} at step {first}; nothing after the last '
          'good checkpoint was saved, so lower --config.optim.lr (or set '
          '--config.optim.grad_clip_norm) and rerun.')
    return merged

  def _save(self, state: TrainState, run: Progress, metrics: dict[str, float] | None, *,
            wait: bool = False) -> None:
    """Saves the kept best if any, then ``state``, in the background; ``wait``: until written."""
    with run.clock.phase('checkpoint'):
      for step, saved, values in [*filter(None, [run.kept]), (run.step, state, metrics)]:
        if values and not all(math.isfinite(v) for v in values.values()):
          values = None  # A NaN validation loss must not rank as "best".
        meta = {**run.meta, 'step': step, 'epoch': step / self.steps_per_epoch}
        checkpoint.save(run.mngr, step, params=saved.params, opt_state=saved.opt_state,
                        model_state=saved.model_state, meta=meta, metrics=values)
      if wait:
        run.mngr.wait_until_finished()
    run.kept, run.saved_step, run.saved_time = None, run.step, time.monotonic()

  def check_programs(self, state: TrainState) -> None:
    """Traces the train and eval programs, so that a config they reject (a loss
    the model cannot give, say) fails before any workdir is touched.

    They are traced through their ``jax.jit`` wrappers, whose trace the first
    calls then reuse: each model is traced once per run, not twice.
    """
    k = min(max(1, self.config.steps_per_dispatch), self.steps_per_epoch)
    perm = jax.ShapeDtypeStruct((len(self.train_data),), jnp.int32,
                                sharding=sharding.replicated(self.mesh))
    self._train_program.trace(state, self.train_data, perm, k)
    self._eval_program.trace(state.params, state.model_state, self.eval_data, self._eval_idx,
                           self._eval_valid)

  def run(self, state: TrainState, workdir: pathlib.Path, *, meta: dict[str, Any]
          ) -> tuple[TrainState, dict[str, float]]:
    """Trains in a claimed ``workdir`` (``workdir.claim``) from its latest checkpoint
    (or ``state``) to the end.

    Sets ``trained``: whether this call trained any step (a finished run's rerun
    does not, and need not draw its pictures again).

    Returns:
      ``(final state, final validation metrics)``.
    """
    mngr = checkpoint.manager(workdir / 'checkpoints', keep=self.config.keep_checkpoints)
    writer = MetricWriter(workdir)
    try:
      state = self.restore_latest(state, mngr, workdir)
      step = int(state.step)
      self.trained = step < self.total_steps
      writer.drop_after(step)  # records of steps the resumed run does again
      if step >= self.total_steps:
        print(f'the run in {workdir} has finished (step {step}, {self.config.num_epochs} '
              'epochs); rerun with a larger --config.num_epochs to train on.', flush=True)
      elif step:
        print(f'resuming from step {step} in {workdir}', flush=True)
      state = self.fit(state, writer=writer, mngr=mngr,
                       meta={**meta, 'steps_per_epoch': self.steps_per_epoch})
      return state, self.evaluate(state)
    finally:
      writer.close()
      mngr.close()

  def restore_latest(self, state: TrainState, mngr: ocp.CheckpointManager,
                     workdir: pathlib.Path) -> TrainState:
    """``state`` replaced by the newest readable checkpoint of ``mngr``, if there is one.

    A checkpoint that cannot be read (a file deleted or cut short) is
    reported in one line and moved to ``workdir/damaged_checkpoints``; the
    next older one is tried.

    Raises:
      UserError: there are checkpoints, but none can be read.
    """
    def restore(step):
      return checkpoint.restore(mngr, step, params=state.params, opt_state=state.opt_state,
                                model_state=state.model_state)

    found = checkpoint.newest_readable(mngr, restore, workdir)
    if found is None:
      return state
    step, restored = found
    repl = sharding.replicated(self.mesh)
    return TrainState(step=jax.device_put(jnp.asarray(step, jnp.int32), repl),
                      params=restored['params'], opt_state=restored['opt_state'],
                      model_state=restored.get('model_state', {}))
