"""Trains a classifier over a pretrained encoder (the study's classifier stage).

  python train_classifier.py --mode probing                      # linear head, frozen encoder
  python train_classifier.py --mode fine_tune --nofreeze         # MLP head, encoder trained too
  python train_classifier.py --mode knn --pretrained_path runs/pretrain_mae
  python train_classifier.py --mode fine_tune --nofreeze --from_scratch --type conv

The encoder's architecture comes from the checkpoint. Without --pretrained_path
the newest pretraining run under runs/ is used.
"""
from absl import flags

from mil_jax import cli

_CONFIG, _WORKDIR, _OVERWRITE = cli.define_run_flags(
    str(cli.CONFIG_DIR / 'classifier.py'),
    'Classifier config and variant, e.g. configs/classifier.py:seed.',
    'Where checkpoints, metrics and plots go '
    '(default: runs/classify_<mode>_<frozen|tuned|scratch>_<model>).')
_MODE = flags.DEFINE_string('mode', None, 'probing (linear head) | fine_tune (MLP head) | knn.')
_FREEZE = flags.DEFINE_bool('freeze', None, 'Keep the encoder fixed (--nofreeze trains it).')
_PRETRAINED = flags.DEFINE_string(
    'pretrained_path', None, 'A pretraining workdir or checkpoint (default: newest under runs/).')
_SCRATCH = flags.DEFINE_bool('from_scratch', None, 'A randomly initialized encoder (needs --type).')
_TYPE = flags.DEFINE_string(
    'type', None, 'fc | conv | mae[:variant]: the encoder for --from_scratch, or the '
    'architecture the checkpoint must have.')
_EPOCHS = flags.DEFINE_integer('num_epochs', None, 'Training epochs (the study: 40).')


def main(argv: list[str]) -> None:
  config = _CONFIG.value
  for flag, field in ((_MODE, 'mode'), (_FREEZE, 'freeze'), (_PRETRAINED, 'pretrained_path'),
                      (_SCRATCH, 'from_scratch'), (_TYPE, 'model_type'),
                      (_EPOCHS, 'num_epochs')):
    if flag.value is not None:
      config[field] = flag.value
  if config.from_scratch and not _FREEZE.present:
    config.freeze = False  # "no pretraining" trains its encoder unless told otherwise
  from mil_jax import classify  # noqa: PLC0415  (heavy: only once the flags are good)
  classify.train_and_evaluate(config, _WORKDIR.value, overwrite=_OVERWRITE.value)


if __name__ == '__main__':
  cli.run(main, kind='classifier')
