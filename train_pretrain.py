"""Pretrains an autoencoder: python train_pretrain.py --config configs/mae.py"""
from absl import flags
from ml_collections import config_flags

from mil_jax import cli

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file, e.g. configs/mae.py or configs/fc.py:l1.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Where checkpoints, metrics and plots go '
                    '(default: runs/pretrain_<model>).')
flags.DEFINE_enum('type', None, ['fc', 'conv', 'mae'],
                  'Shortcut for --config configs/<type>.py (the study\'s flag).')


def main(argv: list[str]) -> None:
  del argv
  cli.fail('train_pretrain.py is not implemented yet.')


if __name__ == '__main__':
  cli.run(main)
