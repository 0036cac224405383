"""A masked convolutional UNet: fill in the removed patches of an image.

The experiment the study's author planned (Context Encoders, Pathak et al.
2016, with MAE-style random patches): a random ``mask_ratio`` of the
``patch_size`` patches of each image is removed (``masking.random_masking``,
the MAE's own function, noise from the ``'masking'`` rng stream) and their
pixels are overwritten with a fill value, learned or zero. The UNet sees the
whole grid, as a convolution needs it:

  encoder: ``num_layers`` x [Conv(k4, s2, p1), LeakyReLU(0.2), LayerNorm over
    channels (not after the first)], channels c, c*f, c*f^2, ... as the Conv
    autoencoder's; each level's output is kept as a skip;
  decoder: from the bottleneck, (num_layers - 1) x [ConvTranspose(k4, s2, p1),
    ReLU, LayerNorm, concatenate the encoder's map of that size], then
    ConvTranspose to 3 channels and tanh.

The loss (``losses.masked_image_l2``) scores the removed pixels, and the
visible ones with a small weight (``visible_loss_weight`` in the config).
As a feature extractor (``MaskedUNetEncoder.__call__``, ``MaskedUNet.encode``)
nothing is masked: the features are the bottleneck map of the whole image,
averaged over its positions; the skips are not part of them.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mil_jax.models import conv_ae
from mil_jax.models.masking import pixel_mask, random_masking

Dtype = Any

MASK_FILLS = ('learned', 'zero')


class MaskedUNetEncoder(nn.Module):
  """The UNet's down path; usable without a decoder.

  Attributes:
    num_layers: stride-2 convs; 1 to 5 for 32x32 images.
    channel_factor: channel multiplier from one layer to the next.
    start_filters: channels of the first conv.
    mask_fill: what a removed pixel holds: 'learned' (one value per
      channel, a param) or 'zero'.
    negative_slope: of the LeakyReLU after each conv.
    dtype: compute dtype (params stay float32).
    conv_impl: how the convs are computed, 'dots' | 'xla' (``conv_ae.CONV_IMPLS``).
  """
  num_layers: int = 4
  channel_factor: int = 2
  start_filters: int = 8
  mask_fill: str = 'learned'
  negative_slope: float = 0.2
  dtype: Dtype = jnp.float32
  conv_impl: str = 'dots'

  def setup(self):
    widths = conv_ae.channels(self.num_layers, self.channel_factor, self.start_filters)
    # The Conv autoencoder's param names (conv_i, norm_i from 1), set by
    # attribute name as setup() names submodules.
    for i, c in enumerate(widths):
      setattr(self, f'conv_{i}', conv_ae._Conv(c, dtype=self.dtype, impl=self.conv_impl))
      if i > 0:
        setattr(self, f'norm_{i}', nn.LayerNorm(dtype=self.dtype))
    # Declared in setup, so the standalone encoder has it too and the
    # classifier loads the pretrained encoder subtree unchanged.
    if self.mask_fill == 'learned':
      self.fill = self.param('mask_fill', nn.initializers.zeros_init(), (3,))
    elif self.mask_fill != 'zero':
      raise ValueError(f"mask_fill must be one of {MASK_FILLS}, got {self.mask_fill!r}")

  def mask_images(self, images: jax.Array, removed: jax.Array) -> jax.Array:
    """Overwrites the removed pixels with the fill value.

    Args:
      images: [B, H, W, 3] in [-1, 1].
      removed: [B, H, W, 1], 1 = removed.

    Returns:
      [B, H, W, 3] float32.
    """
    fill = self.fill if self.mask_fill == 'learned' else jnp.zeros((3,), jnp.float32)
    removed = removed.astype(jnp.float32)
    return images.astype(jnp.float32) * (1.0 - removed) + fill * removed

  def feature_maps(self, images: jax.Array, *, train: bool) -> list[jax.Array]:
    """Every level's output, the skips first and the bottleneck last.

    Args:
      images: [B, 32, 32, 3].
      train: unused (LayerNorm has no batch statistics).

    Returns:
      ``num_layers`` maps; map i is [B, 32 / 2^(i+1), same, c * f^i].
    """
    del train
    x = images.astype(self.dtype)
    maps = []
    for i in range(self.num_layers):
      x = nn.leaky_relu(getattr(self, f'conv_{i}')(x), self.negative_slope)
      if i > 0:
        x = getattr(self, f'norm_{i}')(x)
      maps.append(x)
    return maps

  def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
    """Features of whole images; nothing is masked, so this is deterministic.

    Args:
      images: [B, 32, 32, 3] in [-1, 1].
      train: whether this is a training pass (e.g. fine-tuning).

    Returns:
      features [B, c * f^(num_layers - 1)]: the bottleneck averaged over its
      positions.
    """
    return self.feature_maps(images, train=train)[-1].mean(axis=(1, 2))


class MaskedUNetDecoder(nn.Module):
  """The UNet's up path over the encoder's maps.

  Attributes:
    num_layers: as the encoder's.
    channel_factor: as the encoder's.
    start_filters: as the encoder's.
    dtype: compute dtype.
    conv_impl: as the encoder's.
  """
  num_layers: int = 4
  channel_factor: int = 2
  start_filters: int = 8
  dtype: Dtype = jnp.float32
  conv_impl: str = 'dots'

  @nn.compact
  def __call__(self, maps: list[jax.Array], *, train: bool) -> jax.Array:
    """Decodes the bottleneck, joined by the skip of each size on the way up.

    Args:
      maps: ``MaskedUNetEncoder.feature_maps``, the bottleneck last.
      train: unused.

    Returns:
      images [B, 32, 32, 3] in [-1, 1] (tanh), float32.
    """
    del train
    widths = conv_ae.channels(self.num_layers, self.channel_factor, self.start_filters)
    z = maps[-1]
    for k, level in enumerate(reversed(range(self.num_layers - 1))):
      z = conv_ae._Conv(widths[level], up=True, dtype=self.dtype, impl=self.conv_impl,
                        name=f'conv_transpose_{k}')(z)
      z = nn.LayerNorm(dtype=self.dtype, name=f'norm_{k}')(nn.relu(z))
      z = jnp.concatenate([z, maps[level].astype(z.dtype)], axis=-1)
    z = conv_ae._Conv(3, up=True, dtype=self.dtype, impl=self.conv_impl,
                      name=f'conv_transpose_{self.num_layers - 1}')(z)
    return jnp.tanh(z.astype(jnp.float32))


class MaskedUNet(nn.Module):
  """Masks patches and fills them in: ``encoder`` and ``decoder`` as above.

  Attributes:
    num_layers: stride-2 convs in each half.
    channel_factor: channel multiplier per layer.
    start_filters: first conv's channels.
    patch_size: side of a masked square; divides the image side.
    mask_ratio: fraction of patches removed in ``__call__``, in [0, 1).
    mask_fill: 'learned' | 'zero', what a removed pixel holds.
    dtype: compute dtype.
    conv_impl: how the convs are computed, 'dots' | 'xla'.
  """
  num_layers: int = 4
  channel_factor: int = 2
  start_filters: int = 8
  patch_size: int = 4
  mask_ratio: float = 0.6
  mask_fill: str = 'learned'
  dtype: Dtype = jnp.float32
  conv_impl: str = 'dots'

  def setup(self):
    self.encoder = MaskedUNetEncoder(
        num_layers=self.num_layers, channel_factor=self.channel_factor,
        start_filters=self.start_filters, mask_fill=self.mask_fill, dtype=self.dtype,
        conv_impl=self.conv_impl)
    self.decoder = MaskedUNetDecoder(
        num_layers=self.num_layers, channel_factor=self.channel_factor,
        start_filters=self.start_filters, dtype=self.dtype, conv_impl=self.conv_impl)

  def __call__(self, images: jax.Array, *, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Masks a random share of the patches and reconstructs the whole image.

    Args:
      images: [B, H, W, 3] in [-1, 1]; needs the ``'masking'`` rng stream
        unless mask_ratio is 0.
      train: whether this is a training pass.

    Returns:
      reconstruction: [B, H, W, 3] float32 in [-1, 1], every pixel predicted.
      aux: {'mask': [B, N] float32, 1 = removed, N = (H/p)(W/p)}.
    """
    b, h, w, _ = images.shape
    n = (h // self.patch_size) * (w // self.patch_size)
    if self.mask_ratio > 0:
      _, mask, _ = random_masking(self.make_rng('masking'), b, n, self.mask_ratio)
    else:
      mask = jnp.zeros((b, n), jnp.float32)
    x = self.encoder.mask_images(images, pixel_mask(mask, self.patch_size, h, w))
    maps = self.encoder.feature_maps(x, train=train)
    return self.decoder(maps, train=train), {'mask': mask}

  def encode(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    """[B, 32, 32, 3] -> features [B, c * f^(num_layers - 1)], nothing masked."""
    return self.encoder(images, train=train)
