"""Random patch masking, shared by the masked autoencoder and the masked UNet.

An image is cut into N = (H/p)(W/p) square patches of side p, in row-major
grid order; ``random_masking`` removes a random ``mask_ratio`` of them per
image. The MAE drops the removed patches' tokens (``ids_keep``); the UNet,
a convolutional network that needs the whole grid, overwrites their pixels
(``pixel_mask``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
  """Cuts images into non-overlapping square patches.

  Args:
    images: [B, H, W, C]; H and W divisible by ``patch_size``.
    patch_size: p.

  Returns:
    [B, N, p * p * C] with N = (H/p)(W/p), patches in row-major grid order
    and pixels inside a patch ordered (row, column, channel).
  """
  b, h, w, c = images.shape
  p = patch_size
  x = images.reshape(b, h // p, p, w // p, p, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)  # [B, H/p, W/p, p, p, C]
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: jax.Array, patch_size: int, height: int, width: int) -> jax.Array:
  """Inverse of ``patchify``.

  Args:
    patches: [B, N, p * p * C] with N = (height/p)(width/p).
    patch_size: p.
    height: image height H.
    width: image width W.

  Returns:
    images [B, H, W, C].
  """
  b, n, d = patches.shape
  p = patch_size
  gh, gw = height // p, width // p
  if gh * gw != n or d % (p * p):
    raise ValueError(f'{n} patches of {d} values do not tile a {height}x{width} image '
                     f'with {p}x{p} patches')
  c = d // (p * p)
  x = patches.reshape(b, gh, gw, p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, height, width, c)


def num_kept(num_patches: int, mask_ratio: float) -> int:
  """How many patches stay visible: round(N (1 - ratio)), at least one."""
  return max(1, int(round(num_patches * (1.0 - mask_ratio))))


def random_masking(rng: jax.Array, batch_size: int, num_patches: int,
                   mask_ratio: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Draws an independent random subset of visible patches per image.

  The patches with the smallest uniform noise stay visible; argsort of the
  noise gives a random permutation per image, and its inverse restores the
  original order after the encoder.

  Args:
    rng: PRNG key.
    batch_size: B.
    num_patches: N.
    mask_ratio: fraction of patches to remove, in [0, 1).

  Returns:
    ids_keep: [B, K] int32 indices of the visible patches, K = num_kept(N, ratio).
    mask: [B, N] float32, 1 = removed, 0 = visible, in patch order.
    ids_restore: [B, N] int32; position of each patch in the shuffled order.
  """
  keep = num_kept(num_patches, mask_ratio)
  noise = jax.random.uniform(rng, (batch_size, num_patches))
  ids_shuffle = jnp.argsort(noise, axis=1)
  ids_restore = jnp.argsort(ids_shuffle, axis=1)
  mask = (jnp.arange(num_patches) >= keep).astype(jnp.float32)
  mask = jnp.take_along_axis(jnp.broadcast_to(mask, (batch_size, num_patches)), ids_restore, axis=1)
  return ids_shuffle[:, :keep], mask, ids_restore


def pixel_mask(mask: jax.Array, patch_size: int, height: int, width: int) -> jax.Array:
  """A patch mask spread over the pixels of each patch.

  Args:
    mask: [B, N], 1 = removed, in ``patchify``'s patch order.
    patch_size: p.
    height: image height H; N = (H/p)(W/p).
    width: image width W.

  Returns:
    [B, H, W, 1], each pixel carrying its patch's value.
  """
  b, n = mask.shape
  spread = jnp.broadcast_to(mask[..., None], (b, n, patch_size * patch_size))
  return unpatchify(spread, patch_size, height, width)
