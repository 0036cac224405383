"""The classifier stage: a head over a pretrained (or fresh) encoder, and kNN.

``train_and_evaluate(config, workdir)`` restores the encoder of a pretraining
checkpoint (its architecture comes from the config stored in the checkpoint),
puts a linear (``probing``) or MLP (``fine_tune``) head on it and trains it,
the encoder frozen by masked optimizer updates or fine-tuned; or, with
``mode='knn'``, reports the k-nearest-neighbour accuracy of its features.
A frozen encoder without augmentation is run once per image and the head
trains on the cached features.
"""
from __future__ import annotations

import json
import pathlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from mil_jax import augment as augment_lib
from mil_jax import (
  checkpoint,
  config_checks,
  config_files,
  models,
  paths,
  report,
  sharding,
  trainer,
  tuning,
)
from mil_jax import input_pipeline as ip
from mil_jax import workdir as workdir_lib
from mil_jax.errors import UserError
from mil_jax.metric_writers import MetricWriter, read_metrics
from mil_jax.models.heads import Classifier, LinearHead, MLPHead
from mil_jax.optim import layer_decay_rules, make_optimizer

STUDY_HIDDEN = {'fc': 192}  # the study's MLP width; 150 for the others
FREEZE_RULES = ('encoder/.*',)


# --------------------------------------------------------------------------
# Where the encoder comes from.


def _type_config(spec: str) -> ml_collections.ConfigDict:
  """The pretraining config ``configs/<type>.py[:variant]`` for ``spec = 'type[:variant]'``."""
  try:
    return config_files.pretraining(spec)
  except ValueError as e:
    raise UserError(f'{e}.') from None


def newest_pretraining_run(runs_dir: str | pathlib.Path) -> pathlib.Path:
  """The pretraining workdir under ``runs_dir`` with the most recent checkpoint."""
  candidates = []
  for config_file in paths.user_path(runs_dir, 'runs_dir').glob(f'*/{workdir_lib.CONFIG_FILE}'):
    run = config_file.parent
    steps = [p for p in (run / 'checkpoints').glob('[0-9]*') if p.name.isdigit()]
    try:
      kind = config_checks.config_kind(json.loads(config_file.read_text()))
    except (OSError, ValueError, TypeError):
      continue  # not a run this can read
    if steps and kind == 'pretraining':
      candidates.append((max(p.stat().st_mtime for p in steps), str(run)))
  if not candidates:
    raise UserError(f'no pretraining run found under {runs_dir}; run train_pretrain.py '
                    'first, pass --pretrained_path, or use --from_scratch --type fc|conv|mae.')
  return pathlib.Path(max(candidates)[1])


class Encoder(NamedTuple):
  """Where a classifier's encoder comes from."""
  model: dict[str, Any]       # the model block of its pretraining config
  params: Any                 # its pretrained params; None: a fresh encoder
  source: str                 # a description for the log
  cpu_devices: int | str      # its pretraining's ``speed.cpu_devices``


def resolve_encoder(config: ml_collections.ConfigDict) -> Encoder:
  """The encoder: its model config, pretrained params, description and CPU devices.

  Without ``pretrained_path``, the newest pretraining run under ``runs_dir``
  is used and recorded in ``config.pretrained_path``.
  """
  if config.from_scratch:
    if config.freeze:
      raise UserError('--freeze with --from_scratch would train a head on random features; '
                      'pass --nofreeze, or drop --from_scratch.')
    if not config.model_type:
      raise UserError('--from_scratch needs --type fc|conv|mae to know which encoder to build.')
    pretraining = _type_config(config.model_type)
    return Encoder(dict(pretraining.model), None, f'a fresh {config.model_type} encoder',
                   pretraining.speed.cpu_devices)
  path = config.pretrained_path
  if not path:
    path = newest_pretraining_run(config.runs_dir)
    print(f'using the newest pretraining run: {path}', flush=True)
    config.pretrained_path = str(path)
  directory, step, meta, params = checkpoint.restore_encoder_source(path)
  if meta.get('stage') != 'pretrain':
    raise UserError(f'{path} is a {meta.get("stage", "unknown")} checkpoint, not a pretraining '
                    'one; pass a train_pretrain.py workdir.')
  model_cfg = meta['config']['model']
  if 'attention' in model_cfg:
    # How attention is computed is not part of the architecture: a checkpoint
    # pretrained with cuDNN attention on a GPU must load anywhere.
    model_cfg = {**model_cfg, 'attention': 'auto'}
  if config.model_type:
    expected = json.loads(_type_config(config.model_type).model.to_json())
    diff = [f'{k} {model_cfg.get(k)!r} (not {v!r})' for k, v in expected.items()
            if k not in ('dtype', 'attention') and model_cfg.get(k) != v]
    if diff:
      raise UserError(f'{path} holds a model with {", ".join(diff)}; drop --type or pass a '
                      f'checkpoint of a {config.model_type} model.')
  speed = meta['config'].get('speed') or {}
  return Encoder(model_cfg, params['encoder'], f'{directory / str(step)}',
                 speed.get('cpu_devices', 'all'))


