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


# How attention is computed (the ``attention`` field of the MAE config):
#   'xla': written out below, two batched matmuls and a float32 softmax that
#     XLA fuses, on every backend;
#   'cudnn': jax.nn.dot_product_attention's cuDNN kernel, fused so that the
#     [T, T] weights never reach memory; NVIDIA GPUs, bfloat16 only;
#   'auto' (the default): decided by mil_jax.tuning for the run's platform
#     ('cudnn' where it applies, else 'xla'); a model built without the run's
#     settings computes 'xla'.
ATTENTION_IMPLEMENTATIONS = ('auto', 'xla', 'cudnn')


def _attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum('bhtd,bhsd->bhts', q * jnp.asarray(scale, q.dtype), k)
  weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
  return jnp.einsum('bhts,bhsd->bhtd', weights, v)


def attention_chunk(batch: int, heads: int, length: int, groups: int = 1,
                    chunk_bytes: int = 0) -> int:
  """Examples per attention chunk in each of ``groups`` parts of the batch: the
  most that divide the part and whose float32 weights [c, H, T, T] fit in
  ``chunk_bytes`` (at least 1); the whole part when ``chunk_bytes`` is 0."""
  part = batch // groups
  if not chunk_bytes:
    return part
  fit = max(1, chunk_bytes // (4 * heads * length * length))
  return max(c for c in range(1, min(fit, part) + 1) if part % c == 0)


def _cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """cuDNN's fused attention over [B, T, H, D/H] (the projection's own layout).

  Its training kernels take only even lengths, and a cls token makes every
  length here odd (65, 257): one padding token is appended and masked out as
  a key through the sequence lengths, and its output row dropped.
  """
  batch, length = q.shape[:2]
  if length % 2 == 0:
    return jax.nn.dot_product_attention(q, k, v, implementation='cudnn')
  pad = [(0, 0), (0, 1), (0, 0), (0, 0)]
  lengths = jnp.full((batch,), length, jnp.int32)
  out = jax.nn.dot_product_attention(
      jnp.pad(q, pad), jnp.pad(k, pad), jnp.pad(v, pad), implementation='cudnn',
      query_seq_lengths=lengths, key_value_seq_lengths=lengths)
  return out[:, :length]


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, chunk_bytes: int = 0,
              groups: int = 1) -> jax.Array:
  """Softmax attention, scaled by 1/sqrt(head width); softmax in float32.

  Args:
    q, k, v: [B, H, T, D] (heads before tokens).
    chunk_bytes: attention weights per chunk of examples (``attention_chunk``),
      each chunk's recomputed in the backward pass (jax.checkpoint), so that
      they stay in cache through the softmax and its gradient; 0: no chunks.
    groups: equal parts of the batch (one per device it is split over); each
      loop step takes one chunk of every part, so no device waits on
      another's examples.

  Returns:
    [B, H, T, D].
  """
  batch, heads, length, _ = q.shape
  groups = groups if batch % groups == 0 else 1
  chunk = attention_chunk(batch, heads, length, groups, chunk_bytes)
  steps = batch // groups // chunk
  if steps <= 1:
    return _attention(q, k, v)

  def split(x):  # [B, ...] -> [steps, groups * chunk, ...]
    x = x.reshape(groups, steps, chunk, *x.shape[1:]).swapaxes(0, 1)
    return x.reshape(steps, groups * chunk, *x.shape[3:])

  out = jax.lax.map(jax.checkpoint(lambda qkv: _attention(*qkv)), (split(q), split(k), split(v)))
  return out.reshape(steps, groups, chunk, *q.shape[1:]).swapaxes(0, 1).reshape(q.shape)


