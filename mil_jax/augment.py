"""Stronger augmentation on the device: RandAugment, mixup and cutmix.

Like the crop and flip of ``input_pipeline.augment``, everything here runs
inside the jitted train step on the batch gathered there, with keys derived
from the step's ``'augment'`` key, so a resumed run draws the same numbers.

RandAugment (Cubuk et al. 2019) applies ``num_ops`` operations in a row to
each image, each drawn uniformly from ``OPS``, all at one ``magnitude`` on a
0-10 scale; ops that have a direction (rotate, shear, translate, the
enhancements) take it at random per image. Each op works on uint8 values,
rounding half up and clipping to [0, 255] after every op, as the PIL ops
that define RandAugment do. Under ``vmap`` the per-image choice of op becomes
a select over all of them: every op runs on every image, which costs little
next to a ViT's forward and backward pass (no matrix multiplies).

Mixup (Zhang et al. 2018) and cutmix (Yun et al. 2019) mix every image with
its partner in the reversed batch, and its soft target with the partner's by
the same weight: mixup blends the pixels with lambda ~ Beta(a, a); cutmix
pastes a box of the partner whose area is about 1 - lambda of the image, and
the target weight is then the share of pixels the image kept.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections

from mil_jax import input_pipeline as ip
from mil_jax.errors import UserError

# Pixels that a geometric op uncovers: mid-gray, which ``to_float`` maps to
# about 0, the normalized data's mean, so the filled area carries no signal.
FILL = 128.0
MAX_MAGNITUDE = 10.0
# At magnitude 10 (level 1): the largest rotation, shear, shift and
# enhancement, as in the RandAugment code of the MAE fine-tuning recipe (timm).
MAX_ROTATE_DEGREES = 30.0
MAX_SHEAR = 0.3
MAX_TRANSLATE = 0.45        # of the image side
MAX_ENHANCE = 0.9           # factor 1 +- this
MAX_POSTERIZE_BITS = 4      # bits removed
# Keys folded into the step's 'augment' key (crop and flip use it as is).
RANDAUGMENT_KEY, MIX_KEY = 1, 2


def _round(x: jax.Array) -> jax.Array:
  # PIL-style results: round half up, then clip to the uint8 range.
  return jnp.clip(jnp.floor(x + 0.5), 0.0, 255.0)


def _blend(degenerate: jax.Array, image: jax.Array, factor: jax.Array) -> jax.Array:
  """PIL's ImageEnhance: ``degenerate + factor * (image - degenerate)``."""
  return _round(degenerate + factor * (image - degenerate))


def _gray(image: jax.Array) -> jax.Array:
  """[H, W, 3] -> [H, W, 1] luma (ITU-R 601-2, as PIL's 'L' mode), rounded."""
  return _round(image @ jnp.array([0.299, 0.587, 0.114], image.dtype))[..., None]


def _affine(image: jax.Array, matrix: jax.Array, shift: jax.Array) -> jax.Array:
  """Nearest-neighbour warp about the image center.

  Output pixel ``p = (x, y)`` reads input pixel ``c + matrix @ (p - c) + shift``
  (rounded half up), with ``c`` the center; pixels read from outside get FILL.
  """
  h, w, _ = image.shape
  ys, xs = jnp.mgrid[:h, :w]
  center = jnp.array([(w - 1) / 2, (h - 1) / 2])
  p = jnp.stack([xs, ys], axis=-1).astype(jnp.float32) - center
  src = jnp.floor(p @ matrix.T + center + shift + 0.5).astype(jnp.int32)
  sx, sy = src[..., 0], src[..., 1]
  inside = (sx >= 0) & (sx < w) & (sy >= 0) & (sy < h)
  pixels = image[jnp.clip(sy, 0, h - 1), jnp.clip(sx, 0, w - 1)]
  return jnp.where(inside[..., None], pixels, FILL)


def identity(image: jax.Array, level: jax.Array) -> jax.Array:
  del level
  return image


def auto_contrast(image: jax.Array, level: jax.Array) -> jax.Array:
  """Stretches each channel to span [0, 255]; a flat channel stays as it is."""
  del level
  lo, hi = image.min(axis=(0, 1)), image.max(axis=(0, 1))
  scale = 255.0 / jnp.maximum(hi - lo, 1.0)
  return jnp.where(hi > lo, _round((image - lo) * scale), image)


