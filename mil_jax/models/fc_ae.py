"""The fully connected autoencoder ("FC" in the reference study).

Encoder: flatten 32x32x3 -> 3072, then [Dense, LeakyReLU(0.2)] for each of
``hidden_dims`` (reference 1536, 768, 384: latent 384). The decoder mirrors
it with [ReLU, Dense] back to 3072 and ends in tanh. Unlike the reference the
decoder's last Dense goes straight into tanh: the reference put a ReLU before
the tanh, so it could only output [0, 1) while pixels lie in [-1, 1].
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mil_jax.images import IMAGE_SHAPE

Dtype = Any


# torch.nn.Linear's default weight init (kaiming_uniform with a=sqrt(5)) is
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)), i.e. variance 1/(3 fan_in). Biases start
# at zero rather than torch's small uniform: flax initializers do not see the
# fan-in of a bias, and a zero start makes no measurable difference here.
_torch_linear_init = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')


class FCEncoder(nn.Module):
  """Images -> latent vector.

  Attributes:
    hidden_dims: output width of each Dense layer; the last is the latent.
    negative_slope: of the LeakyReLU after each layer.
    dtype: compute dtype (params stay float32).
  """
  hidden_dims: Sequence[int] = (1536, 768, 384)
  negative_slope: float = 0.2
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """Encodes images.

    Args:
      x: images [B, 32, 32, 3] in [-1, 1].
      train: unused (no dropout or batch statistics).

    Returns:
      features [B, hidden_dims[-1]].
    """
    del train
    x = x.reshape(x.shape[0], -1).astype(self.dtype)
    for i, dim in enumerate(self.hidden_dims):
      x = nn.Dense(dim, dtype=self.dtype, kernel_init=_torch_linear_init, name=f'dense_{i}')(x)
      x = nn.leaky_relu(x, self.negative_slope)
    return x


class FCDecoder(nn.Module):
  """Latent vector -> images.

  Attributes:
    hidden_dims: the encoder's widths; the decoder walks them backwards and
      ends at 3072 pixels.
    dtype: compute dtype.
  """
  hidden_dims: Sequence[int] = (1536, 768, 384)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array, *, train: bool) -> jax.Array:
    """Decodes latents.

    Args:
      z: latents [B, hidden_dims[-1]].
      train: unused.

    Returns:
      images [B, 32, 32, 3] in [-1, 1] (tanh), float32.
    """
    del train
    widths = list(self.hidden_dims[-2::-1]) + [IMAGE_SHAPE[0] * IMAGE_SHAPE[1] * IMAGE_SHAPE[2]]
    for i, dim in enumerate(widths):
      z = nn.relu(z)
      z = nn.Dense(dim, dtype=self.dtype, kernel_init=_torch_linear_init, name=f'dense_{i}')(z)
    return jnp.tanh(z.astype(jnp.float32)).reshape(z.shape[0], *IMAGE_SHAPE)


class FCAutoencoder(nn.Module):
  """Encoder and decoder under the param names ``encoder`` and ``decoder``.

  Attributes:
    hidden_dims: encoder widths, last = latent (reference (1536, 768, 384)).
    dtype: compute dtype.
  """
  hidden_dims: Sequence[int] = (1536, 768, 384)
  dtype: Dtype = jnp.float32

  def setup(self):
    self.encoder = FCEncoder(hidden_dims=self.hidden_dims, dtype=self.dtype)
    self.decoder = FCDecoder(hidden_dims=self.hidden_dims, dtype=self.dtype)

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
    """[B, 32, 32, 3] -> features [B, hidden_dims[-1]]."""
    return self.encoder(x, train=train)

  def decode(self, z: jax.Array, *, train: bool = False) -> jax.Array:
    """[B, hidden_dims[-1]] -> images [B, 32, 32, 3]."""
    return self.decoder(z, train=train)
