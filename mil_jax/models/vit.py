"""Transformer pieces shared by the masked autoencoder's encoder and decoder.

Pre-LayerNorm blocks (as in ViT and MAE): ``x + attn(ln(x))``, then
``x + mlp(ln(x))``, with a final LayerNorm after the stack. Attention is
written out (:func:`attention`) in a heads-first layout, whose two products
are plain batched matmuls on every backend; at these lengths (65 and 257
tokens) the scores fit in memory and XLA fuses the softmax.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

# Xavier-uniform weights and zero biases, as the MAE reference initializes
# every Linear layer of its transformers.
_dense_init = nn.initializers.xavier_uniform()


# On the CPU, attention runs over chunks of examples whose [c, H, T, T]
# weights take at most this many bytes, with the chunk's scores recomputed in
# the backward pass (jax.checkpoint): the weights then stay in cache through
# the softmax and its gradient instead of streaming through memory. For the
# reference MAE's decoder (3 heads, 257 tokens) that is 2 images per chunk,
# and it halved the attention's forward + backward time on a 2-core CPU.
CPU_ATTENTION_CHUNK_BYTES = 2 << 20


def _attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum('bhtd,bhsd->bhts', q * jnp.asarray(scale, q.dtype), k)
  weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
  return jnp.einsum('bhts,bhsd->bhtd', weights, v)


def attention_chunk(batch: int, heads: int, length: int) -> int:
  """Examples per attention chunk: ``batch`` (no chunking) except on a single CPU device."""
  if jax.default_backend() != 'cpu' or jax.device_count() > 1:
    return batch
  fit = max(1, CPU_ATTENTION_CHUNK_BYTES // (4 * heads * length * length))
  return max(c for c in range(1, min(fit, batch) + 1) if batch % c == 0)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, chunk: int | None = None
              ) -> jax.Array:
  """Softmax attention, scaled by 1/sqrt(head width); softmax in float32.

  Args:
    q, k, v: [B, H, T, D] (heads before tokens).
    chunk: examples per chunk (a divisor of B); ``None``: ``attention_chunk``.

  Returns:
    [B, H, T, D].
  """
  batch, heads, length, _ = q.shape
  chunk = attention_chunk(batch, heads, length) if chunk is None else chunk
  if chunk >= batch:
    return _attention(q, k, v)

  def split(x):
    return x.reshape(batch // chunk, chunk, *x.shape[1:])

  out = jax.lax.map(jax.checkpoint(lambda qkv: _attention(*qkv)), (split(q), split(k), split(v)))
  return out.reshape(q.shape)


class MultiHeadAttention(nn.Module):
  """Self-attention with one fused query/key/value projection.

  Attributes:
    num_heads: number of heads; must divide the input width.
    dtype: compute dtype (params stay float32).
  """
  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """Attends every token to every token.

    Args:
      x: tokens [B, T, D].
      train: unused (no dropout); kept for a uniform module signature.

    Returns:
      [B, T, D].
    """
    del train
    batch, length, width = x.shape
    if width % self.num_heads:
      raise ValueError(f'width {width} is not divisible by {self.num_heads} heads')
    head_dim = width // self.num_heads
    qkv = nn.Dense(3 * width, dtype=self.dtype, kernel_init=_dense_init, name='qkv')(x)
    # Heads before tokens ([3, B, H, T, D/H]) so both attention products are
    # plain batched matmuls with the batch dimensions leading: the layout
    # jax.nn.dot_product_attention's XLA path uses ([B, T, H, D/H], under a
    # vmap) made XLA:CPU emit transposed dots and a slow softmax backward
    # that took most of the MAE's step time.
    qkv = qkv.reshape(batch, length, 3, self.num_heads, head_dim).transpose(2, 0, 3, 1, 4)
    out = attention(qkv[0], qkv[1], qkv[2])
    out = out.transpose(0, 2, 1, 3).reshape(batch, length, width)
    return nn.Dense(width, dtype=self.dtype, kernel_init=_dense_init, name='out')(out)


class MlpBlock(nn.Module):
  """Dense -> GELU -> Dense, the feed-forward half of a transformer block.

  Attributes:
    mlp_dim: hidden width.
    dtype: compute dtype.
  """
  mlp_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """[B, T, D] -> [B, T, D]."""
    del train
    width = x.shape[-1]
    y = nn.Dense(self.mlp_dim, dtype=self.dtype, kernel_init=_dense_init, name='fc_1')(x)
    # Exact (erf) GELU, as torch.nn.GELU and the HF ViT blocks of the reference.
    y = nn.gelu(y, approximate=False)
    return nn.Dense(width, dtype=self.dtype, kernel_init=_dense_init, name='fc_2')(y)


class EncoderBlock(nn.Module):
  """One pre-LN transformer block.

  Attributes:
    num_heads: attention heads.
    mlp_dim: hidden width of the MLP.
    dtype: compute dtype.
  """
  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """[B, T, D] -> [B, T, D]."""
    y = nn.LayerNorm(dtype=self.dtype, name='norm_1')(x)
    x = x + MultiHeadAttention(self.num_heads, dtype=self.dtype, name='attn')(y, train=train)
    y = nn.LayerNorm(dtype=self.dtype, name='norm_2')(x)
    return x + MlpBlock(self.mlp_dim, dtype=self.dtype, name='mlp')(y, train=train)


class Transformer(nn.Module):
  """A stack of ``depth`` pre-LN blocks followed by a final LayerNorm.

  Attributes:
    depth: number of blocks.
    num_heads: attention heads per block.
    mlp_dim: hidden width of each block's MLP.
    dtype: compute dtype.
  """
  depth: int
  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """[B, T, D] -> [B, T, D], normalized."""
    for i in range(self.depth):
      x = EncoderBlock(self.num_heads, self.mlp_dim, dtype=self.dtype,
                       name=f'block_{i}')(x, train=train)
    return nn.LayerNorm(dtype=self.dtype, name='norm')(x)


def posemb_sincos_2d(height: int, width: int, dim: int,
                     temperature: float = 10_000.0) -> np.ndarray:
  """Fixed 2-D sine-cosine position embeddings for a ``height x width`` grid.

  A quarter of the channels each hold sin(y), cos(y), sin(x), cos(x) at
  geometrically spaced frequencies.

  Args:
    height: grid rows.
    width: grid columns.
    dim: embedding width; must be divisible by 4.
    temperature: the longest wavelength.

  Returns:
    float32 [height * width, dim], row-major over the grid (the patch order
    of ``mae.patchify``).
  """
  if dim % 4:
    raise ValueError(f'sin-cos position embeddings need a width divisible by 4, got {dim}')
  y, x = np.mgrid[:height, :width]
  omega = 1.0 / temperature ** (np.arange(dim // 4) / (dim // 4))
  y = y.reshape(-1, 1) * omega[None]
  x = x.reshape(-1, 1) * omega[None]
  return np.concatenate([np.sin(y), np.cos(y), np.sin(x), np.cos(x)], axis=1).astype(np.float32)
