"""The GPU pretraining recipe and the fine-tuning recipe: layer-wise learning-rate
decay, stochastic depth, the wiring of augmentation and mixing, the command line."""
import json
import math
import re
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import classifier as classifier_config
from configs import mae as mae_config
from mil_jax import augment, classify, config_files, optim, sharding
from mil_jax import input_pipeline as ip
from mil_jax.errors import UserError
from mil_jax.models import mae, vit

from .conftest import ROOT, latest_params, run_command

FAST_STEP_IMAGES_PER_S = 168_000  # the fast MAE step, bfloat16, batch 1024, one H200


def tiny_mae(depth=3):
  model = mae_config.get_config('fast,runlocal').model.to_dict()
  model['depth'] = depth
  return model


# --------------------------------------------------------------------------
# Configs.


def test_gpu_pretraining_recipe():
  config = mae_config.get_config('gpu')
  fast = mae_config.get_config('fast')
  assert config.model.to_dict() == {**fast.model.to_dict(), 'dtype': 'bfloat16'}
  assert config.optim.lr == pytest.approx(1.5e-4 * config.batch_size / 256)  # the MAE rule
  assert 1024 <= config.batch_size <= 4096 and config.optim.warmup_epochs < config.num_epochs
  steps = 50_000 // config.batch_size * config.num_epochs
  minutes = steps * config.batch_size / FAST_STEP_IMAGES_PER_S / 60
  assert 6.5 < minutes <= 8.0
  assert f'about {minutes:.1f} minutes' in mae_config.__doc__
  with pytest.raises(ValueError):
    mae_config.get_config('seed,gpu')


def test_finetune_recipe_turns_on_every_piece_and_the_others_none():
  ft = classifier_config.get_config('finetune')
  assert (ft.mode, ft.freeze, ft.num_epochs) == ('fine_tune', False, 100)
  assert ft.optim.layer_decay < 1 and ft.drop_path_rate > 0 and ft.label_smoothing > 0
  assert ft.mix.mixup_alpha > 0 and ft.mix.cutmix_alpha > 0 and ft.randaugment.num_ops > 0
  assert ft.data.augment
  assert ft.optim.lr == pytest.approx(1e-3 * ft.batch_size / 256)
  for variant in (None, 'seed', 'runlocal'):
    c = classifier_config.get_config(variant)
    assert c.optim.layer_decay == 1.0 and c.drop_path_rate == 0.0 and c.label_smoothing == 0.0
    assert c.mix.mixup_alpha == 0.0 and c.mix.cutmix_alpha == 0.0 and c.randaugment.num_ops == 0
  with pytest.raises(ValueError):
    classifier_config.get_config('seed,finetune')


# --------------------------------------------------------------------------
# Layer-wise learning-rate decay.


def layer_of(path, depth):
  """The MAE code's layer id, derived here from the path's words."""
  if path.startswith('encoder/') and path.split('/')[1] in ('patch_embed', 'cls_token',
                                                            'pos_embedding'):
    return 0
  block = re.search(r'/block_(\d+)/', path)
  return int(block.group(1)) + 1 if block else depth + 1


def classifier_params(config, model_cfg):
  clf = classify.build_classifier(config, model_cfg, 10)
  return clf.init({'params': jax.random.key(0)}, jnp.zeros((1, 32, 32, 3)), train=False)['params']


def sgd(lr):
  cfg = ml_collections.ConfigDict(classifier_config.get_config().optim.to_dict())
  cfg.update(name='sgd', b1=0.0, lr=lr, schedule='constant', warmup_epochs=0)
  return cfg


