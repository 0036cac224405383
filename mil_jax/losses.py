"""Reconstruction losses for pretraining, and the one function the loop calls.

Every loss returns ``(scalar, per_example [B])``: the scalar is what gets
differentiated, the per-example values let evaluation average exactly over
a partial last batch. Losses compute in float32 whatever the model's dtype.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from mil_jax.errors import UserError
from mil_jax.models import mae, masking


def l2(reconstruction: jax.Array, images: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Mean squared error.

  Args:
    reconstruction: [B, H, W, C].
    images: [B, H, W, C].

  Returns:
    (mean over everything, per-example mean [B]).
  """
  err = jnp.square(reconstruction.astype(jnp.float32) - images.astype(jnp.float32))
  per_example = err.reshape(err.shape[0], -1).mean(axis=1)
  return per_example.mean(), per_example


def l1(reconstruction: jax.Array, images: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Mean absolute error; shapes as ``l2``."""
  err = jnp.abs(reconstruction.astype(jnp.float32) - images.astype(jnp.float32))
  per_example = err.reshape(err.shape[0], -1).mean(axis=1)
  return per_example.mean(), per_example


def masked_l2(pred_patches: jax.Array, images: jax.Array, mask: jax.Array, *,
              patch_size: int, norm_pix: bool,
              visible_weight: float = 0.0) -> tuple[jax.Array, jax.Array]:
  """MAE loss: mean squared error over the pixels of removed patches only.

  Args:
    pred_patches: [B, N, p * p * C], the decoder's prediction per patch.
    images: [B, H, W, C] targets.
    mask: [B, N], 1 = removed (scored), 0 = visible (ignored).
    patch_size: p.
    norm_pix: compare with targets normalized to zero mean and unit variance
      per patch (the MAE paper's better-representation option).
    visible_weight: weight of a visible patch's error against 1 for a
      removed one; 0 (the MAE) ignores visible patches.

  Returns:
    (weighted mean over the patches of the batch, per-example weighted mean
    over that image's patches [B]). With nothing weighted both are 0.
  """
  target = masking.patchify(images.astype(jnp.float32), patch_size)
  if norm_pix:
    mean, std = mae.patch_mean_std(target)
    target = (target - mean) / std
  per_patch = jnp.square(pred_patches.astype(jnp.float32) - target).mean(axis=-1)  # [B, N]
  mask = mask.astype(jnp.float32)
  weights = mask + visible_weight * (1.0 - mask)
  weighted = per_patch * weights

  def mean(total, count):
    # Nothing weighted (mask_ratio 0 and visible_weight 0): loss 0, not 0/0.
    return total / jnp.where(count > 0, count, 1.0)

  return mean(weighted.sum(), weights.sum()), mean(weighted.sum(axis=1), weights.sum(axis=1))


def masked_image_l2(reconstruction: jax.Array, images: jax.Array, mask: jax.Array, *,
                    patch_size: int, visible_weight: float) -> tuple[jax.Array, jax.Array]:
  """The masked UNet's loss: ``masked_l2`` over a whole reconstructed image.

  Args:
    reconstruction: [B, H, W, C], every pixel predicted.
    images: [B, H, W, C] targets.
    mask: [B, N], 1 = removed, in ``masking.patchify``'s patch order.
    patch_size: p.
    visible_weight: weight of the visible pixels' error against the removed ones'.

  Returns:
    (scalar, per-example [B]) as ``masked_l2``.
  """
  return masked_l2(masking.patchify(reconstruction, patch_size), images, mask,
                   patch_size=patch_size, norm_pix=False, visible_weight=visible_weight)


def _l2(config, images, reconstruction, aux):
  del config, aux
  return l2(reconstruction, images)


def _l1(config, images, reconstruction, aux):
  del config, aux
  return l1(reconstruction, images)


def _masked_l2(config, images, reconstruction, aux):
  del reconstruction
  if 'pred_patches' not in aux:
    raise UserError(f"loss 'masked_l2' needs a masked autoencoder (model.name='mae'), "
                    f'not {config.model.name!r}.')
  return masked_l2(aux['pred_patches'], images, aux['mask'],
                   patch_size=config.model.patch_size, norm_pix=config.model.norm_pix_loss)


def _masked_image_l2(config, images, reconstruction, aux):
  if 'mask' not in aux or 'pred_patches' in aux:
    raise UserError(f"loss 'masked_image_l2' needs the masked UNet (model.name='masked_unet'), "
                    f'not {config.model.name!r}.')
  return masked_image_l2(reconstruction, images, aux['mask'], patch_size=config.model.patch_size,
                         visible_weight=config.visible_loss_weight)


LOSSES: dict[str, Callable[..., tuple[jax.Array, jax.Array]]] = {
    'l2': _l2,
    'l1': _l1,
    'masked_l2': _masked_l2,
    'masked_image_l2': _masked_image_l2,
}


def pretrain_loss(config: Any, images: jax.Array, reconstruction: jax.Array,
                  aux: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """The pretraining loss named by ``config.loss``.

  Args:
    config: the run's config; reads ``loss`` and, for 'masked_l2',
      ``model.patch_size`` and ``model.norm_pix_loss``; for
      'masked_image_l2', ``model.patch_size`` and ``visible_loss_weight``.
    images: [B, 32, 32, 3] targets in [-1, 1].
    reconstruction: [B, 32, 32, 3], the autoencoder's first output.
    aux: the autoencoder's second output.

  Returns:
    (scalar loss, per-example loss [B]).

  Raises:
    UserError: unknown ``config.loss``, or a masked loss for a model it does not fit.
  """
  if config.loss not in LOSSES:
    raise UserError(f'unknown loss {config.loss!r}; known losses: {", ".join(sorted(LOSSES))}.')
  return LOSSES[config.loss](config, images, reconstruction, aux)