# --------------------------------------------------------------------------
# Heads, features, kNN.


def build_classifier(config: ml_collections.ConfigDict, model_cfg: dict[str, Any],
                     num_classes: int, speed: tuning.Speed | None = None) -> Classifier:
  """The encoder of ``model_cfg`` under the head of ``config.mode``, computed as
  ``speed`` says (None: the portable choices)."""
  if config.mode == 'probing':
    head = LinearHead(num_classes, batchnorm=config.head.batchnorm)
  else:
    hidden = config.head.hidden_dim or STUDY_HIDDEN.get(model_cfg['name'], 150)
    head = MLPHead(num_classes, hidden, dropout_rate=config.head.dropout_rate)
  if config.drop_path_rate:
    if model_cfg['name'] != 'mae':
      raise UserError(f'drop_path_rate drops transformer blocks and the {model_cfg["name"]} '
                      'encoder has none; set it to 0 or use an mae encoder.')
    model_cfg = {**model_cfg, 'drop_path_rate': config.drop_path_rate}
  settings = speed.model_settings(model_cfg) if speed else None
  return Classifier(models.build_encoder(model_cfg, settings), head, frozen=config.freeze)


def compute_features(clf: Classifier, params: Any, data: ip.DeviceSplit, batch_size: int,
                     mesh: jax.sharding.Mesh) -> ip.DeviceSplit:
  """Encoder features of every example, in inference mode: a split of [N, D] float32."""
  idx, _ = ip.eval_indices(len(data), batch_size)
  idx = sharding.put_replicated(idx, mesh)

  @jax.jit
  def run(params, images, idx):
    def one(batch_idx):
      x = ip.to_float(jax.lax.with_sharding_constraint(
          images[batch_idx], sharding.batch_sharded(mesh)))
      return clf.apply({'params': params}, x, train=False, method='features')
    feats = jax.lax.map(one, idx)
    return feats.reshape(-1, feats.shape[-1])[:len(data)].astype(jnp.float32)

  return ip.DeviceSplit(run(params, data.images, idx), data.labels, data.num_classes)


def knn_accuracy(train: ip.DeviceSplit, test: ip.DeviceSplit, *, k: int, temperature: float,
                 batch_size: int) -> jax.Array:
  """Weighted k-NN top-1 accuracy on cosine similarity (the SSL convention).

  Args:
    train, test: feature splits ``[N, D]`` with labels.
    k: neighbours that vote; each vote weighs ``exp(cosine / temperature)``.
    batch_size: test features per similarity block.
  """
  k = min(k, len(train))

  @jax.jit
  def run(train_f, train_y, test_f, test_y, idx, valid):
    norm = lambda f: f / jnp.maximum(jnp.linalg.norm(f, axis=-1, keepdims=True), 1e-12)
    train_f = norm(train_f)

    def correct(args):
      b_idx, b_valid = args
      sims, nn_idx = jax.lax.top_k(norm(test_f[b_idx]) @ train_f.T, k)
      votes = jax.nn.one_hot(train_y[nn_idx], train.num_classes) * jnp.exp(
          sims / temperature)[..., None]
      hit = jnp.argmax(votes.sum(axis=1), axis=-1) == test_y[b_idx]
      return jnp.sum(hit & b_valid)

    return jnp.sum(jax.lax.map(correct, (idx, valid))) / jnp.sum(valid)

  idx, valid = ip.eval_indices(len(test), batch_size)
  return run(train.images, train.labels, test.images, test.labels, idx, valid)


