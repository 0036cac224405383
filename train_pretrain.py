"""Pretrains an autoencoder on CIFAR-100 (or another configured source).

  python train_pretrain.py --config configs/mae.py
  python train_pretrain.py --config configs/fc.py:l1 --config.batch_size=256 --workdir runs/fc_l1
  python train_pretrain.py --type conv          # = --config configs/conv.py

Rerunning with the same --workdir resumes from its latest checkpoint.
"""
from absl import flags

from mil_jax import cli

_CONFIG, _WORKDIR, _OVERWRITE = cli.define_run_flags(
    None, 'Config file and variant, e.g. configs/mae.py or configs/fc.py:l1.',
    'Where checkpoints, metrics and plots go (default: runs/pretrain_<model>).')
_TYPE = flags.DEFINE_enum('type', None, ['fc', 'conv', 'mae', 'masked_unet'],
                          "Shortcut for --config configs/<type>.py (the study's flag).")


def main(argv: list[str]) -> None:
  config = _CONFIG.value
  if config is None:
    cli.fail('no config given; pass --config configs/<fc|conv|mae>.py or --type fc|conv|mae.')
  if _TYPE.value and _TYPE.value != config.model.name:
    cli.fail(f'--type {_TYPE.value} contradicts --config, which is a {config.model.name} config; '
             'drop one of them.')
  workdir = _WORKDIR.value or f'runs/pretrain_{config.model.name}'
  from mil_jax import pretrain  # noqa: PLC0415  (heavy: only once the flags are good)
  pretrain.train_and_evaluate(config, workdir, overwrite=_OVERWRITE.value)


if __name__ == '__main__':
  cli.run(main, kind='pretraining', type_picks_config=True)