class MultiHeadAttention(nn.Module):
  """Self-attention with one fused query/key/value projection.

  Attributes:
    num_heads: number of heads; must divide the input width.
    dtype: compute dtype (params stay float32).
    implementation: 'xla' | 'cudnn' (``ATTENTION_IMPLEMENTATIONS``; 'auto' is 'xla').
    chunk_bytes, groups: how the written-out form chunks the batch (``attention``).
  """
  num_heads: int
  dtype: Dtype = jnp.float32
  implementation: str = 'xla'
  chunk_bytes: int = 0
  groups: int = 1

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
    qkv = qkv.reshape(batch, length, 3, self.num_heads, head_dim)
    if self.implementation == 'cudnn':
      out = _cudnn_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])  # [B, T, H, D/H]
    else:
      # Heads before tokens ([3, B, H, T, D/H]) so both attention products are
      # plain batched matmuls with the batch dimensions leading: the layout
      # jax.nn.dot_product_attention's XLA path uses ([B, T, H, D/H], under a
      # vmap) made XLA:CPU emit transposed dots and a slow softmax backward
      # that took most of the MAE's step time.
      qkv = qkv.transpose(2, 0, 3, 1, 4)
      out = attention(qkv[0], qkv[1], qkv[2], chunk_bytes=self.chunk_bytes,
                      groups=self.groups).transpose(0, 2, 1, 3)
    return nn.Dense(width, dtype=self.dtype, kernel_init=_dense_init,
                    name='out')(out.reshape(batch, length, width))


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


class DropPath(nn.Module):
  """Stochastic depth: drops a residual branch for whole examples at random.

  At train time each example's branch is kept with probability ``1 - rate``
  and then scaled by ``1 / (1 - rate)``, so its expectation is unchanged; at
  eval time, and at rate 0, the branch passes through untouched. The draws
  come from the ``'dropout'`` rng stream.

  Attributes:
    rate: probability of dropping an example's branch, in [0, 1).
  """
  rate: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """[B, ...] -> [B, ...]; rows zeroed or scaled by 1 / (1 - rate)."""
    if not train or self.rate == 0.0:
      return x
    keep = jax.random.bernoulli(self.make_rng('dropout'), 1.0 - self.rate,
                                (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(keep, x / jnp.asarray(1.0 - self.rate, x.dtype), jnp.zeros_like(x))


class EncoderBlock(nn.Module):
  """One pre-LN transformer block.

  Attributes:
    num_heads: attention heads.
    mlp_dim: hidden width of the MLP.
    dtype: compute dtype.
    attention: how attention is computed ('xla' | 'cudnn').
    attention_chunk_bytes, attention_groups: ``MultiHeadAttention``'s chunking.
    drop_path_rate: stochastic depth of both residual branches (``DropPath``).
  """
  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32
  attention: str = 'xla'
  attention_chunk_bytes: int = 0
  attention_groups: int = 1
  drop_path_rate: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """[B, T, D] -> [B, T, D]."""
    y = nn.LayerNorm(dtype=self.dtype, name='norm_1')(x)
    y = MultiHeadAttention(self.num_heads, dtype=self.dtype, implementation=self.attention,
                           chunk_bytes=self.attention_chunk_bytes, groups=self.attention_groups,
                           name='attn')(y, train=train)
    x = x + DropPath(self.drop_path_rate, name='drop_path_1')(y, train=train)
    y = nn.LayerNorm(dtype=self.dtype, name='norm_2')(x)
    y = MlpBlock(self.mlp_dim, dtype=self.dtype, name='mlp')(y, train=train)
    return x + DropPath(self.drop_path_rate, name='drop_path_2')(y, train=train)


def drop_path_rates(rate: float, depth: int) -> list[float]:
  """Stochastic depth per block, rising linearly from 0 at the first block to
  ``rate`` at the last (the MAE fine-tuning rule: deeper blocks are dropped more)."""
  return [rate * i / max(depth - 1, 1) for i in range(depth)]


class Transformer(nn.Module):
  """A stack of ``depth`` pre-LN blocks followed by a final LayerNorm.

  Attributes:
    depth: number of blocks.
    num_heads: attention heads per block.
    mlp_dim: hidden width of each block's MLP.
    dtype: compute dtype.
    attention: how attention is computed ('xla' | 'cudnn').
    attention_chunk_bytes, attention_groups: ``MultiHeadAttention``'s chunking.
    drop_path_rate: stochastic depth of the last block (``drop_path_rates``).
  """
  depth: int
  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32
  attention: str = 'xla'
  attention_chunk_bytes: int = 0
  attention_groups: int = 1
  drop_path_rate: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """[B, T, D] -> [B, T, D], normalized."""
    for i, rate in enumerate(drop_path_rates(self.drop_path_rate, self.depth)):
      x = EncoderBlock(self.num_heads, self.mlp_dim, dtype=self.dtype, attention=self.attention,
                       attention_chunk_bytes=self.attention_chunk_bytes,
                       attention_groups=self.attention_groups, drop_path_rate=rate,
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
