r"""Speed of the real training steps: ``python -m mil_jax.bench``.

  python -m mil_jax.bench --model conv:192 --batch 32
  python -m mil_jax.bench --model mae:seed --batch 128 --dtype bfloat16
  python -m mil_jax.bench --model conv:256 --stage probe
  python -m mil_jax.bench --model fc --model conv:192 --batch 128,1024 --epoch
  python -m mil_jax.bench --all          # the reference set, one JSON line each
  python -m mil_jax.bench --model conv:192 --batch 32 --run   # a whole run against its steps

Each configuration (every ``--model`` with every ``--batch``) prints one JSON
line. The timed program is the project's own ``Trainer.train_chunk``: built
from ``pretrain.make_task`` (``--stage pretrain``), or the classifier stage's
(``classify.build_trainer`` with ``configs/classifier.py``'s defaults) over a
fresh encoder: ``finetune``, the encoder and an MLP head trained together on
images; ``probe``, a linear head on features the frozen encoder computed
once. The data are ``fake`` uint8 images placed on the device once. A timed
step is everything a run does: batch gather, augment (when the config asks),
forward, backward and the optimizer update.

Fields: ``images_per_s`` (median of ``--windows`` timed windows, each ended by
``block_until_ready``), ``step_ms``, ``compile_s`` (lower + compile of the
``K``-step program), ``params``, ``flops_per_image`` (the matrix-multiply
FLOPs of one step, counted on its jaxpr: ``step_flops``), ``flops_per_s``,
``peak_memory_bytes`` (``None`` where the backend keeps no statistics, as on
CPU), ``mfu`` (``flops_per_s`` over the dense bfloat16 peak of the chips the
step ran on, from their datasheet, ``PEAK_BF16_FLOPS``; ``None`` for a chip
not in that table), ``backend``, ``device_kind``, ``num_devices`` (the
step's mesh), ``cpu_split`` (what ``platform.configure`` added to
``XLA_FLAGS``), ``speed`` (the resolved speed settings, ``mil_jax.tuning``;
``--speed field=value,...`` sets some, to compare choices). With ``--epoch``, also
``epoch_s``: the median over ``--windows`` of the wall time of one whole
epoch of a 50,000-image split (CIFAR's training set), run as the trainer runs
it (the epoch's permutation, then its steps ``K`` at a time, the last call
taking the remainder); evaluation and checkpoints, which a run adds once per
epoch, are not in it. ``--run`` prints instead, per configuration, such
epochs beside those of a whole ``train_pretrain.py`` run on the same data and
their ratio (``bench_run``, ``mil_jax.run_bench``).
"""
from __future__ import annotations

import json
import math
import pathlib
import statistics
import subprocess
import tempfile
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import flags

from mil_jax import (
  classify,
  cli,
  config_files,
  models,
  platform,
  pretrain,
  run_bench,
  sharding,
  trainer,
  tuning,
)
from mil_jax import input_pipeline as ip
from mil_jax.errors import UserError

STAGES = ('pretrain', 'probe', 'finetune')
NUM_CLASSES = 100
# (model, batch, stage): the reference set of ``--all``.
REFERENCE_SET = (('fc', 128, 'pretrain'), ('conv:192', 32, 'pretrain'),
                 ('conv:192', 128, 'pretrain'), ('conv:256', 32, 'pretrain'),
                 ('mae:seed', 128, 'pretrain'), ('conv:256', 128, 'probe'))
# Images in one epoch of ``--epoch``: CIFAR's training split.
EPOCH_IMAGES = 50_000
# Dense bfloat16 FLOP/s by device kind (vendor datasheets), for ``mfu``;
# the first key found in ``device_kind`` wins.
PEAK_BF16_FLOPS = {'H100 PCIe': 756e12, 'H100': 989e12, 'H200': 989e12, 'A100': 312e12,
                   'L4': 121e12, 'TPU v6 lite': 918e12, 'TPU v5 lite': 197e12,
                   'TPU v5': 459e12, 'TPU v4': 275e12}

_MODEL = flags.DEFINE_multi_string(
    'model', ['conv:192'], 'fc|conv|mae, optionally :variant (the config variant, e.g. conv:256, '
    'mae:seed,runlocal); repeat the flag for several.')
_BATCH = flags.DEFINE_list('batch', ['0'], 'Global batch size(s), comma-separated '
                           '(0: the config\'s).')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Compute dtype.')
