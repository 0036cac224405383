"""The shared loop: exact evaluation over a partial last batch; a bfloat16 step tracks float32."""
import jax
import numpy as np
import pytest

from configs import classifier as classifier_config
from configs import conv as conv_config
from configs import fc as fc_config
from configs import mae as mae_config
from mil_jax import classify, models, pretrain, sharding
from mil_jax import input_pipeline as ip

BATCH = 32


def host_copy(tree):
  return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def pixels(images: np.ndarray) -> np.ndarray:
  """uint8 images -> float32 in [-1, 1], written out here rather than taken from the pipeline."""
  return images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def splits(config, mesh, eval_split=None):
  train = ip.load_split(config.data, config.data.train_split)
  held_out = ip.load_split(config.data, eval_split or config.data.eval_split)
  return (ip.DeviceSplit.create(train, mesh), ip.DeviceSplit.create(held_out, mesh), held_out)


# ---------------------------------------------------------------- evaluation


@pytest.mark.parametrize('module,variant', [(conv_config, '192,runlocal'),
                                            (fc_config, 'l1,runlocal')], ids=['conv_l2', 'fc_l1'])
def test_pretraining_eval_is_the_mean_over_every_example(module, variant):
  config = module.get_config(variant)
  config.data.fake_train_size, config.data.fake_test_size = 64, 40  # 40 = 32 + 8
  mesh = sharding.make_mesh()
  model = models.build_autoencoder(config.model)
  train, held_out, split = splits(config, mesh)
  loop, params = pretrain.build_trainer(config, model, train, held_out, mesh)
  got = loop.evaluate(loop.init_state(params))

  # The truth: the model applied to one image at a time, every metric in numpy.
  reconstruct = jax.jit(lambda p, x: model.apply({'params': p}, x, train=False)[0])
  params = host_copy(params)
  loss, mse = [], []
  for image in split.images:
    x = pixels(image[None])
    recon = np.asarray(reconstruct(params, x), np.float64)
    err = recon - x
    loss.append(np.mean(np.abs(err)) if config.loss == 'l1' else np.mean(np.square(err)))
    mse.append(np.mean(np.square(np.clip(recon, -1.0, 1.0) - x)))
  loss, mse = np.array(loss), np.array(mse)
  assert len(loss) == 40 and loss[-1] != loss.mean()  # the padding repeats a row that matters
  want = {'eval/loss': loss.mean(), 'eval/mse': mse.mean(),
          'eval/psnr': np.mean(10.0 * np.log10(4.0 / mse))}
  assert got == pytest.approx(want, rel=1e-5)


def classifier_truth(clf, params, model_state, split):
  """Per example: cross-entropy, top-1 hit, top-5 hit, from one image at a time in float64."""
  logits_of = jax.jit(lambda x: clf.apply({'params': params, **model_state}, x, train=False))
  loss, top1, top5 = [], [], []
  for image, label in zip(split.images, split.labels):
    logits = np.asarray(logits_of(pixels(image[None])), np.float64)[0]
    shifted = logits - logits.max()
    loss.append(np.log(np.exp(shifted).sum()) - shifted[label])
    ranked = np.argsort(-logits)
    top1.append(ranked[0] == label)
    top5.append(label in ranked[:5])
  return np.array(loss), np.array(top1), np.array(top5)


@pytest.mark.parametrize('mode,freeze', [('probing', True), ('fine_tune', False)],
                         ids=['cached_features', 'images'])
