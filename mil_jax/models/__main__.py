r"""Prints the parameter counts of the autoencoder a config describes.

  python -m mil_jax.models --config configs/mae.py:seed

One line per top-level submodule (encoder, decoder) and per submodule one
level deeper, then, as the last line, JSON:
``{"model": ..., "params": ..., "encoder_params": ..., "feature_dim": ...}``.
Shapes come from ``jax.eval_shape``: nothing is allocated or computed.
"""
from __future__ import annotations

import json

from ml_collections import config_flags

from mil_jax import cli, models

_CONFIG = config_flags.DEFINE_config_file('config', None, 'model config file[:variant]',
                                          lock_config=True)


def main(argv: list[str]) -> None:
  if _CONFIG.value is None:
    cli.fail('no config given; pass e.g. --config configs/mae.py:seed.')
  lines, summary = models.summarize(_CONFIG.value.model)
  print('\n'.join(lines))
  print(json.dumps(summary))


if __name__ == '__main__':
  cli.run(main, kind='pretraining')  # a UserError ends in one sentence on stderr and exit code 2
