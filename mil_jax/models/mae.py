"""The masked autoencoder (He et al. 2021) for 32x32 images.

Training pass: the image is cut into N = (32/p)^2 patches, each patch is
embedded and gets a position embedding, a random ``mask_ratio`` of them is
dropped per image (noise from the ``'masking'`` rng stream), and the encoder
runs on the visible ones plus a cls token. The decoder embeds them to its own
width, puts a learned mask token at every removed position, restores the
patch order, adds its own position embeddings and predicts the pixels of
every patch. The loss (``losses.masked_l2``) covers the removed patches only.

As a feature extractor (``MAEEncoder.__call__``, ``MAE.encode``) nothing is
masked, so features are deterministic; the reference masked 75% there too.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mil_jax.models import vit
from mil_jax.models.masking import patchify, random_masking, unpatchify

Dtype = Any

# Tokens, mask token and learned position embeddings start as in MAE/ViT.
_token_init = nn.initializers.normal(stddev=0.02)
_dense_init = nn.initializers.xavier_uniform()


def patch_mean_std(patches: jax.Array, eps: float = 1e-6) -> tuple[jax.Array, jax.Array]:
  """Per-patch pixel mean and standard deviation, for normalized targets.

  Args:
    patches: [B, N, P].
    eps: added to the variance, so flat patches do not divide by zero.

  Returns:
    (mean [B, N, 1], std [B, N, 1]).
  """
  mean = patches.mean(axis=-1, keepdims=True)
  var = patches.var(axis=-1, keepdims=True)
  return mean, jnp.sqrt(var + eps)


def _position_embedding(module: nn.Module, kind: str, grid: int, width: int) -> jax.Array:
  """[1, 1 + grid*grid, width]: row 0 for the cls token, then the patches.

  'learned' makes a param (as the reference); 'sincos' is a constant with a
  zero row for the cls token, so it is not in the param tree.
  """
  if kind == 'learned':
    return module.param('pos_embedding', _token_init, (1, 1 + grid * grid, width))
  if kind == 'sincos':
    table = vit.posemb_sincos_2d(grid, grid, width)
    return jnp.concatenate([jnp.zeros((1, width)), table], axis=0)[None]
  raise ValueError(f"pos_embedding must be 'learned' or 'sincos', got {kind!r}")


class MAEEncoder(nn.Module):
  """ViT encoder over patches with a cls token; usable without a decoder.

  Attributes:
    image_size: side of the square input images.
    patch_size: side of a square patch; divides ``image_size``.
    width: token width D.
    depth: transformer blocks.
    num_heads: attention heads.
    mlp_dim: hidden width of the MLPs.
    pos_embedding: 'learned' or 'sincos'.
    pool: features from the 'cls' token or the 'mean' of the patch tokens.
    dtype: compute dtype (params stay float32).
    attention: how attention is computed ('auto' | 'xla' | 'cudnn', see
      ``vit.ATTENTION_IMPLEMENTATIONS``).
    attention_chunk_bytes, attention_groups: how attention chunks the batch
      (``vit.attention``; decided by mil_jax.tuning).
    drop_path_rate: stochastic depth of the last block, for fine-tuning
      (``vit.drop_path_rates``; 'dropout' rng stream when training).
  """
  image_size: int = 32
  patch_size: int = 2
  width: int = 192
  depth: int = 6
  num_heads: int = 3
  mlp_dim: int = 768
  pos_embedding: str = 'learned'
  pool: str = 'cls'
  dtype: Dtype = jnp.float32
  attention: str = 'auto'
  attention_chunk_bytes: int = 0
  attention_groups: int = 1
  drop_path_rate: float = 0.0

  def setup(self):
    grid = self.image_size // self.patch_size
    self.patch_embed = nn.Dense(self.width, dtype=self.dtype, kernel_init=_dense_init)
    self.cls_token = self.param('cls_token', _token_init, (1, 1, self.width))
    self.pos_embed = _position_embedding(self, self.pos_embedding, grid, self.width)
    self.transformer = vit.Transformer(self.depth, self.num_heads, self.mlp_dim, dtype=self.dtype,
                                       attention=self.attention,
                                       attention_chunk_bytes=self.attention_chunk_bytes,
                                       attention_groups=self.attention_groups,
                                       drop_path_rate=self.drop_path_rate)

  def encode_visible(self, images: jax.Array, *, mask_ratio: float,
                     train: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Runs the encoder on a random visible subset of the patches.

    Args:
      images: [B, H, W, C] in [-1, 1].
      mask_ratio: fraction of patches to remove; 0 removes none and needs no
        rng, otherwise the ``'masking'`` rng stream must be given.
      train: whether this is a training pass.

    Returns:
      tokens: [B, 1 + K, D], the cls token first, then the K visible patches
        in shuffled order.
      mask: [B, N] float32, 1 = removed.
      ids_restore: [B, N] int32, for ``MAEDecoder``.
    """
    x = self.patch_embed(patchify(images.astype(self.dtype), self.patch_size))
    x = x + self.pos_embed[:, 1:].astype(self.dtype)
    b, n, _ = x.shape
    if mask_ratio > 0:
      ids_keep, mask, ids_restore = random_masking(self.make_rng('masking'), b, n, mask_ratio)
      x = jnp.take_along_axis(x, ids_keep[..., None], axis=1)
    else:
      mask = jnp.zeros((b, n), jnp.float32)
      ids_restore = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
    cls = (self.cls_token + self.pos_embed[:, :1]).astype(self.dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.width)), x], axis=1)
    return self.transformer(x, train=train), mask, ids_restore

  def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
    """Features of whole images; nothing is masked, so this is deterministic.

    Args:
      images: [B, H, W, C] in [-1, 1].
      train: whether this is a training pass (e.g. fine-tuning).

    Returns:
      features [B, D]: the cls token, or the mean patch token if pool='mean'.
    """
    tokens, _, _ = self.encode_visible(images, mask_ratio=0.0, train=train)
    if self.pool == 'cls':
      return tokens[:, 0]
    if self.pool == 'mean':
      return tokens[:, 1:].mean(axis=1)
    raise ValueError(f"pool must be 'cls' or 'mean', got {self.pool!r}")