_K = flags.DEFINE_integer('steps_per_dispatch', 0,
                          'Train steps per jitted call (0: the config\'s, as training runs).')
_SPEED = flags.DEFINE_list('speed', [], "Speed settings over the config's, e.g. "
                           "'conv_impl=xla,cpu_ynn_fusions=all' (mil_jax.tuning).")
_STAGE = flags.DEFINE_enum('stage', 'pretrain', list(STAGES), 'Which training step to time.')
_ALL = flags.DEFINE_bool('all', False, 'Run the reference set (ignores --model/--batch/--stage).')
_SECONDS = flags.DEFINE_float('seconds', 3.0, 'Approximate length of one timed window.')
_WINDOWS = flags.DEFINE_integer('windows', 3, 'Timed windows; the median is reported.')
_EPOCH = flags.DEFINE_bool('epoch', False, f'Also time whole epochs of {EPOCH_IMAGES:,} images '
                           '(the epoch_s field).')
_RUN = flags.DEFINE_bool('run', False, 'Time a whole train_pretrain.py run beside whole epochs '
                         'of its steps alone (pretraining only; see mil_jax.run_bench).')
_RUN_EPOCHS = flags.DEFINE_integer('run_epochs', 3, 'Epochs of the --run run (at least 2: the '
                                   'first, which compiles, is left out).')
_RUN_IMAGES = flags.DEFINE_integer('run_images', EPOCH_IMAGES, 'Training images of --run (and '
                                   'a fifth of that many validation images).')


def speed_overrides(pairs: list[str]) -> dict[str, str]:
  """``['conv_impl=xla', ...]`` as a dict of speed fields; a mistake is a UserError."""
  out = {}
  for pair in pairs:
    key, eq, value = pair.partition('=')
    if not eq or key not in tuning.FIELDS:
      raise UserError(f'--speed takes field=value pairs of the fields {", ".join(tuning.FIELDS)}; '
                      f'got {pair!r}.')
    out[key] = value
  return out


def load_config(spec: str, batch: int, dtype: str, steps_per_dispatch: int,
                train_size: int = 0, speed: dict[str, str] | None = None
                ) -> ml_collections.ConfigDict:
  """The pretraining config named by ``'name[:variant]'``, set up for timing
  (``speed``: fields of its ``speed`` block replaced)."""
  try:
    config = config_files.pretraining(spec)
  except ValueError as e:
    raise UserError(f'{e}.') from None
  config.batch_size = batch or config.batch_size
  config.model.dtype = dtype
  config.steps_per_dispatch = steps_per_dispatch or config.steps_per_dispatch
  config.data.source = 'fake'
  config.data.fake_num_classes = NUM_CLASSES
  # Enough examples for a few epochs of distinct batches; the step cost does
  # not depend on the split's size (one gather of B rows).
  config.data.fake_train_size = train_size or max(2048, 8 * config.batch_size)
  config.data.fake_test_size = config.batch_size
  if speed:
    config.speed = ml_collections.ConfigDict({**config.speed.to_dict(), **speed})
  return config


def classifier_config(config: ml_collections.ConfigDict, stage: str,
                      steps_per_dispatch: int = 0) -> ml_collections.ConfigDict:
  """The classifier stage's own config for ``stage``, on ``config``'s batch and data.

  ``probe``: the linear head on a frozen encoder's cached features;
  ``finetune``: the MLP head and the encoder trained together on images.
  """
  clf = config_files.classifier()
  clf.mode, clf.freeze = ('probing', True) if stage == 'probe' else ('fine_tune', False)
  clf.batch_size = config.batch_size
  clf.steps_per_dispatch = steps_per_dispatch or clf.steps_per_dispatch
  for key in ('source', 'fake_train_size', 'fake_test_size', 'fake_num_classes'):
    clf.data[key] = config.data[key]
  return clf


