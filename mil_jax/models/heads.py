"""Classifier heads, and the classifier: a pretrained encoder under a head.

The classifier's params are ``{'encoder': ..., 'head': ...}``, so the
``'encoder'`` subtree of a pretrained autoencoder drops in unchanged and
freeze rules read ``encoder/.*``.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class LinearHead(nn.Module):
  """One Dense layer over the features (the study's ``probing`` head).

  Attributes:
    num_classes: outputs.
    batchnorm: normalize the features first with a BatchNorm without scale or
      shift (the MAE paper's linear-probing trick: feature scales of a frozen
      encoder are arbitrary, and Adam on a raw linear layer copes badly).
  """
  num_classes: int
  batchnorm: bool = False

  @nn.compact
  def __call__(self, features: jax.Array, *, train: bool) -> jax.Array:
    """[B, D] -> logits [B, num_classes] (float32)."""
    x = features.astype(jnp.float32)
    if self.batchnorm:
      x = nn.BatchNorm(use_running_average=not train, use_bias=False, use_scale=False,
                       momentum=0.9, epsilon=1e-6, name='batchnorm')(x)
    return nn.Dense(self.num_classes, name='dense')(x)


class MLPHead(nn.Module):
  """Dense(hidden) -> ReLU -> Dropout -> Dense(classes) (the study's ``fine_tune`` head).

  Attributes:
    num_classes: outputs.
    hidden_dim: hidden width (the study: 192 for FC, 150 for Conv and MAE).
    dropout_rate: dropout after the ReLU; needs the ``'dropout'`` rng when training.
  """
  num_classes: int
  hidden_dim: int
  dropout_rate: float = 0.2

  @nn.compact
  def __call__(self, features: jax.Array, *, train: bool) -> jax.Array:
    """[B, D] -> logits [B, num_classes] (float32)."""
    x = nn.Dense(self.hidden_dim, name='hidden')(features.astype(jnp.float32))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(nn.relu(x))
    return nn.Dense(self.num_classes, name='out')(x)


class Classifier(nn.Module):
  """``head(encoder(images))``.

  Attributes:
    encoder: any encoder of ``mil_jax.models.build_encoder`` (``[B,32,32,3] -> [B, D]``).
    head: a head module (``[B, D] -> [B, classes]``).
    frozen: the encoder runs in inference mode and no gradient flows into it.
  """
  encoder: nn.Module
  head: nn.Module
  frozen: bool = False

  def features(self, images: jax.Array, *, train: bool) -> jax.Array:
    """[B, 32, 32, 3] in [-1, 1] -> [B, D]."""
    features = self.encoder(images, train=train and not self.frozen)
    return jax.lax.stop_gradient(features) if self.frozen else features

  def classify(self, features: jax.Array, *, train: bool) -> jax.Array:
    """[B, D] -> logits [B, classes]: the head alone, for cached features."""
    return self.head(features, train=train)

  def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
    """[B, 32, 32, 3] in [-1, 1] -> logits [B, classes]."""
    return self.classify(self.features(images, train=train), train=train)
