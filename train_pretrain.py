"""Pretrains an autoencoder on CIFAR-100 (or another configured source).

  python train_pretrain.py --config configs/mae.py
  python train_pretrain.py --config configs/fc.py:l1 --config.batch_size=256 --workdir runs/fc_l1
  python train_pretrain.py --type conv          # = --config configs/conv.py

Rerunning with the same --workdir resumes from its latest checkpoint.
"""
from absl import flags
from ml_collections import config_flags

from mil_jax import cli

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file and variant, e.g. configs/mae.py or configs/fc.py:l1.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Where checkpoints, metrics and plots go (default: runs/pretrain_<model>).')
flags.DEFINE_enum('type', None, ['fc', 'conv', 'mae'],
                  "Shortcut for --config configs/<type>.py (the study's flag).")
_OVERWRITE = flags.DEFINE_bool(
    'overwrite', False, 'Replace a run of a different config found in --workdir.')


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    cli.fail(f'unexpected arguments {argv[1:]}; flags are written --name=value.')
  config = _CONFIG.value
  if config is None:
    cli.fail('no config given; pass --config configs/<fc|conv|mae>.py or --type fc|conv|mae.')
  workdir = _WORKDIR.value or f'runs/pretrain_{config.model.name}'
  from mil_jax import pretrain  # noqa: PLC0415  (heavy: only once the flags are good)
  pretrain.train_and_evaluate(config, workdir, overwrite=_OVERWRITE.value)


if __name__ == '__main__':
  cli.run(main)