@pytest.mark.parametrize('depth,decay', [(3, 0.5), (1, 0.75)])
def test_layer_decay_scales_each_blocks_learning_rate(depth, decay):
  config = classifier_config.get_config('finetune')
  params = classifier_params(config, tiny_mae(depth))
  lr = 0.1
  tx, _ = optim.make_optimizer(sgd(lr), params, steps_per_epoch=1, total_steps=1,
                               lr_scales=optim.layer_decay_rules(depth, decay))
  grads = jax.tree.map(lambda p: jnp.full_like(p, 2.0), params)
  updates, _ = tx.update(grads, tx.init(params), params)
  seen = set()
  for path, u in jax.tree_util.tree_flatten_with_path(updates)[0]:
    name = optim.path_str(path)
    layer = layer_of(name, depth)
    seen.add(layer)
    np.testing.assert_allclose(u, -lr * 2.0 * decay ** (depth + 1 - layer), rtol=1e-6,
                               err_msg=name)
  assert seen == set(range(depth + 2))  # embeddings, every block, the top


def test_layer_decay_reaches_the_optimizer_of_the_classifier_stage():
  config = classifier_config.get_config('finetune,runlocal')
  config.optim.update(name='sgd', b1=0.0, schedule='constant', weight_decay=0.0)
  model_cfg = tiny_mae(2)
  mesh = sharding.make_mesh()
  data = ip.DeviceSplit.create(ip.load_split(config.data, 'train'), mesh)
  loop, params, _ = classify.build_trainer(config, model_cfg, None, data, data, mesh)
  ones = jax.tree.map(jnp.ones_like, params)
  updates, _ = loop.tx.update(ones, loop.tx.init(params), params)
  for path, u in jax.tree_util.tree_flatten_with_path(updates)[0]:
    name = optim.path_str(path)
    np.testing.assert_allclose(u, -config.optim.lr * 0.75 ** (3 - layer_of(name, 2)), rtol=1e-6,
                               err_msg=name)


@pytest.mark.parametrize('fields,message', [
    (dict(layer_decay=0.75), 'the conv encoder has none'),
    (dict(drop_path_rate=0.1), 'the conv encoder has none'),
    (dict(layer_decay=1.5), r'layer_decay must be in \(0, 1\]'),
])
def test_recipe_pieces_for_a_vit_only(fields, message):
  config = classifier_config.get_config('runlocal')
  config.mode, config.freeze = 'fine_tune', False
  config.drop_path_rate = fields.get('drop_path_rate', 0.0)
  config.optim.layer_decay = fields.get('layer_decay', 1.0)
  model_cfg = (tiny_mae() if fields.get('layer_decay') == 1.5
               else config_files.pretraining('conv:192,runlocal').model.to_dict())
  mesh = sharding.make_mesh()
  data = ip.DeviceSplit.create(ip.load_split(config.data, 'train'), mesh)
  with pytest.raises(UserError, match=message):
    classify.build_trainer(config, model_cfg, None, data, data, mesh)


# --------------------------------------------------------------------------
# Stochastic depth.


def test_drop_path_rates_rise_linearly_to_the_last_block():
  np.testing.assert_allclose(vit.drop_path_rates(0.1, 6), np.linspace(0, 0.1, 6))
  assert vit.drop_path_rates(0.3, 1) == [0.0]


def test_drop_path_drops_whole_examples_at_the_rate():
  n, rate = 4000, 0.3
  x = jax.random.normal(jax.random.key(0), (n, 5, 4)) + 3.0  # no zeros of its own
  layer = vit.DropPath(rate)
  y = np.asarray(layer.apply({}, x, train=True, rngs={'dropout': jax.random.key(1)}))
  dropped = np.all(y == 0, axis=(1, 2))
  kept = ~dropped
  np.testing.assert_allclose(y[kept], np.asarray(x)[kept] / (1 - rate), rtol=1e-6)
  assert not np.any(y[kept] == 0)
  assert abs(dropped.mean() - rate) < 4 * math.sqrt(rate * (1 - rate) / n)
  np.testing.assert_array_equal(layer.apply({}, x, train=False), x)
  np.testing.assert_array_equal(vit.DropPath(0.0).apply({}, x, train=True), x)