def make_task(config: ml_collections.ConfigDict, clf: Classifier, num_classes: int, *,
              on_features: bool, augment: bool) -> tuple[trainer.LossFn, trainer.EvalFn]:
  """Cross-entropy training and loss/top-1/top-5 evaluation of the classifier.

  On images (not ``on_features``) training adds RandAugment after the crop
  and flip, and mixup / cutmix with soft targets, as ``config.randaugment``
  and ``config.mix`` ask (``mil_jax.augment``); ``train/accuracy`` counts
  each image's own label.
  """
  method = 'classify' if on_features else None
  augment_lib.check(config)

  def logits_of(params, model_state, inputs, train, rngs):
    variables = {'params': params, **model_state}
    if train and model_state:
      return clf.apply(variables, inputs, train=True, rngs=rngs, method=method,
                       mutable=list(model_state))
    return clf.apply(variables, inputs, train=train, rngs=rngs, method=method), model_state

  def inputs_of(batch, rng, train):
    if on_features:
      return batch
    if train:
      return augment_lib.train_images(rng, batch, crop_flip=augment, config=config)
    return ip.prepare_batch(rng, batch, augment_images=False)

  def loss_fn(params, model_state, batch, labels, rngs):
    x = inputs_of(batch, rngs['augment'], True)
    targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), config.label_smoothing)
    if not on_features:
      x, targets = augment_lib.mix(jax.random.fold_in(rngs['augment'], augment_lib.MIX_KEY), x,
                                   targets, config.mix)
    logits, model_state = logits_of(params, model_state, x, True, {'dropout': rngs['dropout']})
    loss = optax.softmax_cross_entropy(logits, targets).mean()
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    return loss, ({'train/accuracy': accuracy}, model_state)

  def eval_fn(params, model_state, batch, labels, rng):
    logits, _ = logits_of(params, model_state, inputs_of(batch, rng, False), False, {})
    top5 = jax.lax.top_k(logits, min(5, num_classes))[1]
    return {'loss': optax.softmax_cross_entropy_with_integer_labels(logits, labels),
            'accuracy': (top5[:, 0] == labels).astype(jnp.float32),
            'top5': jnp.any(top5 == labels[:, None], axis=-1).astype(jnp.float32)}

  return loss_fn, eval_fn


# --------------------------------------------------------------------------
# The stage.


def _init(clf: Classifier, config: ml_collections.ConfigDict, encoder_params: Any,
          mesh: jax.sharding.Mesh) -> tuple[Any, Any]:
  """Replicated ``(params, model_state)``; the pretrained encoder dropped in unchanged."""
  variables = trainer.init_variables(clf, config.seed, mesh)
  params = dict(variables['params'])
  if encoder_params is not None:
    expected = jax.tree.map(lambda x: (x.shape, x.dtype), params['encoder'])
    got = jax.tree.map(lambda x: (x.shape, x.dtype), encoder_params)
    if expected != got:
      raise UserError('the checkpoint\'s encoder weights do not fit the architecture in its '
                      'stored config; the checkpoint is damaged or from another version.')
    params['encoder'] = sharding.put_replicated(encoder_params, mesh)
  model_state = {k: v for k, v in variables.items() if k != 'params'}
  return params, model_state


def _on_cached_features(config: ml_collections.ConfigDict) -> bool:
  """Whether the head trains on features the frozen encoder computed once."""
  return config.freeze and config.cache_features and config.mode != 'knn'


def resolve_speed(config: ml_collections.ConfigDict, encoder: Encoder) -> tuning.Speed:
  """The stage's speed settings. Its ``cpu_devices`` 'auto' follows the encoder's
  pretraining config, except that a head on cached features takes one device
  (it is too small to split)."""
  cached = _on_cached_features(config)
  speed = dict(config.speed)
  if speed.get('cpu_devices') == 'auto':
    speed['cpu_devices'] = 1 if cached else encoder.cpu_devices
  return tuning.resolve(speed, batch_size=config.batch_size,
                        steps_per_dispatch=config.steps_per_dispatch,
                        architecture='head' if cached else encoder.model['name'])


def _layer_decay(config: ml_collections.ConfigDict,
                 model_cfg: dict[str, Any]) -> list[tuple[str, float]]:
  """The learning-rate scale rules of ``config.optim.layer_decay`` (none at 1)."""
  decay = config.optim.layer_decay
  if decay == 1.0:
    return []
  if not 0.0 < decay < 1.0:
    raise UserError(f'optim.layer_decay must be in (0, 1], got {decay}.')
  if model_cfg['name'] != 'mae':
    raise UserError(f'optim.layer_decay scales the learning rate by transformer block and the '
                    f'{model_cfg["name"]} encoder has none; set it to 1 or use an mae encoder.')
  return layer_decay_rules(model_cfg['depth'], decay)


