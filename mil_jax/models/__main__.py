r"""Prints the parameter counts of the autoencoder a config describes.

  python -m mil_jax.models --config configs/mae.py:seed

One line per top-level submodule (encoder, decoder) and per submodule one
level deeper, then, as the last line, JSON:
``{"model": ..., "params": ..., "encoder_params": ..., "feature_dim": ...}``.
Shapes come from ``jax.eval_shape``: nothing is allocated or computed.
"""
from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from absl import app, flags
from ml_collections import config_flags

from mil_jax import models
from mil_jax.errors import UserError

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
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if _CONFIG.value is None:
    print('error: --config is required, e.g. --config configs/mae.py:seed.', file=sys.stderr)
    sys.exit(2)
  try:
    lines, summary = summarize(_CONFIG.value.model)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  print('\n'.join(lines))
  print(json.dumps(summary))


def _parse_flags(argv: list[str]) -> list[str]:
  # A bad --config (unknown variant, missing file) is the user's mistake:
  # one sentence and exit 2, where absl would exit 1.
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    # config_flags puts the get_config traceback inside the message; its
    # first line names the flag and its last line the cause.
    text = str(e).strip().splitlines()
    print(f'error: {text[0]} {text[-1]}' if len(text) > 1 else f'error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