class MAEDecoder(nn.Module):
  """Lightweight transformer that predicts the pixels of every patch.

  Attributes:
    image_size: side of the square images.
    patch_size: side of a patch.
    width: decoder token width.
    depth: decoder transformer blocks.
    num_heads: decoder attention heads.
    mlp_dim: hidden width of the decoder MLPs.
    pos_embedding: 'learned' or 'sincos' (the decoder has its own).
    channels: image channels to predict.
    dtype: compute dtype.
    attention: how attention is computed ('auto' | 'xla' | 'cudnn').
    attention_chunk_bytes, attention_groups: as the encoder's.
  """
  image_size: int = 32
  patch_size: int = 2
  width: int = 192
  depth: int = 2
  num_heads: int = 3
  mlp_dim: int = 768
  pos_embedding: str = 'learned'
  channels: int = 3
  dtype: Dtype = jnp.float32
  attention: str = 'auto'
  attention_chunk_bytes: int = 0
  attention_groups: int = 1

  @nn.compact
  def __call__(self, tokens: jax.Array, ids_restore: jax.Array, *, train: bool) -> jax.Array:
    """Predicts all patches from the encoded visible ones.

    Args:
      tokens: [B, 1 + K, D_enc] from ``MAEEncoder.encode_visible``.
      ids_restore: [B, N] from the same call.
      train: whether this is a training pass.

    Returns:
      predicted patches [B, N, p * p * channels], in patch order.
    """
    grid = self.image_size // self.patch_size
    x = nn.Dense(self.width, dtype=self.dtype, kernel_init=_dense_init, name='embed')(tokens)
    b, n = ids_restore.shape
    mask_token = self.param('mask_token', _token_init, (1, 1, self.width)).astype(self.dtype)
    patches = jnp.concatenate(
        [x[:, 1:], jnp.broadcast_to(mask_token, (b, n + 1 - x.shape[1], self.width))], axis=1)
    patches = jnp.take_along_axis(patches, ids_restore[..., None], axis=1)
    x = jnp.concatenate([x[:, :1], patches], axis=1)
    x = x + _position_embedding(self, self.pos_embedding, grid, self.width).astype(self.dtype)
    x = vit.Transformer(self.depth, self.num_heads, self.mlp_dim, dtype=self.dtype,
                        attention=self.attention, attention_chunk_bytes=self.attention_chunk_bytes,
                        attention_groups=self.attention_groups, name='transformer')(x, train=train)
    pred = nn.Dense(self.patch_size ** 2 * self.channels, dtype=self.dtype,
                    kernel_init=_dense_init, name='pred')(x[:, 1:])
    return pred