def build_trainer(config: ml_collections.ConfigDict, model_cfg: dict[str, Any],
                  encoder_params: Any, train_data: ip.DeviceSplit, eval_data: ip.DeviceSplit,
                  mesh: jax.sharding.Mesh, speed: tuning.Speed | None = None
                  ) -> tuple[trainer.Trainer, Any, Any]:
  """The classifier stage's trainer, and its initial ``(params, model_state)``.

  With a frozen encoder and ``cache_features`` the trainer's data are the
  encoder's features of ``train_data`` and ``eval_data``, computed here once.
  ``encoder_params`` None: a freshly initialized encoder. ``speed``: the run's
  resolved settings (None: ``config.speed`` resolved for ``mesh``).
  """
  num_classes = train_data.num_classes
  clf = build_classifier(config, model_cfg, num_classes, speed)
  params, model_state = _init(clf, config, encoder_params, mesh)
  cached = _on_cached_features(config)
  if cached:
    train_data = compute_features(clf, params, train_data, config.batch_size, mesh)
    eval_data = compute_features(clf, params, eval_data, config.batch_size, mesh)
  optim_cfg = ml_collections.ConfigDict(config.optim.to_dict())
  if config.freeze and config.frozen_lr:
    optim_cfg.lr = config.frozen_lr
  spe = max(ip.steps_per_epoch(len(train_data), config.batch_size), 1)
  try:
    tx, schedule = make_optimizer(optim_cfg, params, steps_per_epoch=spe,
                                  total_steps=spe * config.num_epochs,
                                  freeze=FREEZE_RULES if config.freeze else (),
                                  lr_scales=_layer_decay(config, model_cfg))
  except ValueError as e:
    raise UserError(f'cannot freeze the encoder: {e}.') from None
  loss_fn, eval_fn = make_task(config, clf, num_classes, on_features=cached,
                               augment=config.data.augment and not cached)
  loop = trainer.Trainer(config=config, mesh=mesh, loss_fn=loss_fn, eval_fn=eval_fn, tx=tx,
                         schedule=schedule, train_data=train_data, eval_data=eval_data,
                         speed=speed)
  return loop, params, model_state


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path | None,
                       *, overwrite: bool = False) -> dict[str, float]:
  """Trains (or, for ``knn``, measures) a classifier and returns its final metrics.

  Args:
    config: a classifier config (``configs/classifier.py``).
    workdir: where checkpoints, metrics and ``accuracy.png`` go; None:
      ``<runs_dir>/classify_<mode>_<frozen|tuned|scratch>_<model>``.
    overwrite: replace a run of a different config found in ``workdir``.

  Returns:
    ``{'eval/loss', 'eval/accuracy', 'eval/top5'}``, or ``{'eval/knn_accuracy'}``.
  """
  sharding.initialize_distributed()
  paths.resolve_classifier_paths(config)
  config_checks.check_classifier(config)
  encoder = resolve_encoder(config)
  model_cfg, encoder_params, source = encoder.model, encoder.params, encoder.source
  speed = resolve_speed(config, encoder)
  tuning.record(config, speed)
  mesh = sharding.training_mesh(speed.devices)
  sharding.check_batch_size(config.batch_size, mesh)
  train_split = ip.load_split(config.data, config.data.train_split)
  eval_split = ip.load_split(config.data, config.data.eval_split)
  if workdir is None:
    # A fresh encoder's run must not meet a pretrained one's in the same workdir.
    tuned = 'frozen' if config.freeze else 'scratch' if config.from_scratch else 'tuned'
    workdir = pathlib.Path(config.runs_dir) / f'classify_{config.mode}_{tuned}_{model_cfg["name"]}'
  print(f'encoder: {model_cfg["name"]} from {source}', flush=True)

  train_data = ip.DeviceSplit.create(train_split, mesh)
  eval_data = ip.DeviceSplit.create(eval_split, mesh)
  if config.mode == 'knn':
    clf = build_classifier(config, model_cfg, train_data.num_classes, speed)
    params, _ = _init(clf, config, encoder_params, mesh)
    train = compute_features(clf, params, train_data, config.batch_size, mesh)
    test = compute_features(clf, params, eval_data, config.batch_size, mesh)
    with workdir_lib.claim(workdir, config, overwrite=overwrite) as workdir:
      return _knn(config, train, test, workdir)

  loop, params, model_state = build_trainer(config, model_cfg, encoder_params, train_data,
                                            eval_data, mesh, speed)
  state = loop.init_state(params, model_state)
  loop.check_programs(state)
  with workdir_lib.claim(workdir, config, overwrite=overwrite) as workdir:
    state, final = loop.run(
        state, workdir, meta={'stage': 'classify', 'config': config.to_dict(),
                              'encoder_model': model_cfg, 'encoder_source': source})
    if jax.process_index() == 0 and report.to_draw(workdir / 'accuracy.png', loop.trained):
      report.plot_accuracy(read_metrics(workdir), workdir / 'accuracy.png')
  return final


def _knn(config: ml_collections.ConfigDict, train: ip.DeviceSplit, test: ip.DeviceSplit,
         workdir: pathlib.Path) -> dict[str, float]:
  accuracy = float(knn_accuracy(train, test, k=config.knn.k, temperature=config.knn.temperature,
                                batch_size=config.batch_size))
  writer = MetricWriter(workdir)
  writer.write(0, 0, {'eval/knn_accuracy': accuracy})
  writer.close()
  print(f'k-NN accuracy (k={config.knn.k}): {accuracy:.4f}', flush=True)
  return {'eval/knn_accuracy': accuracy}
