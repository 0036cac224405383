r"""Fully connected autoencoder pretraining on CIFAR-100 (the study's "FC").

Command:
  python train_pretrain.py --config configs/fc.py:l2 --workdir /tmp/fc_l2
  python train_pretrain.py --config configs/fc.py:l1 --workdir /tmp/fc_l1

Variants:
  l2 (default): squared error; 3072 -> 1536 -> 768 -> 384 -> ... -> 3072, 12,394,368 params.
  l1: the same model with the absolute error.
  runlocal: fake data, widths 64-32-16, a few seconds on a CPU ('l1,runlocal').

Expected runtime (100 epochs of batch 128): 70-75 minutes of training steps on a
  2-core CPU; under a minute on one H100 (docs/performance.md).
Expected result: not measured at 100 epochs. After 2 epochs on CIFAR-10 (README,
  Results): kNN .482 (l2), .474 (l1). The study: .235 (l2) / .245 (l1) top-1 linear +
  fine-tune on CIFAR-100.
"""
from __future__ import annotations

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Variants: 'l2' (default) or 'l1' (the loss), plus 'runlocal'."""
  args = common.parse_arg(arg, known=('l2', 'l1', 'runlocal'))
  if args.l1 and args.l2:
    raise ValueError("choose one of the variants 'l1' and 'l2', not both")

  config = ml_collections.ConfigDict()
  common.loop_config(config, batch_size=128, num_epochs=100, steps_per_dispatch=8)
  # On a CPU split into cores, one device: the large dots already use every
  # core, and the gradient all-reduce of 12.4 M parameters cost more than a
  # second device gained (docs/performance.md).
  config.speed = common.speed_config(cpu_devices=1)
  config.loss = 'l1' if args.l1 else 'l2'
  config.data = common.data_config()

  config.model = ml_collections.ConfigDict(dict(
      name='fc',
      hidden_dims=(1536, 768, 384),   # encoder widths; the last is the latent
      dtype='float32',                # compute dtype: 'float32' | 'bfloat16'
  ))

  config.optim = common.optim_config('adam', 1e-4, 'exponential',
                                     decay_rate=0.9)  # lr factor per epoch

  if args.runlocal:
    common.runlocal(config)
    config.model.hidden_dims = (64, 32, 16)
  return config
