"""Tests of mil_jax.losses: values, masking, normalized targets, dispatch."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import fc as fc_config
from configs import mae as mae_config
from configs import masked_unet as unet_config
from mil_jax import losses, models
from mil_jax.errors import UserError
from mil_jax.models import mae


def _images(seed: int, batch: int = 3) -> np.ndarray:
  return np.random.default_rng(seed).uniform(-1, 1, (batch, 32, 32, 3)).astype(np.float32)


def _mask(batch: int = 3, num_patches: int = 64, seed: int = 0) -> np.ndarray:
  _, mask, _ = mae.random_masking(jax.random.key(seed), batch, num_patches, 0.75)
  return np.asarray(mask)


def test_l2_and_l1_match_numpy():
  recon, images = _images(0), _images(1)
  for loss, err in ((losses.l2, np.square), (losses.l1, np.abs)):
    scalar, per_example = loss(jnp.asarray(recon), jnp.asarray(images))
    want = err(recon - images).reshape(3, -1).mean(axis=1)
    assert per_example.shape == (3,)
    np.testing.assert_allclose(per_example, want, rtol=1e-5)
    np.testing.assert_allclose(scalar, want.mean(), rtol=1e-5)
  assert float(losses.l2(jnp.asarray(images), jnp.asarray(images))[0]) == 0.0


def test_masked_l2_averages_over_removed_patches_only():
  pred = np.random.default_rng(2).normal(size=(3, 64, 48)).astype(np.float32)
  images, mask = _images(3), _mask()
  scalar, per_example = losses.masked_l2(pred, images, mask, patch_size=4, norm_pix=False)
  per_patch = np.square(pred - np.asarray(mae.patchify(images, 4))).mean(axis=-1)
  want = np.array([per_patch[b][mask[b] == 1].mean() for b in range(3)])
  assert per_example.shape == (3,)
  np.testing.assert_allclose(per_example, want, rtol=1e-5)
  np.testing.assert_allclose(scalar, per_patch[mask == 1].mean(), rtol=1e-5)


@pytest.mark.parametrize('norm_pix', [False, True])
def test_masked_l2_ignores_visible_target_pixels(norm_pix):
  pred = np.random.default_rng(4).normal(size=(3, 64, 48)).astype(np.float32)
  images, mask = _images(5), _mask()
  base = losses.masked_l2(pred, images, mask, patch_size=4, norm_pix=norm_pix)
  noise = np.random.default_rng(6).normal(size=(3, 64, 48)).astype(np.float32)
  # Changing pixels inside visible patches leaves the loss unchanged...
  visible_changed = mae.unpatchify(noise * (1 - mask)[..., None], 4, 32, 32) + images
  after = losses.masked_l2(pred, visible_changed, mask, patch_size=4, norm_pix=norm_pix)
  np.testing.assert_allclose(after[1], base[1], rtol=1e-6)
  # ...changing pixels inside removed patches changes it, for every image.
  masked_changed = mae.unpatchify(noise * mask[..., None], 4, 32, 32) + images
  after = losses.masked_l2(pred, masked_changed, mask, patch_size=4, norm_pix=norm_pix)
  assert np.all(np.abs(np.asarray(after[1]) - np.asarray(base[1])) > 1e-3)


def test_masked_l2_gradient_is_zero_on_visible_patches():
  pred = jnp.asarray(np.random.default_rng(7).normal(size=(3, 64, 48)), jnp.float32)
  images, mask = _images(8), _mask()
  grad = jax.grad(lambda p: losses.masked_l2(p, images, mask, patch_size=4, norm_pix=False)[0])(
      pred)
  norms = np.abs(np.asarray(grad)).sum(axis=-1)
  assert np.all(norms[mask == 0] == 0.0)
  assert np.all(norms[mask == 1] > 0.0)


def test_norm_pix_targets_are_per_patch_normalized():
  images, mask = _images(9), _mask()
  target = np.asarray(mae.patchify(images, 4))
  mean = target.mean(-1, keepdims=True)
  normalized = (target - mean) / np.sqrt(target.var(-1, keepdims=True) + 1e-6)
  loss, _ = losses.masked_l2(normalized, images, mask, patch_size=4, norm_pix=True)
  assert float(loss) < 1e-8
  # Brightness and contrast of a patch do not matter to normalized targets.
  rescaled = mae.unpatchify(3.0 * target + 0.5, 4, 32, 32)
  loss, _ = losses.masked_l2(normalized, rescaled, mask, patch_size=4, norm_pix=True)
  assert float(loss) < 1e-6
  loss, _ = losses.masked_l2(normalized, rescaled, mask, patch_size=4, norm_pix=False)
  assert float(loss) > 0.1


def test_masked_l2_with_nothing_removed_is_zero_not_nan():
  pred = np.ones((2, 64, 48), np.float32)
  scalar, per_example = losses.masked_l2(pred, _images(0, 2), np.zeros((2, 64)), patch_size=4,
                                         norm_pix=False)
  assert float(scalar) == 0.0
  np.testing.assert_array_equal(per_example, [0.0, 0.0])


def test_pretrain_loss_dispatches_on_config_loss():
  images, recon = _images(10), _images(11)
  config = fc_config.get_config('l1')
  np.testing.assert_allclose(losses.pretrain_loss(config, images, recon, {})[0],
                             losses.l1(recon, images)[0])
  config.loss = 'l2'
  np.testing.assert_allclose(losses.pretrain_loss(config, images, recon, {})[0],
                             losses.l2(recon, images)[0])

  config = mae_config.get_config('seed')  # patch 2: 256 patches of 12 values
  pred = np.random.default_rng(12).normal(size=(3, 256, 12)).astype(np.float32)
  aux = {'pred_patches': pred, 'mask': _mask(num_patches=256)}
  for norm_pix in (False, True):
    config.model.norm_pix_loss = norm_pix
    got = losses.pretrain_loss(config, images, recon, aux)
    want = losses.masked_l2(pred, images, aux['mask'], patch_size=2, norm_pix=norm_pix)
    np.testing.assert_allclose(got[0], want[0])
    np.testing.assert_allclose(got[1], want[1])


def _pixel_mask(mask: np.ndarray, patch_size: int = 4) -> np.ndarray:
  """[B, N] -> [B, 32, 32]: each pixel's patch entry, by index arithmetic."""
  idx = (np.arange(32)[:, None] // patch_size) * (32 // patch_size) + np.arange(32) // patch_size
  return mask[:, idx]


@pytest.mark.parametrize('visible_weight', [0.0, 0.1, 1.0])
def test_masked_image_l2_weights_removed_and_visible_pixels(visible_weight):
  recon, images, mask = _images(20), _images(21), _mask(seed=3)
  scalar, per_example = losses.masked_image_l2(recon, images, mask, patch_size=4,
                                               visible_weight=visible_weight)
  err = np.square(recon - images).sum(axis=-1)               # [B, 32, 32]
  removed = _pixel_mask(mask)
  num = (err * removed).sum((1, 2)) + visible_weight * (err * (1 - removed)).sum((1, 2))
  den = 3 * (removed.sum((1, 2)) + visible_weight * (1 - removed).sum((1, 2)))
  np.testing.assert_allclose(per_example, num / den, rtol=1e-5)
  np.testing.assert_allclose(scalar, num.sum() / den.sum(), rtol=1e-5)
  if visible_weight == 1.0:   # every pixel alike: the plain mean squared error
    np.testing.assert_allclose(per_example, losses.l2(recon, images)[1], rtol=1e-5)


def test_masked_image_l2_ignores_visible_pixels_at_weight_zero():
  recon, images, mask = _images(22), _images(23), _mask(seed=4)
  removed = _pixel_mask(mask)[..., None]
  loss = lambda r, w=0.0: losses.masked_image_l2(r, images, mask, patch_size=4,
                                                 visible_weight=w)
  noise = np.random.default_rng(24).normal(size=recon.shape).astype(np.float32)
  base = loss(recon)[1]
  np.testing.assert_allclose(loss(recon + noise * (1 - removed))[1], base, rtol=1e-6)
  assert np.all(np.abs(np.asarray(loss(recon + noise * removed)[1]) - base) > 1e-3)
  # ...and with a weight the visible pixels count.
  assert np.all(np.abs(np.asarray(loss(recon + noise * (1 - removed), 0.1)[1])
                       - np.asarray(loss(recon, 0.1)[1])) > 1e-3)
  grad = np.asarray(jax.grad(lambda r: loss(r)[0])(jnp.asarray(recon)))
  assert np.all(grad[np.broadcast_to(removed, grad.shape) == 0] == 0.0)
  assert np.all(np.abs(grad).sum(-1)[removed[..., 0] == 1] > 0.0)


def test_pretrain_loss_of_the_masked_unet_config():
  config = unet_config.get_config('base')
  recon, images, mask = _images(25), _images(26), _mask(seed=5)
  got = losses.pretrain_loss(config, images, recon, {'mask': mask})
  want = losses.masked_image_l2(recon, images, mask, patch_size=4,
                                visible_weight=config.visible_loss_weight)
  assert config.visible_loss_weight > 0
  np.testing.assert_allclose(got[1], want[1])
  conv = fc_config.get_config()
  conv.loss = 'masked_image_l2'
  with pytest.raises(UserError, match='masked_unet'):
    losses.pretrain_loss(conv, images, recon, {})
  mae_cfg = mae_config.get_config('seed,runlocal')
  mae_cfg.loss = 'masked_image_l2'
  with pytest.raises(UserError, match='masked_unet'):
    losses.pretrain_loss(mae_cfg, images, recon, {'mask': mask, 'pred_patches': mask})


def test_pretrain_loss_user_errors():
  images = _images(13)
  with pytest.raises(UserError, match="'huber'.*l1, l2, masked_image_l2, masked_l2"):
    losses.pretrain_loss(ml_collections.ConfigDict({'loss': 'huber'}), images, images, {})
  config = fc_config.get_config()
  config.loss = 'masked_l2'
  with pytest.raises(UserError, match='mae'):
    losses.pretrain_loss(config, images, images, {})


def test_mae_loss_gradient_reaches_encoder_and_decoder():
  before = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', True)  # compile 3x faster on CPU
  try:
    config = mae_config.get_config('seed,runlocal')
    ae = models.build_autoencoder(config.model)
    images = jnp.asarray(_images(14, batch=2))
    shapes = jax.eval_shape(
        lambda x: ae.init({'params': jax.random.key(0), 'masking': jax.random.key(0)}, x,
                          train=False), images)
    rng = np.random.default_rng(15)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(scale=0.1, size=s.shape), s.dtype),
                          shapes)['params']

    @jax.jit
    def grads(params, images, key):
      def loss_fn(params):
        recon, aux = ae.apply({'params': params}, images, train=True, rngs={'masking': key})
        return losses.pretrain_loss(config, images, recon, aux)[0]
      return jax.value_and_grad(loss_fn)(params)

    loss, g = grads(params, images, jax.random.key(1))
  finally:
    jax.config.update('jax_disable_most_optimizations', before)
  assert np.isfinite(float(loss)) and float(loss) > 0
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(g))
  for path in (('encoder', 'patch_embed', 'kernel'), ('encoder', 'cls_token'),
               ('decoder', 'mask_token'), ('decoder', 'pred', 'kernel')):
    leaf = g
    for key in path:
      leaf = leaf[key]
    assert float(jnp.abs(leaf).sum()) > 0, path
