"""The convolutional autoencoder ("Conv-192" / "Conv-256" in the reference).

Every conv has a 4x4 kernel and stride 2 with one pixel of padding, so each
encoder layer halves the image side and each decoder layer doubles it.
Encoder (channels c, c*f, c*f^2, ...):
  Conv(3 -> c), LeakyReLU(0.2), then (num_layers - 1) x
  [Conv(c_i -> c_i * f), LeakyReLU(0.2), LayerNorm over channels],
  flattened. With 4 layers, f = 2 and c = 6 the output is 2x2x48 = 192.
Decoder: (num_layers - 1) x [ConvTranspose(c_i -> c_i / f), ReLU, LayerNorm],
  then ConvTranspose(c -> 3) and tanh.
Convolution kernels are Xavier-normal with zero biases, as in the reference.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mil_jax.images import IMAGE_SIZE

Dtype = Any



def _xavier_normal(key: jax.Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> jax.Array:
  """torch.nn.init.xavier_normal_ for a [kh, kw, in, out] kernel.

  An untruncated normal with variance 2 / (fan_in + fan_out), both fans
  counted with the receptive field. The numbers are drawn as a flat vector
  and reshaped because XLA:CPU compiles random bits of a 4-D shape much
  slower than of a 1-D one; the numbers are the same either way.
  """
  receptive = math.prod(shape[:-2])
  std = math.sqrt(2.0 / (receptive * shape[-2] + receptive * shape[-1]))
  return (std * jax.random.normal(key, (math.prod(shape),), dtype)).reshape(shape)

# The convs are written with dots by default (``speed.conv_impl`` 'dots'): with
# these tiny channel counts XLA:CPU runs lax.conv, and above all its gradients,
# slower than a few plain dots over a space-to-depth view of the image
# (docs/performance.md); 'xla' computes them with lax.conv. A k4 s2 p1 conv is
# a k2 s1 conv over 2x2 pixel blocks (four shifted dots), and the transposed
# conv is its exact transpose (four dots whose outputs are shifted, summed and
# put back to pixels), so neither ever builds a patch matrix. The params are those of nn.Conv /
# nn.ConvTranspose: ``kernel`` [4, 4, in, out] and ``bias`` [out].

# The lax padding of the equivalent nn.Conv / nn.ConvTranspose: torch's
# padding=1 for the conv; for the transposed conv, a conv over the
# stride-dilated input padded by k - 1 - 1 = 2 on each side, whose output side
# is exactly twice the input side as torch's ConvTranspose2d(k=4, s=2, p=1).
_CONV_PADDING = ((1, 1), (1, 1))
_CONV_TRANSPOSE_PADDING = ((2, 2), (2, 2))


def _space_to_depth(x: jax.Array) -> jax.Array:
  """[B, H, W, C] padded by one pixel -> 2x2 blocks [B, H/2 + 1, W/2 + 1, 4C] ((r, s, c) order)."""
  b, h, w, c = x.shape
  x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  x = x.reshape(b, h // 2 + 1, 2, w // 2 + 1, 2, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h // 2 + 1, w // 2 + 1, 4 * c)


def _depth_to_space(x: jax.Array) -> jax.Array:
  """Inverse of ``_space_to_depth``: [B, h + 1, w + 1, 4C] -> [B, 2h, 2w, C] without the border."""
  b, hb, wb, c4 = x.shape
  c = c4 // 4
  x = x.reshape(b, hb, wb, 2, 2, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, 2 * hb, 2 * wb, c)
  return x[:, 1:-1, 1:-1]


def _block_kernel(kernel: jax.Array) -> jax.Array:
  """[4, 4, C, O] -> [2(di), 2(dj), 4C ((r, s, c)), O], kernel row 2di + r, column 2dj + s."""
  c, o = kernel.shape[2:]
  return kernel.reshape(2, 2, 2, 2, c, o).transpose(0, 2, 1, 3, 4, 5).reshape(2, 2, 4 * c, o)


def conv_down(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
  """torch Conv2d(k=4, s=2, p=1) = nn.Conv(padding=1), as four dots over 2x2 blocks.

  Output pixel (i, j) sees padded rows 2i..2i+3 and columns 2j..2j+3: the
  2x2 blocks (i + di, j + dj) for di, dj in {0, 1}, each times one quarter of
  the kernel.

  Args:
    x: [B, H, W, C], H and W even.
    kernel: [4, 4, C, O] (rows, columns, in, out).
    bias: [O].

  Returns:
    [B, H/2, W/2, O].
  """
  _, h, w, _ = x.shape
  blocks, k = _space_to_depth(x), _block_kernel(kernel)
  out = bias
  for di in (0, 1):
    for dj in (0, 1):
      out = out + blocks[:, di:di + h // 2, dj:dj + w // 2] @ k[di, dj]
  return out


def conv_up(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
  """torch ConvTranspose2d(k=4, s=2, p=1) as flax's ConvTranspose (padding 2), as dots.

  The exact transpose of ``conv_down`` with the spatially flipped kernel:
  input pixel (i, j) times each quarter (di, dj) of the kernel gives a 2x2
  output block, written at block (i + di, j + dj) of the padded output.

  Args:
    x: [B, H, W, C].
    kernel: [4, 4, C, O].
    bias: [O].

  Returns:
    [B, 2H, 2W, O].
  """
  b, h, w, _ = x.shape
  # Quarter (di, dj) as [C, 4O]: kernel[3 - 2di - r, 3 - 2dj - s, c, o].
  k = _block_kernel(kernel[::-1, ::-1].swapaxes(2, 3)).swapaxes(2, 3)
  blocks = 0
  for di in (0, 1):
    for dj in (0, 1):
      blocks = blocks + jnp.pad(x @ k[di, dj], ((0, 0), (di, 1 - di), (dj, 1 - dj), (0, 0)))
  return _depth_to_space(blocks) + bias


_DIMENSIONS = ('NHWC', 'HWIO', 'NHWC')


def conv_down_xla(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
  """``conv_down`` as XLA's convolution (nn.Conv's computation)."""
  return jax.lax.conv_general_dilated(x, kernel, (2, 2), _CONV_PADDING,
                                      dimension_numbers=_DIMENSIONS) + bias


def conv_up_xla(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
  """``conv_up`` as XLA's transposed convolution (nn.ConvTranspose's computation)."""
  return jax.lax.conv_transpose(x, kernel, (2, 2), _CONV_TRANSPOSE_PADDING,
                                dimension_numbers=_DIMENSIONS) + bias


# How the convs are computed (``speed.conv_impl``, decided by mil_jax.tuning):
# the same function of the same params either way.
CONV_IMPLS = {'dots': (conv_down, conv_up), 'xla': (conv_down_xla, conv_up_xla)}


class _Conv(nn.Module):
  """A 4x4 stride-2 conv (``up``: transposed) with nn.Conv's param names and shapes.

  ``impl``: 'dots' (four dots over 2x2 blocks) or 'xla' (XLA's convolution).
  """
  features: int
  up: bool = False
  dtype: Dtype = jnp.float32
  impl: str = 'dots'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, H/2, W/2, features], or [B, 2H, 2W, features] when ``up``."""
    kernel = self.param('kernel', _xavier_normal, (4, 4, x.shape[-1], self.features))
    bias = self.param('bias', nn.initializers.zeros_init(), (self.features,))
    x, kernel, bias = (t.astype(self.dtype) for t in (x, kernel, bias))
    return CONV_IMPLS[self.impl][self.up](x, kernel, bias)


def channels(num_layers: int, channel_factor: int, start_filters: int) -> list[int]:
  """Encoder output channels per layer, e.g. (4, 2, 6) -> [6, 12, 24, 48]."""
  return [start_filters * channel_factor ** i for i in range(num_layers)]


def latent_side(num_layers: int) -> int:
  """Side of the encoder's last feature map, e.g. 4 layers -> 2."""
  return IMAGE_SIZE // 2 ** num_layers


class ConvEncoder(nn.Module):
  """Images -> flattened last feature map.

  Attributes:
    num_layers: stride-2 convs; 1 to 5 for 32x32 images.
    channel_factor: channel multiplier from one layer to the next.
    start_filters: channels of the first conv.
    negative_slope: of the LeakyReLU after each conv.
    dtype: compute dtype (params stay float32).
    conv_impl: how the convs are computed, 'dots' | 'xla' (``CONV_IMPLS``).
  """
  num_layers: int = 4
  channel_factor: int = 2
  start_filters: int = 6
  negative_slope: float = 0.2
  dtype: Dtype = jnp.float32
  conv_impl: str = 'dots'

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """Encodes images.

    Args:
      x: images [B, 32, 32, 3] in [-1, 1].
      train: unused (LayerNorm has no batch statistics).

    Returns:
      features [B, s * s * C] with s = 32 / 2**num_layers and C the last
      layer's channels (192 for the reference Conv-192).
    """
    del train
    x = x.astype(self.dtype)
    for i, c in enumerate(channels(self.num_layers, self.channel_factor, self.start_filters)):
      x = _Conv(c, dtype=self.dtype, impl=self.conv_impl, name=f'conv_{i}')(x)
      x = nn.leaky_relu(x, self.negative_slope)
      if i > 0:
        x = nn.LayerNorm(dtype=self.dtype, name=f'norm_{i}')(x)
    return x.reshape(x.shape[0], -1)


class ConvDecoder(nn.Module):
  """Flattened latent -> images; mirrors ``ConvEncoder``.

  Attributes:
    num_layers: as the encoder's.
    channel_factor: as the encoder's.
    start_filters: as the encoder's.
    dtype: compute dtype.
    conv_impl: how the convs are computed, 'dots' | 'xla'.
  """
  num_layers: int = 4
  channel_factor: int = 2
  start_filters: int = 6
  dtype: Dtype = jnp.float32
  conv_impl: str = 'dots'

  @nn.compact
  def __call__(self, z: jax.Array, *, train: bool) -> jax.Array:
    """Decodes latents.

    Args:
      z: latents [B, s * s * C] as ``ConvEncoder`` returns them.
      train: unused.

    Returns:
      images [B, 32, 32, 3] in [-1, 1] (tanh), float32.
    """
    del train
    widths = channels(self.num_layers, self.channel_factor, self.start_filters)
    side = latent_side(self.num_layers)
    z = z.reshape(z.shape[0], side, side, widths[-1])
    for i, c in enumerate(reversed(widths[:-1])):
      z = _Conv(c, up=True, dtype=self.dtype, impl=self.conv_impl,
                name=f'conv_transpose_{i}')(z)
      z = nn.relu(z)
      z = nn.LayerNorm(dtype=self.dtype, name=f'norm_{i}')(z)
    z = _Conv(3, up=True, dtype=self.dtype, impl=self.conv_impl,
              name=f'conv_transpose_{self.num_layers - 1}')(z)
    return jnp.tanh(z.astype(jnp.float32))


class ConvAutoencoder(nn.Module):
  """Encoder and decoder under the param names ``encoder`` and ``decoder``.

  Attributes:
    num_layers: stride-2 convs in each half (reference 4).
    channel_factor: channel multiplier per layer (reference 2).
    start_filters: first conv's channels (6 for Conv-192, 8 for Conv-256).
    dtype: compute dtype.
    conv_impl: how the convs are computed, 'dots' | 'xla'.
  """
  num_layers: int = 4
  channel_factor: int = 2
  start_filters: int = 6
  dtype: Dtype = jnp.float32
  conv_impl: str = 'dots'

  def setup(self):
    self.encoder = ConvEncoder(num_layers=self.num_layers, channel_factor=self.channel_factor,
                               start_filters=self.start_filters, dtype=self.dtype,
                               conv_impl=self.conv_impl)
    self.decoder = ConvDecoder(num_layers=self.num_layers, channel_factor=self.channel_factor,
                               start_filters=self.start_filters, dtype=self.dtype,
                               conv_impl=self.conv_impl)

  def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Reconstructs images.

    Args:
      x: images [B, 32, 32, 3] in [-1, 1].
      train: whether this is a training pass.

    Returns:
      (reconstruction [B, 32, 32, 3] in [-1, 1], aux {}).
    """
    return self.decode(self.encode(x, train=train), train=train), {}

  def encode(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """[B, 32, 32, 3] -> features [B, s * s * C]."""
    return self.encoder(x, train=train)

  def decode(self, z: jax.Array, *, train: bool = False) -> jax.Array:
    """[B, s * s * C] -> images [B, 32, 32, 3]."""
    return self.decoder(z, train=train)