def build(config: ml_collections.ConfigDict, stage: str, steps_per_dispatch: int = 0,
          speed: dict[str, str] | None = None
          ) -> tuple[trainer.Trainer, trainer.TrainState, int]:
  """The trainer, its initial state and the parameter count for ``stage``.

  ``pretrain`` runs ``config`` itself (``pretrain.build_trainer``); ``probe``
  and ``finetune`` run the classifier stage's program
  (``classify.build_trainer``) over a fresh encoder of ``config.model``, with
  ``steps_per_dispatch`` (0: the classifier config's). ``speed``: fields of
  the classifier's speed block replaced (the pretraining's are in ``config``).
  The stage's settings are resolved as its command resolves them.
  """
  clf = classifier_config(config, stage, steps_per_dispatch) if stage != 'pretrain' else None
  if clf is None:
    settings = tuning.resolve(config.speed, batch_size=config.batch_size,
                              steps_per_dispatch=config.steps_per_dispatch,
                              architecture=config.model.name)
  else:
    clf.speed = ml_collections.ConfigDict({**clf.speed.to_dict(), **(speed or {})})
    encoder = classify.Encoder(config.model.to_dict(), None, 'a fresh encoder',
                               config.speed.cpu_devices)
    settings = classify.resolve_speed(clf, encoder)
  mesh = sharding.training_mesh(settings.devices)
  split = ip.load_split(config.data, config.data.train_split)
  data = ip.DeviceSplit.create(split, mesh)
  eval_data = ip.DeviceSplit(data.images[:config.batch_size], data.labels[:config.batch_size],
                             data.num_classes)
  if stage == 'pretrain':
    model = models.build_autoencoder(config.model, settings.model_settings(config.model))
    loop, params = pretrain.build_trainer(config, model, data, eval_data, mesh, settings)
    model_state = None
  else:
    loop, params, model_state = classify.build_trainer(clf, config.model.to_dict(), None, data,
                                                       eval_data, mesh, settings)
  count = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
  return loop, loop.init_state(params, model_state), count


def _attention_flops(eqn: Any) -> float:
  """cuDNN fused attention: 2 matmuls of [T, H] x [H, S] per head forward, 4 backward."""
  q, k = eqn.invars[0].aval, eqn.invars[1].aval
  keys = k.shape[2] if eqn.params.get('layout') == 1 else k.shape[1]  # BNTH else BTNH
  per_matmul = 2.0 * math.prod(q.shape) * keys
  return (4 if 'bwd' in eqn.primitive.name else 2) * per_matmul


def _sub_jaxprs(eqn: Any) -> list[Any]:
  """The jaxprs in an equation's params (a scan's body, a cond's branches, ...)."""
  values = [x for v in eqn.params.values() for x in (v if isinstance(v, (list, tuple)) else [v])]
  # A Jaxpr or a ClosedJaxpr has equations; anything else holding one, its ``jaxpr``.
  found = [x if hasattr(x, 'eqns') else getattr(x, 'jaxpr', None) for x in values]
  return [j for j in found if hasattr(j, 'eqns')]


def _jaxpr_flops(jaxpr: Any) -> float:
  """Matrix-multiply FLOPs of a jaxpr, sub-jaxprs included (a scan's times its length)."""
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'dot_general':
      lhs = eqn.invars[0].aval
      (contract, _), _ = eqn.params['dimension_numbers']
      depth = math.prod(lhs.shape[d] for d in contract)
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * depth
    elif name == 'conv_general_dilated':
      rhs = eqn.invars[1].aval
      spec = eqn.params['dimension_numbers'].rhs_spec  # (out, in, *spatial)
      per_output = math.prod(rhs.shape[d] for d in spec[1:])
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * per_output
    elif name.startswith('dot_product_attention_'):
      total += _attention_flops(eqn)
    counts = [_jaxpr_flops(sub) for sub in _sub_jaxprs(eqn)]
    if counts:  # a cond runs one branch: count the costliest
      inner = max(counts) if name == 'cond' else sum(counts)
      total += inner * (eqn.params['length'] if name == 'scan' else 1)
  return total


def step_flops(loop: trainer.Trainer, state: trainer.TrainState, perm: jax.Array) -> float:
  """Matrix-multiply FLOPs of one train step (forward, backward and update).

  Counted on the step's jaxpr rather than by XLA's cost analysis, which is
  not available before compilation on every backend and, after it, misses
  the dots that GPU backends hand to cuBLAS. Elementwise work is not counted,
  as usual for model FLOPs utilization.
  """
  jaxpr = jax.make_jaxpr(loop.train_step)(state, loop.train_data, perm)
  return _jaxpr_flops(jaxpr.jaxpr)


def _peak_flops(device_kind: str) -> float | None:
  return next((v for k, v in PEAK_BF16_FLOPS.items() if k in device_kind), None)


