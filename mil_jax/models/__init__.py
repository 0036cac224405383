"""The model registry: ``config.model`` -> an autoencoder or its encoder.

``model_config.name`` picks the architecture; every other field of
``model_config`` is an attribute of that autoencoder class, and the fields the
encoder class shares are passed to it, so ``build_encoder(cfg)`` creates
exactly the param tree that ``build_autoencoder(cfg)`` has under
``'encoder'``. ``dtype`` is given as 'float32' or 'bfloat16' and is the
compute dtype; params are always float32.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mil_jax.errors import UserError
from mil_jax.images import IMAGE_SHAPE, IMAGE_SIZE
from mil_jax.models import conv_ae, fc_ae, mae, masked_unet, vit


def _check_conv(cfg: Mapping[str, Any]) -> None:
  if not 1 <= cfg['num_layers'] <= 5:
    raise UserError(f"conv num_layers must be 1 to 5 for 32x32 images, got {cfg['num_layers']}.")
  if cfg['channel_factor'] < 1 or cfg['start_filters'] < 1:
    raise UserError('conv channel_factor and start_filters must be positive integers.')


def _check_fc(cfg: Mapping[str, Any]) -> None:
  if not cfg['hidden_dims'] or min(cfg['hidden_dims']) < 1:
    raise UserError(f"fc hidden_dims must be positive widths, got {cfg['hidden_dims']}.")


def _check_mae(cfg: Mapping[str, Any]) -> None:
  if cfg['image_size'] % cfg['patch_size']:
    raise UserError(f"mae patch_size {cfg['patch_size']} must divide image_size "
                    f"{cfg['image_size']}.")
  if not 0.0 <= cfg['mask_ratio'] < 1.0:
    raise UserError(f"mae mask_ratio must be in [0, 1), got {cfg['mask_ratio']}.")
  if not 0.0 <= cfg['drop_path_rate'] < 1.0:
    raise UserError(f"mae drop_path_rate must be in [0, 1), got {cfg['drop_path_rate']}.")
  for width, heads in (('width', 'num_heads'), ('decoder_width', 'decoder_num_heads')):
    if cfg[width] % cfg[heads]:
      raise UserError(f'mae {width} {cfg[width]} must be divisible by {heads} {cfg[heads]}.')
  if cfg['pos_embedding'] not in ('learned', 'sincos'):
    raise UserError(f"mae pos_embedding must be 'learned' or 'sincos', "
                    f"got {cfg['pos_embedding']!r}.")
  if cfg['pos_embedding'] == 'sincos' and (cfg['width'] % 4 or cfg['decoder_width'] % 4):
    raise UserError('mae sincos position embeddings need width and decoder_width '
                    'divisible by 4.')
  if cfg['pool'] not in ('cls', 'mean'):
    raise UserError(f"mae pool must be 'cls' or 'mean', got {cfg['pool']!r}.")
  if cfg['attention'] not in vit.ATTENTION_IMPLEMENTATIONS:
    raise UserError(f"mae attention must be one of {', '.join(vit.ATTENTION_IMPLEMENTATIONS)}, "
                    f"got {cfg['attention']!r}.")


def _check_masked_unet(cfg: Mapping[str, Any]) -> None:
  if not 1 <= cfg['num_layers'] <= 5:
    raise UserError(f"masked_unet num_layers must be 1 to 5 for 32x32 images, "
                    f"got {cfg['num_layers']}.")
  if cfg['channel_factor'] < 1 or cfg['start_filters'] < 1:
    raise UserError('masked_unet channel_factor and start_filters must be positive integers.')
  if IMAGE_SIZE % cfg['patch_size']:
    raise UserError(f"masked_unet patch_size {cfg['patch_size']} must divide the image side "
                    f"{IMAGE_SIZE}.")
  if not 0.0 <= cfg['mask_ratio'] < 1.0:
    raise UserError(f"masked_unet mask_ratio must be in [0, 1), got {cfg['mask_ratio']}.")
  if cfg['mask_fill'] not in masked_unet.MASK_FILLS:
    raise UserError(f"masked_unet mask_fill must be one of {', '.join(masked_unet.MASK_FILLS)}, "
                    f"got {cfg['mask_fill']!r}.")


@dataclasses.dataclass(frozen=True)
class _Entry:
  autoencoder: type[nn.Module]
  encoder: type[nn.Module]
  check: Callable[[Mapping[str, Any]], None]


MODELS: dict[str, _Entry] = {
    'fc': _Entry(fc_ae.FCAutoencoder, fc_ae.FCEncoder, _check_fc),
    'conv': _Entry(conv_ae.ConvAutoencoder, conv_ae.ConvEncoder, _check_conv),
    'mae': _Entry(mae.MAE, mae.MAEEncoder, _check_mae),
    'masked_unet': _Entry(masked_unet.MaskedUNet, masked_unet.MaskedUNetEncoder,
                          _check_masked_unet),
}

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def _module_fields(cls: type[nn.Module]) -> set[str]:
  # 'parent' and 'name' are linen's own dataclass fields, not hyperparameters.
  return {f.name for f in dataclasses.fields(cls)} - {'parent', 'name'}


def _resolve(model_config: Mapping[str, Any],
             settings: Mapping[str, Any] | None) -> tuple[_Entry, dict[str, Any]]:
  """Checks a model config and turns it into autoencoder constructor kwargs, with
  the ``settings`` (``tuning.Speed.model_settings``) the class has."""
  name = model_config['name']
  if name not in MODELS:
    raise UserError(f'unknown model name {name!r}; known models: {", ".join(sorted(MODELS))}.')
  entry = MODELS[name]
  kwargs = {k: v for k, v in dict(model_config).items() if k != 'name'}
  unknown = set(kwargs) - _module_fields(entry.autoencoder)
  if unknown:
    raise UserError(f'model {name!r} has no field(s) {sorted(unknown)}; '
                    f'its fields are {sorted(_module_fields(entry.autoencoder))}.')
  if 'dtype' in kwargs:
    if kwargs['dtype'] not in DTYPES:
      raise UserError(f"model dtype must be one of {sorted(DTYPES)}, got {kwargs['dtype']!r}.")
    kwargs['dtype'] = DTYPES[kwargs['dtype']]
  # ConfigDict hands tuples back as tuples, but a JSON round trip gives lists;
  # module attributes should be hashable.
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
  entry.check({**{f.name: f.default for f in dataclasses.fields(entry.autoencoder)}, **kwargs})
  fields = _module_fields(entry.autoencoder)
  kwargs.update({k: v for k, v in (settings or {}).items() if k in fields})
  return entry, kwargs


def build_autoencoder(model_config: Mapping[str, Any],
                      settings: Mapping[str, Any] | None = None) -> nn.Module:
  """The autoencoder named by ``model_config.name`` ('fc' | 'conv' | 'mae' | 'masked_unet').

  Its params are ``{'encoder': ..., 'decoder': ...}``; ``apply(v, x,
  train=...)`` returns ``(reconstruction [B, 32, 32, 3], aux)`` and
  ``apply(v, x, method='encode')`` the encoder's features [B, D].
  ``settings``: how the run computes it (``tuning.Speed.model_settings``);
  without them, the portable choices (written-out attention, no chunks).

  Raises:
    UserError: unknown name, unknown field or an invalid value.
  """
  entry, kwargs = _resolve(model_config, settings)
  return entry.autoencoder(**kwargs)


def build_encoder(model_config: Mapping[str, Any],
                  settings: Mapping[str, Any] | None = None) -> nn.Module:
  """The encoder of that autoencoder alone: ``apply(v, x, train=...) -> [B, D]``.

  Its param tree equals the autoencoder's ``params['encoder']``, so a
  classifier can hold it as submodule ``encoder`` and load pretrained weights.

  Raises:
    UserError: as ``build_autoencoder``.
  """
  entry, kwargs = _resolve(model_config, settings)
  fields = _module_fields(entry.encoder)
  return entry.encoder(**{k: v for k, v in kwargs.items() if k in fields})


# The models are built for CIFAR images; the count does not depend on batch.
_IMAGES = jax.ShapeDtypeStruct((1, *IMAGE_SHAPE), jnp.float32)


def _count(tree: Any) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(tree))


def summarize(model_config: Mapping[str, Any]) -> tuple[list[str], dict[str, Any]]:
  """Param counts of ``build_autoencoder(model_config)`` without allocating.

  Returns:
    (table lines, {'model', 'params', 'encoder_params', 'feature_dim'}).

  Raises:
    UserError: an invalid model config.
  """
  ae = build_autoencoder(model_config)
  rngs = {'params': jax.random.key(0), 'masking': jax.random.key(1)}
  variables = jax.eval_shape(lambda x: ae.init(rngs, x, train=False), _IMAGES)
  params = variables['params']
  features = jax.eval_shape(lambda v, x: ae.apply(v, x, method='encode'), variables, _IMAGES)

  lines = [f'model: {model_config["name"]}']
  # Encoder first: it is the part later stages reuse.
  for top in sorted(params, key=lambda k: (k != 'encoder', k)):
    sub = params[top]
    lines.append(f'{top:<32}{_count(sub):>14,}')
    for name, leaf in sub.items():
      lines.append(f'  {name:<30}{_count(leaf):>14,}')
  lines.append(f'{"total":<32}{_count(params):>14,}')
  summary = {
      'model': model_config['name'],
      'params': _count(params),
      'encoder_params': _count(params['encoder']),
      'feature_dim': int(features.shape[-1]),
  }
  return lines, summary
