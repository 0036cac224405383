"""Tests of mil_jax.augment: every RandAugment op against a NumPy version, mixup and cutmix."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import classifier as classifier_config
from mil_jax import augment
from mil_jax.errors import UserError

H = W = 32
C = (W - 1) / 2  # the center, in pixel indices


# --------------------------------------------------------------------------
# NumPy versions of the ops, written from their definitions (float64, loops).


def np_round(x):
  return np.clip(np.floor(np.asarray(x, np.float64) + 0.5), 0, 255)


def np_blend(degenerate, image, factor):
  return np_round(degenerate + factor * (image - degenerate))


def np_gray(image):
  return np_round(0.299 * image[..., 0] + 0.587 * image[..., 1] + 0.114 * image[..., 2])


def np_warp(image, source):
  """out[y, x] = image at the nearest pixel to source(x, y); 128 outside."""
  out = np.full_like(image, 128.0)
  for y in range(H):
    for x in range(W):
      sx, sy = source(x, y)
      ix, iy = math.floor(sx + 0.5), math.floor(sy + 0.5)
      if 0 <= ix < W and 0 <= iy < H:
        out[y, x] = image[iy, ix]
  return out


def np_rotate(image, level):
  t = math.radians(30 * level)
  return np_warp(image, lambda x, y: (C + math.cos(t) * (x - C) - math.sin(t) * (y - C),
                                      C + math.sin(t) * (x - C) + math.cos(t) * (y - C)))


def np_auto_contrast(image, level):
  out = image.copy()
  for c in range(3):
    lo, hi = image[..., c].min(), image[..., c].max()
    if hi > lo:
      out[..., c] = np_round((image[..., c] - lo) * 255.0 / (hi - lo))
  return out


def np_equalize(image, level):
  # PIL's ImageOps.equalize, step by step.
  out = image.copy()
  for c in range(3):
    values = image[..., c].astype(np.int64)
    hist = np.bincount(values.ravel(), minlength=256)
    present = hist[hist > 0]
    step = (present.sum() - present[-1]) // 255
    if len(present) <= 1 or step == 0:
      continue
    lut, n = [], step // 2
    for i in range(256):
      lut.append(min(n // step, 255))
      n += hist[i]
    out[..., c] = np.asarray(lut)[values]
  return out


def np_posterize(image, level):
  bits = int(math.floor(abs(level) * 4 + 0.5))
  return (image.astype(np.uint8) & np.uint8((0xFF << bits) & 0xFF)).astype(np.float64)


def np_solarize(image, level):
  threshold = 256 * (1 - abs(level))
  return np.where(image >= threshold, 255 - image, image)


def np_sharpness(image, level):
  degenerate = image.copy()
  kernel = np.ones((3, 3))
  kernel[1, 1] = 5
  for y in range(1, H - 1):
    for x in range(1, W - 1):
      for c in range(3):
        degenerate[y, x, c] = np_round((image[y - 1:y + 2, x - 1:x + 2, c] * kernel).sum() / 13)
  return np_blend(degenerate, image, 1 + 0.9 * level)


NP_OPS = {
    'identity': lambda img, level: img,
    'auto_contrast': np_auto_contrast,
    'equalize': np_equalize,
    'rotate': np_rotate,
    'solarize': np_solarize,
    'color': lambda img, level: np_blend(np_gray(img)[..., None], img, 1 + 0.9 * level),
    'posterize': np_posterize,
    'contrast': lambda img, level: np_blend(np.floor(np_gray(img).mean() + 0.5), img,
                                            1 + 0.9 * level),
    'brightness': lambda img, level: np_round(img * (1 + 0.9 * level)),
    'sharpness': np_sharpness,
    'shear_x': lambda img, level: np_warp(img, lambda x, y: (x + 0.3 * level * (y - C), y)),
    'shear_y': lambda img, level: np_warp(img, lambda x, y: (x, y + 0.3 * level * (x - C))),
    'translate_x': lambda img, level: np_warp(img, lambda x, y: (x + 0.45 * W * level, y)),
    'translate_y': lambda img, level: np_warp(img, lambda x, y: (x, y + 0.45 * H * level)),
}
GEOMETRIC = ('rotate', 'shear_x', 'shear_y', 'translate_x', 'translate_y')


def test_every_op_has_a_numpy_version():
  assert list(NP_OPS) == list(augment.OPS)


def images(seed, n=3):
  """Natural-ish images: smooth colour gradients plus noise, not spanning 0..255."""
  rng = np.random.default_rng(seed)
  ys, xs = np.mgrid[:H, :W] / (H - 1)
  out = []
  for _ in range(n):
    a, b, c = rng.uniform(-60, 60, size=(3, 3))
    base = rng.uniform(70, 180, size=3)
    img = base + a * xs[..., None] + b * ys[..., None] + c * (xs * ys)[..., None]
    out.append(np.clip(img + rng.normal(0, 12, size=img.shape), 20, 235).round())
  return np.stack(out)


@pytest.mark.parametrize('name', list(augment.OPS))
@pytest.mark.parametrize('level', [0.9, -0.57, 0.33])
def test_op_matches_numpy(name, level):
  op = jax.jit(augment.OPS[name])
  for img in images(seed=len(name)):
    got = np.asarray(op(jnp.asarray(img, jnp.float32), jnp.float32(level)), np.float64)
    want = NP_OPS[name](img, level)
    assert got.shape == want.shape
    assert np.array_equal(got, np.round(got)) and got.min() >= 0 and got.max() <= 255
    if name in GEOMETRIC or name in ('posterize', 'solarize', 'identity', 'equalize'):
      np.testing.assert_array_equal(got, want)
    else:  # float32 here, float64 there: a value on a rounding edge may differ by 1
      assert np.abs(got - want).max() <= 1
      assert np.mean(got == want) > 0.99


@pytest.mark.parametrize('name', [n for n in augment.OPS if n not in ('auto_contrast', 'equalize')])
def test_magnitude_zero_is_identity(name):
  img = images(seed=7, n=1)[0]
  img[0, :4] = [[0, 0, 0], [255, 255, 255], [1, 254, 128], [127, 128, 129]]  # the range's ends
  for sign in (1.0, -1.0):
    got = augment.OPS[name](jnp.asarray(img, jnp.float32), jnp.float32(sign * 0.0))
    np.testing.assert_array_equal(np.asarray(got), img)


def test_solarize_threshold_is_inclusive():
  values = jnp.array([[[126.0, 127.0, 128.0], [129.0, 0.0, 255.0]]])
  got = augment.solarize(values, jnp.float32(-0.5))  # threshold 256 * 0.5 = 128
  np.testing.assert_array_equal(got, [[[126, 127, 127], [126, 0, 0]]])


def test_rotation_is_counter_clockwise_and_fills_gray():
  img = np.zeros((H, W, 3))
  img[16, 28] = 255.0  # a dot right of the center
  out = np.asarray(augment.rotate(jnp.asarray(img, jnp.float32), jnp.float32(1.0)))
  bright = np.argwhere(out[..., 0] == 255)
  # 30 degrees counter-clockwise on screen moves it up: (16, 28) -> about (9.7, 26.6);
  # clockwise would move it down to about y = 22.
  assert [10, 27] in bright.tolist()
  assert (bright[:, 0] < 12).all() and ((bright[:, 1] >= 25) & (bright[:, 1] <= 28)).all()
  assert out[0, 0, 0] == augment.FILL  # a corner rotated in from outside the image


def test_randaugment_applies_the_drawn_ops_in_order():
  imgs = images(seed=3, n=8).astype(np.uint8)
  rng = jax.random.key(5)
  out = jax.jit(lambda k, x: augment.randaugment(k, x, num_ops=2, magnitude=7.0))(rng, imgs)
  assert out.dtype == jnp.uint8 and out.shape == imgs.shape
  ops, signs = augment.randaugment_choices(rng, 8, 2)
  names = list(augment.OPS)
  for i in range(8):
    want = imgs[i].astype(np.float64)
    for j in range(2):
      want = NP_OPS[names[int(ops[i, j])]](want, float(signs[i, j]) * 0.7)
    assert np.abs(np.asarray(out[i], np.float64) - want).max() <= 1, [names[o] for o in ops[i]]
  np.testing.assert_array_equal(augment.randaugment(rng, imgs, num_ops=0, magnitude=7.0), imgs)


def test_randaugment_choices_are_uniform_with_random_signs():
  ops, signs = augment.randaugment_choices(jax.random.key(0), 7000, 2)
  counts = np.bincount(np.asarray(ops).ravel(), minlength=len(augment.OPS))
  assert len(counts) == len(augment.OPS)
  expected = ops.size / len(augment.OPS)  # 1000 per op; binomial sd about 30
  assert np.abs(counts - expected).max() < 5 * math.sqrt(expected)
  assert set(np.unique(np.asarray(signs))) == {-1.0, 1.0}
  assert abs(np.mean(np.asarray(signs) == 1.0) - 0.5) < 0.02


# --------------------------------------------------------------------------
# Mixup and cutmix.


def ks_distance(a, b):
  """The two-sample Kolmogorov-Smirnov statistic."""
  a, b = np.sort(a), np.sort(b)
  grid = np.concatenate([a, b])
  return np.abs(np.searchsorted(a, grid, side='right') / len(a)
                - np.searchsorted(b, grid, side='right') / len(b)).max()


def draw(seed, batch, **kw):
  args = dict(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5)
  args.update(kw)
  return jax.jit(lambda k: augment.draw_mix(k, batch, H, W, **args))(jax.random.key(seed))


@pytest.mark.parametrize('alpha', [0.8, 0.3])
def test_mixup_lambda_is_beta_distributed(alpha):
  d = draw(0, 20000, mixup_alpha=alpha, cutmix_alpha=0.0)
  assert not np.asarray(d.cutmix).any()
  np.testing.assert_array_equal(d.lam, d.beta)
  reference = np.random.default_rng(0).beta(alpha, alpha, size=20000)
  assert ks_distance(np.asarray(d.lam), reference) < 0.025  # 0.1 % critical value: 0.0195
  # Beta(a, a) has variance 1 / (4 (2a + 1)).
  assert np.var(np.asarray(d.lam)) == pytest.approx(1 / (4 * (2 * alpha + 1)), rel=0.05)


def test_cutmix_box_area_matches_lambda():
  d = draw(1, 20000, mixup_alpha=0.0, cutmix_alpha=1.0)
  assert np.asarray(d.cutmix).all()
  beta, lam, box = np.asarray(d.beta), np.asarray(d.lam), np.asarray(d.box)
  reference = np.random.default_rng(2).beta(1.0, 1.0, size=20000)
  assert ks_distance(beta, reference) < 0.025
  h, w = box[:, 1] - box[:, 0], box[:, 3] - box[:, 2]
  assert (box[:, [0, 2]] >= 0).all() and (box[:, 1] <= H).all() and (box[:, 3] <= W).all()
  np.testing.assert_allclose(lam, 1 - h * w / (H * W), atol=1e-6)
  # Boxes away from the border keep the side drawn: floor(32 sqrt(1 - beta)).
  side = np.floor(H * np.sqrt(1 - beta))
  inner = (box[:, 0] > 0) & (box[:, 1] < H) & (box[:, 2] > 0) & (box[:, 3] < W)
  assert inner.mean() > 0.1
  np.testing.assert_array_equal(h[inner], side[inner])
  np.testing.assert_array_equal(w[inner], side[inner])
  assert (h <= side).all() and (w <= side).all()


def test_switch_prob_picks_cutmix():
  for p in (0.5, 0.2):
    cutmix = np.asarray(draw(3, 10000, switch_prob=p).cutmix)
    assert abs(cutmix.mean() - p) < 4 * math.sqrt(p * (1 - p) / 10000)


def test_mixed_images_and_targets_follow_the_formula():
  batch, classes = 64, 10
  rng = np.random.default_rng(4)
  x = rng.normal(size=(batch, H, W, 3)).astype(np.float32)
  labels = rng.integers(0, classes, size=batch)
  t = np.full((batch, classes), 0.01, np.float32)
  t[np.arange(batch), labels] = 0.91  # smoothed one-hot: rows sum to 1
  config = ml_collections.ConfigDict(dict(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5))
  key = jax.random.key(9)
  got_x, got_t = augment.mix(key, jnp.asarray(x), jnp.asarray(t), config)
  d = augment.draw_mix(key, batch, H, W, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5)
  cutmix, lam, box = np.asarray(d.cutmix), np.asarray(d.lam, np.float64), np.asarray(d.box)
  assert 10 < cutmix.sum() < 54
  want_x = np.empty_like(x)
  for i in range(batch):
    j = batch - 1 - i
    if cutmix[i]:
      want_x[i] = x[i]
      y0, y1, x0, x1 = box[i]
      want_x[i, y0:y1, x0:x1] = x[j, y0:y1, x0:x1]
      taken = np.mean(np.all(np.asarray(got_x[i]) == x[j], axis=-1) & ~np.all(
          np.asarray(got_x[i]) == x[i], axis=-1))
      assert taken == pytest.approx(1 - lam[i], abs=1e-6)  # pixel share = target share
    else:
      want_x[i] = lam[i] * x[i] + (1 - lam[i]) * x[j]
  np.testing.assert_allclose(got_x, want_x, rtol=1e-5, atol=1e-5)
  want_t = lam[:, None] * t + (1 - lam[:, None]) * t[::-1]
  np.testing.assert_allclose(got_t, want_t, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(got_t).sum(axis=1), 1.0, atol=1e-5)


def test_mix_off_returns_the_batch():
  x, t = jnp.ones((4, H, W, 3)), jnp.eye(4)
  config = ml_collections.ConfigDict(dict(mixup_alpha=0.0, cutmix_alpha=0.0, switch_prob=0.5))
  got_x, got_t = augment.mix(jax.random.key(0), x, t, config)
  assert got_x is x and got_t is t


@pytest.mark.parametrize('block,field,value,message', [
    ('randaugment', 'magnitude', 11.0, 'magnitude in'),
    ('randaugment', 'num_ops', -1, 'num_ops >= 0'),
    ('mix', 'mixup_alpha', -0.5, 'alphas >= 0'),
    ('mix', 'switch_prob', 1.5, r'switch_prob in \[0, 1\]'),
    ('mix', 'cutmix_alpha', float('inf'), 'finite'),
])
def test_out_of_range_fields_are_user_errors(block, field, value, message):
  config = classifier_config.get_config('finetune')
  augment.check(config)  # the recipe itself is fine
  config[block][field] = value
  with pytest.raises(UserError, match=message):
    augment.check(config)