def test_encoder_block_drops_each_residual_branch_per_example():
  n, rate = 1000, 0.4
  x = jax.random.normal(jax.random.key(2), (n, 3, 8))
  block = vit.EncoderBlock(num_heads=2, mlp_dim=16, attention='xla', drop_path_rate=rate)
  variables = block.init(jax.random.key(3), x, train=False)
  y = np.asarray(block.apply(variables, x, train=True, rngs={'dropout': jax.random.key(4)}))
  # The four outcomes per example, from the block's own sublayers.
  p = variables['params']
  attn = lambda h: vit.MultiHeadAttention(2, implementation='xla').apply(
      {'params': p['attn']}, h, train=False)
  mlp = lambda h: vit.MlpBlock(16).apply({'params': p['mlp']}, h, train=False)
  ln = lambda name, h: jax.nn.standardize(h, axis=-1, epsilon=1e-6) * p[name]['scale'] + p[
      name]['bias']

  def outcome(keep_attn, keep_mlp, scale):
    h = x + keep_attn * attn(ln('norm_1', x)) * scale
    return np.asarray(h + keep_mlp * mlp(ln('norm_2', h)) * scale)

  outcomes = {(a, m): outcome(a, m, 1 / (1 - rate)) for a in (0, 1) for m in (0, 1)}
  counts = dict.fromkeys(outcomes, 0)
  for i in range(n):
    match = [k for k, o in outcomes.items() if np.allclose(y[i], o[i], atol=1e-5)]
    assert len(match) == 1, i
    counts[match[0]] += 1
  for (a, m), count in counts.items():
    prob = (1 - rate if a else rate) * (1 - rate if m else rate)
    assert abs(count / n - prob) < 4 * math.sqrt(prob * (1 - prob) / n), (a, m, count)
  np.testing.assert_allclose(block.apply(variables, x, train=False), outcome(1, 1, 1.0),
                             atol=1e-5)


def test_encoder_with_drop_path_is_unchanged_at_eval():
  images = jax.random.uniform(jax.random.key(5), (64, 32, 32, 3), minval=-1, maxval=1)
  cfg = {k: v for k, v in tiny_mae(2).items() if k in ('patch_size', 'width', 'depth',
                                                        'num_heads', 'mlp_dim', 'pos_embedding')}
  plain = mae.MAEEncoder(**cfg, attention='xla')
  dropping = mae.MAEEncoder(**cfg, attention='xla', drop_path_rate=0.5)
  variables = plain.init(jax.random.key(6), images, train=False)
  np.testing.assert_array_equal(dropping.apply(variables, images, train=False),
                                plain.apply(variables, images, train=False))
  rngs = lambda seed: {'dropout': jax.random.key(seed)}
  np.testing.assert_array_equal(plain.apply(variables, images, train=True, rngs=rngs(7)),
                                plain.apply(variables, images, train=False))
  # Block 1 (rate 0.5) is drawn per example: two draws agree on about a quarter.
  a, b = (dropping.apply(variables, images, train=True, rngs=rngs(k)) for k in (7, 8))
  same = np.all(np.isclose(a, b), axis=1)
  assert 0 < same.sum() < len(images)


# --------------------------------------------------------------------------
# The classifier's loss with every piece on.


def test_finetune_loss_uses_augmented_mixed_images_and_soft_targets():
  config = classifier_config.get_config('finetune')
  clf = classify.build_classifier(config, tiny_mae(2), 10)
  params = classifier_params(config, tiny_mae(2))
  loss_fn, eval_fn = classify.make_task(config, clf, 10, on_features=False, augment=True)
  batch = jnp.asarray(np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3)), jnp.uint8)
  labels = jnp.arange(8) % 10
  rngs = {'augment': jax.random.key(1), 'dropout': jax.random.key(2)}
  loss, _ = loss_fn(params, {}, batch, labels, rngs)

  x = augment.train_images(rngs['augment'], batch, crop_flip=True, config=config)
  assert not np.allclose(x, ip.to_float(ip.augment(rngs['augment'], batch)))  # RandAugment ran
  targets = jax.nn.one_hot(labels, 10) * 0.9 + 0.01  # label smoothing 0.1
  x, targets = augment.mix(jax.random.fold_in(rngs['augment'], augment.MIX_KEY), x, targets,
                           config.mix)
  logits = clf.apply({'params': params}, x, train=True, rngs={'dropout': rngs['dropout']})
  want = optax.softmax_cross_entropy(logits, targets).mean()
  assert float(loss) == pytest.approx(float(want), rel=1e-5)

  plain = clf.apply({'params': params}, ip.to_float(batch), train=False)
  np.testing.assert_allclose(eval_fn(params, {}, batch, labels, rngs['augment'])['loss'],
                             optax.softmax_cross_entropy_with_integer_labels(plain, labels),
                             rtol=1e-5)