def _time_epochs(loop: trainer.Trainer, compiled: Any, state: trainer.TrainState,
                 windows: int) -> tuple[list[float], trainer.TrainState]:
  """Wall seconds of ``windows`` whole epochs after one warm-up epoch, as ``fit`` runs them."""
  data, k = loop.train_data, loop.config.steps_per_dispatch
  full, rest = divmod(loop.steps_per_epoch, k)
  perm = loop.permutation(state.step)
  tail = loop.train_chunk.lower(state, data, perm, rest).compile() if rest else None

  def epoch(state):
    perm, in_flight = loop.permutation(state.step), trainer.InFlight()
    for _ in range(full):
      state, metrics = compiled(state, data, perm)
      in_flight.add(metrics)
    if tail is not None:
      state, metrics = tail(state, data, perm)
    return jax.block_until_ready((state, metrics))[0]

  state = epoch(state)
  times = []
  for _ in range(windows):
    t0 = time.perf_counter()
    state = epoch(state)
    times.append(time.perf_counter() - t0)
  return times, state


def bench_one(spec: str, batch: int, *, stage: str = 'pretrain', dtype: str = 'float32',
              steps_per_dispatch: int = 0, seconds: float = 3.0, windows: int = 3,
              epoch_images: int = 0, speed: dict[str, str] | None = None) -> dict[str, Any]:
  """Times one configuration; returns the JSON record (see the module docstring).

  ``epoch_images`` > 0 also times whole epochs of a split of that size
  (``epoch_s``); the step timing is the same either way.
  """
  config = load_config(spec, batch, dtype, steps_per_dispatch, train_size=epoch_images,
                       speed=speed)
  loop, state, num_params = build(config, stage, steps_per_dispatch, speed)
  k = loop.config.steps_per_dispatch
  data, perm = loop.train_data, loop.permutation(state.step)

  t0 = time.perf_counter()
  compiled = loop.train_chunk.lower(state, data, perm, k).compile()
  compile_s = time.perf_counter() - t0
  flops = step_flops(loop, state, perm)
  flops_per_image = (flops or 0.0) / config.batch_size or None

  # Warm-up: the first calls fault in fresh memory and fill caches.
  calls = 0
  t0 = time.perf_counter()
  while calls < 3 or (time.perf_counter() - t0 < 0.5 and calls < 50):
    state, metrics = compiled(state, data, perm)
    jax.block_until_ready(metrics)
    calls += 1
  per_call = (time.perf_counter() - t0) / calls
  calls_per_window = max(1, int(round(seconds / max(per_call, 1e-6))))
  rates = []
  for _ in range(windows):
    t0, in_flight = time.perf_counter(), trainer.InFlight()
    for _ in range(calls_per_window):
      state, metrics = compiled(state, data, perm)
      in_flight.add(metrics)
    jax.block_until_ready((state, metrics))
    rates.append(calls_per_window * k * config.batch_size / (time.perf_counter() - t0))
  loss = float(np.asarray(metrics['train/loss'])[-1])
  if not np.isfinite(loss):
    raise RuntimeError(f'{spec} {stage}: the loss became {loss} while timing')

  images_per_s = statistics.median(rates)
  epoch_times = _time_epochs(loop, compiled, state, windows)[0] if epoch_images else None
  device, num_devices = loop.mesh.devices.flat[0], loop.mesh.size
  stats = device.memory_stats()
  flops_per_s = flops_per_image * images_per_s if flops_per_image else None
  peak = _peak_flops(device.device_kind)
  peak = peak * num_devices if peak else None
  return {
      'model': spec, 'stage': stage, 'batch': config.batch_size, 'dtype': dtype,
      'steps_per_dispatch': k,
      'images_per_s': round(images_per_s, 1),
      'images_per_s_windows': [round(r, 1) for r in rates],
      'step_ms': round(1e3 * config.batch_size / images_per_s, 3),
      'compile_s': round(compile_s, 2),
      'params': num_params,
      'flops_per_image': flops_per_image,
      'flops_per_s': flops_per_s,
      'mfu': round(flops_per_s / peak, 4) if flops_per_s and peak else None,
      'peak_memory_bytes': stats.get('peak_bytes_in_use') if stats else None,
      **({'epoch_images': len(loop.train_data) // config.batch_size * config.batch_size,
          'epoch_s': round(statistics.median(epoch_times), 4),
          'epoch_s_windows': [round(t, 4) for t in epoch_times]} if epoch_times else {}),
      'backend': jax.default_backend(),
      'device_kind': device.device_kind,
      'num_devices': num_devices,
      'cpu_split': platform.applied(),
      'speed': loop.speed.to_dict(),
  }