class MAE(nn.Module):
  """Masked autoencoder: ``encoder`` (MAEEncoder) and ``decoder`` (MAEDecoder).

  Attributes: the encoder's (image_size, patch_size, width, depth, num_heads,
  mlp_dim, pos_embedding, pool), the decoder's as ``decoder_*``, and
    mask_ratio: fraction of patches removed in ``__call__``, in [0, 1).
    norm_pix_loss: the decoder predicts per-patch normalized pixels; the
      reconstruction is mapped back to pixels with the input patches' stats.
    dtype: compute dtype.
    attention: how attention is computed ('auto' | 'xla' | 'cudnn').
    attention_chunk_bytes, attention_groups: as the encoder's.
    drop_path_rate: the encoder's stochastic depth (0 in pretraining; the
      field exists so that an encoder config always builds its autoencoder).
  """
  image_size: int = 32
  patch_size: int = 2
  width: int = 192
  depth: int = 6
  num_heads: int = 3
  mlp_dim: int = 768
  decoder_width: int = 192
  decoder_depth: int = 2
  decoder_num_heads: int = 3
  decoder_mlp_dim: int = 768
  mask_ratio: float = 0.75
  norm_pix_loss: bool = False
  pos_embedding: str = 'learned'
  pool: str = 'cls'
  dtype: Dtype = jnp.float32
  attention: str = 'auto'
  attention_chunk_bytes: int = 0
  attention_groups: int = 1
  drop_path_rate: float = 0.0

  def setup(self):
    self.encoder = MAEEncoder(
        image_size=self.image_size, patch_size=self.patch_size, width=self.width,
        depth=self.depth, num_heads=self.num_heads, mlp_dim=self.mlp_dim,
        pos_embedding=self.pos_embedding, pool=self.pool, dtype=self.dtype,
        attention=self.attention, attention_chunk_bytes=self.attention_chunk_bytes,
        attention_groups=self.attention_groups, drop_path_rate=self.drop_path_rate)
    self.decoder = MAEDecoder(
        image_size=self.image_size, patch_size=self.patch_size, width=self.decoder_width,
        depth=self.decoder_depth, num_heads=self.decoder_num_heads,
        mlp_dim=self.decoder_mlp_dim, pos_embedding=self.pos_embedding, dtype=self.dtype,
        attention=self.attention, attention_chunk_bytes=self.attention_chunk_bytes,
        attention_groups=self.attention_groups)

  def __call__(self, images: jax.Array, *, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Masks, encodes the visible patches and predicts all of them.

    Args:
      images: [B, H, W, 3] in [-1, 1]; needs the ``'masking'`` rng stream
        unless mask_ratio is 0.
      train: whether this is a training pass.

    Returns:
      reconstruction: [B, H, W, 3] float32, the un-patchified prediction of
        every patch (image scale; not clipped).
      aux: {'mask': [B, N] float32, 1 = removed; 'pred_patches':
        [B, N, p * p * 3] float32, the raw prediction the loss compares}.
    """
    tokens, mask, ids_restore = self.encoder.encode_visible(
        images, mask_ratio=self.mask_ratio, train=train)
    pred = self.decoder(tokens, ids_restore, train=train).astype(jnp.float32)
    recon = pred
    if self.norm_pix_loss:
      mean, std = patch_mean_std(patchify(images.astype(jnp.float32), self.patch_size))
      recon = pred * std + mean
    h, w = images.shape[1:3]
    return unpatchify(recon, self.patch_size, h, w), {'mask': mask, 'pred_patches': pred}

  def encode(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    """[B, H, W, 3] -> features [B, width], nothing masked."""
    return self.encoder(images, train=train)