# --------------------------------------------------------------------------
# End to end: the gpu recipe's tiny version, then the fine-tuning command.


def repo_copy(dest):
  """The programs and packages of the repository, copied to ``dest``."""
  for name in ('configs', 'mil_jax'):
    shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns('__pycache__'))
  for script in ('train_pretrain.py', 'train_classifier.py'):
    shutil.copy(ROOT / script, dest / script)
  return dest


def test_finetune_command_over_a_tiny_mae(tmp_path):
  from mil_jax import pretrain  # noqa: PLC0415
  repo = repo_copy(tmp_path / 'repo')
  runs = repo / 'runs'
  pre = mae_config.get_config('gpu,runlocal')  # bfloat16, as the recipe
  pre.model.depth = 2  # so that the last block has a drop path rate
  pre.num_epochs, pre.data.fake_train_size, pre.data.fake_test_size = 1, 64, 32
  pretrain.train_and_evaluate(pre, runs / 'mae')
  _, pretrained = latest_params(runs / 'mae')

  # As the README has it: run from the repository, paths relative to it.
  args = ['train_classifier.py', '--mode', 'fine_tune', '--nofreeze', '--config',
          'configs/classifier.py:finetune,runlocal', '--pretrained_path', 'runs/mae',
          '--workdir', 'runs/ft', '--num_epochs', '1',
          '--config.data.fake_train_size=64', '--config.data.fake_test_size=32']
  out = run_command(args, cwd=repo, env={'PYTHONPATH': str(repo)})
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'epoch 1/1 step 2:' in out.stdout and 'eval/accuracy' in out.stdout
  metrics = [json.loads(line) for line in (runs / 'ft' / 'metrics.jsonl').open()]
  assert 0.0 <= metrics[-1]['eval/accuracy'] <= 1.0
  stored = json.loads((runs / 'ft' / 'config.json').read_text())
  assert stored['optim']['layer_decay'] == 0.75 and stored['drop_path_rate'] == 0.1
  assert stored['mix']['cutmix_alpha'] == 1.0 and stored['randaugment']['num_ops'] == 2

  _, tuned = latest_params(runs / 'ft')
  change = lambda t: max(float(np.abs(a).max()) for a in jax.tree.leaves(t))
  delta = jax.tree.map(lambda a, b: a - b, tuned['encoder'], pretrained['encoder'])
  # Two AdamW steps move every parameter by about lr * scale per step at most, so
  # the largest move in each layer follows the layer's scale, 0.75 ** (3 - layer).
  top = change(delta['transformer']['norm'])
  layers = {0: {k: delta[k] for k in ('patch_embed', 'cls_token')},
            1: delta['transformer']['block_0'], 2: delta['transformer']['block_1']}
  for layer, moved in layers.items():
    assert change(moved) / top == pytest.approx(0.75 ** (3 - layer), rel=0.1), layer

  bad = [a if a != 'runs/ft' else 'runs/bad' for a in args]
  out = run_command([*bad, '--config.optim.layer_decay=2.0'], cwd=repo,
                    env={'PYTHONPATH': str(repo)})
  assert out.returncode == 2
  assert out.stderr.strip().splitlines() == [
      'error: optim.layer_decay must be in (0, 1], got 2.0.']
  assert not (runs / 'bad').exists()