def bench_run(spec: str, batch: int, *, dtype: str = 'float32', steps_per_dispatch: int = 0,
              windows: int = 3, images: int = EPOCH_IMAGES, epochs: int = 3,
              compile_cache: bool = False, speed: dict[str, str] | None = None) -> dict[str, Any]:
  """Times a whole ``train_pretrain.py`` run of ``epochs`` epochs of ``images``
  images, between two sets of ``windows`` steps-only epochs of the same size
  (so that a shared machine's drift shows in both); returns the JSON record."""
  if epochs < 2 or images < max(batch, 1):
    raise UserError(f'--run needs --run_epochs of at least 2 (got {epochs}) and --run_images of '
                    f'at least one batch (got {images}).')
  config = load_config(spec, batch, dtype, steps_per_dispatch, train_size=images, speed=speed)
  loop, state, _ = build(config, 'pretrain')
  k, data = loop.config.steps_per_dispatch, loop.train_data
  compiled = loop.train_chunk.lower(state, data, loop.permutation(state.step), k).compile()
  before, state = _time_epochs(loop, compiled, state, windows)
  with tempfile.TemporaryDirectory() as tmp:
    workdir = pathlib.Path(tmp) / 'run'
    t0 = time.perf_counter()
    out = subprocess.run(run_bench.command(
        spec, batch=config.batch_size, dtype=dtype, steps_per_dispatch=k, num_classes=NUM_CLASSES,
        images=images, epochs=epochs, workdir=workdir, compile_cache=compile_cache,
        speed=speed),
        env=run_bench.environment(), capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if out.returncode:
      raise RuntimeError(f'the run of {spec} failed: {out.stderr[-3000:]}')
    epoch_records = run_bench.epoch_records(workdir)
  after, _ = _time_epochs(loop, compiled, state, windows)
  return {'model': spec, 'stage': 'run', 'batch': config.batch_size, 'dtype': dtype,
          'steps_per_dispatch': k, 'epoch_images': loop.steps_per_epoch * config.batch_size,
          'epochs': epochs, **run_bench.summary(before + after, epoch_records),
          'run_wall_s': round(wall, 2), 'backend': jax.default_backend(),
          'device_kind': loop.mesh.devices.flat[0].device_kind, 'num_devices': loop.mesh.size}


def main(argv: list[str]) -> None:
  speed = speed_overrides(_SPEED.value)
  if _ALL.value:
    runs = [(m, b, s, 0) for m, b, s in REFERENCE_SET]
  else:
    try:
      batches = [int(b) for b in _BATCH.value]
    except ValueError:
      raise UserError(f'--batch takes whole numbers separated by commas, got '
                      f'{",".join(_BATCH.value)!r}.') from None
    runs = [(m, b, _STAGE.value, _K.value) for m in _MODEL.value for b in batches]
  if _RUN.value:
    if _STAGE.value != 'pretrain' and not _ALL.value:
      raise UserError('--run times train_pretrain.py runs: drop --stage.')
    cache = flags.FLAGS['compile_cache'].present and flags.FLAGS.compile_cache
    for spec, batch, _, k in [r for r in runs if r[2] == 'pretrain']:
      record = bench_run(spec, batch, dtype=_DTYPE.value, steps_per_dispatch=k,
                         windows=_WINDOWS.value, images=_RUN_IMAGES.value,
                         epochs=_RUN_EPOCHS.value, compile_cache=cache, speed=speed)
      print(json.dumps(record), flush=True)
    return
  for spec, batch, stage, k in runs:
    record = bench_one(spec, batch, stage=stage, dtype=_DTYPE.value, steps_per_dispatch=k,
                       seconds=_SECONDS.value, windows=_WINDOWS.value,
                       epoch_images=EPOCH_IMAGES if _EPOCH.value else 0, speed=speed)
    print(json.dumps(record), flush=True)


if __name__ == '__main__':
  cli.run(main, compile_cache=False)  # compile_s times compiling, not reading a cache