def test_classifier_eval_is_the_mean_over_every_example(mode, freeze):
  config = classifier_config.get_config('runlocal')
  config.update(mode=mode, freeze=freeze)
  config.data.fake_train_size, config.data.fake_test_size = 64, 96
  model_cfg = dict(conv_config.get_config('192,runlocal').model)
  mesh = sharding.make_mesh()
  clf = classify.build_classifier(config, model_cfg, 10)
  params, model_state = classify._init(clf, config, None, mesh)
  loss, top1, top5 = classifier_truth(clf, host_copy(params), model_state,
                                      ip.load_split(config.data, 'test'))
  # Evaluate on the first n test images, n ending on a top-1 hit inside a
  # partial batch: the rows padding that batch (copies of the last) would
  # then move the accuracy, the top-5 and the loss if they counted.
  n = max(i + 1 for i in np.flatnonzero(top1) if (i + 1) % BATCH and i + 1 > BATCH)
  loss, top1, top5 = loss[:n], top1[:n], top5[:n]
  assert top1.mean() < 1 and top5.mean() < 1

  train, held_out, _ = splits(config, mesh, f'test[:{n}]')
  loop, loop_params, loop_state = classify.build_trainer(config, model_cfg, None, train,
                                                         held_out, mesh)
  jax.tree.map(np.testing.assert_array_equal, host_copy(loop_params), host_copy(params))
  got = loop.evaluate(loop.init_state(loop_params, loop_state))
  assert got['eval/loss'] == pytest.approx(loss.mean(), rel=1e-5)
  assert got['eval/accuracy'] == pytest.approx(top1.mean(), rel=1e-6)
  assert got['eval/top5'] == pytest.approx(top5.mean(), rel=1e-6)


# ---------------------------------------------------------------- bfloat16


def one_sgd_step(module, variant, dtype):
  """``(params before, params after, loss)`` of one plain-SGD step (lr 1: update = -gradient)."""
  config = module.get_config(variant)
  config.model.dtype = dtype
  config.data.fake_train_size, config.data.fake_test_size = BATCH, 8
  config.optim.update(name='sgd', lr=1.0, b1=0.0, schedule='constant', warmup_epochs=0,
                      weight_decay=0.0)
  mesh = sharding.make_mesh()
  train, held_out, _ = splits(config, mesh)
  loop, params = pretrain.build_trainer(config, models.build_autoencoder(config.model), train,
                                        held_out, mesh)
  before = host_copy(params)
  state = loop.init_state(params)
  state, metrics = loop.train_chunk(state, loop.train_data, loop.permutation(state.step), 1)
  return before, host_copy(state.params), float(metrics['train/loss'][0])


# The stated tolerances, over measurements on a 2-core x86 CPU: the loss of a
# bfloat16 step was within 0.05 % of float32's, and each tensor's update within
# 6.7 % (FC) and 1.7 % (MAE) of float32's, except for the biases and the MAE's
# mask token: their gradients are sums over every example and token, which
# XLA:CPU adds up in bfloat16, and were off by up to 33 % (the decoder's qkv
# bias, the mask token summed over 1,536 masked patches).
LOSS_RTOL, UPDATE_RTOL, SUMMED_UPDATE_RTOL = 1e-2, 0.15, 0.5
SUMMED = ("['bias']", "['mask_token']")


@pytest.mark.parametrize('module,variant', [(fc_config, 'l2,runlocal'),
                                            (mae_config, 'seed,runlocal')], ids=['fc', 'mae'])
def test_one_bfloat16_step_tracks_float32(module, variant):
  before, after32, loss32 = one_sgd_step(module, variant, 'float32')
  before16, after16, loss16 = one_sgd_step(module, variant, 'bfloat16')
  jax.tree.map(np.testing.assert_array_equal, before16, before)  # the same start
  assert loss16 == pytest.approx(loss32, rel=LOSS_RTOL)
  flat = lambda tree: jax.tree_util.tree_flatten_with_path(tree)[0]
  differ = False
  for (path, b), (_, p32), (_, p16) in zip(flat(before), flat(after32), flat(after16)):
    name = jax.tree_util.keystr(path)
    assert p16.dtype == np.float32, name  # parameters stay float32
    update32, update16 = p32.astype(np.float64) - b, p16.astype(np.float64) - b
    error = np.linalg.norm(update16 - update32) / np.linalg.norm(update32)
    assert error <= (SUMMED_UPDATE_RTOL if name.endswith(SUMMED) else UPDATE_RTOL), (name, error)
    differ |= error > 0
  assert differ, 'the bfloat16 step equals the float32 one: bfloat16 was not used'
