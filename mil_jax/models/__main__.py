r"""Prints the parameter counts of the autoencoder a config describes.

  python -m mil_jax.models --config configs/mae.py:seed

One line per top-level submodule (encoder, decoder) and per submodule one
level deeper, then, as the last line, JSON:
``{"model": ..., "params": ..., "encoder_params": ..., "feature_dim": ...}``.
Shapes come from ``jax.eval_shape``: nothing is allocated or computed.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from ml_collections import config_flags

from mil_jax import cli, models

_CONFIG = config_flags.DEFINE_config_file('config', None, 'model config file[:variant]',
                                          lock_config=True)

# The models are built for CIFAR images; the count does not depend on batch.
_IMAGES = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)


def _count(tree: Any) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(tree))


def summarize(model_config: Mapping[str, Any]) -> tuple[list[str], dict[str, Any]]:
  """Param counts of ``build_autoencoder(model_config)`` without allocating.

  Returns:
    (table lines, {'model', 'params', 'encoder_params', 'feature_dim'}).

  Raises:
    UserError: an invalid model config.
  """
  ae = models.build_autoencoder(model_config)
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


def main(argv: list[str]) -> None:
  if _CONFIG.value is None:
    cli.fail('no config given; pass e.g. --config configs/mae.py:seed.')
  lines, summary = summarize(_CONFIG.value.model)
  print('\n'.join(lines))
  print(json.dumps(summary))


if __name__ == '__main__':
  cli.run(main, kind='pretraining')  # a UserError ends in one sentence on stderr and exit code 2