def equalize(image: jax.Array, level: jax.Array) -> jax.Array:
  """Histogram equalization of each channel, PIL's ``ImageOps.equalize`` rule."""
  del level

  def channel(values: jax.Array) -> jax.Array:
    v = values.astype(jnp.int32)
    hist = jnp.zeros(256, jnp.int32).at[v.ravel()].add(1)
    last = 255 - jnp.argmax(hist[::-1] > 0)  # the highest value present
    step = (v.size - hist[last]) // 255
    lut = (step // 2 + jnp.cumsum(hist) - hist) // jnp.maximum(step, 1)
    return jnp.where(step > 0, jnp.minimum(lut[v], 255), v).astype(values.dtype)

  return jax.vmap(channel, in_axes=-1, out_axes=-1)(image)


def rotate(image: jax.Array, level: jax.Array) -> jax.Array:
  """Rotates counter-clockwise (as displayed) by ``level * MAX_ROTATE_DEGREES``."""
  t = jnp.deg2rad(level * MAX_ROTATE_DEGREES)
  c, s = jnp.cos(t), jnp.sin(t)
  return _affine(image, jnp.array([[c, -s], [s, c]]), jnp.zeros(2))


def shear_x(image: jax.Array, level: jax.Array) -> jax.Array:
  """Shifts row ``y`` by ``level * MAX_SHEAR * (y - center)`` pixels."""
  return _affine(image, jnp.array([[1.0, level * MAX_SHEAR], [0.0, 1.0]]), jnp.zeros(2))


def shear_y(image: jax.Array, level: jax.Array) -> jax.Array:
  """Shifts column ``x`` by ``level * MAX_SHEAR * (x - center)`` pixels."""
  return _affine(image, jnp.array([[1.0, 0.0], [level * MAX_SHEAR, 1.0]]), jnp.zeros(2))


def translate_x(image: jax.Array, level: jax.Array) -> jax.Array:
  """Shifts the image left by ``level * MAX_TRANSLATE`` of its width."""
  shift = jnp.stack([level * MAX_TRANSLATE * image.shape[1], 0.0])
  return _affine(image, jnp.eye(2), shift)


def translate_y(image: jax.Array, level: jax.Array) -> jax.Array:
  """Shifts the image up by ``level * MAX_TRANSLATE`` of its height."""
  shift = jnp.stack([0.0, level * MAX_TRANSLATE * image.shape[0]])
  return _affine(image, jnp.eye(2), shift)


def solarize(image: jax.Array, level: jax.Array) -> jax.Array:
  """Inverts the values at or above ``256 * (1 - |level|)`` (none at level 0)."""
  return jnp.where(image >= 256.0 * (1.0 - jnp.abs(level)), 255.0 - image, image)


def posterize(image: jax.Array, level: jax.Array) -> jax.Array:
  """Clears the ``round(|level| * MAX_POSTERIZE_BITS)`` lowest bits."""
  bits = jnp.floor(jnp.abs(level) * MAX_POSTERIZE_BITS + 0.5)
  unit = jnp.exp2(bits)
  return jnp.floor(image / unit) * unit


def color(image: jax.Array, level: jax.Array) -> jax.Array:
  """Saturation: blends with the gray image by ``1 + level * MAX_ENHANCE``."""
  return _blend(_gray(image), image, 1.0 + level * MAX_ENHANCE)


def contrast(image: jax.Array, level: jax.Array) -> jax.Array:
  """Blends with the image's mean gray value by ``1 + level * MAX_ENHANCE``."""
  mean = jnp.floor(_gray(image).mean() + 0.5)
  return _blend(mean, image, 1.0 + level * MAX_ENHANCE)


def brightness(image: jax.Array, level: jax.Array) -> jax.Array:
  """Scales the values by ``1 + level * MAX_ENHANCE``."""
  return _blend(jnp.zeros_like(image), image, 1.0 + level * MAX_ENHANCE)


def sharpness(image: jax.Array, level: jax.Array) -> jax.Array:
  """Blends with PIL's SMOOTH-filtered image (3x3, center weight 5 of 13; the
  border rows and columns unfiltered) by ``1 + level * MAX_ENHANCE``."""
  h, w, _ = image.shape
  window = sum(image[dy:h - 2 + dy, dx:w - 2 + dx] for dy in range(3) for dx in range(3))
  smooth = _round((window + 4.0 * image[1:-1, 1:-1]) / 13.0)
  degenerate = image.at[1:-1, 1:-1].set(smooth)
  return _blend(degenerate, image, 1.0 + level * MAX_ENHANCE)


# Name -> op(image [H, W, C] float32 of uint8 values, level in [-1, 1]) -> same.
OPS: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    'identity': identity, 'auto_contrast': auto_contrast, 'equalize': equalize,
    'rotate': rotate, 'solarize': solarize, 'color': color, 'posterize': posterize,
    'contrast': contrast, 'brightness': brightness, 'sharpness': sharpness,
    'shear_x': shear_x, 'shear_y': shear_y, 'translate_x': translate_x,
    'translate_y': translate_y,
}


