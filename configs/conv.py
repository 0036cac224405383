r"""Convolutional autoencoder pretraining on CIFAR-100 ("Conv-192" / "Conv-256").

Command:
  python train_pretrain.py --config configs/conv.py:192 --workdir /tmp/conv192
  python train_pretrain.py --config configs/conv.py:256 --workdir /tmp/conv256
  python train_pretrain.py --config configs/conv.py:layers=5,factor=2,filters=8 \
      --workdir /tmp/conv_5_2_8

Variants:
  192 (default): 4 layers, factor 2, 6 start filters: 192 features, 49,347 params.
  256: 8 start filters: 256 features, 87,299 params.
  layers=L,factor=F,filters=C: a point of the study's size sweep (configs/sweep.py).
  runlocal: fake data, a few seconds on a CPU ('256,runlocal').

Expected runtime (100 epochs of batch 32): 21-22 (192) and 22-25 (256) minutes of
  training steps on a 2-core CPU, 70 and 65 s on one H100 or H200 (docs/performance.md).
Expected result: not measured at 100 epochs. After 2 epochs on CIFAR-10 (README,
  Results): kNN .358 (192), .367 (256). The study: .198 (192) / .214 (256) top-1
  linear + fine-tune on CIFAR-100.
Training settings (the study's schedule, and how to replay it): docs/usage.md.
"""
from __future__ import annotations

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Variants: '192' | '256' | 'layers=,factor=,filters=', plus 'runlocal'."""
  # filters=0 means "not given", so a preset and an explicit count can clash.
  args = common.parse_arg(arg, known=('192', '256', 'runlocal'), layers=4, factor=2, filters=0)
  if args['192'] and args['256']:
    raise ValueError("choose one of the variants '192' and '256', not both")
  if (args['192'] or args['256']) and args.filters:
    raise ValueError("the variants '192' and '256' fix the filters; drop filters=")
  filters = args.filters or (8 if args['256'] else 6)

  config = ml_collections.ConfigDict()
  common.loop_config(config, batch_size=32, num_epochs=100, steps_per_dispatch=16)
  config.loss = 'l2'
  config.data = common.data_config()

  config.model = ml_collections.ConfigDict(dict(
      name='conv',
      num_layers=args.layers,         # stride-2 convs per half; 32 / 2**layers is the latent side
      channel_factor=args.factor,     # channel multiplier per layer
      start_filters=filters,          # channels of the first conv
      dtype='float32',                # compute dtype: 'float32' | 'bfloat16'
  ))

  config.optim = common.optim_config('adam', 1e-4, 'cosine',
                                     cosine_steps=1562)  # torch CosineAnnealingLR T_max, in steps

  if args.runlocal:
    common.runlocal(config)
    config.optim.cosine_steps = 0     # the smoke run is far shorter than T_max
  return config
