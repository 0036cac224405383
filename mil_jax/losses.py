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
from mil_jax.models import mae


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
              patch_size: int, norm_pix: bool) -> tuple[jax.Array, jax.Array]:
  """MAE loss: mean squared error over the pixels of removed patches only.

  Args:
    pred_patches: [B, N, p * p * C], the decoder's prediction per patch.
    images: [B, H, W, C] targets.
    mask: [B, N], 1 = removed (scored), 0 = visible (ignored).
    patch_size: p.
    norm_pix: compare with targets normalized to zero mean and unit variance
      per patch (the MAE paper's better-representation option).

  Returns:
    (mean over all removed patches of the batch, per-example mean over that
    image's removed patches [B]). With nothing removed both are 0.
  """
  target = mae.patchify(images.astype(jnp.float32), patch_size)
  if norm_pix:
    mean, std = mae.patch_mean_std(target)
    target = (target - mean) / std
  per_patch = jnp.square(pred_patches.astype(jnp.float32) - target).mean(axis=-1)  # [B, N]
  mask = mask.astype(jnp.float32)
  weighted = per_patch * mask
  # max(., 1) keeps a mask_ratio=0 pass finite (loss 0) instead of 0/0.
  per_example = weighted.sum(axis=1) / jnp.maximum(mask.sum(axis=1), 1.0)
  return weighted.sum() / jnp.maximum(mask.sum(), 1.0), per_example


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


LOSSES: dict[str, Callable[..., tuple[jax.Array, jax.Array]]] = {
    'l2': _l2,
    'l1': _l1,
    'masked_l2': _masked_l2,
}


def pretrain_loss(config: Any, images: jax.Array, reconstruction: jax.Array,
                  aux: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """The pretraining loss named by ``config.loss``.

  Args:
    config: the run's config; reads ``loss`` and, for 'masked_l2',
      ``model.patch_size`` and ``model.norm_pix_loss``.
    images: [B, 32, 32, 3] targets in [-1, 1].
    reconstruction: [B, 32, 32, 3], the autoencoder's first output.
    aux: the autoencoder's second output.

  Returns:
    (scalar loss, per-example loss [B]).

  Raises:
    UserError: unknown ``config.loss``, or 'masked_l2' for a model without a mask.
  """
  if config.loss not in LOSSES:
    raise UserError(f'unknown loss {config.loss!r}; known losses: {", ".join(sorted(LOSSES))}.')
  return LOSSES[config.loss](config, images, reconstruction, aux)