def randaugment_choices(rng: jax.Array, batch: int, num_ops: int) -> tuple[jax.Array, jax.Array]:
  """The ops of every image and their directions.

  Returns:
    ``ops`` int32 ``[B, num_ops]``, indices into ``OPS`` (uniform), and
    ``signs`` float32 ``[B, num_ops]``, +1 or -1 (each with probability 1/2).
  """
  op_rng, sign_rng = jax.random.split(rng)
  ops = jax.random.randint(op_rng, (batch, num_ops), 0, len(OPS))
  signs = jnp.where(jax.random.bernoulli(sign_rng, 0.5, (batch, num_ops)), 1.0, -1.0)
  return ops, signs


def randaugment(rng: jax.Array, images: jax.Array, *, num_ops: int,
                magnitude: float) -> jax.Array:
  """RandAugment of every image (call inside jit).

  Args:
    rng: a PRNG key.
    images: uint8 ``[B, H, W, 3]``.
    num_ops: ops applied to each image in a row (0: none).
    magnitude: the strength of every op, 0 to ``MAX_MAGNITUDE``.

  Returns:
    uint8 ``[B, H, W, 3]``.
  """
  if not num_ops:
    return images
  ops, signs = randaugment_choices(rng, images.shape[0], num_ops)
  branches = list(OPS.values())

  def one(image, image_ops, image_signs):
    for j in range(num_ops):
      level = image_signs[j] * magnitude / MAX_MAGNITUDE
      image = jax.lax.switch(image_ops[j], branches, image, level)
    return image

  return jax.vmap(one)(images.astype(jnp.float32), ops, signs).astype(jnp.uint8)


# --------------------------------------------------------------------------
# Mixup and cutmix.


@flax.struct.dataclass
class MixDraw:
  """The random choices of one mixed batch, each ``[B]``.

  Attributes:
    cutmix: bool, the image gets cutmix (else mixup).
    beta: float32, the Beta draw of its method (1 for a method that is off).
    lam: float32, the image's own share of its target: ``beta`` for mixup,
      for cutmix the share of pixels it kept, after the box was clipped.
    box: int32 ``[B, 4]`` rows ``(y0, y1, x0, x1)``, the pasted region
      (half-open; empty for mixup).
  """
  cutmix: jax.Array
  beta: jax.Array
  lam: jax.Array
  box: jax.Array


def draw_mix(rng: jax.Array, batch: int, height: int, width: int, *, mixup_alpha: float,
             cutmix_alpha: float, switch_prob: float) -> MixDraw:
  """Draws mixup or cutmix for each of ``batch`` images.

  With both alphas > 0 an image gets cutmix with probability ``switch_prob``;
  with one of them 0 it always gets the other. Mixup's lambda is drawn from
  Beta(mixup_alpha, mixup_alpha). Cutmix's box has sides ``floor(H sqrt(1 - l))``
  and ``floor(W sqrt(1 - l))`` for l ~ Beta(cutmix_alpha, cutmix_alpha), a
  uniformly drawn pixel as its center, and is clipped to the image.
  """
  k_switch, k_mix, k_cut, k_y, k_x = jax.random.split(rng, 5)
  if mixup_alpha > 0 and cutmix_alpha > 0:
    cutmix = jax.random.bernoulli(k_switch, switch_prob, (batch,))
  else:
    cutmix = jnp.full((batch,), cutmix_alpha > 0)
  ones = jnp.ones((batch,), jnp.float32)
  lam_mix = jax.random.beta(k_mix, mixup_alpha, mixup_alpha, (batch,)) if mixup_alpha else ones
  lam_cut = jax.random.beta(k_cut, cutmix_alpha, cutmix_alpha, (batch,)) if cutmix_alpha else ones
  ratio = jnp.sqrt(1.0 - lam_cut)
  cut_h = jnp.where(cutmix, jnp.floor(height * ratio), 0).astype(jnp.int32)
  cut_w = jnp.where(cutmix, jnp.floor(width * ratio), 0).astype(jnp.int32)
  cy = jax.random.randint(k_y, (batch,), 0, height)
  cx = jax.random.randint(k_x, (batch,), 0, width)
  y0, x0 = cy - cut_h // 2, cx - cut_w // 2
  box = jnp.stack([jnp.clip(y0, 0, height), jnp.clip(y0 + cut_h, 0, height),
                   jnp.clip(x0, 0, width), jnp.clip(x0 + cut_w, 0, width)], axis=1)
  area = (box[:, 1] - box[:, 0]) * (box[:, 3] - box[:, 2])
  lam = jnp.where(cutmix, 1.0 - area / (height * width), lam_mix)
  return MixDraw(cutmix=cutmix, beta=jnp.where(cutmix, lam_cut, lam_mix).astype(jnp.float32),
                 lam=lam.astype(jnp.float32), box=box)


def apply_mix(images: jax.Array, targets: jax.Array,
              draw: MixDraw) -> tuple[jax.Array, jax.Array]:
  """Mixes every image and target with its partner in the reversed batch.

  Args:
    images: float ``[B, H, W, C]``.
    targets: float ``[B, K]``, rows summing to 1.
    draw: from ``draw_mix``.

  Returns:
    ``(images, targets)``: ``lam x + (1 - lam) x[::-1]`` (mixup) or ``x``
    with the box taken from ``x[::-1]`` (cutmix), and
    ``lam t + (1 - lam) t[::-1]``.
  """
  _, h, w, _ = images.shape
  ys, xs = jnp.arange(h)[None, :, None], jnp.arange(w)[None, None, :]
  b = draw.box
  in_box = ((ys >= b[:, 0, None, None]) & (ys < b[:, 1, None, None])
            & (xs >= b[:, 2, None, None]) & (xs < b[:, 3, None, None]))[..., None]
  partner = images[::-1]
  lam = draw.lam.astype(images.dtype)[:, None, None, None]
  mixed = jnp.where(draw.cutmix[:, None, None, None], jnp.where(in_box, partner, images),
                    lam * images + (1 - lam) * partner)
  lam_t = draw.lam.astype(targets.dtype)[:, None]
  return mixed, lam_t * targets + (1 - lam_t) * targets[::-1]


def mix(rng: jax.Array, images: jax.Array, targets: jax.Array,
        config: ml_collections.ConfigDict) -> tuple[jax.Array, jax.Array]:
  """Mixup / cutmix of a batch as ``config`` (a classifier config's ``mix``
  block) asks; unchanged when both alphas are 0. Shapes as ``apply_mix``."""
  if not (config.mixup_alpha or config.cutmix_alpha):
    return images, targets
  b, h, w, _ = images.shape
  draw = draw_mix(rng, b, h, w, mixup_alpha=config.mixup_alpha,
                  cutmix_alpha=config.cutmix_alpha, switch_prob=config.switch_prob)
  return apply_mix(images, targets, draw)


# --------------------------------------------------------------------------
# What the classifier stage calls.


def check(config: ml_collections.ConfigDict) -> None:
  """Rejects a classifier config's out-of-range ``randaugment`` and ``mix`` fields."""
  ra, mx = config.randaugment, config.mix
  if ra.num_ops < 0 or not 0.0 <= ra.magnitude <= MAX_MAGNITUDE:
    raise UserError(f'randaugment needs num_ops >= 0 and magnitude in [0, {MAX_MAGNITUDE:g}], '
                    f'got {ra.num_ops} and {ra.magnitude}.')
  if mx.mixup_alpha < 0 or mx.cutmix_alpha < 0 or not 0.0 <= mx.switch_prob <= 1.0:
    raise UserError(f'mix needs alphas >= 0 and switch_prob in [0, 1], got mixup_alpha '
                    f'{mx.mixup_alpha}, cutmix_alpha {mx.cutmix_alpha}, switch_prob '
                    f'{mx.switch_prob}.')
  if not all(math.isfinite(v) for v in (ra.magnitude, mx.mixup_alpha, mx.cutmix_alpha)):
    raise UserError('randaugment.magnitude and the mix alphas must be finite numbers.')


def train_images(rng: jax.Array, images: jax.Array, *, crop_flip: bool,
                 config: ml_collections.ConfigDict) -> jax.Array:
  """uint8 ``[B, 32, 32, 3]`` -> float32 in [-1, 1]: crop and flip
  (``input_pipeline.augment``, when ``crop_flip``), then RandAugment as
  ``config.randaugment`` asks (inside jit)."""
  if crop_flip:
    images = ip.augment(rng, images)
  images = randaugment(jax.random.fold_in(rng, RANDAUGMENT_KEY), images,
                       num_ops=config.randaugment.num_ops,
                       magnitude=config.randaugment.magnitude)
  return ip.to_float(images)
